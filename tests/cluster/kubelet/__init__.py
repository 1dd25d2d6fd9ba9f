"""A process "kubelet" for tests: runs the pods of one Node as local processes.

TEST HARNESS ONLY.  It talks to a real kube-apiserver (with the ``kubernetes``
client's ApiClient) the way a kubelet does:

* registers a Node with capacity/allocatable (cpu, memory, pods,
  ``nvidia.com/gpu``), Ready conditions, InternalIP 127.0.0.1 and a kubelet
  endpoint, and keeps its Lease in ``kube-node-lease`` fresh;
* binds unscheduled pods to itself when ``bind_pods=True`` (use that only
  when no kube-scheduler runs), after a simple resource-fit check;
* runs each pod's init containers (in order) and containers as local
  processes (one process group each): ``command``/``args`` with ``$(VAR)``
  expansion, ``env`` (literal, ``secretKeyRef``, ``configMapKeyRef``,
  ``fieldRef``, ``resourceFieldRef``), ``envFrom``, ``workingDir``; a
  container without ``command`` runs ``image_commands[image]`` (the image's
  entrypoint) followed by its ``args``;
* volumes: emptyDir, configMap, secret, downwardAPI, projected (incl. the
  ``kube-api-access-*`` service-account volume the ServiceAccount admission
  plugin adds: a pod-bound token from the TokenRequest API, refreshed at 80%
  of its lifetime, plus ``ca.crt`` and ``namespace``) and hostPath are
  written to ``<pod dir>/volumes/<name>``.  With ``mount_namespaces`` (the
  default as root) every container runs in a private mount namespace
  (``unshare --mount``) with its volumeMounts bind-mounted at their
  ``mountPath`` (read-only where Kubernetes makes them so), so the token is
  at ``/var/run/secrets/kubernetes.io/serviceaccount`` and
  ``load_incluster_config()`` works unchanged.  Missing mount points are
  created on the host (empty) and left there.  Every container also gets:

  - ``KUBERNETES_SERVICE_HOST=127.0.0.1``, ``KUBERNETES_SERVICE_PORT(_HTTPS)``
    = the apiserver's port (like a real pod's service env),
  - ``AMLFS_SA_DIR=<dir>`` when it mounts the token volume: where token,
    ca.crt and namespace are (the mountPath with mount namespaces, else the
    host directory; ``InClusterConfigLoader(token_filename=$AMLFS_SA_DIR/token,
    cert_filename=$AMLFS_SA_DIR/ca.crt).load_and_set()`` works in both),
  - without mount namespaces: ``KUBECONFIG=<pod dir>/sa-kubeconfig``
    (``tokenFile``), so clients that fall back from in-cluster config to a
    kubeconfig (``kubernetes.config.load_config()``, kopf's login) act as the
    pod's ServiceAccount,
  - without mount namespaces, ``AMLFS_POD_VOLUMES``: JSON
    ``{mountPath: host dir}`` of its mounts.

  The kubelet's own (admin) KUBECONFIG is never passed to pods.
* the termination message: each container instance gets a fresh file whose
  path is in ``AMLFS_TERMINATION_LOG`` (with mount namespaces
  ``/run/amlfs-pod/termination-log`` on a private tmpfs, also bind-mounted at
  ``terminationMessagePath`` when that file exists on the host; it is never
  created there); its content (max 4096 bytes) becomes
  ``state.terminated.message``; ``FallbackToLogsOnError`` uses the log tail;
* reports real status: ``Pending`` -> ``Running`` -> ``Succeeded``/``Failed``,
  container states with exit codes, ``restartCount``/``lastState``; honours
  ``restartPolicy`` (Always/OnFailure/Never, with a short restart back-off),
  ``activeDeadlineSeconds`` (``DeadlineExceeded``) and deletion (SIGTERM to
  the process group, the grace period, SIGKILL, final status, then a delete
  with grace 0);
* keeps each container's output in ``<pod dir>/logs/<container>/<n>.log``
  (``log_path()``/``logs()``), and serves it to ``kubectl logs`` via an HTTPS
  ``/containerLogs`` endpoint the apiserver proxies to;
* ``fail_pod()`` makes containers exit with a given code (a crash),
  ``evict_pod()`` kills a pod the way the kubelet's eviction manager does
  (``phase=Failed``, ``reason=Evicted``, DisruptionTarget condition).

Pod processes inherit the kubelet's environment (PATH, with the Python venv's
bin directory first, so ``python``/``amlfs-trainer`` resolve to the venv)
minus ``KUBECONFIG``, and die with the kubelet (``setpriv --pdeathsig``).
Pods share the host network (podIP = 127.0.0.1).  Not supported: probes
(containers are Ready once started), exec/attach/port-forward, Services,
sidecar init containers, PVCs, resource limits enforcement, image pulls.

Layout: ``core`` (ProcessKubelet: start/stop, the worker thread, the test
API) composes one mixin per concern: ``node`` (Node, Lease heartbeats),
``informer`` (pod list/watch), ``binding`` (only without a scheduler),
``lifecycle`` (the pod state machine, fail_pod/evict_pod), ``containers``
(processes), ``volumes`` (incl. ServiceAccount tokens), ``mounts`` (mount
namespaces), ``env`` (env and argv), ``logserver`` (/containerLogs); shared
pieces live in ``common``, ``rest`` (the API client) and ``runtime`` (pod
and container state).
"""

from __future__ import annotations

from .common import (
    GPU_RESOURCE,
    IN_POD_TERMINATION_LOG,
    MAX_TERMINATION_MESSAGE,
    SA_MOUNT_PATH,
    TERMINAL,
    ConfigError,
    now_micro,
    now_rfc3339,
    parse_quantity,
    parse_time,
)
from .core import ProcessKubelet
from .env import expand
from .rest import ApiError, Rest
from .runtime import Container, PodRuntime

__all__ = [
    "GPU_RESOURCE",
    "IN_POD_TERMINATION_LOG",
    "MAX_TERMINATION_MESSAGE",
    "SA_MOUNT_PATH",
    "TERMINAL",
    "ApiError",
    "ConfigError",
    "Container",
    "PodRuntime",
    "ProcessKubelet",
    "Rest",
    "expand",
    "now_micro",
    "now_rfc3339",
    "parse_quantity",
    "parse_time",
]
