"""Readers of Market-1501 / DukeMTMC-reID names, identity folders and LFW pairs files (real JPEGs on disk), the
open-set splits built from them, and their one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from amlfs_trainer.data import DataError
from amlfs_trainer.readers.faces import lfw_path, read_identity_folders, read_pairs
from amlfs_trainer.readers.reid import ReaderError, parse_name, read_reid
from amlfs_trainer.tasks.openset import build_pairs, carve_identities, query_gallery
from tests.support.task_layouts import LFW_PEOPLE, casia, duke, jpeg, lfw, market, pairs_text


@pytest.mark.parametrize(
    ("name", "dataset", "want"),
    [
        ("0002_c1s1_000451_03.jpg", "market1501", (2, 0)),
        ("1501_c6s4_002202_00.jpg", "market1501", (1501, 5)),
        ("-1_c3s2_000101_01.jpg", "market1501", (-1, 2)),
        ("0000_c2s1_000776_04.jpg", "market1501", (0, 1)),
        ("0001_c2_f0046182.jpg", "dukemtmc-reid", (1, 1)),
        ("7140_c8_f0171320.jpg", "dukemtmc-reid", (7140, 7)),
        ("0002_c1s1_000451.jpg", "market1501", None),  # no box
        ("0002_c1_f0046182.jpg", "market1501", None),  # Duke's name
        ("0002_c1s1_000451_03.jpg", "dukemtmc-reid", None),  # Market's name
        ("abcd_c1s1_000451_03.jpg", "market1501", None),
        ("0002_c0s1_000451_03.jpg", "market1501", None),  # cameras start at 1
    ],
)
def test_file_names(name: str, dataset: str, want: tuple[int, int] | None) -> None:
    assert parse_name(name, dataset) == want


def test_market_layout_junk_dropped_distractors_in_gallery_only(tmp_path: Path) -> None:
    n = market(tmp_path)
    ds = read_reid(tmp_path, "market1501")
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (n["train"], n["query"], n["gallery"])
    assert all(e.person > 0 for e in ds.train + ds.query)
    assert sum(e.person == 0 for e in ds.gallery) == n["distractors"]
    assert all(e.person != -1 for e in ds.gallery)  # junk dropped
    assert {e.camera for e in ds.train} == {0, 1, 2}  # 0-based
    assert ds.query[0].path.name == "0100_c1s2_000501_01.jpg"


def test_duke_layout(tmp_path: Path) -> None:
    duke(tmp_path)
    ds = read_reid(tmp_path, "dukemtmc-reid")
    assert {e.person for e in ds.train} == set(range(1, 7))
    assert {e.camera for e in ds.query} == {0, 4, 7}
    assert len(ds.gallery) == 12


def test_reid_errors_name_the_file(tmp_path: Path) -> None:
    market(tmp_path)
    bad = tmp_path / "query" / "0101-c1.jpg"
    jpeg(bad, 1)
    with pytest.raises(ReaderError) as err:
        read_reid(tmp_path, "market1501")
    msg = str(err.value)
    assert str(bad) in msg and "0002_c1s1_000451_03.jpg" in msg and "\n" not in msg
    bad.unlink()
    with pytest.raises(ReaderError, match="not a DukeMTMC-reID file name"):  # a Market root read as Duke
        read_reid(tmp_path, "dukemtmc-reid")
    for p in (tmp_path / "query").iterdir():
        p.unlink()
    (tmp_path / "query").rmdir()
    with pytest.raises(ReaderError, match=r"query is missing; a Market-1501 root holds bounding_box_train/"):
        read_reid(tmp_path, "market1501")


def test_query_gallery_split_per_identity_and_camera() -> None:
    ids = torch.tensor([1] * 10 + [2] * 3 + [3])
    cams = torch.tensor([0] * 5 + [1] * 5 + [0, 0, 2] + [1])
    q, g = query_gallery(ids, cams, seed=7)
    assert sorted(q.tolist() + g.tolist()) == list(range(14))
    groups = {}
    for i in q.tolist():
        groups[(int(ids[i]), int(cams[i]))] = groups.get((int(ids[i]), int(cams[i])), 0) + 1
    # 20 % of each (person, camera) group, at least one
    assert groups == {(1, 0): 1, (1, 1): 1, (2, 0): 1, (2, 2): 1, (3, 1): 1}
    assert torch.equal(query_gallery(ids, cams, seed=7)[0], q)  # deterministic


def test_validation_identities_are_carved_from_training_ones() -> None:
    train, val = carve_identities(list(range(10, 30)), 0.25, seed=3, min_val=1, what="x")
    assert len(val) == 5 and len(train) == 15 and not set(train) & set(val)
    assert carve_identities(list(range(10, 30)), 0.25, seed=3, min_val=1, what="x") == (train, val)
    with pytest.raises(DataError, match=r"task\.valFraction: x has 3 training identities"):
        carve_identities([1, 2, 3], 0.5, seed=0, min_val=2, what="x")


def test_built_pairs_are_deterministic_and_labelled() -> None:
    ids = torch.tensor([5] * 4 + [6] * 4 + [7] * 4)
    p = build_pairs(ids, seed=1, folds=3, per_fold=2)
    assert len(p.a) == 12 and p.fold.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(ids[p.a] == ids[p.b], p.same)
    assert bool((p.a != p.b).all())
    q = build_pairs(ids, seed=1, folds=3, per_fold=2)
    assert torch.equal(p.a, q.a) and torch.equal(p.b, q.b)


def test_identity_folders(tmp_path: Path) -> None:
    casia(tmp_path, people=3, per_person=2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    names, samples = read_identity_folders(tmp_path)
    assert names == ["0000000", "0000001", "0000002"]
    assert [i for _, i in samples] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ReaderError, match="not a directory"):
        read_identity_folders(tmp_path / "nope")


def test_pairs_file(tmp_path: Path) -> None:
    lfw(tmp_path / "lfw")
    f = tmp_path / "pairs.txt"
    f.write_text(pairs_text(folds=2))
    pairs = read_pairs(f, tmp_path / "lfw")
    assert [p.fold for p in pairs] == [0] * 4 + [1] * 4
    assert [p.same for p in pairs] == [True, True, False, False] * 2
    assert (
        pairs[0].a
        == lfw_path(tmp_path / "lfw", LFW_PEOPLE[0], 1)
        == tmp_path / "lfw/Ada_Lovelace/Ada_Lovelace_0001.jpg"
    )
    assert pairs[2].b == tmp_path / "lfw/Alan_Turing/Alan_Turing_0003.jpg"


@pytest.mark.parametrize(
    ("edit", "line", "hint"),
    [
        (
            lambda ls: ls.__setitem__(2, "Alan_Turing 2"),
            3,
            "expected a matched pair 'name n1 n2' (fold 1), got 2 fields",
        ),
        (lambda ls: ls.__setitem__(3, "Ada_Lovelace 1 2"), 4, "expected a mismatched pair"),
        (lambda ls: ls.__setitem__(1, "Ada_Lovelace one 2"), 2, "are not positive integers"),
        (lambda ls: ls.__setitem__(0, "ten 2"), 1, "header 'ten 2' is not 'folds pairs'"),
        (lambda ls: ls.__setitem__(1, "Ada_Lovelace 1 9"), 2, "Ada_Lovelace_0009.jpg does not exist"),
        (lambda ls: ls.pop(), 8, "the header promises 2 folds of 2 + 2 pairs (8 lines), the file has 7"),
    ],
)
def test_pairs_file_errors_name_the_file_and_line(tmp_path: Path, edit, line: int, hint: str) -> None:
    lfw(tmp_path / "lfw")
    lines = pairs_text(folds=2).splitlines()
    edit(lines)
    f = tmp_path / "pairs.txt"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReaderError) as err:
        read_pairs(f, tmp_path / "lfw")
    msg = str(err.value)
    assert msg.startswith(f"{f}:{line}: ") and hint in msg and "\n" not in msg, msg


def test_pairs_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ReaderError, match=r"task\.pairs\.file: cannot read"):
        read_pairs(tmp_path / "pairs.txt", tmp_path)
