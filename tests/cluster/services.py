"""Real monitoring services for tests: Prometheus and the Pushgateway.

Both come from Debian's packages (``apt-get install -y prometheus
prometheus-pushgateway``); they run as local processes on free 127.0.0.1
ports in a temp dir and are torn down with their process group.

Prometheus scrapes (every second):

* the Pushgateway (``honor_labels: true``, so pushed ``job``/``instance``
  labels are kept),
* any ``/metrics`` endpoint a test registers at run time with
  ``prometheus.add_target("127.0.0.1:8000", labels={...})`` (file_sd_configs;
  Prometheus picks the file up within about a second).

S3 (SeaweedFS) is ``tests/support/s3.py``, which the unit tests use too;
``start_s3`` here only finds and calls it, so both start the same server.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .controlplane import _kill_group, die_with_parent, free_port

PROMETHEUS_BIN = os.environ.get("AMLFS_PROMETHEUS_BIN", "prometheus")
PUSHGATEWAY_BIN = os.environ.get("AMLFS_PUSHGATEWAY_BIN", "prometheus-pushgateway")


class ServiceError(RuntimeError):
    pass


def _which(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if not path:
        raise ServiceError(
            f"{binary} not found: install Debian's package ({package}): "
            f"apt-get install -y --no-install-recommends {package}"
        )
    return path


def _http(url: str, data: bytes | None = None, method: str | None = None, timeout: float = 5) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@dataclass
class _Service:
    workdir: Path | None = None

    def __post_init__(self) -> None:
        self._own = self.workdir is None
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"amlfs-{self.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.popen: subprocess.Popen | None = None
        self.log = self.workdir / f"{self.name}.log"

    name = "service"

    def _spawn(self, argv: list[str]) -> None:
        with open(self.log, "ab") as fh:
            self.popen = subprocess.Popen(
                die_with_parent(argv),
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,
            )

    def _wait_http(self, url: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen is not None and self.popen.poll() is not None:
                raise ServiceError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError):
                if _http(url, timeout=1)[0] == 200:
                    return
            time.sleep(0.1)
        raise ServiceError(f"{self.name} not ready at {url} after {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.popen is not None:
            _kill_group(self.popen, grace=5)
            self.popen = None
        if self._own and not os.environ.get("AMLFS_KEEP_CLUSTER_DIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class Pushgateway(_Service):
    name = "pushgateway"
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pod_url(self) -> str:
        """The URL pods push to: the same one here (the process kubelet's pods share this host's network)."""
        return self.url

    def start(self) -> Pushgateway:
        binary = _which(PUSHGATEWAY_BIN, "prometheus-pushgateway")
        self.port = self.port or free_port()
        # in memory only: the Debian build persists to /var/lib/prometheus/pushgateway.data by default, which
        # every Pushgateway on the machine would share and reload
        self._spawn([binary, f"--web.listen-address={self.address}", "--log.level=warn", "--persistence.file="])
        self._wait_http(self.url + "/-/ready")
        return self

    def push(self, job: str, text: str, grouping: dict[str, str] | None = None) -> None:
        """PUT metrics in the text exposition format under job (+ grouping labels)."""
        path = "/metrics/job/" + urllib.parse.quote(job, safe="")
        for k, v in (grouping or {}).items():
            path += f"/{urllib.parse.quote(k, safe='')}/{urllib.parse.quote(v, safe='')}"
        if not text.endswith("\n"):
            text += "\n"
        code, body = _http(self.url + path, data=text.encode(), method="PUT")
        if code not in (200, 202):
            raise ServiceError(f"pushgateway push failed: HTTP {code}: {body[:300]!r}")


@dataclass
class Prometheus(_Service):
    name = "prometheus"
    port: int = 0
    pushgateway: str | None = None  # "127.0.0.1:port"
    scrape_interval: str = "1s"
    extra_targets: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        binary = _which(PROMETHEUS_BIN, "prometheus")
        self.port = self.port or free_port()
        self.sd_dir = self.workdir / "targets"
        self.sd_dir.mkdir(exist_ok=True)
        for i, t in enumerate(self.extra_targets):
            self.add_target(t, name=f"extra{i}")
        self._write_config()
        self._spawn(
            [
                binary,
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                "--storage.tsdb.retention.time=1d",
                "--log.level=warn",
            ]
        )
        self._wait_http(self.url + "/-/ready", timeout=60)
        return self

    def _write_config(self) -> None:
        # JSON is YAML; Prometheus reads it as its YAML config.
        scrape = [
            {
                "job_name": "registered",
                "file_sd_configs": [{"files": [str(self.sd_dir / "*.json")], "refresh_interval": "1s"}],
            }
        ]
        if self.pushgateway:
            scrape.insert(
                0,
                {
                    "job_name": "pushgateway",
                    "honor_labels": True,
                    "static_configs": [{"targets": [self.pushgateway]}],
                },
            )
        cfg = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "scrape_configs": scrape,
        }
        (self.workdir / "prometheus.yml").write_text(json.dumps(cfg, indent=2))

    def add_target(
        self,
        address: str,
        labels: dict[str, str] | None = None,
        name: str | None = None,
        metrics_path: str | None = None,
    ) -> Path:
        """Scrape ``http://address/metrics`` (job "registered") from now on.
        Returns the file_sd file; ``remove_target(path)`` deletes it."""
        lbl = dict(labels or {})
        if metrics_path:
            lbl["__metrics_path__"] = metrics_path
        name = name or address.replace(":", "_").replace("/", "_")
        path = self.sd_dir / f"{name}.json"
        tmp = path.with_suffix(".tmp")  # not *.json: never read half-written
        tmp.write_text(json.dumps([{"targets": [address], "labels": lbl}]))
        os.replace(tmp, path)
        return path

    def remove_target(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def query(self, promql: str) -> list[dict]:
        """Instant query; returns the result vector (list of {metric, value})."""
        code, body = _http(self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        if code != 200:
            raise ServiceError(f"prometheus query {promql!r} failed: HTTP {code}: {body[:300]!r}")
        data = json.loads(body)
        return data["data"]["result"]

    def wait_for(self, promql: str, timeout: float = 30, predicate=None) -> list[dict]:
        """Poll ``query`` until it returns a non-empty result (and ``predicate``
        holds, if given)."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if result and (predicate is None or predicate(result)):
                return result
            time.sleep(0.25)
        raise TimeoutError(f"prometheus: {promql!r} gave {result!r} after {timeout}s")

    def targets(self) -> list[dict]:
        code, body = _http(self.url + "/api/v1/targets")
        return json.loads(body)["data"]["activeTargets"] if code == 200 else []


