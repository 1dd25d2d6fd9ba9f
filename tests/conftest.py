"""Shared fixtures. Services are real processes started here and stopped at the end of the session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.s3 import S3Server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point this process's storage layer (boto3) at the test S3 server."""
    from amlfs import storage

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    storage._clients.clear()
    return s3_server


# Fixtures that start real services: a test that uses one belongs to the `cluster` lane.
_SERVICE_FIXTURES = {"s3_server", "s3_env"}
_CLUSTER_DIR = Path(__file__).parent / "cluster"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        in_cluster_dir = _CLUSTER_DIR in Path(item.path).parents
        if in_cluster_dir or _SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)
