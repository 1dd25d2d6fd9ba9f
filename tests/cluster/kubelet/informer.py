"""The pod informer: a list-then-watch of the node's pods into a local cache (uid -> pod) that the worker
reconciles, as client-go's informer does for a kubelet (a real kubelet asks only for `spec.nodeName=<node>`; with
``bind_pods`` this one needs the unbound pods too, and watches all); relists after watch errors (e.g. 410 Gone)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from .common import log
from .rest import Rest, _iter_lines


class InformerMixin:
    """Fills ``_cache`` from the apiserver and wakes the worker on every change."""

    # set by ProcessKubelet.__init__
    rest: Rest
    synced: threading.Event
    _cache: dict[str, dict]
    _cache_lock: threading.Lock
    _wake: threading.Event
    _stop: threading.Event
    _watch_resp: Any
    node_name: str
    bind_pods: bool

    def _informer_loop(self) -> None:
        rv = None
        # each kubelet parsing every pod event of the cluster would cost the API server and this process a
        # multiple of what the node's own pods do
        only = {} if self.bind_pods else {"fieldSelector": f"spec.nodeName={self.node_name}"}
        while not self._stop.is_set():
            try:
                if rv is None:
                    lst = self.rest.get("/api/v1/pods", query=only)
                    with self._cache_lock:
                        self._cache = {p["metadata"]["uid"]: p for p in lst.get("items", [])}
                    rv = lst["metadata"]["resourceVersion"]
                    self.synced.set()
                    self._wake.set()
                resp = self.rest.request(
                    "GET",
                    "/api/v1/pods",
                    stream=True,
                    timeout=None,
                    query={
                        **only,
                        "watch": "true",
                        "resourceVersion": rv,
                        "allowWatchBookmarks": "true",
                        "timeoutSeconds": "20",
                    },
                )
                self._watch_resp = resp
                try:
                    for line in _iter_lines(resp):
                        evt = json.loads(line)
                        typ, obj = evt.get("type"), evt.get("object", {})
                        if typ == "ERROR":
                            rv = None  # e.g. 410 Gone: relist
                            break
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if typ == "BOOKMARK":
                            continue
                        uid = obj["metadata"]["uid"]
                        with self._cache_lock:
                            if typ == "DELETED":
                                self._cache.pop(uid, None)
                            else:
                                self._cache[uid] = obj
                        self._wake.set()
                finally:
                    self._watch_resp = None
                    resp.release_conn()
            except Exception as e:
                if self._stop.is_set():
                    return
                log.warning("pod watch failed (%s); relisting", e)
                rv = None
                time.sleep(0.5)
