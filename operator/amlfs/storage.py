"""Object storage behind one small API: `s3://bucket/key` (boto3) and `file://` or plain local paths.

Writes are atomic: local files go to a temporary name and are renamed into place; S3 objects only appear
once the (multipart) upload completes. Credentials for S3 come from the standard AWS environment variables;
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (or the `endpoint` argument) select an S3-compatible server.
AWS gets boto3's defaults (virtual-hosted addressing, checksums on every request that supports them); other
endpoints get path-style addressing and checksums only where S3 requires them, which older S3-compatible servers
understand. `AMLFS_S3_ADDRESSING` (auto, virtual, path) and `AMLFS_S3_CHECKSUMS` (when_supported, when_required)
override either choice. boto3 is imported lazily so that the search core never needs it.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from amlfs.contract import ConfigError

MULTIPART_THRESHOLD = 64 * 1024 * 1024


class StorageError(Exception):
    """A transient or environmental storage failure (worth a retry)."""


class NotFound(StorageError):
    """The object does not exist."""


class Rejected(StorageError):
    """The request was refused for a reason a retry does not change: access denied, no such bucket, a bad
    request, no credentials."""


@dataclass(frozen=True)
class Location:
    scheme: str  # "s3" or "file"
    bucket: str
    key: str  # s3: object key; file: absolute path

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.scheme == "s3" else f"file://{self.key}"


def parse(uri: str) -> Location:
    if uri.startswith("s3://"):
        u = urlparse(uri)
        if not u.netloc:
            raise ValueError(f"{uri!r}: missing bucket; use s3://bucket/key")
        return Location("s3", u.netloc, u.path.lstrip("/"))
    if uri.startswith("file://"):
        return Location("file", "", str(Path(uri[len("file://") :]).absolute()))
    if "://" in uri:
        raise ValueError(f"{uri!r}: unsupported scheme; use s3://bucket/key, file:///path or a path")
    return Location("file", "", str(Path(uri).absolute()))


def join(uri: str, *parts: str) -> str:
    base = uri.rstrip("/")
    return "/".join([base, *(p.strip("/") for p in parts if p)])


def normalize(uri: str) -> str:
    """A canonical URI string: plain paths become file:// URIs."""
    return str(parse(uri))


# --- S3 client -----------------------------------------------------------------------------------

_clients: dict[tuple[str, ...], Any] = {}
ADDRESSING = ("auto", "virtual", "path")
CHECKSUMS = ("when_supported", "when_required")
_RETRYABLE_4XX = (408, 429)  # request timeout, too many requests
_RETRYABLE_CODES = ("RequestTimeout", "SlowDown", "Throttling", "ThrottlingException")


_clients_lock = threading.Lock()  # boto3's default session is not safe to make clients from several threads at once
# the endpoint of the S3 calls of the current context (`using_endpoint`); None: the environment's
_ENDPOINT: contextvars.ContextVar[str | None] = contextvars.ContextVar("amlfs_s3_endpoint", default=None)


def _endpoint() -> str:
    return _ENDPOINT.get() or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


@contextlib.contextmanager
def using_endpoint(url: str) -> Iterator[None]:
    """Send the S3 calls made in this context to `url` (empty: the environment's endpoint), with the process's
    credentials. Threads started for the work inherit it only through `contextvars.copy_context()`."""
    token = _ENDPOINT.set(url or None)
    try:
        yield
    finally:
        _ENDPOINT.reset(token)


def is_aws(endpoint: str) -> bool:
    """No endpoint (boto3 resolves AWS's) or an AWS host name."""
    if not endpoint:
        return True
    host = urlparse(endpoint).hostname or ""
    return any(host == d or host.endswith(f".{d}") for d in ("amazonaws.com", "amazonaws.com.cn"))


def _choice(variable: str, allowed: tuple[str, ...], default: str) -> str:
    value = os.environ.get(variable, "").strip().lower()
    if not value:
        return default
    if value not in allowed:
        raise ConfigError(f"{variable}: {value!r} is not one of {', '.join(allowed)}; set one of them or unset it")
    return value


