"""Carving identities into training, validation and test sets, and building query/gallery splits and pairs.

Everything is a pure function of its inputs and a seed, so every sample (and every pod) of a search sees the
same splits. Shared by the open-set tasks on in-memory datasets and by the readers of re-ID and face files.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from amlfs_trainer.data import DataError
from amlfs_trainer.tasks.base import Gallery, Pairs

QUERY_FRACTION = 0.2  # of each (identity, camera) group's images, at least one, become queries
SYNTHETIC_CAMERAS = 6  # cameras drawn for datasets that have none (as many as Market-1501 has)
PAIR_FOLDS = 10
PAIRS_PER_FOLD = 60  # matched and as many mismatched pairs per fold, when the images allow


def _gen(kind: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash_seed(kind, seed))


def hash_seed(kind: str, seed: int) -> int:
    """A seed for one purpose (`kind`) derived from a spec seed, so the purposes draw independent streams."""
    return int.from_bytes(hashlib.sha256(f"amlfs-{kind}:{seed}".encode()).digest()[:8], "little") & (2**63 - 1)


def carve_identities(
    ids: list[int], val_fraction: float, seed: int, min_val: int, what: str
) -> tuple[list[int], list[int]]:
    """(training identities, validation identities), both sorted: round(n * valFraction) of them (at least
    `min_val`) held out for the reward, at least 2 left to train on."""
    ids = sorted(ids)
    n_val = max(min_val, round(len(ids) * val_fraction))
    if len(ids) - n_val < 2:
        raise DataError(
            f"task.valFraction: {what} has {len(ids)} training identities; holding out {n_val} for validation "
            "leaves fewer than 2 to train on; lower task.valFraction or task.heldOutClasses"
        )
    perm = torch.randperm(len(ids), generator=_gen("val-identities", seed)).tolist()
    val = sorted(ids[i] for i in perm[:n_val])
    return sorted(set(ids) - set(val)), val


def synthetic_cameras(n: int, seed: int) -> Tensor:
    return torch.randint(0, SYNTHETIC_CAMERAS, (n,), generator=_gen("cameras", seed))


def query_gallery(ids: Tensor, cams: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """(query indices, gallery indices), sorted: per (identity, camera) group, QUERY_FRACTION of its images (at
    least one) in a seeded order are queries, the rest gallery."""
    order = torch.randperm(len(ids), generator=_gen("queries", seed))
    key = ids[order] * 1_000_003 + cams[order]
    sorted_key, pos = torch.sort(key, stable=True)
    group_start = torch.ones_like(sorted_key, dtype=torch.bool)
    group_start[1:] = sorted_key[1:] != sorted_key[:-1]
    starts = torch.nonzero(group_start).view(-1)
    sizes = torch.diff(torch.cat([starts, torch.tensor([len(key)])]))
    quota = torch.clamp(torch.round(sizes.double() * QUERY_FRACTION).long(), min=1)
    rank = torch.arange(len(key)) - torch.repeat_interleave(starts, sizes)
    is_query = rank < torch.repeat_interleave(quota, sizes)
    chosen = order[pos]
    return chosen[is_query].sort().values, chosen[~is_query].sort().values


def check_queries(q: Gallery, g: Gallery, what: str) -> None:
    """At least one query must have a correct match in another camera, or its mAP is undefined."""
    for i in range(len(q.ids)):
        if bool(((g.ids == q.ids[i]) & (g.cams != q.cams[i])).any()):
            return
    raise DataError(
        f"{what}: no query has a gallery image of its identity from another camera, so mAP is undefined; "
        "use a dataset whose identities are seen by at least two cameras"
    )


def build_pairs(ids: Tensor, seed: int, folds: int = PAIR_FOLDS, per_fold: int = PAIRS_PER_FOLD) -> Pairs:
    """LFW-like pairs over images labelled `ids`: `folds` folds of up to `per_fold` matched pairs (two distinct
    images of one identity) and as many mismatched (images of two identities), drawn with a seeded generator."""
    gen = _gen("pairs", seed)
    by_id = [torch.nonzero(ids == v).view(-1) for v in torch.unique(ids).tolist()]
    multi = [g for g in by_id if len(g) >= 2]
    if not multi or len(by_id) < 2:
        raise DataError(
            f"task.valFraction: verification pairs need at least 2 identities, one with 2 images, got {len(by_id)} "
            "identities; raise task.valFraction (or task.heldOutClasses)"
        )
    total = len(ids)
    per_fold = max(1, min(per_fold, total // (2 * folds) or 1))
    a: list[int] = []
    b: list[int] = []
    same: list[bool] = []
    fold: list[int] = []

    def pick(group: Tensor) -> int:
        return int(group[int(torch.randint(len(group), (1,), generator=gen))])

    for k in range(folds):
        for _ in range(per_fold):
            g = multi[int(torch.randint(len(multi), (1,), generator=gen))]
            two = g[torch.randperm(len(g), generator=gen)[:2]]
            a.append(int(two[0]))
            b.append(int(two[1]))
            same.append(True)
            fold.append(k)
        for _ in range(per_fold):
            i, j = torch.randperm(len(by_id), generator=gen)[:2].tolist()
            a.append(pick(by_id[i]))
            b.append(pick(by_id[j]))
            same.append(False)
            fold.append(k)
    return Pairs(torch.tensor(a), torch.tensor(b), torch.tensor(same), torch.tensor(fold))
