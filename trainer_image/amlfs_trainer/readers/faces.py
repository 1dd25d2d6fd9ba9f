"""Face datasets: an identity-per-folder training tree (CASIA-WebFace layout) and LFW-style pairs files.

* Identity folders: every subfolder of the root is one identity; its images (.jpg, .jpeg, .png) are that
  identity's. Folders are sorted by name, so identity indices are stable.
* Pairs (LFW's `pairs.txt`): a header line `F N` (F folds of N matched and N mismatched pairs; a single number
  N means one fold), then per fold N lines `name n1 n2` (the same person) and N lines `name1 n1 name2 n2`
  (different people); image n of a person is `<images>/<name>/<name>_<nnnn>.jpg`. Fields may be separated by
  tabs or spaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from amlfs_trainer.readers.reid import ReaderError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Pair:
    a: Path
    b: Path
    same: bool
    fold: int


def read_identity_folders(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(identity names, [(image, identity index)]) of an identity-per-folder tree."""
    if not root.is_dir():
        raise ReaderError(
            f"task.dataRoot: {root} is not a directory; point it at a tree of one folder per identity "
            "(CASIA-WebFace layout)"
        )
    names: list[str] = []
    samples: list[tuple[Path, int]] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            continue
        samples += [(p, len(names)) for p in images]
        names.append(folder.name)
    if len(names) < 2:
        raise ReaderError(
            f"task.dataRoot: {root} holds {len(names)} identity folder(s) with images; a verification task needs "
            "one folder per identity (at least 2)"
        )
    return names, samples


def lfw_path(images: Path, name: str, number: int) -> Path:
    return images / name / f"{name}_{number:04d}.jpg"


def read_pairs(file: Path, images: Path) -> list[Pair]:
    """The pairs of `file` with their fold (0-based, file order); every referenced image must exist."""
    try:
        lines = file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not text"
        raise ReaderError(f"task.pairs.file: cannot read {file} ({why}); check the path") from None
    if not images.is_dir():
        raise ReaderError(f"task.pairs.imagesRoot: {images} is not a directory; point it at the LFW images")

    def bad(line_no: int, why: str) -> ReaderError:
        return ReaderError(f"{file}:{line_no}: {why}; fix the line (LFW pairs.txt format)")

    rows = [(i + 1, line.split()) for i, line in enumerate(lines) if line.strip()]
    if not rows:
        raise ReaderError(f"{file}: empty pairs file; give a header line such as '10 300' and the pairs")
    head_no, head = rows[0]
    if not 1 <= len(head) <= 2 or not all(h.isdigit() and int(h) > 0 for h in head):
        raise bad(head_no, f"header {' '.join(head)!r} is not 'folds pairs' (e.g. '10 300')")
    folds, per = (1, int(head[0])) if len(head) == 1 else (int(head[0]), int(head[1]))
    body = rows[1:]
    if len(body) != 2 * folds * per:
        where = body[-1][0] if body else head_no
        raise bad(
            where,
            f"the header promises {folds} folds of {per} + {per} pairs ({2 * folds * per} lines), "
            f"the file has {len(body)}",
        )
    out: list[Pair] = []
    for k, (line_no, fields) in enumerate(body):
        fold, matched = k // (2 * per), (k % (2 * per)) < per
        want = 3 if matched else 4
        if len(fields) != want:
            kind = "a matched pair 'name n1 n2'" if matched else "a mismatched pair 'name1 n1 name2 n2'"
            raise bad(line_no, f"expected {kind} (fold {fold + 1}), got {len(fields)} fields")
        nums = [fields[1], fields[2]] if matched else [fields[1], fields[3]]
        if not all(n.isdigit() for n in nums):
            raise bad(line_no, f"image numbers {' '.join(nums)!r} are not positive integers")
        if matched:
            a, b = lfw_path(images, fields[0], int(fields[1])), lfw_path(images, fields[0], int(fields[2]))
        else:
            a, b = lfw_path(images, fields[0], int(fields[1])), lfw_path(images, fields[2], int(fields[3]))
        for p in (a, b):
            if not p.is_file():
                raise bad(line_no, f"image {p} does not exist")
        out.append(Pair(a, b, matched, fold))
    return out