def client_settings(endpoint: str) -> tuple[str, str]:
    """(addressing style, checksum mode) for an endpoint. AWS: virtual-hosted style (boto3's `auto` without an
    endpoint; an explicit AWS endpoint needs `virtual`, as `auto` means path style there) and boto3's checksums. An
    S3-compatible server: path style (it may not serve bucket subdomains) and checksums only where required
    (servers older than S3's default integrity checks reject the new checksum headers)."""
    aws = is_aws(endpoint)
    addressing = _choice("AMLFS_S3_ADDRESSING", ADDRESSING, ("virtual" if endpoint else "auto") if aws else "path")
    checksums = _choice("AMLFS_S3_CHECKSUMS", CHECKSUMS, "when_supported" if aws else "when_required")
    return addressing, checksums


def s3_client(endpoint: str | None = None) -> Any:
    """The S3 client for an endpoint (default: the context's, else the environment's), one per endpoint and
    settings, shared by all threads."""
    ep = endpoint if endpoint is not None else _endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    addressing, checksums = client_settings(ep)
    key = (ep, region, addressing, checksums)
    with _clients_lock:
        if key not in _clients:
            _clients[key] = _new_client(ep, region, addressing, checksums)
        return _clients[key]


def _new_client(ep: str, region: str, addressing: str, checksums: str) -> Any:
    import boto3
    from botocore.config import Config

    cfg = Config(
        retries={"max_attempts": 5, "mode": "standard"},
        s3={"addressing_style": addressing},
        request_checksum_calculation=checksums,
        response_checksum_validation=checksums,
        connect_timeout=10,
        read_timeout=120,
        max_pool_connections=64,  # the operator's passes share one client from many threads
    )
    # a session of its own: boto3's default session would keep the credentials it resolved first for the life of
    # the process, whatever the environment says when a later client is made
    return boto3.session.Session().client("s3", endpoint_url=ep or None, region_name=region, config=cfg)


def _client_error(exc: Any) -> StorageError:
    """NotFound for a missing object, Rejected for another refusal a retry cannot fix, else a StorageError
    (server errors, throttling: transient)."""
    code = exc.response.get("Error", {}).get("Code", "")
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if code in ("404", "NoSuchKey", "NotFound"):
        return NotFound(str(exc))
    if 400 <= status < 500 and status not in _RETRYABLE_4XX and code not in _RETRYABLE_CODES:
        return Rejected(f"S3 error {code}: {exc}")
    return StorageError(f"S3 error {code}: {exc}")


def _s3_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
    )

    try:
        return fn(*args, **kwargs)
    except ClientError as exc:
        raise _client_error(exc) from None
    except (NoCredentialsError, PartialCredentialsError, ParamValidationError) as exc:
        raise Rejected(f"S3 error: {exc}") from None
    except (BotoCoreError, Boto3Error) as exc:  # connection refused or reset, timeouts, retries exhausted
        raise StorageError(f"S3 error: {exc}") from None


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)


# --- the API -------------------------------------------------------------------------------------


def exists(uri: str) -> bool:
    loc = parse(uri)
    if loc.scheme == "file":
        return Path(loc.key).exists()
    try:
        _s3_call(s3_client().head_object, Bucket=loc.bucket, Key=loc.key)
        return True
    except NotFound:
        return False


