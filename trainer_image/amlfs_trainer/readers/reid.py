"""Person re-identification datasets: Market-1501 and DukeMTMC-reID, as distributed.

Both hold `bounding_box_train/` (training identities), `query/` and `bounding_box_test/` (the gallery) of JPEGs
whose names carry the person and the camera:

* Market-1501: `PPPP_cCsS_FFFFFF_BB.jpg` (person, camera 1-6, sequence, frame, box). Person -1 marks junk boxes,
  dropped everywhere; person 0000 marks distractors, kept in the gallery only (they match no query).
* DukeMTMC-reID: `PPPP_cC_fFFFFFFF.jpg` (person, camera 1-8, frame).

Cameras are returned 0-based. Other files (Market-1501 ships `Thumbs.db`) are ignored; a `.jpg` whose name does
not parse is an error, since it means the folder is not the dataset it is said to be.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from amlfs.contract import ConfigError

FOLDERS = ("bounding_box_train", "query", "bounding_box_test")


class ReaderError(ConfigError):
    """Malformed dataset files. `str()` is one line naming the file and the fix."""


@dataclass(frozen=True)
class Format:
    label: str
    pattern: re.Pattern[str]
    example: str


FORMATS = {
    "market1501": Format(
        "Market-1501", re.compile(r"^(-1|\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$"), "0002_c1s1_000451_03.jpg"
    ),
    "dukemtmc-reid": Format("DukeMTMC-reID", re.compile(r"^(\d{4})_c(\d)_f(\d{7})\.jpg$"), "0001_c2_f0046182.jpg"),
}


@dataclass(frozen=True)
class Entry:
    path: Path
    person: int  # as in the file name (0: a distractor)
    camera: int  # 0-based


@dataclass(frozen=True)
class ReidDataset:
    train: list[Entry]
    query: list[Entry]
    gallery: list[Entry]


def parse_name(name: str, dataset: str) -> tuple[int, int] | None:
    """(person, 0-based camera) of a file name; None when it does not follow the dataset's format."""
    m = FORMATS[dataset].pattern.match(name)
    if m is None:
        return None
    person, camera = int(m.group(1)), int(m.group(2))
    return (person, camera - 1) if camera >= 1 else None


def read_folder(folder: Path, dataset: str) -> list[Entry]:
    """The images of one folder, sorted by name, junk (person -1) dropped."""
    fmt = FORMATS[dataset]
    if not folder.is_dir():
        raise ReaderError(
            f"task.dataRoot: {folder} is missing; a {fmt.label} root holds {', '.join(f + '/' for f in FOLDERS)}; "
            "point dataRoot at the extracted dataset"
        )
    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() != ".jpg":
            continue
        parsed = parse_name(path.name, dataset)
        if parsed is None:
            raise ReaderError(
                f"{path}: not a {fmt.label} file name (expected e.g. {fmt.example}); remove the file or fix "
                "task.dataset"
            )
        if parsed[0] >= 0:
            out.append(Entry(path, *parsed))
    if not out:
        raise ReaderError(f"{folder}: no {fmt.label} images; point task.dataRoot at the extracted dataset")
    return out


def read_reid(root: Path, dataset: str) -> ReidDataset:
    train, query, gallery = (read_folder(root / f, dataset) for f in FOLDERS)
    if bad := next((e for e in train if e.person == 0), None):
        raise ReaderError(f"{bad.path}: a distractor (person 0000) among the training images; remove it")
    if bad := next((e for e in query if e.person == 0), None):
        raise ReaderError(f"{bad.path}: a distractor (person 0000) among the queries; remove it")
    return ReidDataset(train, query, gallery)
