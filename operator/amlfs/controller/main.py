"""`amlfs-operator`: run the LossSearch operator (kopf), namespaced or cluster-wide.

Settings come from flags or environment variables, so a Deployment sets them as env:
  AMLFS_NAMESPACE           watch only this namespace (default: all)
  AMLFS_PUSHGATEWAY         Pushgateway URL the operator reads rewards from
  AMLFS_POD_PUSHGATEWAY     Pushgateway URL the trainer pods push to (default: AMLFS_PUSHGATEWAY)
  AMLFS_DEFAULT_STORAGE     s3://bucket/prefix for searches whose spec names no storage
  AMLFS_POD_S3_ENDPOINT     S3 endpoint given to pods when the spec names none
  AMLFS_POD_RUN_AS_USER     uid, gid and fsGroup of the trainer pods (default 1000); empty: leave them unset for
                            the platform to assign (OpenShift's restricted-v2); runAsNonRoot is set either way
  AMLFS_REWARD_TIMEOUT      seconds before falling back to result.json (default 30)
  AMLFS_GROUP_TTL           seconds a closed epoch's Pushgateway groups stay to be scraped (default 120)
  AMLFS_INTERVAL            seconds between passes when nothing happens (default 5)
  AMLFS_REWARD_POLL         seconds between reads of the Pushgateway while samples train, to end an epoch on its
                            rewards without waiting for the kubelet to report its pods' exits (default 0.5; 0: off)
  AMLFS_SETTLE              seconds progress (a pod started, a result came while others still train) waits for
                            its pass, so that a burst makes one pass and one status write (default 1); what may
                            need a decision (a pod ended, the epoch's last result, an edit) is seen at once
  AMLFS_PROGRESS            seconds between status writes that only show progress (samples started, or finished
                            while others train; default 5; 0: each at once); decisions are written at once
  AMLFS_WORKERS             passes running at once (default 16)
  AMLFS_METRICS_PORT        /metrics port (default 8080); /healthz on AMLFS_HEALTH_PORT (default 8081)
  AMLFS_LOG_FORMAT          plain or json
The operator's own S3 credentials/endpoint come from the standard AWS_* variables.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

import kopf
from prometheus_client import start_http_server

from amlfs.controller import handlers  # noqa: F401 (registers the handlers)
from amlfs.controller.reconcile import Settings


def _uid(text: str) -> int | None:
    """A uid >= 1, or None for an empty value (the platform assigns one)."""
    if not text.strip():
        return None
    try:
        uid = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a uid: {text!r}") from None
    if uid < 1:
        raise argparse.ArgumentTypeError(f"uid {uid}: trainer pods run as non-root")
    return uid


def parser() -> argparse.ArgumentParser:
    e = os.environ.get
    p = argparse.ArgumentParser(
        prog="amlfs-operator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--namespace", default=e("AMLFS_NAMESPACE", ""), help="watch one namespace (default: all)")
    p.add_argument("--pushgateway", default=e("AMLFS_PUSHGATEWAY", ""))
    p.add_argument("--pod-pushgateway", default=e("AMLFS_POD_PUSHGATEWAY", ""))
    p.add_argument("--default-storage", default=e("AMLFS_DEFAULT_STORAGE", ""))
    p.add_argument("--pod-s3-endpoint", default=e("AMLFS_POD_S3_ENDPOINT", ""))
    p.add_argument(
        "--pod-run-as-user",
        type=_uid,
        default=e("AMLFS_POD_RUN_AS_USER", "1000"),  # a string default goes through type= as well
        metavar="UID",
        help="uid/gid/fsGroup of trainer pods; '' leaves them to the platform (default 1000)",
    )
    p.add_argument("--reward-timeout", type=float, default=float(e("AMLFS_REWARD_TIMEOUT", "30")))
    p.add_argument("--group-ttl", type=float, default=float(e("AMLFS_GROUP_TTL", "120")))
    p.add_argument("--interval", type=float, default=float(e("AMLFS_INTERVAL", "5")))
    p.add_argument("--reward-poll", type=float, default=float(e("AMLFS_REWARD_POLL", "0.5")))
    p.add_argument("--settle", type=float, default=float(e("AMLFS_SETTLE", "1")))
    p.add_argument("--progress", type=float, default=float(e("AMLFS_PROGRESS", "5")))
    p.add_argument("--workers", type=int, default=int(e("AMLFS_WORKERS", "16")))
    p.add_argument("--metrics-port", type=int, default=int(e("AMLFS_METRICS_PORT", "8080")))
    p.add_argument("--health-port", type=int, default=int(e("AMLFS_HEALTH_PORT", "8081")))
    p.add_argument("--log-format", choices=["plain", "json"], default=e("AMLFS_LOG_FORMAT", "plain"))
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    kopf.configure(
        verbose=args.verbose,
        quiet=not args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN,
    )
    logging.getLogger("amlfs").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    settings = Settings(
        pushgateway=args.pushgateway,
        pod_pushgateway=args.pod_pushgateway,
        default_storage=args.default_storage,
        pod_s3_endpoint=args.pod_s3_endpoint,
        reward_timeout=args.reward_timeout,
        group_ttl=args.group_ttl,
        run_as_user=args.pod_run_as_user,
        interval=args.interval,
        workers=max(1, args.workers),
        reward_poll=max(0.0, args.reward_poll),
        settle=max(0.0, args.settle),
        progress=max(0.0, args.progress),
    )
    if args.metrics_port:
        start_http_server(args.metrics_port)
    asyncio.run(
        kopf.operator(
            clusterwide=not args.namespace,
            namespaces=[args.namespace] if args.namespace else [],
            standalone=True,
            liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
            memo=kopf.Memo(config=settings),  # the startup handler makes the clients from it (handlers.py)
        )
    )


if __name__ == "__main__":
    main()
