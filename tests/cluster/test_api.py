"""The API machinery the operator relies on: garbage collection, CRDs with
CEL validation and a status subresource, RBAC for ServiceAccount tokens."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException


def test_gc_deletes_pod_owned_by_deleted_configmap(cluster, namespace):
    core = cluster.core()
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}, "data": {"a": "b"}})
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "owned",
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}],
        },
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "main",
                    "image": cluster.image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["sleep", "600"],
                }
            ],
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))
    cluster.wait_pod(namespace, "owned", phases=("Running",))
    pids = cluster.kubelet.pids() if cluster.kubelet else []
    core.delete_namespaced_config_map("owner", namespace)
    cluster.wait_gone(namespace, "owned", timeout=90)
    if pids:  # local: the pod's process is gone too
        deadline = time.monotonic() + 10
        still = pids
        while still and time.monotonic() < deadline:
            still = [p for p in still if p in cluster.kubelet.pids()]
            time.sleep(0.2)
        assert not still


@pytest.fixture
def widget_crd(cluster):
    """A namespaced CRD with a CEL rule and a status subresource (unique group)."""
    group = f"t{uuid.uuid4().hex[:8]}.amlfs.test"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["minTrials", "maxTrials"],
                                    "properties": {
                                        "minTrials": {"type": "integer"},
                                        "maxTrials": {"type": "integer"},
                                    },
                                    "x-kubernetes-validations": [
                                        {
                                            "rule": "self.minTrials <= self.maxTrials",
                                            "message": "minTrials must not exceed maxTrials",
                                        }
                                    ],
                                },
                                "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                            },
                        }
                    },
                }
            ],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(crd))
    cluster.wait_crd(f"widgets.{group}")
    # Discovery may lag the Established condition by a moment.
    custom = client.CustomObjectsApi(cluster.api_client)
    deadline = time.monotonic() + 30
    while True:
        try:
            custom.list_cluster_custom_object(group, "v1", "widgets")
            break
        except ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    yield group
    cluster.kubectl("delete", "crd", f"widgets.{group}", "--wait=false", check=False)


def test_crd_cel_rule_and_status_subresource(cluster, namespace, widget_crd):
    group = widget_crd
    custom = client.CustomObjectsApi(cluster.api_client)

    def widget(name, lo, hi):
        return {
            "apiVersion": f"{group}/v1",
            "kind": "Widget",
            "metadata": {"name": name},
            "spec": {"minTrials": lo, "maxTrials": hi},
        }

    with pytest.raises(ApiException) as err:
        custom.create_namespaced_custom_object(group, "v1", namespace, "widgets", widget("bad", 5, 2))
    assert err.value.status == 422
    assert "minTrials must not exceed maxTrials" in err.value.body

    # kubectl shows the same rejection.
    r = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(widget("bad2", 9, 1)), check=False)
    assert r.returncode != 0 and "minTrials must not exceed maxTrials" in r.stderr

    custom.create_namespaced_custom_object(group, "v1", namespace, "widgets", widget("good", 1, 4))

    # status is its own subresource: patching it leaves spec alone ...
    custom.patch_namespaced_custom_object_status(
        group, "v1", namespace, "widgets", "good", {"status": {"phase": "Running"}}
    )
    obj = custom.get_namespaced_custom_object(group, "v1", namespace, "widgets", "good")
    assert obj["status"] == {"phase": "Running"}
    assert obj["spec"] == {"minTrials": 1, "maxTrials": 4}
    # ... and writing status through the main resource is ignored.
    custom.patch_namespaced_custom_object(
        group, "v1", namespace, "widgets", "good", {"spec": {"maxTrials": 8}, "status": {"phase": "Hacked"}}
    )
    obj = custom.get_namespaced_custom_object(group, "v1", namespace, "widgets", "good")
    assert obj["spec"]["maxTrials"] == 8
    assert obj["status"] == {"phase": "Running"}


def _token_client(cluster, namespace: str, sa: str) -> client.ApiClient:
    core = cluster.core()
    tr = core.create_namespaced_service_account_token(sa, namespace, {"spec": {"expirationSeconds": 600}})
    cfg = client.Configuration()
    admin = cluster.api_client.configuration
    cfg.host = admin.host
    cfg.ssl_ca_cert = admin.ssl_ca_cert
    cfg.verify_ssl = admin.verify_ssl
    cfg.api_key = {"authorization": "Bearer " + tr.status.token}
    return client.ApiClient(cfg)


def test_rbac_service_account_token_gets_only_what_its_role_grants(cluster, namespace):
    core = cluster.core()
    rbac = client.RbacAuthorizationV1Api(cluster.api_client)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "narrow"}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "read-configmaps"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "narrow-reads-configmaps"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-configmaps"},
            "subjects": [{"kind": "ServiceAccount", "name": "narrow", "namespace": namespace}],
        },
    )
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "visible"}, "data": {"k": "v"}})

    sa_core = client.CoreV1Api(_token_client(cluster, namespace, "narrow"))
    # RBAC changes propagate through the authorizer's informer: allow a moment.
    deadline = time.monotonic() + 15
    while True:
        try:
            names = [c.metadata.name for c in sa_core.list_namespaced_config_map(namespace).items]
            break
        except ApiException as e:
            if e.status != 403 or time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    assert "visible" in names
    assert sa_core.read_namespaced_config_map("visible", namespace).data == {"k": "v"}

    denied = [
        lambda: sa_core.list_namespaced_secret(namespace),
        lambda: sa_core.create_namespaced_config_map(namespace, {"metadata": {"name": "nope"}}),
        lambda: sa_core.delete_namespaced_config_map("visible", namespace),
        lambda: sa_core.list_namespaced_config_map("default"),
        lambda: sa_core.list_namespaced_pod(namespace),
    ]
    for call in denied:
        with pytest.raises(ApiException) as err:
            call()
        assert err.value.status == 403

    # The same answers through SelfSubjectAccessReview.
    authz = client.AuthorizationV1Api(sa_core.api_client)

    def can(verb, resource):
        review = authz.create_self_subject_access_review(
            {"spec": {"resourceAttributes": {"namespace": namespace, "verb": verb, "resource": resource}}}
        )
        return review.status.allowed

    assert can("list", "configmaps") is True
    assert can("create", "configmaps") is False
    assert can("get", "secrets") is False
