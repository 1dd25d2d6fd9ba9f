"""kopf handlers: one daemon per LossSearch runs reconciliation passes; pod and resource events wake it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes import client, config

from amlfs import storage
from amlfs.controller import metrics
from amlfs.controller.pods import LABEL_SEARCH
from amlfs.controller.reconcile import GROUP, PLURAL, VERSION, Reconciler, Settings

log = logging.getLogger("amlfs.operator")
_wakeups: dict[tuple[str, str], threading.Event] = {}
_state: dict[str, Any] = {}


def configure(settings: Settings, api: client.ApiClient | None = None) -> None:
    """Set the operator's settings (called by the entrypoint before kopf starts)."""
    _state["settings"] = settings
    _state["api"] = api


def _reconciler() -> Reconciler:
    if "reconciler" not in _state:
        api = _state.get("api")
        if api is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api = client.ApiClient()
        _state["reconciler"] = Reconciler(api, _state.get("settings") or Settings())
    return _state["reconciler"]


def _wake(namespace: str | None, name: str | None) -> None:
    ev = _wakeups.get((namespace or "", name or ""))
    if ev is not None:
        ev.set()


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="amlfs.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="amlfs.io", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    _reconciler()


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10.0)
def search_daemon(stopped: kopf.DaemonStopped, namespace: str | None, name: str, **_: Any) -> None:
    """Level-based loop: reconcile, then sleep until woken by an event or the interval passes."""
    assert namespace is not None  # LossSearch is namespaced
    ev = _wakeups.setdefault((namespace, name), threading.Event())
    rec = _reconciler()
    try:
        while not stopped:
            ev.clear()
            try:
                delay = rec.reconcile(namespace, name)
            except Exception:  # one bad pass must not kill the daemon; the next one re-derives everything
                log.exception("reconcile of %s/%s failed", namespace, name)
                delay = rec.settings.interval
            if delay > 0:
                ev.wait(delay)
    finally:
        _wakeups.pop((namespace, name), None)


@kopf.on.event(GROUP, VERSION, PLURAL)
def search_changed(namespace: str | None, name: str, **_: Any) -> None:
    _wake(namespace, name)


@kopf.on.event("", "v1", "pods", labels={LABEL_SEARCH: kopf.PRESENT})
def pod_changed(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    _wake(namespace, labels.get(LABEL_SEARCH))


@kopf.on.delete(GROUP, VERSION, PLURAL, when=lambda spec, **_: bool((spec.get("storage") or {}).get("deleteOnDelete")))
def delete_storage(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
    """Only for specs with storage.deleteOnDelete: remove the search's objects (pods go by ownerReference)."""
    assert namespace is not None
    from amlfs.spec import LossSearchSpec

    rec = _reconciler()
    spec = LossSearchSpec.model_validate(dict(body.get("spec") or {}))
    base = spec.storage.uri or rec.settings.default_storage
    if base:
        n = storage.delete_prefix(storage.join(base, namespace, name))
        log.info("deleted %d objects of %s/%s", n, namespace, name)
    metrics.forget(namespace, name, spec)
