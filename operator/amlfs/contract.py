"""The trainer contract: what one `amlfs-trainer` invocation is given, how that is spelled on a command line and
in AMLFS_* environment variables, what it writes, how it exits and where it pushes its results.

Everything that crosses the boundary between a shell (the local runner, the operator's pods) and the trainer is
defined here, once, without torch: the shells build an `Invocation` and spell it with `to_argv` or `to_env`; the
trainer reads it back with `parser` + `from_args` (flags first, then the environment, then the defaults), or with
`from_env` alone (a mapping of AMLFS_* strings, e.g. a message to a long-lived worker).

One invocation trains a *pack*: k >= 1 members of the same epoch, all from the same start checkpoint. Each member
is (sample index, theta, output prefix[, attempt]) and writes its own `CHECKPOINT` and then `RESULT` under its
output prefix, exactly as a sample trained alone. A pack of one is spelled with the single-sample flags
(`--sample`, `--theta`, `--output`; AMLFS_SAMPLE, AMLFS_THETA, AMLFS_OUTPUT), a larger pack with `--members` /
AMLFS_MEMBERS, a JSON list of {"sample", "theta", "output"[, "attempt"]}; the trainer accepts either spelling
for any k.

Exit codes: `EXIT_OK` (every member's result.json was written, with or without a reward), `EXIT_CONFIG` (invalid
configuration or input; never retried; nothing was written), `EXIT_TRANSIENT` (a storage failure; worth a
retry; members whose result.json exists are complete). Anything else (a crash, an OOM kill) is a failure.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

EXIT_OK, EXIT_CONFIG, EXIT_TRANSIENT = 0, 2, 3

CHECKPOINT = "checkpoint.pt"  # under a member's output prefix: model, optimizer, scheduler, RNG state
RESULT = "result.json"  # written last: its presence marks the member as complete
STATUS_OK, STATUS_NO_REWARD = "ok", "no-reward"  # result.json "status"

PUSH_JOB = "amlfs-trainer"  # Pushgateway job of the trainers' results
GROUPING_LABELS = ("namespace", "search", "epoch", "sample")  # one Pushgateway group per member

PACK_MODES = ("auto", "sequential", "vectorized")


class ConfigError(Exception):
    """Invalid configuration or input, anywhere in the trainer: exit code `EXIT_CONFIG`, never retried.

    `str()` is one line naming the field and the fix. The trainer's specific errors (data, model, usage)
    subclass it, so the trainer catches this one base.
    """


def grouping_key(namespace: str, search: str, epoch: int, sample: int) -> dict[str, str]:
    """The Pushgateway grouping key of one member's result (the job is `PUSH_JOB`)."""
    return dict(zip(GROUPING_LABELS, (namespace, search, str(epoch), str(sample)), strict=True))


@dataclass(frozen=True)
class Member:
    """One sample of a pack. An empty theta means the search space's identity (plain cross-entropy).
    `attempt` None: the invocation's attempt."""

    sample: int
    theta: tuple[float, ...]
    output: str
    attempt: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sample": self.sample, "theta": list(self.theta), "output": self.output}
        if self.attempt is not None:
            out["attempt"] = self.attempt
        return out


@dataclass(frozen=True)
class Invocation:
    """The arguments of one trainer invocation. `spec` is the LossSearch spec as JSON text, or @FILE."""

    spec: str
    epoch: int
    members: tuple[Member, ...]
    search: str = "search"
    namespace: str = "default"
    attempt: int = 0
    start: str = ""  # start checkpoint URI; empty at epoch 0
    start_sha256: str = ""
    device: str = "auto"  # auto, cpu, cuda, cuda:N; an explicit cuda fails (EXIT_CONFIG) when CUDA is unusable
    pack_mode: str = "auto"  # auto: vectorized on CUDA for k > 1, else sequential
    threads: int = 0  # torch CPU threads; 0: the process's CPU quota (cgroup cpu.max, affinity)
    cudnn_benchmark: bool = False
    metrics_port: int = 0  # serve /metrics while training; 0: off
    pushgateway: str = ""  # push each member's result here
    cache_dir: str = ""  # dataset cache directory

    def member_attempt(self, m: Member) -> int:
        return self.attempt if m.attempt is None else m.attempt

    @property
    def samples(self) -> list[int]:
        return [m.sample for m in self.members]


# --- the spelling table ----------------------------------------------------------------------------------

_INT, _STR, _BOOL = "int", "str", "bool"


@dataclass(frozen=True)
class _Field:
    attr: str  # Invocation attribute ("" for the single-member spellings)
    flag: str
    env: str
    kind: str
    help: str