@dataclass
class Monitoring:
    """Pushgateway + a Prometheus that scrapes it."""

    workdir: Path | None = None

    def start(self) -> Monitoring:
        base = self.workdir or Path(tempfile.mkdtemp(prefix="amlfs-monitoring-"))
        self._own = self.workdir is None
        self.workdir = base
        self.pushgateway = Pushgateway(workdir=base / "pushgateway").start()
        try:
            self.prometheus = Prometheus(workdir=base / "prometheus", pushgateway=self.pushgateway.address).start()
        except BaseException:
            self.pushgateway.stop()
            raise
        return self

    def stop(self) -> None:
        for svc in ("prometheus", "pushgateway"):
            s = getattr(self, svc, None)
            if s is not None:
                with contextlib.suppress(Exception):
                    s.stop()
        if self._own and not os.environ.get("AMLFS_KEEP_CLUSTER_DIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Monitoring:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_s3(tmpdir: Path):
    """Start SeaweedFS S3 with ``tests/support/s3.py``: imported as ``tests.support.s3`` or, when only ``tests/``
    (not the repository root) is on sys.path, loaded from its file."""
    try:
        from tests.support.s3 import start_s3 as _start  # type: ignore
    except ImportError:
        import importlib.util
        import sys

        path = Path(__file__).resolve().parents[1] / "support" / "s3.py"
        if not path.exists():
            raise ServiceError("tests/support/s3.py (start_s3) not found") from None
        spec = importlib.util.spec_from_file_location("amlfs_support_s3", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        _start = mod.start_s3
    return _start(tmpdir)
