"""amlfs: AM-LFS loss-function search — the pure search core, the local runner and the Kubernetes operator."""

__version__ = "0.1.0"
