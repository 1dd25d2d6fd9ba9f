"""Small synthetic re-ID and face datasets in their real on-disk formats (real JPEG files), for the tests."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def jpeg(path: Path, person: int, size: tuple[int, int] = (16, 32)) -> None:
    """A small JPEG whose colour depends on the person (so identities are learnable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = ((person * 67) % 256, (person * 131) % 256, (person * 29) % 256)
    img = Image.new("RGB", size, colour)
    for x in range(0, size[0], 4):  # a stripe pattern per person
        for y in range(0, size[1], 2 + person % 5):
            img.putpixel((x, y), (255 - colour[0], 255 - colour[1], 255 - colour[2]))
    img.save(path, "JPEG")


def market(root: Path, train_people: int = 8, test_people: int = 4, cams: int = 3, per_cam: int = 2) -> dict:
    """A Market-1501 layout; returns what it wrote (counts of parsed images, junk and distractors)."""
    n = {"train": 0, "query": 0, "gallery": 0, "junk": 0, "distractors": 0}
    for p in range(1, train_people + 1):
        for c in range(1, cams + 1):
            for f in range(per_cam):
                jpeg(root / "bounding_box_train" / f"{p:04d}_c{c}s1_{100 * c + f:06d}_0{f}.jpg", p)
                n["train"] += 1
    for p in range(100, 100 + test_people):
        for c in range(1, cams + 1):
            jpeg(root / "query" / f"{p:04d}_c{c}s2_{500 + c:06d}_01.jpg", p)
            n["query"] += 1
            for f in range(per_cam):
                jpeg(root / "bounding_box_test" / f"{p:04d}_c{c}s2_{700 + 10 * c + f:06d}_0{f + 1}.jpg", p)
                n["gallery"] += 1
    for i in range(3):
        jpeg(root / "bounding_box_test" / f"-1_c{i + 1}s1_{900 + i:06d}_00.jpg", 50)
        n["junk"] += 1
        jpeg(root / "bounding_box_test" / f"0000_c{i + 1}s1_{950 + i:06d}_00.jpg", 60)
        n["distractors"] += 1
        n["gallery"] += 1
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"\0\1")
    return n


def duke(root: Path) -> None:
    for folder, people in (
        ("bounding_box_train", range(1, 7)),
        ("query", range(20, 23)),
        ("bounding_box_test", range(20, 24)),
    ):
        for p in people:
            for c in (1, 5, 8):
                jpeg(root / folder / f"{p:04d}_c{c}_f{1000 * p + c:07d}.jpg", p)


def casia(root: Path, people: int = 12, per_person: int = 4) -> None:
    for p in range(people):
        for i in range(per_person):
            jpeg(root / f"{p:07d}" / f"{i + 1:03d}.jpg", p, (24, 24))


LFW_PEOPLE = ("Ada_Lovelace", "Alan_Turing", "Grace_Hopper", "Kurt_Goedel")


def lfw(root: Path, per_person: int = 3) -> None:
    for k, name in enumerate(LFW_PEOPLE):
        for n in range(1, per_person + 1):
            jpeg(root / name / f"{name}_{n:04d}.jpg", 200 + k, (24, 24))


def pairs_text(folds: int = 2) -> str:
    """`folds` folds of 2 matched and 2 mismatched pairs over `lfw`'s people (tab-separated, as LFW's file)."""
    lines = [f"{folds}\t2"]
    for k in range(folds):
        a, b = LFW_PEOPLE[k % 4], LFW_PEOPLE[(k + 1) % 4]
        lines += [f"{a}\t1\t2", f"{b}\t2\t3", f"{a}\t1\t{b}\t3", f"{b}\t1\t{LFW_PEOPLE[(k + 2) % 4]}\t2"]
    return "\n".join(lines) + "\n"
