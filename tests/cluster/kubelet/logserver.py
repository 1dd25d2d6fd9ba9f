"""The kubelet's HTTPS endpoint (self-signed, 127.0.0.1): ``/containerLogs`` (tail, limit, previous, follow), which
the apiserver proxies ``kubectl logs`` to, and ``/healthz``."""

from __future__ import annotations

import http.server
import ssl
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

from .common import log


class LogServerMixin:
    """Serves container log files from ``<pod dir>/logs``."""

    # set by ProcessKubelet.__init__
    workdir: Path
    node_name: str
    _stop: threading.Event
    _server: http.server.ThreadingHTTPServer | None

    def _start_log_server(self) -> None:
        kubelet = self
        certdir = self.workdir / "pki"
        certdir.mkdir(exist_ok=True)
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "kubelet.key",
                "-out",
                "kubelet.crt",
                "-days",
                "3650",
                "-subj",
                f"/CN={self.node_name}",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ],
            cwd=certdir,
            check=True,
            capture_output=True,
        )

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # quiet
                log.debug("kubelet http: " + fmt, *args)

            def do_GET(self):
                url = urllib.parse.urlparse(self.path)
                q = urllib.parse.parse_qs(url.query)
                parts = url.path.strip("/").split("/")
                if parts == ["healthz"]:
                    return self._send(200, b"ok")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    return self._send(404, b"not found")
                _, ns, name, cname = parts
                try:
                    rt = kubelet._runtime_by_name(ns, name)
                    c = next(x for x in rt.all_containers() if x.name == cname)
                except (KeyError, StopIteration):
                    return self._send(404, f"container {cname} of pod {ns}/{name} not found".encode())
                previous = q.get("previous", ["false"])[0] == "true"
                path = kubelet.log_path(ns, name, cname, previous=previous)
                data = path.read_bytes() if path.exists() else b""
                if "tailLines" in q:
                    n = int(q["tailLines"][0])
                    lines = data.splitlines(keepends=True)
                    data = b"".join(lines[-n:]) if n > 0 else b""
                if "limitBytes" in q:
                    data = data[: int(q["limitBytes"][0])]
                if q.get("follow", ["false"])[0] != "true" or previous:
                    return self._send(200, data)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                pos = path.stat().st_size if path.exists() else 0
                try:
                    self._chunk(data)
                    popen = c.popen
                    while not kubelet._stop.is_set():
                        more = b""
                        if path.exists():
                            with open(path, "rb") as fh:
                                fh.seek(pos)
                                more = fh.read()
                        pos += len(more)
                        if more:
                            self._chunk(more)
                        elif popen is None or popen.poll() is not None:
                            break
                        else:
                            time.sleep(0.2)
                    self._chunk(b"")
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass

            def _chunk(self, b: bytes):
                self.wfile.write(f"{len(b):x}\r\n".encode() + b + b"\r\n")
                self.wfile.flush()

            def _send(self, code: int, body: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certdir / "kubelet.crt", certdir / "kubelet.key")
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._server = server
        self.log_port = server.server_address[1]
        t = threading.Thread(target=server.serve_forever, name="kubelet-logs", daemon=True)
        t.start()