def read_bytes(uri: str) -> bytes:
    loc = parse(uri)
    if loc.scheme == "file":
        try:
            return Path(loc.key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{uri}: no such file") from None
        except OSError as exc:
            raise StorageError(f"{uri}: {exc.strerror}") from None
    body = _s3_call(s3_client().get_object, Bucket=loc.bucket, Key=loc.key)["Body"]
    return body.read()


def write_bytes(uri: str, data: bytes) -> None:
    loc = parse(uri)
    if loc.scheme == "file":
        _atomic_local(Path(loc.key), lambda f: f.write(data))
        return
    _s3_call(s3_client().put_object, Bucket=loc.bucket, Key=loc.key, Body=data)


def upload_file(path: Path, uri: str) -> None:
    loc = parse(uri)
    if loc.scheme == "file":
        dest = Path(loc.key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
        return
    _s3_call(s3_client().upload_file, str(path), loc.bucket, loc.key, Config=_transfer_config())


def download_file(uri: str, path: Path) -> None:
    loc = parse(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    if loc.scheme == "file":
        try:
            shutil.copyfile(loc.key, path)
        except FileNotFoundError:
            raise NotFound(f"{uri}: no such file") from None
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _s3_call(s3_client().download_file, loc.bucket, loc.key, str(tmp), Config=_transfer_config())
    os.replace(tmp, path)


def copy(src: str, dst: str) -> None:
    """Copy an object. S3 to S3 is a server-side copy: no bytes pass through this process."""
    s, d = parse(src), parse(dst)
    if s.scheme == "s3" and d.scheme == "s3":
        _s3_call(s3_client().copy, {"Bucket": s.bucket, "Key": s.key}, d.bucket, d.key, Config=_transfer_config())
    elif s.scheme == "file":
        upload_file(Path(s.key), dst)
    else:
        download_file(src, Path(d.key))


def list_sizes(uri: str) -> list[tuple[str, int]]:
    """(URI, size in bytes) of every object below a prefix (recursively), sorted."""
    loc = parse(uri)
    if loc.scheme == "file":
        root = Path(loc.key)
        if not root.exists():
            return []
        return sorted(
            (f"file://{p}", p.stat().st_size) for p in root.rglob("*") if p.is_file() and not p.name.endswith(".tmp")
        )
    prefix = loc.key.rstrip("/") + "/" if loc.key else ""
    out: list[tuple[str, int]] = []
    paginator = s3_client().get_paginator("list_objects_v2")
    pages = _s3_call(lambda: list(paginator.paginate(Bucket=loc.bucket, Prefix=prefix)))
    for page in pages:
        out.extend((f"s3://{loc.bucket}/{o['Key']}", int(o["Size"])) for o in page.get("Contents", []))
    return sorted(out)


def list_prefix(uri: str) -> list[str]:
    """URIs of every object below a prefix (recursively), sorted."""
    return [u for u, _ in list_sizes(uri)]


def download_prefix(uri: str, dest: Path, workers: int = 8) -> Path:
    """Copy every object under a prefix into dest, keeping relative paths, `workers` objects at a time (a
    dataset of many small objects is bound by round trips, not bandwidth). Files already there with the same
    size are kept (a dataset cache shared by the samples of a node); each file appears atomically. An empty or
    missing prefix is NotFound."""
    base = parse(uri).key.rstrip("/")
    objects = list_sizes(uri)
    if not objects:
        raise NotFound(f"{uri}: no objects below this prefix")
    todo = []
    for obj, size in objects:
        target = dest / parse(obj).key[len(base) :].lstrip("/")
        if not (target.exists() and target.stat().st_size == size):
            todo.append((obj, target))
    if len(todo) <= 1 or workers <= 1:
        for obj, target in todo:
            download_file(obj, target)
        return dest
    with ThreadPoolExecutor(max_workers=workers) as pool:  # boto3 clients are thread-safe
        ctx = contextvars.copy_context
        for future in [pool.submit(ctx().run, download_file, obj, target) for obj, target in todo]:
            future.result()  # the first failure propagates (after the others finish)
    return dest


def delete_prefix(uri: str) -> int:
    objs = list_prefix(uri)
    for obj in objs:
        loc = parse(obj)
        if loc.scheme == "file":
            Path(loc.key).unlink(missing_ok=True)
        else:
            _s3_call(s3_client().delete_object, Bucket=loc.bucket, Key=loc.key)
    return len(objs)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def append_jsonl(uri: str, record: dict[str, Any], key: str = "epoch") -> bool:
    """Append a record to a JSON-lines object unless one with the same `key` is there (idempotent).

    S3 objects cannot be appended to, so this rewrites the object; only one writer (the controller) uses it.
    """
    try:
        lines = read_bytes(uri).decode().splitlines()
    except NotFound:
        lines = []
    if any(json.loads(line).get(key) == record.get(key) for line in lines if line.strip()):
        return False
    lines.append(json.dumps(record, sort_keys=True))
    write_bytes(uri, ("\n".join(lines) + "\n").encode())
    return True


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_local(dest: Path, write: Any) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
