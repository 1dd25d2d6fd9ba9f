"""`amlfs`: the user's command line.

amlfs run [FILE.yaml]       run a whole search on this machine (default: the bundled digits-quick example)
amlfs validate FILE.yaml    check a LossSearch manifest
amlfs example [NAME]        print a bundled example manifest
amlfs crd                   print the LossSearch CustomResourceDefinition (generated from the spec models)
amlfs export ROOT [-o FILE]  the final loss of a finished search, for one's own training loop
amlfs report ROOT [--png FILE] [--json]  a search's summary (what `amlfs run` prints) from its storage alone
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from amlfs import storage, stored
from amlfs.contract import EXIT_CONFIG
from amlfs.spec import SpecError, load_manifest

DEFAULT_EXAMPLE = "digits-quick"


def example_path(name: str) -> Path:
    p = resources.files("amlfs") / "examples" / f"{name}.yaml"
    with resources.as_file(p) as path:
        if not path.exists():
            available = sorted(f.name.removesuffix(".yaml") for f in (resources.files("amlfs") / "examples").iterdir())
            raise SpecError(f"example {name!r}: not bundled; use one of {available}")
        return Path(path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="amlfs", description="AM-LFS loss-function search.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a search on this machine")
    r.add_argument("file", nargs="?", help=f"LossSearch manifest (default: bundled {DEFAULT_EXAMPLE})")
    r.add_argument("--workdir", default="./runs", help="where status, checkpoints and reports go (default ./runs)")
    r.add_argument(
        "--parallel", type=int, default=0, help="trainer workers, each one invocation at a time (default: GPUs, or 2)"
    )
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="trainer device")
    r.add_argument("--threads", type=int, default=0, help="torch threads per trainer (default: cores/parallel)")
    r.add_argument(
        "--pack",
        type=int,
        default=1,
        help="samples of an epoch per trainer invocation (default 1; on a GPU a pack trains vectorised)",
    )
    r.add_argument(
        "--fresh-processes",
        action="store_true",
        help="one trainer process per invocation instead of long-lived workers (pays the start-up every time)",
    )
    r.add_argument("--no-report", action="store_true", help="skip the PNG report")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    v = sub.add_parser("validate", help="validate a manifest")
    v.add_argument("file")
    e = sub.add_parser("example", help="print a bundled example manifest")
    e.add_argument("name", nargs="?", default=DEFAULT_EXAMPLE)
    sub.add_parser("crd", help="print the LossSearch CRD (YAML)")
    x = sub.add_parser(
        "export",
        help="write a finished search's loss as a small JSON file (load it with amlfs_trainer.exported_loss)",
    )
    x.add_argument("root", help="the search's storage root: runs/NAME, file:///..., or status.storageRoot (s3://...)")
    x.add_argument("-o", "--output", default="-", help="file to write (default: standard output)")
    rp = sub.add_parser("report", help="a search's summary table (and PNG) from its storage alone, finished or not")
    rp.add_argument("root", help="the search's storage root: runs/NAME, file:///..., or status.storageRoot (s3://...)")
    rp.add_argument("--png", metavar="FILE", help="also write the PNG report (rewards per epoch, learned t and τ)")
    rp.add_argument("--json", action="store_true", help="print a machine-readable summary instead of the tables")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        if args.command == "validate":
            m = load_manifest(args.file)
            print(f"{args.file}: valid LossSearch {m.metadata.name!r}")
            return 0
        if args.command == "crd":
            from amlfs.crd import render_yaml

            sys.stdout.write(render_yaml())
            return 0
        if args.command == "export":
            from amlfs import export

            body = export.text(export.exported(args.root))
            if args.output == "-":
                sys.stdout.write(body)
            else:
                storage.write_bytes(storage.normalize(str(Path(args.output).absolute())), body.encode())
            return 0
        if args.command == "report":
            return _report(args, console)
        if args.command == "example":
            sys.stdout.write(example_path(args.name).read_text())
            return 0
        return _run(args, console)
    except SpecError as exc:
        print(f"amlfs: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: the search is resumable — run the same command again[/]")
        return 130


def _run(args: argparse.Namespace, console: Console) -> int:
    from amlfs.runner import LocalRunner, _gpu_count

    path = Path(args.file) if args.file else example_path(DEFAULT_EXAMPLE)
    manifest = load_manifest(path)
    if args.parallel < 0:
        raise SpecError(f"--parallel: must be >= 1, got {args.parallel}")
    if args.pack < 1:
        raise SpecError(f"--pack: must be >= 1, got {args.pack}")
    parallel = args.parallel or (_gpu_count() if args.device != "cpu" else 0) or 2
    workdir = Path(args.workdir)
    spec = manifest.spec
    epochs, per_epoch = spec.search.epochs, spec.search.samples_per_epoch
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=args.quiet,
    )
    ep_task = progress.add_task("epochs", total=epochs)
    s_task = progress.add_task("samples", total=per_epoch)

    def on_event(kind: str, data: dict) -> None:
        if kind == "status":
            st = data["status"]
            done = sum(1 for x in st.samples if x.state in ("Succeeded", "NoReward", "Failed", "ConfigError"))
            progress.update(ep_task, completed=st.epoch, total=max(epochs, st.epoch))
            progress.update(
                s_task,
                completed=done,
                total=max(1, len(st.samples)) if st.samples else per_epoch,
                description=f"epoch {st.epoch} samples",
            )
        elif kind == "epoch":
            progress.console.print(
                f"epoch {data['epoch']}: best {data['bestReward']:.4f} (sample {data['best']}), "
                f"mean {data['meanReward']:.4f}, |Δμ| {data['muStep']:.3f}"
            )
        elif kind == "sample-failed":
            progress.console.print(
                f"[yellow]epoch {data['epoch']} sample {data['sample']} exited {data['rc']}: {data['message']}[/]"
            )

    runner = LocalRunner(
        manifest,
        workdir,
        parallel=parallel,
        device=args.device,
        threads=args.threads,
        on_event=on_event,
        pack=args.pack,
        processes=args.fresh_processes,
    )
    how = "trainer processes" if args.fresh_processes else "trainer workers"
    packs = f", packs of up to {args.pack}" if args.pack > 1 else ""
    console.print(f"amlfs: search {manifest.metadata.name!r} from {path} in {runner.dir} ({parallel} {how}{packs})")
    with progress:
        status = runner.run()
    history = stored.read_history(runner.root)
    from amlfs.report import print_summary, write_png

    print_summary(Console(), status, history, spec)
    if not args.no_report and history:
        png = write_png(runner.dir / "report.png", status, history, spec)
        console.print(f"report: {png}")
    console.print(f"status: {runner.status_path}")
    if status.phase == "Failed":
        print(f"amlfs: search failed: {status.message}", file=sys.stderr)
        return 1
    return 0


def _report(args: argparse.Namespace, console: Console) -> int:
    from amlfs import report

    found = stored.load(args.root)  # everything is read before anything is written
    if args.png:
        png = Path(args.png)
        try:
            report.write_png(png, found.status, found.history, found.spec)
        except ImportError:
            raise SpecError("--png: needs matplotlib; pip install 'amlfs[trainer]' or leave --png out") from None
        except (OSError, storage.StorageError) as exc:
            raise SpecError(f"--png {png}: cannot write it ({exc}); give a writable path") from None
    if args.json:
        sys.stdout.write(json.dumps(report.summary_json(found), indent=1) + "\n")
    else:
        report.print_report(Console(), found)
    if args.png:
        console.print(f"report: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