FIELDS: tuple[_Field, ...] = (
    _Field("spec", "--spec", "AMLFS_SPEC", _STR, "LossSearch spec as JSON, or @FILE"),
    _Field("search", "--search", "AMLFS_SEARCH", _STR, "search name"),
    _Field("namespace", "--namespace", "AMLFS_NAMESPACE", _STR, "namespace of the search"),
    _Field("epoch", "--epoch", "AMLFS_EPOCH", _INT, "0-based epoch"),
    _Field("attempt", "--attempt", "AMLFS_ATTEMPT", _INT, "attempt number (members may name their own)"),
    _Field("members", "--members", "AMLFS_MEMBERS", _STR, 'the pack: JSON list of {"sample", "theta", "output"}'),
    _Field("", "--sample", "AMLFS_SAMPLE", _INT, "a pack of one: the sample index"),
    _Field("", "--theta", "AMLFS_THETA", _STR, "a pack of one: theta as a JSON list (default: identity)"),
    _Field("", "--output", "AMLFS_OUTPUT", _STR, "a pack of one: output prefix URI for checkpoint.pt, result.json"),
    _Field("start", "--start", "AMLFS_START", _STR, "start checkpoint URI; empty at epoch 0"),
    _Field("start_sha256", "--start-sha256", "AMLFS_START_SHA256", _STR, "expected sha256 of --start"),
    _Field("device", "--device", "AMLFS_DEVICE", _STR, "auto, cpu, cuda or cuda:N"),
    _Field("pack_mode", "--pack-mode", "AMLFS_PACK_MODE", _STR, "auto, sequential or vectorized"),
    _Field("threads", "--threads", "AMLFS_THREADS", _INT, "torch CPU threads (0: the CPU quota)"),
    _Field("cudnn_benchmark", "--cudnn-benchmark", "AMLFS_CUDNN_BENCHMARK", _BOOL, "cudnn.benchmark (0 or 1)"),
    _Field("metrics_port", "--metrics-port", "AMLFS_METRICS_PORT", _INT, "serve /metrics (0: off)"),
    _Field("pushgateway", "--pushgateway", "AMLFS_PUSHGATEWAY", _STR, "Pushgateway URL for the results"),
    _Field("cache_dir", "--cache-dir", "AMLFS_CACHE_DIR", _STR, "dataset cache directory"),
)
ENV_NAMES: frozenset[str] = frozenset(f.env for f in FIELDS)
# settings a user may give a trainer pod through its pod template; the rest of the contract is the operator's
TUNABLE_ENV: frozenset[str] = frozenset({"AMLFS_DEVICE", "AMLFS_PACK_MODE", "AMLFS_THREADS", "AMLFS_CUDNN_BENCHMARK"})
_BY_FLAG = {f.flag: f for f in FIELDS}
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Invocation)}


def _dest(f: _Field) -> str:
    return f.flag[2:].replace("-", "_")


def _spell(value: Any, kind: str) -> str:
    if kind == _BOOL:
        return "1" if value else "0"
    return str(value)


def _pairs(inv: Invocation) -> list[tuple[_Field, str]]:
    """(field, text) for every value that differs from its default; the members in their spelling."""
    out: list[tuple[_Field, str]] = []
    for f in FIELDS:
        if not f.attr:
            continue
        if f.attr == "members":
            if len(inv.members) == 1 and inv.members[0].attempt is None:
                m = inv.members[0]
                out.append((_BY_FLAG["--sample"], str(m.sample)))
                if m.theta:
                    out.append((_BY_FLAG["--theta"], json.dumps(list(m.theta))))
                out.append((_BY_FLAG["--output"], m.output))
            else:
                out.append((f, json.dumps([m.to_json() for m in inv.members], separators=(",", ":"))))
            continue
        value = getattr(inv, f.attr)
        if f.attr in ("spec", "epoch") or value != _DEFAULTS[f.attr]:
            out.append((f, _spell(value, f.kind)))
    return out


def to_argv(inv: Invocation) -> list[str]:
    """The invocation as `amlfs-trainer` flags (values equal to their defaults are left out)."""
    argv: list[str] = []
    for f, text in _pairs(inv):
        argv += [f.flag, text]
    return argv


def to_env(inv: Invocation) -> dict[str, str]:
    """The invocation as AMLFS_* environment variables (values equal to their defaults are left out)."""
    return {f.env: text for f, text in _pairs(inv)}


