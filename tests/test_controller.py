"""The operator's pieces that need no cluster: skipping unchanged status writes, the pod watch's label selector."""

from __future__ import annotations

import kopf
from kubernetes import client

from amlfs.controller import handlers
from amlfs.controller.reconcile import Reconciler, Settings


class RecordingCustom:
    def __init__(self) -> None:
        self.patches: list[dict] = []

    def patch_namespaced_custom_object_status(self, group, version, namespace, plural, name, patch):
        self.patches.append(patch)
        return {"metadata": {"resourceVersion": str(100 + len(self.patches))}, "status": patch["status"]}


def test_an_unchanged_status_is_not_written_again():
    rec = Reconciler(client.ApiClient(), Settings())
    rec.custom = RecordingCustom()  # type: ignore[assignment]
    body = {"metadata": {"name": "s", "namespace": "ns", "resourceVersion": "7", "generation": 1}}
    status = {"phase": "Running", "epoch": 1, "start": None, "samples": [{"index": 0, "reward": None}]}
    conds = [("Ready", "False", "Running", "Running")]
    assert rec._patch_status(body, dict(status), conds) == "101"
    stored = rec.custom.patches[0]["status"]
    stored = {k: v for k, v in stored.items() if v is not None}  # a merge patch drops nulls
    body["status"], body["metadata"]["resourceVersion"] = stored, "101"
    assert rec._patch_status(body, dict(status), conds) == ""
    assert len(rec.custom.patches) == 1
    assert rec._patch_status(body, dict(status, epoch=2), conds) == "102"


def test_the_pod_watch_asks_the_server_for_trainer_pods_only():
    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    pods = kopf.Resource(group="", version="v1", plural="pods", kind="Pod", singular="pod")
    searches = kopf.Resource(group="amlfs.io", version="v1alpha1", plural="losssearches", kind="LossSearch")
    assert settings.watching.label_selectors.collect(pods) == ["amlfs.io/search"]
    assert settings.watching.label_selectors.collect(searches) == []
