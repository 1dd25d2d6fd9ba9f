"""Test harness: a real Kubernetes control plane, a process kubelet and
monitoring services, run as local processes (see README.md here)."""
