"""Datasets for the trainer, held on the training device where they fit.

`load_task` turns a `TaskSpec` into a `TaskData`: three splits (train, val, test) that yield normalised
float batches on the task's device. The validation split (the search's reward) is carved from the
training set with `task.splitSeed`; the test set is never used for the reward.

Small datasets (digits, mnist1d, MNIST, Fashion-MNIST, CIFAR-10/100) are loaded once into tensors on the
device (images as uint8, converted and normalised per batch) and batched by indexing, so an epoch makes
no per-example Python calls and no host synchronisation. CIFAR augmentation (4-pixel padded random crop
+ horizontal flip) and MNIST augmentation (2-pixel padded random crop) run vectorised on the device:
one gather per batch whose random offsets are drawn for the whole epoch from the epoch's generator.
`imagefolder` is streamed from disk through a DataLoader.

CIFAR-10/100, MNIST and Fashion-MNIST are read (and, with `task.download`, downloaded) by torchvision's
dataset classes. Files already present are not MD5-checked, so a truncated or malformed file is reported
as corrupt only when it fails to parse.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from amlfs.contract import ConfigError
from amlfs.spec import TaskSpec
from amlfs_trainer.corruption import corrupt

SPLITS = ("train", "val", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGEFOLDER_SIZE = 224
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 20260101  # fixed: the digits test split never depends on task.splitSeed


class DataError(ConfigError):
    """Missing or corrupt dataset files. `str()` is one line naming the field and the fix."""


@dataclass(frozen=True)
class _Info:
    label: str  # human name in messages
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    pad: int = 0  # random-crop padding when augmenting (0: no crop)
    flip: bool = False  # random horizontal flip when augmenting


_INFO: dict[str, _Info] = {
    "digits": _Info("digits", 10, (1, 8, 8)),
    "mnist1d": _Info("MNIST-1D", 10, (1, 40)),
    "cifar10": _Info("CIFAR-10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True),
    "cifar100": _Info("CIFAR-100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4, True),
    "mnist": _Info("MNIST", 10, (1, 28, 28), (0.1307,), (0.3081,), 2, False),
    "fashion-mnist": _Info("Fashion-MNIST", 10, (1, 28, 28), (0.2860,), (0.3530,), 2, False),
    "imagefolder": _Info("ImageFolder", 0, (3, IMAGEFOLDER_SIZE, IMAGEFOLDER_SIZE), IMAGENET_MEAN, IMAGENET_STD),
    "market1501": _Info("Market-1501", 0, (3, 256, 128), IMAGENET_MEAN, IMAGENET_STD),
    "dukemtmc-reid": _Info("DukeMTMC-reID", 0, (3, 256, 128), IMAGENET_MEAN, IMAGENET_STD),
    "casia-webface": _Info("CASIA-WebFace", 0, (3, 112, 112), IMAGENET_MEAN, IMAGENET_STD),
}


def dataset_info(name: str, data_root: str | Path | None = None) -> tuple[int, tuple[int, ...]]:
    """(num_classes, per-example input shape) without loading the data.

    For `imagefolder` the class count is only known from the files: it is the number of class folders
    under `data_root/train` when a local `data_root` is given, else 0 (unknown until `load_task`).
    """
    info = _info(name)
    if name == "imagefolder" and data_root and not str(data_root).startswith("s3://"):
        train = _local_path(str(data_root)) / "train"
        if train.is_dir():
            return sum(1 for p in train.iterdir() if p.is_dir()), info.input_shape
    return info.num_classes, info.input_shape


def _info(name: str) -> _Info:
    if name not in _INFO:
        raise DataError(f"task.dataset: unknown dataset {name!r}; use one of {', '.join(_INFO)}")
    return _INFO[name]


# --- the TaskData interface -------------------------------------------------------------------------


class TaskData(ABC):
    """Three splits of one dataset, yielding normalised float inputs and int64 labels on `device`."""

    num_classes: int
    input_shape: tuple[int, ...]
    device: torch.device

    @abstractmethod
    def size(self, split: str) -> int:
        """Number of examples in `split` ("train", "val" or "test")."""

    @abstractmethod
    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """One shuffled epoch of the training split, augmented if the task says so; last batch kept."""

    @abstractmethod
    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """`split` ("val", "test"; "train" also works) in a fixed order, without augmentation."""

    def labels(self, split: str) -> Tensor:
        """The labels of `split` (int64, on the CPU), in eval order; subclasses read them without the inputs."""
        return torch.cat([y.cpu() for _, y in self.eval_batches(split, 65536)])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


@dataclass
class _Split:
    x: Tensor  # (N, ...) uint8 images or float signals, on the device
    y: Tensor  # (N,) int64, on the device


class InMemoryTaskData(TaskData):
    """All splits as tensors on the device; uint8 images are normalised batch by batch."""

    def __init__(self, splits: dict[str, _Split], info: _Info, device: torch.device, augment: bool) -> None:
        self.num_classes = info.num_classes
        self.input_shape = tuple(splits["train"].x.shape[1:])
        self.device = device
        self._splits = splits
        self._pad = info.pad if augment else 0
        self._flip = info.flip and augment
        self._channels_last = device.type == "cuda" and len(self.input_shape) == 3
        self._scale: Tensor | None = None
        self._shift: Tensor | None = None
        if splits["train"].x.dtype == torch.uint8:
            mean = torch.tensor(info.mean, dtype=torch.float32, device=device)
            std = torch.tensor(info.std, dtype=torch.float32, device=device)
            view = (1, -1) + (1,) * (len(self.input_shape) - 1)
            self._scale = (1.0 / (255.0 * std)).view(view)
            self._shift = (-mean / std).view(view)

    def size(self, split: str) -> int:
        self._check(split)
        return int(self._splits[split].y.shape[0])

    def _check(self, split: str) -> None:
        """The classification splits, or the named evaluation sets an open-set task was built with."""
        if split not in self._splits:
            _check_split(split)

    def _prepare(self, x: Tensor) -> Tensor:
        if self._scale is not None and self._shift is not None:
            x = torch.addcmul(self._shift, x.float(), self._scale)
        else:
            x = x.float()
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        _check_batch_size(batch_size)
        data = self._splits["train"]
        n = int(data.y.shape[0])
        augment = self._pad > 0 or self._flip
        # Everything random for the epoch comes from `generator` on the CPU, in one transfer.
        rows = [torch.randperm(n, generator=generator)]
        if augment:
            rows.append(torch.randint(0, 2 * self._pad + 1, (n,), generator=generator))
            rows.append(torch.randint(0, 2 * self._pad + 1, (n,), generator=generator))
            rows.append(torch.randint(0, 2 if self._flip else 1, (n,), generator=generator))
        plan = torch.stack(rows).to(self.device, non_blocking=True)
        for start in range(0, n, batch_size):
            cols = plan[:, start : start + batch_size]
            idx = cols[0]
            x = data.x[idx]
            if augment:
                x = crop_flip(x, self._pad, cols[1], cols[2], cols[3].bool())
            yield self._prepare(x), data.y[idx]

    def labels(self, split: str) -> Tensor:
        self._check(split)
        return self._splits[split].y.cpu()

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        self._check(split)
        _check_batch_size(batch_size)
        data = self._splits[split]
        for start in range(0, int(data.y.shape[0]), batch_size):
            yield self._prepare(data.x[start : start + batch_size]), data.y[start : start + batch_size]


def crop_flip(x: Tensor, pad: int, dy: Tensor, dx: Tensor, flip: Tensor) -> Tensor:
    """Per-example random crop (zero padding `pad`, offsets `dy`, `dx` in [0, 2*pad]) and horizontal flip.

    `x` is (B, C, H, W); one advanced-indexing gather does both, with no per-image loop. The result has
    the input's shape and dtype, channels_last in memory.
    """
    _, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = dy.view(-1, 1) + ar_h  # (B, H)
    cols = dx.view(-1, 1) + torch.where(flip.view(-1, 1), (w - 1) - ar_w, ar_w)  # (B, W)
    batch = torch.arange(x.shape[0], device=x.device).view(-1, 1, 1)
    out = padded[batch, :, rows.view(-1, h, 1), cols.view(-1, 1, w)]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


# --- splits ---------------------------------------------------------------------------------------


def carve_val(n: int, val_fraction: float, split_seed: int, train_limit: int = 0) -> tuple[Tensor, Tensor]:
    """Sorted (train, val) index tensors over range(n); deterministic in `split_seed`.

    The validation part is `round(n * val_fraction)` examples (at least 1, leaving at least 1 to train);
    `train_limit` > 0 then keeps a random `train_limit` of the remaining training examples.
    """
    if n < 2:
        raise DataError(f"task.dataset: only {n} training example(s); need at least 2 to carve a validation split")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    val, train = perm[:n_val], perm[n_val:]
    if train_limit > 0:
        train = train[:train_limit]
    return train.sort().values, val.sort().values


def _to_splits(
    x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, task: TaskSpec, device: torch.device
) -> dict[str, _Split]:
    train_idx, val_idx = carve_val(len(y_train), task.val_fraction, task.split_seed, task.train_limit)

    def put(x: Tensor, y: Tensor) -> _Split:
        x = x.to(device)
        if x.dim() == 4 and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return _Split(x, y.to(device=device, dtype=torch.int64))

    return {
        "train": put(x_train[train_idx], y_train[train_idx]),
        "val": put(x_train[val_idx], y_train[val_idx]),
        "test": put(x_test, y_test),
    }


# --- entry point -----------------------------------------------------------------------------------


def load_task(task: TaskSpec, device: torch.device, cache_dir: Path | None = None) -> TaskData:
    """Load `task.dataset` and carve its splits; see the module docstring."""
    device = torch.device(device)
    info = _info(task.dataset)
    cache = Path(cache_dir) if cache_dir is not None else None
    if task.dataset == "imagefolder":
        return FolderTaskData(task, resolve_root(task, cache), device)
    arrays = load_arrays(task, cache)
    arrays = corrupt(arrays, task, info.num_classes)  # task.imbalance, task.labelNoise: train+val only
    return InMemoryTaskData(_to_splits(*arrays, task, device), info, device, task.augment)


def load_arrays(task: TaskSpec, cache: Path | None) -> Arrays:
    """(x_train, y_train, x_test, y_test) of an in-memory dataset, on the CPU, labels checked."""
    info = _info(task.dataset)
    if task.dataset == "digits":
        arrays = _load_digits()
    elif task.dataset == "mnist1d":
        arrays = _load_mnist1d(cache)
    elif task.dataset in ("cifar10", "cifar100"):
        arrays = _load_cifar(task, resolve_root(task, cache))
    elif task.dataset in ("mnist", "fashion-mnist"):
        arrays = _load_mnist_like(task, resolve_root(task, cache), cache)
    else:
        raise DataError(f"task.dataset: {info.label} is not an in-memory dataset")
    _check_labels(arrays[1], info, task)
    _check_labels(arrays[3], info, task)
    return arrays


def _check_labels(y: Tensor, info: _Info, task: TaskSpec) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= info.num_classes):
        raise DataError(
            f"task.dataRoot: {info.label} labels under {task.data_root} fall outside "
            f"0..{info.num_classes - 1}; the files are corrupt or of another dataset"
        )


def _local_path(root: str) -> Path:
    return Path(root.removeprefix("file://"))


def resolve_root(task: TaskSpec, cache: Path | None) -> Path:
    """A local directory holding the dataset; an s3:// prefix is first copied into the cache."""
    label = _info(task.dataset).label
    if not task.data_root:
        raise DataError(
            f"task.dataRoot: empty, but {label} is read from files; set task.dataRoot to a directory "
            "or s3:// prefix (with task.download: true to fetch it)"
        )
    if not task.data_root.startswith("s3://"):
        return _local_path(task.data_root)
    base = cache if cache is not None else Path(tempfile.gettempdir()) / "amlfs-data"
    digest = hashlib.sha256(task.data_root.encode()).hexdigest()[:16]
    dest = base / "s3" / digest
    dest.mkdir(parents=True, exist_ok=True)
    from amlfs import storage

    try:
        return Path(storage.download_prefix(task.data_root, dest))
    except storage.NotFound as exc:
        raise DataError(
            f"task.dataRoot: nothing to copy from {task.data_root} ({_one_line(exc)}); check the prefix: the "
            "dataset's files go below it"
        ) from None
    except (storage.Rejected, ValueError) as exc:
        raise DataError(
            f"task.dataRoot: cannot copy {task.data_root} ({_one_line(exc)}); check the bucket, "
            "storage.endpoint and the S3 credentials"
        ) from None
    # other storage errors (connection refused, timeouts, 5xx) propagate: the trainer exits EXIT_TRANSIENT


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)


