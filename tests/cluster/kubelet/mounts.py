"""Mount namespaces: each container runs under ``unshare --mount`` with its volumeMounts bind-mounted at their
mountPath (read-only where Kubernetes makes them so) and the termination-message file on a private tmpfs, so in-pod
code finds the ServiceAccount token and config at the standard paths. Needs root: probed when the kubelet is created
unless ``mount_namespaces`` is given."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import IN_POD_TERMINATION_LOG, ConfigError
from .runtime import Container, PodRuntime


class MountsMixin:
    """Builds the ``unshare`` wrapper around a container's argv."""

    # set by ProcessKubelet.__init__
    workdir: Path

    def _container_mounts(self, rt: PodRuntime, c: Container) -> list[tuple[Path, str, bool]]:
        """(host source, mountPath, read-only) for c's volumeMounts."""
        out = []
        for m in c.spec.get("volumeMounts") or []:
            src = rt.volumes.get(m["name"])
            if src is None:
                raise ConfigError(f"volumeMount {m['name']}: no such volume")
            if m.get("subPath"):
                src = src / m["subPath"]
                if not src.exists():
                    src.mkdir(parents=True)
            ro = bool(m.get("readOnly")) or m["name"] in rt.read_only
            out.append((src, m["mountPath"], ro))
        return out

    def _keep_visible(self) -> list[Path]:
        """Host directories pods must see whatever they mount: the Python environment and base
        interpreter, this checkout (editable installs import from it) and the kubelet's own pod dirs."""
        paths = {
            Path(sys.prefix).resolve(),
            Path(sys.base_prefix).resolve(),
            Path(__file__).resolve().parents[3],  # the checkout: tests/cluster/kubelet/<this file>
            self.workdir.resolve(),
        }
        # outermost first, and no path inside another kept one
        out: list[Path] = []
        for p in sorted(paths, key=lambda p: len(p.parts)):
            if p.is_dir() and not any(_is_within(p, o) for o in out):
                out.append(p)
        return out

    def _mount_wrapper(self, c: Container, mounts: list[tuple[Path, str, bool]], argv: list[str]) -> list[str]:
        """argv run in a private mount namespace (``unshare --mount``; needs
        root) with the volumes bind-mounted at their mountPath and the
        termination-message file at ``IN_POD_TERMINATION_LOG`` (on a private
        tmpfs) and at ``terminationMessagePath`` when that path exists on the
        host (it is never created there: host programs may test for
        /dev/termination-log). Sources are opened before anything is mounted
        and bound through /proc/self/fd, so a volume mounted over /tmp cannot
        hide the others. Missing mount points are created (on the host, when
        not inside another volume) and left there."""
        q = shlex.quote
        lines = ["set -e"]
        ordered = sorted(mounts, key=lambda m: len(Path(m[1]).parts))  # parents first
        fds = {}
        for i, (src, _dst, _ro) in enumerate(ordered):
            fds[i] = 10 + i
            lines.append(f"exec {fds[i]}<{q(str(src))}")
        term_fd = 10 + len(ordered)
        lines.append(f"exec {term_fd}<>{q(str(c.term_file))}")
        # Host paths the pod's programs live in (the venv, the checkout, the pod dirs) stay visible even when a
        # volume is mounted over one of their ancestors (an emptyDir at /tmp with the checkout under /tmp).
        keep = [k for k in self._keep_visible() if any(_is_within(k, Path(dst)) for _s, dst, _ro in ordered)]
        keep_fds = {k: term_fd + 1 + j for j, k in enumerate(keep)}
        for k, fd in keep_fds.items():
            lines.append(f"exec {fd}<{q(str(k))}")
        for i, (src, dst, ro) in enumerate(ordered):
            if src.is_dir():
                lines.append(f"[ -e {q(dst)} ] || mkdir -p {q(dst)}")
            else:
                lines.append(f"[ -e {q(dst)} ] || {{ mkdir -p {q(str(Path(dst).parent))}; : > {q(dst)}; }}")
            lines.append(f"mount --no-canonicalize --bind /proc/self/fd/{fds[i]} {q(dst)}")
            if ro:
                lines.append(f"mount -o remount,bind,ro {q(dst)}")
        for k, fd in keep_fds.items():
            lines.append(f"mkdir -p {q(str(k))}")
            lines.append(f"mount --no-canonicalize --bind /proc/self/fd/{fd} {q(str(k))}")
        term_dir = str(Path(IN_POD_TERMINATION_LOG).parent)
        lines += [
            f"mkdir -p {q(term_dir)}",
            f"mount -t tmpfs -o size=1m,mode=0755 amlfs-pod {q(term_dir)}",
            f": > {q(IN_POD_TERMINATION_LOG)}",
            f"mount --no-canonicalize --bind /proc/self/fd/{term_fd} {q(IN_POD_TERMINATION_LOG)}",
        ]
        term_path = c.spec.get("terminationMessagePath") or "/dev/termination-log"
        lines.append(
            f"if [ -f {q(term_path)} ]; then mount --no-canonicalize --bind /proc/self/fd/{term_fd} {q(term_path)}; fi"
        )
        lines += [f"exec {fd}<&-" for fd in [*fds.values(), term_fd, *keep_fds.values()]]
        lines.append('exec "$@"')
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/bash",
            "-c",
            "\n".join(lines),
            "amlfs-pod",
            *argv,
        ]


def _mount_namespaces_work() -> bool:
    """Can we give a pod a private mount namespace with bind mounts?"""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("mount"):
        return False
    probe = tempfile.mkdtemp(prefix="amlfs-mntprobe-")
    try:
        r = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--", "mount", "--bind", probe, probe],
            capture_output=True,
            timeout=10,
        )
        return r.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        os.rmdir(probe)


def _is_within(path: Path, ancestor: Path) -> bool:
    """path is ancestor or lies below it."""
    try:
        path.relative_to(ancestor)
        return True
    except ValueError:
        return False