def without_contract_env(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without the contract's variables, so that a child process sees only what it is given."""
    return {k: v for k, v in environ.items() if k not in ENV_NAMES}


# --- reading it back ---------------------------------------------------------------------------------------


def parser(environ: Mapping[str, str], prog: str = "amlfs-trainer", description: str = "") -> argparse.ArgumentParser:
    """The trainer's argument parser; every flag defaults to its AMLFS_* variable in `environ`."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in FIELDS:
        p.add_argument(f.flag, dest=_dest(f), default=environ.get(f.env), help=f"{f.help} (env {f.env})")
    return p


def from_env(environ: Mapping[str, str]) -> Invocation:
    """The invocation spelled by AMLFS_* variables alone. ConfigError (one line) for malformed values."""
    return from_args(parser(environ).parse_args([]))


def from_argv(argv: Sequence[str], environ: Mapping[str, str]) -> Invocation:
    return from_args(parser(environ).parse_args(list(argv)))


def from_args(ns: argparse.Namespace) -> Invocation:
    """The invocation from parsed flags (whose defaults are the environment). ConfigError for bad values."""
    raw: dict[str, str | None] = {f.flag: getattr(ns, _dest(f)) for f in FIELDS}
    if not raw["--spec"]:
        raise ConfigError("--spec: missing; pass the LossSearch spec as JSON or @FILE (or set AMLFS_SPEC)")
    values: dict[str, Any] = {}
    for f in FIELDS:
        text = raw[f.flag]
        if not f.attr or f.attr == "members" or text is None or text == "":
            continue
        values[f.attr] = _read(text, f)
    if "epoch" not in values:
        raise ConfigError("--epoch: missing; pass the 0-based epoch (or set AMLFS_EPOCH)")
    single = [flag for flag in ("--sample", "--theta", "--output") if raw[flag]]
    if raw["--members"]:
        if single:
            raise ConfigError(
                f"--members: given together with {', '.join(single)}; pass the pack either as --members or as "
                "--sample/--theta/--output"
            )
        members = _members(raw["--members"])
    else:
        if not raw["--output"]:
            raise ConfigError(
                "--output: missing; pass the prefix URI for checkpoint.pt and result.json (or --members for a pack)"
            )
        if not raw["--sample"]:
            raise ConfigError("--sample: missing; pass the sample index (or --members for a pack)")
        sample = _read(raw["--sample"], _BY_FLAG["--sample"])
        theta = _theta(raw["--theta"] or "", "--theta")
        members = (Member(sample, theta, raw["--output"]),)
    if values.get("pack_mode", "auto") not in PACK_MODES:
        raise ConfigError(f"--pack-mode: expected one of {', '.join(PACK_MODES)}, got {values['pack_mode']!r}")
    return Invocation(members=members, **values)


def _read(text: str, f: _Field) -> Any:
    if f.kind == _INT:
        try:
            n = int(text)
        except ValueError:
            raise ConfigError(f"{f.flag}: expected an integer, got {text!r}") from None
        if n < 0:
            raise ConfigError(f"{f.flag}: must be >= 0, got {n}")
        return n
    if f.kind == _BOOL:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{f.flag}: expected 0 or 1, got {text!r}")
    return text


def _theta(text: str, where: str) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        value = json.loads(text)
    except ValueError:
        raise ConfigError(f"{where}: expected a JSON list of numbers, got {text[:60]!r}") from None
    return _numbers(value, where, text)


def _numbers(value: Any, where: str, text: str = "") -> tuple[float, ...]:
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int | float) for v in value):
        raise ConfigError(f"{where}: expected a JSON list of numbers, got {(text or json.dumps(value))[:60]!r}")
    out = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in out):
        raise ConfigError(f"{where}: theta must be finite numbers")
    return out


def _members(text: str) -> tuple[Member, ...]:
    try:
        value = json.loads(text)
    except ValueError:
        raise ConfigError(
            f'--members: expected a JSON list of {{"sample", "theta", "output"}}, got {text[:60]!r}'
        ) from None
    if not isinstance(value, list) or not value:
        raise ConfigError('--members: expected a non-empty JSON list of {"sample", "theta", "output"}')
    out: list[Member] = []
    for i, m in enumerate(value):
        where = f"--members[{i}]"
        if not isinstance(m, dict):
            raise ConfigError(f'{where}: expected {{"sample", "theta", "output"}}, got {json.dumps(m)[:60]}')
        unknown = sorted(set(m) - {"sample", "theta", "output", "attempt"})
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown field; expected sample, theta, output, attempt")
        for key in ("sample", "attempt"):
            v = m.get(key, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{where}.{key}: expected an integer >= 0, got {v!r}")
        if "sample" not in m:
            raise ConfigError(f"{where}.sample: missing")
        output = m.get("output")
        if not isinstance(output, str) or not output:
            raise ConfigError(f"{where}.output: missing; give the member's output prefix URI")
        theta = _numbers(m.get("theta") or [], f"{where}.theta")
        out.append(Member(m["sample"], theta, output, m.get("attempt")))
    for key in ("sample", "output"):
        seen = [getattr(m, key) for m in out]
        dup = next((v for v in seen if seen.count(v) > 1), None)
        if dup is not None:
            raise ConfigError(f"--members: {key} {dup!r} appears twice; every member needs its own {key}")
    return tuple(out)