def _download(task: TaskSpec, root: Path, what: str, fetch: Any) -> None:
    try:
        fetch()
    except Exception as exc:  # network errors and torchvision's RuntimeErrors
        raise DataError(
            f"task.download: downloading {what} into {root} failed ({_one_line(exc)}); put the files "
            "under task.dataRoot yourself or check network access"
        ) from None


# --- digits and mnist1d (built offline) -------------------------------------------------------------

Arrays = tuple[Tensor, Tensor, Tensor, Tensor]  # x_train, y_train, x_test, y_test (CPU)


def _load_digits() -> Arrays:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32)).view(-1, 1, 8, 8) / 16.0
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(DIGITS_TEST_SEED))
    n_test = round(len(y) * DIGITS_TEST_FRACTION)
    test, train = perm[:n_test].sort().values, perm[n_test:].sort().values
    mean, std = x[train].mean(), x[train].std()  # over train+val, never the test part
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def _load_mnist1d(cache: Path | None) -> Arrays:
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    path = cache / f"mnist1d-{key}.npz" if cache is not None else None
    data: dict[str, np.ndarray] | None = None
    if path is not None and path.is_file():
        try:
            with np.load(path) as f:
                data = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError):
            data = None  # a broken cache file is regenerated
    if data is None:
        data = _make_mnist1d()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, x=data["x"], y=data["y"], x_test=data["x_test"], y_test=data["y_test"])
            tmp.replace(path)

    def x_(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).unsqueeze(1)

    def y_(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.int64))

    return x_(data["x"]), y_(data["y"]), x_(data["x_test"]), y_(data["y_test"])


