"""The Kubernetes face of amlfs: a kopf operator for `LossSearch` resources (thin shell over amlfs.core)."""
