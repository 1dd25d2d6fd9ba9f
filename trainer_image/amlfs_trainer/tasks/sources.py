"""Where the open-set kinds' images come from: an in-memory dataset split by class, or lists of image files.

* `in_memory_open_set`: digits, mnist1d, MNIST, CIFAR... pooled (their train and test parts), the last
  task.heldOutClasses classes the test identities, validation identities carved from the rest; held on the
  device like the classification data.
* `ImageListData`: (path, label) lists streamed from disk through DataLoaders (re-ID and face files).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from amlfs.spec import TaskSpec
from amlfs_trainer.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    InMemoryTaskData,
    TaskData,
    _info,
    _Samples,
    _Split,
    image_batches,
    load_arrays,
)
from amlfs_trainer.tasks.base import Gallery, OpenSetData, Pairs
from amlfs_trainer.tasks.openset import (
    build_pairs,
    carve_identities,
    check_queries,
    hash_seed,
    query_gallery,
    synthetic_cameras,
)

RETRIEVAL_SIZE = (256, 128)  # re-ID's usual input (height, width)
FACE_SIZE = (112, 112)


def image_size(task: TaskSpec, default: tuple[int, int]) -> tuple[int, int]:
    return (task.image_size[0], task.image_size[1]) if task.image_size else default


def train_subset(n: int, task: TaskSpec) -> Tensor:
    """Indices of the training examples kept under task.trainLimit (a seeded subset), sorted."""
    if task.train_limit <= 0 or task.train_limit >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(hash_seed("train-limit", task.split_seed))
    return torch.randperm(n, generator=gen)[: task.train_limit].sort().values


# --- in-memory datasets, split by class ------------------------------------------------------------------------


def in_memory_open_set(task: TaskSpec, device: torch.device, cache: Path | None, kind: str) -> OpenSetData:
    info = _info(task.dataset)
    x_train, y_train, x_test, y_test = load_arrays(task, cache)
    x, y = torch.cat([x_train, x_test]), torch.cat([y_train, y_test])
    n_classes, held = info.num_classes, task.held_out_classes
    min_val = 1 if kind == "retrieval" else 2
    if held > n_classes - min_val - 2:
        raise DataError(
            f"task.heldOutClasses: {held} of {info.label}'s {n_classes} classes held out leaves fewer than "
            f"{min_val + 2} for training and validation; lower task.heldOutClasses"
        )
    test_ids = list(range(n_classes - held, n_classes))
    train_ids, val_ids = carve_identities(
        list(range(n_classes - held)), task.val_fraction, task.split_seed, min_val, info.label
    )
    remap = torch.full((n_classes,), -1, dtype=torch.int64)
    remap[torch.tensor(train_ids)] = torch.arange(len(train_ids))
    train = torch.nonzero(remap[y] >= 0).view(-1)
    train = train[train_subset(len(train), task)]

    def put(idx: Tensor, labels: Tensor) -> _Split:
        xs = x[idx].to(device)
        if xs.dim() == 4 and device.type == "cuda":
            xs = xs.contiguous(memory_format=torch.channels_last)
        return _Split(xs, labels.to(device=device, dtype=torch.int64))

    splits = {"train": put(train, remap[y[train]])}
    galleries: dict[str, Gallery] = {}
    pairs: dict[str, Pairs] = {}
    for split, ids in (("val", val_ids), ("test", test_ids)):
        idx = torch.nonzero(torch.isin(y, torch.tensor(ids))).view(-1)
        seed = hash_seed(split, task.split_seed)
        if kind == "retrieval":
            cams = synthetic_cameras(len(idx), seed)
            q, g = query_gallery(y[idx], cams, seed)
            for part, sel in (("query", q), ("gallery", g)):
                splits[f"{split}-{part}"] = put(idx[sel], y[idx[sel]])
                galleries[f"{split}-{part}"] = Gallery(y[idx[sel]].clone(), cams[sel].clone())
            check_queries(galleries[f"{split}-query"], galleries[f"{split}-gallery"], f"task.dataset ({split})")
        else:
            splits[f"{split}-pairs"] = put(idx, y[idx])
            pairs[f"{split}-pairs"] = build_pairs(y[idx], seed)
    inner = InMemoryTaskData(splits, dataclasses.replace(info, num_classes=len(train_ids)), device, task.augment)
    return OpenSetData(inner, galleries, pairs)


# --- image files ------------------------------------------------------------------------------------------------


class ImageListData(TaskData):
    """A training list of (image path, training label) and named evaluation lists, streamed through DataLoaders."""

    def __init__(
        self,
        train: Sequence[tuple[Path, int]],
        sets: Mapping[str, Sequence[tuple[Path, int]]],
        num_classes: int,
        size: tuple[int, int],
        train_tf: Any,
        eval_tf: Any,
        device: torch.device,
        workers: int,
    ) -> None:
        self.num_classes = num_classes
        self.input_shape = (3, *size)
        self.device = device
        self._workers = workers
        self._eval_tf = eval_tf
        self._sets = {"train": _Samples([(str(p), y) for p, y in train], train_tf)}
        self._sets |= {name: _Samples([(str(p), y) for p, y in items], eval_tf) for name, items in sets.items()}

    def size(self, split: str) -> int:
        return len(self._set(split))

    def _set(self, split: str) -> _Samples:
        if split not in self._sets:
            raise ValueError(f"split must be one of {sorted(self._sets)}, got {split!r}")
        return self._sets[split]

    def _loader(
        self, dataset: _Samples, batch_size: int, order: list[int] | None, generator: torch.Generator | None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        return image_batches(dataset, batch_size, order, generator, self._workers, self.device)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        dataset = self._sets["train"]
        order = torch.randperm(len(dataset), generator=generator).tolist()
        yield from self._loader(dataset, batch_size, order, generator)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        dataset = self._set(split)
        if split == "train":
            dataset = _Samples(dataset.samples, self._eval_tf)
        yield from self._loader(dataset, batch_size, None, None)


def transforms(size: tuple[int, int], augment: bool, crop_erase: bool, erasing: float) -> tuple[Any, Any]:
    """(train, eval) transforms: resize to `size`; training adds a flip and, for re-ID, pad-and-crop and random
    erasing (Zhong et al.)."""
    from torchvision import transforms as T

    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    eval_tf = T.Compose([T.Resize(size), T.ToTensor(), normalize])
    if not augment:
        return eval_tf, eval_tf
    steps: list[Callable[..., Any]] = [T.Resize(size), T.RandomHorizontalFlip()]
    if crop_erase:
        steps += [T.Pad(max(1, size[0] // 25)), T.RandomCrop(size)]
    steps += [T.ToTensor(), normalize]
    if crop_erase and erasing > 0:
        steps.append(T.RandomErasing(p=erasing))
    return T.Compose(steps), eval_tf


def fetch_local(uri: str, cache: Path | None, field: str, is_file: bool) -> Path:
    """A local path for a file or directory given as a path or an s3:// URI (copied into the cache)."""
    if not uri.startswith("s3://"):
        return Path(uri.removeprefix("file://"))
    from amlfs import storage

    base = cache if cache is not None else Path(tempfile.gettempdir()) / "amlfs-data"
    dest = base / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if is_file:
            local = dest / uri.rstrip("/").rsplit("/", 1)[-1]
            if not local.is_file():
                storage.download_file(uri, local)
            return local
        return Path(storage.download_prefix(uri, dest))
    except Exception as exc:  # storage errors come in many types (botocore, OSError, ...)
        raise DataError(
            f"{field}: cannot copy {uri} to {dest} ({' '.join(str(exc).split())[:200]}); check the URI, "
            "storage.endpoint and the S3 credentials"
        ) from None