def _make_mnist1d() -> dict[str, np.ndarray]:
    """The package's default MNIST-1D (4000 train / 1000 test, length 40), generated without the network."""
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()  # make_dataset reseeds the global RNGs
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}


# --- CIFAR-10/100, MNIST and Fashion-MNIST (read by torchvision) ----------------------------------


@functools.cache
def _cifar_class(name: str) -> Any:
    """torchvision's CIFAR-10 or CIFAR-100 dataset, asking only that the batch files exist.

    torchvision checks every batch against the official MD5 and reports any difference as "not found";
    a malformed file still fails when it is read. The class-name file (`batches.meta` / `meta`) is never
    needed, so it is neither required nor read.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    class Cifar10(CIFAR10):
        train_list = [[f, None] for f, _ in CIFAR10.train_list]
        test_list = [[f, None] for f, _ in CIFAR10.test_list]

        def _load_meta(self) -> None:
            self.classes: list[str] = []

    class Cifar100(CIFAR100):
        train_list = [[f, None] for f, _ in CIFAR100.train_list]
        test_list = [[f, None] for f, _ in CIFAR100.test_list]
        _load_meta = Cifar10._load_meta

    return Cifar10 if name == "cifar10" else Cifar100


def _load_cifar(task: TaskSpec, root: Path) -> Arrays:
    cls = _cifar_class(task.dataset)
    label = _info(task.dataset).label
    base = root / cls.base_folder
    train_files = [base / f for f, _ in cls.train_list]
    test_files = [base / f for f, _ in cls.test_list]

    def missing() -> list[str]:
        return [p.name for p in train_files + test_files if not p.is_file()]

    if missing() and task.download:
        _download(task, root, label, lambda: cls(str(root), train=True, download=True))
    if absent := missing():
        raise DataError(
            f"task.dataRoot: no {label} files under {task.data_root} (expected {cls.base_folder}/ with "
            f"{', '.join(absent)}); set task.download: true or point dataRoot at the data"
        )

    def read(train: bool) -> tuple[Tensor, Tensor]:
        ds = cls(str(root), train=train)
        # torchvision holds the images as (N, H, W, C); the trainer's are (N, C, H, W).
        x = np.ascontiguousarray(np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2))
        return torch.from_numpy(x), torch.tensor(ds.targets, dtype=torch.int64)

    x_train, y_train = _read(task, lambda: read(True), train_files)
    x_test, y_test = _read(task, lambda: read(False), test_files)
    return x_train, y_train, x_test, y_test


def _find_idx(dirs: Sequence[Path], name: str) -> Path | None:
    for d in dirs:
        for candidate in (d / name, d / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _load_mnist_like(task: TaskSpec, root: Path, cache: Path | None) -> Arrays:
    from torchvision.datasets import MNIST, FashionMNIST
    from torchvision.datasets.utils import extract_archive

    cls = MNIST if task.dataset == "mnist" else FashionMNIST
    label = _info(task.dataset).label
    names = [f.removesuffix(".gz") for f, _ in cls.resources]  # train images, labels; test images, labels
    # torchvision's `<root>/<Class>/raw/` first, then a bare `raw/`, then the files directly under root.
    dirs = [root / cls.__name__ / "raw", root / "raw", root]

    def find() -> dict[str, Path]:
        return {name: p for name in names if (p := _find_idx(dirs, name)) is not None}

    found = find()
    if len(found) < len(names) and task.download:
        _download(task, root, label, lambda: cls(str(root), train=True, download=True))
        found = find()
    if missing := [name for name in names if name not in found]:
        raise DataError(
            f"task.dataRoot: no {label} files under {task.data_root} (expected "
            f"{dirs[0].relative_to(root)}/ with {', '.join(missing)}[.gz]); set task.download: true "
            "or point dataRoot at the data"
        )
    # torchvision reads only uncompressed `<root>/<Class>/raw/` files, and prefers legacy `processed/*.pt`
    # files where they exist. So it is given a staging root holding just the files found here (links;
    # gzipped ones decompressed), outside dataRoot, which may be read-only.
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="amlfs-idx-", dir=cache) as stage:
        raw = Path(stage) / cls.__name__ / "raw"
        raw.mkdir(parents=True)
        for name, path in found.items():
            if path.suffix != ".gz":
                (raw / name).symlink_to(path.absolute())
                continue
            try:
                extract_archive(str(path), str(raw))
            except Exception as exc:  # gzip and OS errors of several types
                raise _corrupt(task, [path], exc) from None

        def read(train: bool) -> tuple[Tensor, Tensor]:
            ds = cls(stage, train=train)
            return ds.data.unsqueeze(1), ds.targets

        x_train, y_train = _read(task, lambda: read(True), [found[n] for n in names[:2]])
        x_test, y_test = _read(task, lambda: read(False), [found[n] for n in names[2:]])
    return x_train, y_train, x_test, y_test


def _read(task: TaskSpec, read: Callable[[], tuple[Tensor, Tensor]], files: Sequence[Path]) -> tuple[Tensor, Tensor]:
    """`read()`'s (images, labels), any failure reported as corrupt `files` (the ones `read` parses)."""
    try:
        x, y = read()
    except Exception as exc:  # torchvision's parsers raise whatever the bytes trigger (pickle, assert, view...)
        raise _corrupt(task, files, exc) from None
    if len(x) != len(y):
        raise _corrupt(task, files, f"{len(x)} images but {len(y)} labels")
    return x, y


