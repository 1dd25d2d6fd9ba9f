"""Prometheus + Pushgateway run for real (Debian packages here; the images of tests/e2e/manifests on kind)."""

from __future__ import annotations

import time
import uuid

import pytest
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, start_http_server

from .controlplane import free_port
from .incluster import ClusterPrometheus


def test_pushed_metric_is_queryable_in_prometheus(monitoring):
    job = f"amlfs_trial_{uuid.uuid4().hex[:6]}"
    registry = CollectorRegistry()
    g = Gauge("amlfs_trial_accuracy", "validation accuracy", ["trial"], registry=registry)
    g.labels(trial="t1").set(0.93)
    push_to_gateway(monitoring.pushgateway.address, job=job, registry=registry)
    result = monitoring.prometheus.wait_for(f'amlfs_trial_accuracy{{job="{job}"}}', timeout=30)
    assert result[0]["metric"]["trial"] == "t1"  # honor_labels kept the pushed labels
    assert float(result[0]["value"][1]) == 0.93


def test_registered_metrics_endpoint_is_scraped(monitoring):
    if isinstance(monitoring.prometheus, ClusterPrometheus):
        pytest.skip("the in-cluster Prometheus discovers pods; it scrapes no endpoint of this host")
    registry = CollectorRegistry()
    g = Gauge("amlfs_operator_active_trials", "trials running", registry=registry)
    g.set(3)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        path = monitoring.prometheus.add_target(f"127.0.0.1:{port}", labels={"component": "operator"})
        result = monitoring.prometheus.wait_for('amlfs_operator_active_trials{component="operator"}', timeout=30)
        assert float(result[0]["value"][1]) == 3
        monitoring.prometheus.remove_target(path)
    finally:
        server.shutdown()
        thread.join(timeout=5)


def test_a_trainers_pushed_result_names_its_output_prefix_to_the_operator(monitoring):
    """The trainer's push and the operator's read of the real Pushgateway agree on which output a result was
    written to (what lets an epoch close before the kubelet reports the pods)."""
    from amlfs.controller.rewards import PushgatewayReader
    from amlfs_trainer.metrics import push_result

    search = f"s{uuid.uuid4().hex[:6]}"
    output = f"s3://bucket/ns/{search}/uid-1/epoch-0002/sample-01"
    result = {"status": "ok", "reward": 0.8, "sha256": "ab" * 32, "valLoss": 0.4, "output": output}
    before = time.time()
    push_result(monitoring.pushgateway.url, "ns", search, 2, 1, result)
    got = PushgatewayReader(monitoring.pushgateway.url).results("ns", search)[(2, 1)]
    assert (got.reward, got.sha256, got.val_loss, got.output) == (0.8, "ab" * 32, 0.4, output)
    assert got.pushed_at is not None and before - 1 <= got.pushed_at <= time.time() + 1  # the handoff's start
    assert got.wrote(output) and not got.wrote(f"s3://bucket/ns/{search}/epoch-0002/sample-01")
