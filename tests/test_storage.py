"""The storage layer against the local filesystem and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from amlfs import storage


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.cluster)])
def root(request, tmp_path) -> str:
    if request.param == "file":
        return f"file://{tmp_path}/store"
    server = request.getfixturevalue("s3_env")
    return f"s3://{server.bucket}/t-{os.urandom(4).hex()}"


def test_round_trip_list_copy_delete(root, tmp_path):
    data = os.urandom(300_000)
    storage.write_bytes(f"{root}/a/x.bin", data)
    assert storage.exists(f"{root}/a/x.bin") and not storage.exists(f"{root}/a/y.bin")
    assert storage.read_bytes(f"{root}/a/x.bin") == data
    storage.copy(f"{root}/a/x.bin", f"{root}/b/x.bin")
    assert storage.read_bytes(f"{root}/b/x.bin") == data
    local = tmp_path / "dl" / "x.bin"
    storage.download_file(f"{root}/b/x.bin", local)
    assert storage.sha256_file(local) == hashlib.sha256(data).hexdigest()
    storage.upload_file(local, f"{root}/c/d/x.bin")
    assert storage.list_prefix(root) == [f"{root}/a/x.bin", f"{root}/b/x.bin", f"{root}/c/d/x.bin"]
    dest = storage.download_prefix(f"{root}/c", tmp_path / "mirror")
    assert (dest / "d" / "x.bin").read_bytes() == data
    with pytest.raises(storage.NotFound):
        storage.read_bytes(f"{root}/missing")
    assert storage.delete_prefix(root) == 3
    assert storage.list_prefix(root) == []


def test_append_jsonl_is_idempotent(root):
    uri = f"{root}/history.jsonl"
    assert storage.append_jsonl(uri, {"epoch": 0, "r": 1})
    assert storage.append_jsonl(uri, {"epoch": 1, "r": 2})
    assert not storage.append_jsonl(uri, {"epoch": 1, "r": 99})
    lines = storage.read_bytes(uri).decode().splitlines()
    assert lines == ['{"epoch": 0, "r": 1}', '{"epoch": 1, "r": 2}']


def test_multipart_upload_and_server_side_copy(s3_env, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * 1024 * 1024 + 17))
    uri = f"s3://{s3_env.bucket}/mp/big.bin"
    storage.upload_file(big, uri)
    head = s3_env.client().head_object(Bucket=s3_env.bucket, Key="mp/big.bin")
    assert "-" in head["ETag"]  # multipart ETags are "<md5>-<parts>"
    storage.copy(uri, f"s3://{s3_env.bucket}/mp/copy.bin")
    back = tmp_path / "back.bin"
    storage.download_file(f"s3://{s3_env.bucket}/mp/copy.bin", back)
    assert storage.sha256_file(back) == storage.sha256_file(big)


def test_local_writes_are_atomic(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    storage.write_bytes(str(target), b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        storage.write_bytes(str(target), b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left behind


def test_uri_parsing():
    assert storage.parse("s3://b/k/x").key == "k/x"
    assert str(storage.parse("/tmp/x")) == "file:///tmp/x"
    with pytest.raises(ValueError, match="unsupported scheme"):
        storage.parse("gs://b/k")
    with pytest.raises(ValueError, match="missing bucket"):
        storage.parse("s3:///k")
    assert Path(storage.parse("file://rel/x").key).is_absolute()


def test_download_prefix_fetches_in_parallel_and_keeps_cached_files(root, tmp_path, monkeypatch):
    files = {f"part-{i // 5}/f{i:02d}.bin": os.urandom(1000 + i) for i in range(20)}
    for rel, data in files.items():
        storage.write_bytes(f"{root}/ds/{rel}", data)
    dest = tmp_path / "cache"
    kept = dest / "part-0" / "f00.bin"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"x" * len(files["part-0/f00.bin"]))  # same size: treated as already cached
    stale = dest / "part-0" / "f01.bin"
    stale.write_bytes(b"short")  # different size: fetched again

    real, lock, active, peak = storage.download_file, threading.Lock(), [0], [0]

    def tracking(uri: str, path: Path) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        try:
            real(uri, path)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(storage, "download_file", tracking)
    storage.download_prefix(f"{root}/ds", dest, workers=4)
    assert peak[0] > 1  # objects were fetched concurrently
    assert kept.read_bytes() == b"x" * len(files["part-0/f00.bin"])
    for rel, data in files.items():
        if rel != "part-0/f00.bin":
            assert (dest / rel).read_bytes() == data, rel
    assert not list(dest.rglob("*.tmp"))


# --- the S3 client chosen per endpoint ------------------------------------------

CLIENTS = [
    # endpoint, AMLFS_S3_ADDRESSING, AMLFS_S3_CHECKSUMS, addressing, checksums, presigned URL of s3://bkt/k
    ("", "", "", "auto", "when_supported", "https://bkt.s3.amazonaws.com/k"),
    (
        "https://s3.eu-west-1.amazonaws.com",
        "",
        "",
        "virtual",
        "when_supported",
        "https://bkt.s3.eu-west-1.amazonaws.com/k",
    ),
    ("http://127.0.0.1:8333", "", "", "path", "when_required", "http://127.0.0.1:8333/bkt/k"),
    (
        "https://minio.example.org",
        "virtual",
        "when_supported",
        "virtual",
        "when_supported",
        "https://bkt.minio.example.org/k",
    ),
    ("", "path", "when_required", "path", "when_required", "https://s3.amazonaws.com/bkt/k"),
]


@pytest.mark.parametrize("endpoint,addressing_env,checksums_env,addressing,checksums,url", CLIENTS)
def test_client_config_per_endpoint(monkeypatch, endpoint, addressing_env, checksums_env, addressing, checksums, url):
    for name, value in (("AMLFS_S3_ADDRESSING", addressing_env), ("AMLFS_S3_CHECKSUMS", checksums_env)):
        monkeypatch.setenv(name, value) if value else monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    storage._clients.clear()
    client = storage.s3_client(endpoint)
    cfg = client.meta.config
    assert cfg.s3["addressing_style"] == addressing
    assert cfg.request_checksum_calculation == checksums and cfg.response_checksum_validation == checksums
    # the request the client actually builds
    assert client.generate_presigned_url("get_object", Params={"Bucket": "bkt", "Key": "k"}).split("?")[0] == url
    storage._clients.clear()


def test_bad_client_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("AMLFS_S3_CHECKSUMS", "always")
    with pytest.raises(storage.ConfigError, match=r"^AMLFS_S3_CHECKSUMS: 'always' is not one of .*; set one"):
        storage.s3_client("http://127.0.0.1:1")


# --- what a failure means ---------------------------------------------------------------------------------


def client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Get"
    )


@pytest.mark.parametrize(
    "exc,kind",
    [
        (client_error("NoSuchKey", 404), storage.NotFound),
        (client_error("404", 404), storage.NotFound),
        (client_error("AccessDenied", 403), storage.Rejected),
        (client_error("NoSuchBucket", 404), storage.Rejected),
        (client_error("InternalError", 500), storage.StorageError),
        (client_error("ServiceUnavailable", 503), storage.StorageError),
        (client_error("SlowDown", 503), storage.StorageError),
        (client_error("TooManyRequests", 429), storage.StorageError),
        (client_error("RequestTimeout", 400), storage.StorageError),
    ],
)
def test_failures_are_classified(exc, kind):
    def fail() -> None:
        raise exc

    with pytest.raises(storage.StorageError) as info:
        storage._s3_call(fail)
    assert type(info.value) is kind


def test_a_refused_connection_is_transient(monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    storage._clients.clear()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    with pytest.raises(storage.StorageError) as info:
        storage.read_bytes("s3://bkt/k")
    assert type(info.value) is storage.StorageError and "Could not connect" in str(info.value)
    storage._clients.clear()