def _corrupt(task: TaskSpec, files: Sequence[Path], why: BaseException | str) -> DataError:
    if isinstance(why, BaseException):
        why = f"{type(why).__name__}: {_one_line(why)}" if str(why).strip() else type(why).__name__
    parents = {p.parent for p in files}
    where = (
        f"{', '.join(p.name for p in files)} under {files[0].parent}"
        if len(parents) == 1
        else ", ".join(map(str, files))
    )
    return DataError(
        f"task.dataRoot: corrupt {_info(task.dataset).label} data in {where} ({why}); delete those files "
        "and set task.download: true or copy them again"
    )


# --- imagefolder ----------------------------------------------------------------------------------


class _Samples(torch.utils.data.Dataset):
    """(path, label) pairs loaded with PIL and transformed."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Any) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from torchvision.datasets.folder import default_loader

        path, target = self.samples[i]
        return self.transform(default_loader(path)), target


class FolderTaskData(TaskData):
    """An ImageFolder tree (`train/` plus `val/` or `test/`) streamed from disk through DataLoaders.

    The validation split is carved from `train/`; the test split is the `val/` (or `test/`) folder,
    whose class folders must be a subset of those in `train/`.
    """

    def __init__(self, task: TaskSpec, root: Path, device: torch.device) -> None:
        from torchvision import transforms as T
        from torchvision.datasets import ImageFolder
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

        train_dir = root / "train"
        test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
        if not train_dir.is_dir() or test_dir is None:
            raise DataError(
                f"task.dataRoot: no ImageFolder tree under {task.data_root} (expected train/ and val/ "
                "or test/, one subfolder per class); point dataRoot at such a tree"
            )
        try:
            base = ImageFolder(str(train_dir))
            test_samples = make_dataset(str(test_dir), base.class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        except (FileNotFoundError, OSError) as exc:
            raise DataError(
                f"task.dataRoot: unreadable ImageFolder tree under {task.data_root} "
                f"({_one_line(exc)}); put at least one image per class folder"
            ) from None
        extra = sorted({p.name for p in test_dir.iterdir() if p.is_dir()} - set(base.classes))
        if extra:
            raise DataError(
                f"task.dataRoot: {test_dir.name}/ has classes missing from train/ "
                f"({', '.join(extra[:5])}); give both the same class folders"
            )
        normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        size = IMAGEFOLDER_SIZE
        eval_tf = T.Compose([T.Resize(size * 8 // 7), T.CenterCrop(size), T.ToTensor(), normalize])
        train_tf = (
            T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
            if task.augment
            else eval_tf
        )
        train_idx, val_idx = carve_val(len(base.samples), task.val_fraction, task.split_seed, task.train_limit)
        self.num_classes = len(base.classes)
        self.classes = list(base.classes)
        self.input_shape = (3, size, size)
        self.device = device
        self._workers = task.num_workers
        self._eval_tf = eval_tf
        self._sets = {
            "train": _Samples([base.samples[i] for i in train_idx.tolist()], train_tf),
            "val": _Samples([base.samples[i] for i in val_idx.tolist()], eval_tf),
            "test": _Samples(test_samples, eval_tf),
        }

    def size(self, split: str) -> int:
        _check_split(split)
        return len(self._sets[split])

    def _loader(
        self, dataset: _Samples, batch_size: int, order: list[int] | None, generator: torch.Generator | None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        return image_batches(dataset, batch_size, order, generator, self._workers, self.device)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        _check_batch_size(batch_size)
        dataset = self._sets["train"]
        order = torch.randperm(len(dataset), generator=generator).tolist()
        # The loader draws its workers' seeds (hence the augmentation) from `generator` too.
        yield from self._loader(dataset, batch_size, order, generator)

    def labels(self, split: str) -> Tensor:
        _check_split(split)
        return torch.tensor([c for _, c in self._sets[split].samples], dtype=torch.int64)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        _check_split(split)
        _check_batch_size(batch_size)
        dataset = self._sets[split]
        if split == "train":
            dataset = _Samples(dataset.samples, self._eval_tf)
        yield from self._loader(dataset, batch_size, None, None)


def image_batches(
    dataset: Any,
    batch_size: int,
    order: list[int] | None,
    generator: torch.Generator | None,
    workers: int,
    device: torch.device,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of a dataset of image files on the device, in `order` (None: as stored), decoded by `workers`
    DataLoader processes; an image PIL cannot read is a DataError naming it."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order,
        shuffle=False,
        drop_last=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=generator,
    )
    try:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(device, non_blocking=True)
    except OSError as exc:  # PIL's UnidentifiedImageError is an OSError
        why = " ".join(str(exc).split())[:200]
        raise DataError(f"task.dataRoot: unreadable image ({why}); remove or replace it") from None
