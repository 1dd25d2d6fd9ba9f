"""A thin REST layer over the kubernetes client's ApiClient: raw JSON dicts in and out, as a kubelet speaks to the
apiserver, without the generated models (the kubelet needs merge-patches, watches and subresources)."""

from __future__ import annotations

import json
import os
import threading
from typing import Any


class ApiError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class Rest:
    def __init__(self, kubeconfig: str | os.PathLike):
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
        self.configuration = cfg
        self._local = threading.local()

    @property
    def api(self):
        from kubernetes import client

        if not hasattr(self._local, "api"):
            self._local.api = client.ApiClient(self.configuration)
        return self._local.api

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict | None = None,
        content_type: str = "application/json",
        timeout: float | None = 30,
        stream: bool = False,
    ):
        """One API call; returns the decoded JSON body (or, with stream=True,
        the open urllib3 response). Non-2xx answers raise ApiError."""
        api = self.api
        headers = {"Accept": "application/json", "Content-Type": content_type}
        req = api.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()) or None,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = api.call_api(*req, _request_timeout=timeout)
        raw = resp.response
        if not 200 <= resp.status <= 299:
            data = raw.data
            raw.release_conn()
            raise ApiError(resp.status, data.decode(errors="replace") if data else "")
        if stream:
            return raw
        try:
            data = raw.data
        finally:
            raw.release_conn()
        return json.loads(data) if data else {}

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def get_or_none(self, path: str):
        try:
            return self.get(path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def merge_patch(self, path: str, body: dict):
        return self.request("PATCH", path, body=body, content_type="application/merge-patch+json")


def _iter_lines(resp, chunk: int = 65536):
    buf = b""
    for data in resp.stream(chunk, decode_content=True):
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf
