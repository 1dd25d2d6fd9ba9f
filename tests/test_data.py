"""The trainer's datasets, on small files written here in the real on-disk formats (no network)."""

from __future__ import annotations

import gzip
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from amlfs.spec import TaskSpec
from amlfs_trainer import data as D
from amlfs_trainer.data import DataError, crop_flip, dataset_info, load_task

CPU = torch.device("cpu")
CIFAR10_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR10_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def task(**kw: object) -> TaskSpec:
    return TaskSpec(**kw)  # type: ignore[arg-type]


def collect(batches) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batches, strict=True)
    return torch.cat(xs), torch.cat(ys)


# --- writers for the real formats -----------------------------------------------------------------


def synthetic_images(n: int, channels: int, side: int, offset: int, seed: int) -> np.ndarray:
    """uint8 (n, C, side, side): channel 0 holds the constant `offset + i` (the example's identity),
    other channels are noise so that crops and flips visibly change pixels."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, channels, side, side), dtype=np.uint8)
    x[:, 0] = (offset + np.arange(n)).astype(np.uint8)[:, None, None]
    return x


def identity_of(x_norm: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Recover channel 0's constant from normalised inputs (centre pixel survives any 4-px crop)."""
    c = x_norm.shape[-1] // 2
    raw = (x_norm[:, 0, c, c] * std.flatten()[0] + mean.flatten()[0]) * 255.0
    return raw.round().long()


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 30) -> dict[str, np.ndarray]:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    n = 5 * per_batch
    images = synthetic_images(n, 3, 32, 0, 1)
    labels = np.random.default_rng(2).integers(0, 10, n)
    for b in range(5):
        sl = slice(b * per_batch, (b + 1) * per_batch)
        entry = {
            "batch_label": f"training batch {b + 1} of 5",
            "labels": labels[sl].tolist(),
            "data": images[sl].reshape(per_batch, -1),
            "filenames": [f"img{i}.png" for i in range(per_batch)],
        }
        (base / f"data_batch_{b + 1}").write_bytes(pickle.dumps(entry, protocol=2))
    test_images = synthetic_images(n_test, 3, 32, 200, 3)
    test_labels = np.random.default_rng(4).integers(0, 10, n_test)
    entry = {
        "batch_label": "testing batch 1 of 1",
        "labels": test_labels.tolist(),
        "data": test_images.reshape(n_test, -1),
        "filenames": [f"t{i}.png" for i in range(n_test)],
    }
    (base / "test_batch").write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch, "num_vis": 3072}
    (base / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {"x": images, "y": labels, "x_test": test_images, "y_test": test_labels}


def write_cifar100(root: Path, n: int = 60, n_test: int = 20) -> dict[str, np.ndarray]:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(5)
    out = {
        "x": synthetic_images(n, 3, 32, 0, 6),
        "y": rng.integers(0, 100, n),
        "x_test": synthetic_images(n_test, 3, 32, 200, 7),
        "y_test": rng.integers(0, 100, n_test),
    }
    for name, x, y in (("train", out["x"], out["y"]), ("test", out["x_test"], out["y_test"])):
        entry = {
            "filenames": [f"{i}.png" for i in range(len(y))],
            "batch_label": name,
            "fine_labels": y.tolist(),
            "coarse_labels": (y // 5).tolist(),
            "data": x.reshape(len(y), -1),
        }
        (base / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    (base / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return out


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_mnist(
    root: Path,
    cls: str = "MNIST",
    n: int = 60,
    n_test: int = 20,
    gz: bool | set[str] = False,
    folder: str | None = None,
) -> dict:
    """The four idx files in `root/folder` (torchvision's `<cls>/raw` by default); `gz`: all or these names."""
    raw = root / (f"{cls}/raw" if folder is None else folder)
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(8)
    out = {
        "x": synthetic_images(n, 1, 28, 0, 9)[:, 0],
        "y": rng.integers(0, 10, n),
        "x_test": synthetic_images(n_test, 1, 28, 200, 10)[:, 0],
        "y_test": rng.integers(0, 10, n_test),
    }
    files = {
        "train-images-idx3-ubyte": out["x"],
        "train-labels-idx1-ubyte": out["y"],
        "t10k-images-idx3-ubyte": out["x_test"],
        "t10k-labels-idx1-ubyte": out["y_test"],
    }
    for name, arr in files.items():
        if gz is True or (isinstance(gz, set) and name in gz):
            (raw / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(arr)))
        else:
            (raw / name).write_bytes(idx_bytes(arr))
    return out


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("cifar10")
    return root, write_cifar10(root)


# --- info ---------------------------------------------------------------------------------------


def test_dataset_info_matches_loaded_shapes() -> None:
    assert dataset_info("cifar10") == (10, (3, 32, 32))
    assert dataset_info("cifar100") == (100, (3, 32, 32))
    assert dataset_info("mnist") == (10, (1, 28, 28))
    assert dataset_info("fashion-mnist") == (10, (1, 28, 28))
    assert dataset_info("digits") == (10, (1, 8, 8))
    assert dataset_info("mnist1d") == (10, (1, 40))
    assert dataset_info("imagefolder") == (0, (3, 224, 224))
    with pytest.raises(DataError, match=r"^task\.dataset: unknown"):
        dataset_info("svhn")


# --- digits and mnist1d -----------------------------------------------------------------------------


def test_digits_offline_split_and_normalisation() -> None:
    d = load_task(task(dataset="digits", val_fraction=0.1), CPU)
    assert (d.num_classes, d.input_shape) == (10, (1, 8, 8))
    assert d.size("test") == round(1797 * 0.2)
    pool = 1797 - d.size("test")
    assert d.size("val") == round(pool * 0.1) and d.size("train") == pool - d.size("val")
    x, y = collect(d.eval_batches("train", 500))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (1, 8, 8)
    assert set(y.tolist()) == set(range(10))
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    # the test split does not move with split_seed; validation does
    other = load_task(task(dataset="digits", split_seed=7), CPU)
    assert torch.equal(collect(d.eval_batches("test", 1000))[0], collect(other.eval_batches("test", 1000))[0])
    assert not torch.equal(collect(d.eval_batches("val", 1000))[0], collect(other.eval_batches("val", 1000))[0])


def test_mnist1d_generated_offline_and_cached(tmp_path: Path) -> None:
    np.random.seed(123)
    random.seed(123)
    before = (np.random.get_state()[1].copy(), random.getstate())
    d = load_task(task(dataset="mnist1d", val_fraction=0.1), CPU, cache_dir=tmp_path)
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
    assert (d.num_classes, d.input_shape) == (10, (1, 40))
    assert (d.size("train"), d.size("val"), d.size("test")) == (3600, 400, 1000)
    xb, yb = next(d.train_batches(64, torch.Generator().manual_seed(0)))
    assert xb.shape == (64, 1, 40) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 1
    again = load_task(task(dataset="mnist1d", val_fraction=0.1), CPU, cache_dir=tmp_path)  # from the cache
    for split in ("train", "val", "test"):
        a, b = collect(d.eval_batches(split, 4096)), collect(again.eval_batches(split, 4096))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert set(collect(d.eval_batches("test", 4096))[1].tolist()) == set(range(10))


# --- CIFAR-10 -------------------------------------------------------------------------------------


def test_cifar10_round_trip_and_normalisation(cifar10_root) -> None:
    root, raw = cifar10_root
    d = load_task(task(dataset="cifar10", data_root=str(root), val_fraction=0.2, augment=False), CPU)
    assert (d.num_classes, d.input_shape) == (10, (3, 32, 32))
    assert (d.size("train"), d.size("val"), d.size("test")) == (80, 20, 30)
    seen = []
    for split in ("train", "val", "test"):
        x, y = collect(d.eval_batches(split, 7))
        ids = identity_of(x, CIFAR10_MEAN, CIFAR10_STD)
        src = ids - 200 if split == "test" else ids
        xs, ys = (raw["x_test"], raw["y_test"]) if split == "test" else (raw["x"], raw["y"])
        expected = (torch.from_numpy(xs[src.numpy()]).float() / 255 - CIFAR10_MEAN) / CIFAR10_STD
        torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(y, torch.from_numpy(ys[src.numpy()]))
        assert torch.equal(ids, ids.sort().values), "eval order is fixed (sorted)"
        if split != "test":
            seen.append(set(ids.tolist()))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(100))


def test_cifar10_split_determinism_and_train_limit(cifar10_root) -> None:
    root, _ = cifar10_root

    def val_ids(**kw: object) -> list[int]:
        d = load_task(task(dataset="cifar10", data_root=str(root), val_fraction=0.2, **kw), CPU)
        return identity_of(collect(d.eval_batches("val", 64))[0], CIFAR10_MEAN, CIFAR10_STD).tolist()

    assert val_ids(split_seed=1) == val_ids(split_seed=1)
    assert val_ids(split_seed=1) != val_ids(split_seed=2)
    limited = load_task(
        task(dataset="cifar10", data_root=str(root), val_fraction=0.2, split_seed=1, train_limit=25), CPU
    )
    assert limited.size("train") == 25 and limited.size("val") == 20
    train_ids = identity_of(collect(limited.eval_batches("train", 64))[0], CIFAR10_MEAN, CIFAR10_STD).tolist()
    assert set(train_ids).isdisjoint(val_ids(split_seed=1))


def test_cifar10_train_epoch_shuffled_augmented_labels_kept(cifar10_root) -> None:
    root, raw = cifar10_root
    d = load_task(task(dataset="cifar10", data_root=str(root), val_fraction=0.2, augment=True), CPU)
    batches = list(d.train_batches(7, torch.Generator().manual_seed(3)))
    assert [len(y) for _, y in batches] == [7] * 11 + [3]  # 80 examples, last partial batch kept
    x, y = collect(batches)
    assert x.shape == (80, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    ids = identity_of(x, CIFAR10_MEAN, CIFAR10_STD)
    assert sorted(ids.tolist()) == sorted(
        identity_of(collect(d.eval_batches("train", 80))[0], CIFAR10_MEAN, CIFAR10_STD).tolist()
    )
    assert not torch.equal(ids, ids.sort().values), "shuffled"
    assert torch.equal(y, torch.from_numpy(raw["y"][ids.numpy()])), "labels follow their images"
    plain = (torch.from_numpy(raw["x"][ids.numpy()]).float() / 255 - CIFAR10_MEAN) / CIFAR10_STD
    changed = (x - plain).abs().flatten(1).amax(1) > 1e-3
    assert changed.float().mean() > 0.5, "crop/flip changes most images"
    again = collect(d.train_batches(7, torch.Generator().manual_seed(3)))
    assert torch.equal(again[0], x) and torch.equal(again[1], y), "same generator, same epoch"
    other = collect(d.train_batches(7, torch.Generator().manual_seed(4)))
    assert not torch.equal(other[1], y)


def test_channels_last_batches_same_values(cifar10_root) -> None:
    """The CUDA layout (channels_last), forced on the CPU: same values, NHWC strides."""
    root, _ = cifar10_root
    d = load_task(task(dataset="cifar10", data_root=str(root), val_fraction=0.2), CPU)
    ref_train = next(d.train_batches(16, torch.Generator().manual_seed(0)))[0]
    ref_val = next(d.eval_batches("val", 16))[0]
    d._channels_last = True  # what InMemoryTaskData sets on CUDA for image data
    x_train = next(d.train_batches(16, torch.Generator().manual_seed(0)))[0]
    x_val = next(d.eval_batches("val", 16))[0]
    for x, ref in ((x_train, ref_train), (x_val, ref_val)):
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, ref)


def test_crop_flip_matches_reference() -> None:
    x = torch.randint(0, 256, (5, 3, 6, 7), dtype=torch.uint8)
    dy, dx = torch.tensor([0, 4, 2, 1, 3]), torch.tensor([4, 0, 2, 3, 1])
    flip = torch.tensor([False, True, False, True, True])
    out = crop_flip(x, 2, dy, dx, flip)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)))
    for i in range(5):
        ref = padded[i, :, dy[i] : dy[i] + 6, dx[i] : dx[i] + 7]
        if flip[i]:
            ref = ref[:, :, ::-1]
        assert np.array_equal(out[i].numpy(), ref)
    # zero offset at the centre and no flip is the identity
    same = crop_flip(x, 2, torch.full((5,), 2), torch.full((5,), 2), torch.zeros(5, dtype=torch.bool))
    assert torch.equal(same, x)


# --- CIFAR-100, MNIST, Fashion-MNIST --------------------------------------------------------------


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    raw = write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "meta").unlink()  # class names: not needed, as before
    d = load_task(task(dataset="cifar100", data_root=str(tmp_path), val_fraction=0.25), CPU)
    assert (d.num_classes, d.size("train"), d.size("val"), d.size("test")) == (100, 45, 15, 20)
    mean = torch.tensor([0.5071, 0.4865, 0.4409]).view(1, 3, 1, 1)
    std = torch.tensor([0.2673, 0.2564, 0.2762]).view(1, 3, 1, 1)
    x, y = collect(d.eval_batches("test", 8))
    ids = identity_of(x, mean, std) - 200
    assert torch.equal(ids, torch.arange(20)) and torch.equal(y, torch.from_numpy(raw["y_test"]))
    xb, yb = next(d.train_batches(16, torch.Generator().manual_seed(0)))
    assert xb.shape == (16, 3, 32, 32)
    assert torch.equal(yb, torch.from_numpy(raw["y"][identity_of(xb, mean, std).numpy()]))


@pytest.mark.parametrize(
    ("dataset", "cls", "gz", "mean", "std"),
    [
        ("mnist", "MNIST", False, 0.1307, 0.3081),
        ("fashion-mnist", "FashionMNIST", True, 0.2860, 0.3530),
    ],
)
def test_mnist_like_idx_files(tmp_path: Path, dataset: str, cls: str, gz: bool, mean: float, std: float) -> None:
    raw = write_mnist(tmp_path, cls, gz=gz)
    d = load_task(task(dataset=dataset, data_root=str(tmp_path), val_fraction=0.25, augment=True), CPU)
    assert (d.num_classes, d.input_shape) == (10, (1, 28, 28))
    assert (d.size("train"), d.size("val"), d.size("test")) == (45, 15, 20)
    m, s = torch.tensor(mean), torch.tensor(std)
    x, y = collect(d.eval_batches("test", 6))
    torch.testing.assert_close(x, (torch.from_numpy(raw["x_test"]).float()[:, None] / 255 - m) / s)
    assert torch.equal(y, torch.from_numpy(raw["y_test"]))
    xt, yt = collect(d.train_batches(16, torch.Generator().manual_seed(0)))
    ids = identity_of(xt, m, s)
    assert xt.shape == (45, 1, 28, 28) and torch.equal(yt, torch.from_numpy(raw["y"][ids.numpy()]))
    plain = (torch.from_numpy(raw["x"][ids.numpy()]).float()[:, None] / 255 - m) / s
    assert ((xt - plain).abs().flatten(1).amax(1) > 1e-3).any(), "random crop moves pixels"


@pytest.mark.parametrize(
    ("folder", "gz"),
    [
        ("raw", False),  # a bare raw/ under dataRoot
        ("", False),  # the files directly under dataRoot
        ("", {"train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}),  # some gzipped, some not
        ("MNIST/raw", {"train-labels-idx1-ubyte"}),
    ],
)
def test_mnist_other_layouts_read_without_writing_to_data_root(tmp_path: Path, folder: str, gz: object) -> None:
    root, cache = tmp_path / "data", tmp_path / "cache"
    raw = write_mnist(root, folder=folder, gz=gz)  # type: ignore[arg-type]
    before = sorted(root.rglob("*"))
    d = load_task(task(dataset="mnist", data_root=str(root), val_fraction=0.25), CPU, cache_dir=cache)
    assert (d.size("train"), d.size("val"), d.size("test")) == (45, 15, 20)
    x, y = collect(d.eval_batches("test", 32))
    assert torch.equal(identity_of(x, torch.tensor(0.1307), torch.tensor(0.3081)) - 200, torch.arange(20))
    assert torch.equal(y, torch.from_numpy(raw["y_test"]))
    xt, yt = collect(d.eval_batches("train", 64))
    ids = identity_of(xt, torch.tensor(0.1307), torch.tensor(0.3081))
    assert torch.equal(yt, torch.from_numpy(raw["y"][ids.numpy()]))
    assert sorted(root.rglob("*")) == before, "dataRoot is only read"
    assert list(cache.iterdir()) == [], "the decompressed staging copy is removed"


def test_mnist_layout_is_torchvisions_and_download_skipped_when_present(tmp_path: Path, monkeypatch) -> None:
    import urllib.request

    import torchvision

    raw = write_mnist(tmp_path)
    tv = torchvision.datasets.MNIST(str(tmp_path), train=False, download=True)  # offline: files found
    assert torch.equal(tv.data, torch.from_numpy(raw["x_test"])) and torch.equal(
        tv.targets, torch.from_numpy(raw["y_test"])
    )

    def no_network(*a: object, **k: object) -> None:
        raise AssertionError("download attempted although the files exist")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    d = load_task(task(dataset="mnist", data_root=str(tmp_path), download=True), CPU)
    assert d.size("test") == 20
    write_cifar10(tmp_path)
    assert load_task(task(dataset="cifar10", data_root=str(tmp_path), download=True), CPU).size("test") == 30


# --- errors -------------------------------------------------------------------------------------------


def test_missing_files_name_field_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_task(task(dataset="cifar10", data_root=str(tmp_path)), CPU)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("task.dataRoot: no CIFAR-10 files under")
    assert str(tmp_path) in msg and "cifar-10-batches-py/" in msg and "task.download: true" in msg
    with pytest.raises(DataError, match=r"task.dataRoot: no MNIST files .*MNIST/raw/"):
        load_task(task(dataset="mnist", data_root=str(tmp_path)), CPU)
    with pytest.raises(DataError, match=r"task.dataRoot: no CIFAR-100 files .*cifar-100-python/"):
        load_task(task(dataset="cifar100", data_root=str(tmp_path)), CPU)
    with pytest.raises(DataError, match=r"^task\.dataRoot: empty"):
        load_task(task(dataset="cifar10"), CPU)


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ("cifar10", r"CIFAR-10 into .* failed \(<urlopen error \[Errno -3\]"),
        # torchvision tries each mirror and reports them all, over several lines
        ("fashion-mnist", r"Fashion-MNIST into .* failed \(Error downloading train-images-idx3-ubyte.gz: Tried "),
    ],
)
def test_failed_download_is_a_data_error(tmp_path: Path, monkeypatch, dataset: str, expected: str) -> None:
    import urllib.error
    import urllib.request

    def offline(*a: object, **k: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match=rf"^task.download: downloading {expected}") as err:
        load_task(task(dataset=dataset, data_root=str(tmp_path), download=True), CPU)
    assert "\n" not in str(err.value) and str(err.value).endswith("check network access")


def test_corrupt_files(tmp_path: Path) -> None:
    fix = r"; delete those files and set task.download: true or copy them again$"
    write_cifar10(tmp_path)
    base = tmp_path / "cifar-10-batches-py"
    path = base / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(
        DataError,
        match=r"^task.dataRoot: corrupt CIFAR-10 data in data_batch_1, .*data_batch_3, .*"
        rf"under {re.escape(str(base))} \(UnpicklingError: pickle data was truncated\){fix}",
    ):
        load_task(task(dataset="cifar10", data_root=str(tmp_path)), CPU)
    short = tmp_path / "c100"
    write_cifar100(short)
    entry = pickle.loads((short / "cifar-100-python" / "test").read_bytes())
    entry["fine_labels"] = entry["fine_labels"][:-1]
    (short / "cifar-100-python" / "test").write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DataError, match=rf"corrupt CIFAR-100 data in test under .* \(20 images but 19 labels\){fix}"):
        load_task(task(dataset="cifar100", data_root=str(short)), CPU)

    mnist = tmp_path / "m"
    write_mnist(mnist)
    lbl = mnist / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    lbl.write_bytes(lbl.read_bytes()[:-3])
    with pytest.raises(
        DataError,
        match=r"^task.dataRoot: corrupt MNIST data in t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte under "
        rf".*MNIST/raw \(RuntimeError: shape '\[20\]' is invalid for input of size 17\){fix}",
    ):
        load_task(task(dataset="mnist", data_root=str(mnist)), CPU)
    lbl.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))  # not an idx file at all
    with pytest.raises(DataError, match=r"corrupt MNIST data in t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"):
        load_task(task(dataset="mnist", data_root=str(mnist)), CPU)
    fewer = tmp_path / "f"
    raw = write_mnist(fewer, folder="")
    (fewer / "train-labels-idx1-ubyte").write_bytes(idx_bytes(raw["y"][:-1]))
    with pytest.raises(DataError, match=rf"corrupt MNIST data in train-images.* \(60 images but 59 labels\){fix}"):
        load_task(task(dataset="mnist", data_root=str(fewer)), CPU)
    gz = tmp_path / "g"
    write_mnist(gz, "FashionMNIST", gz=True)
    (gz / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(
        DataError,
        match=r"^task.dataRoot: corrupt Fashion-MNIST data in train-images-idx3-ubyte.gz under .*raw \(BadGzip",
    ):
        load_task(task(dataset="fashion-mnist", data_root=str(gz)), CPU)
    wrong = tmp_path / "w"
    raw = write_mnist(wrong)
    (wrong / "MNIST" / "raw" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(raw["y"] + 10))
    with pytest.raises(DataError, match=r"MNIST labels under .* fall outside 0\.\.9"):
        load_task(task(dataset="mnist", data_root=str(wrong)), CPU)


# --- s3 and imagefolder -----------------------------------------------------------------------------


def test_s3_root_is_copied_to_the_cache(tmp_path: Path, monkeypatch) -> None:
    from amlfs import storage

    src = tmp_path / "bucket" / "datasets"
    write_cifar10(src, per_batch=4, n_test=5)
    calls: list[tuple[str, Path]] = []
    real = storage.download_prefix

    def download_prefix(uri: str, dest: Path) -> Path:  # S3 stand-in: the real copy, from a file:// prefix
        calls.append((uri, dest))
        return real(f"file://{src}", dest)

    monkeypatch.setattr(storage, "download_prefix", download_prefix)
    d = load_task(
        task(dataset="cifar10", data_root="s3://bucket/datasets", val_fraction=0.25), CPU, cache_dir=tmp_path / "cache"
    )
    assert [c[0] for c in calls] == ["s3://bucket/datasets"]
    assert calls[0][1].is_relative_to(tmp_path / "cache")
    assert (calls[0][1] / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert (d.size("train"), d.size("val"), d.size("test")) == (15, 5, 5)


def write_imagefolder(root: Path, classes: dict[str, tuple[int, int, int]], per_class: dict[str, int]) -> None:
    from PIL import Image

    for split, n in per_class.items():
        for name, colour in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12 + i, 10), colour).save(folder / f"{i}.png")


def test_imagefolder(tmp_path: Path) -> None:
    colours = {"apple": (200, 10, 10), "kiwi": (10, 200, 10), "plum": (10, 10, 200)}
    write_imagefolder(tmp_path, colours, {"train": 4, "val": 1})
    assert dataset_info("imagefolder", str(tmp_path)) == (3, (3, 224, 224))
    d = load_task(task(dataset="imagefolder", data_root=str(tmp_path), val_fraction=0.25, num_workers=0), CPU)
    assert (d.num_classes, d.input_shape) == (3, (3, 224, 224))
    assert (d.size("train"), d.size("val"), d.size("test")) == (9, 3, 3)
    x, y = collect(d.eval_batches("test", 2))
    assert x.shape == (3, 3, 224, 224) and y.tolist() == [0, 1, 2]
    mean = torch.tensor(D.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(D.IMAGENET_STD).view(1, 3, 1, 1)
    expected = (torch.tensor(list(colours.values())).float().view(3, 3, 1, 1) / 255 - mean) / std
    torch.testing.assert_close(x, expected.expand_as(x), atol=1e-5, rtol=0)
    xt, yt = collect(d.train_batches(4, torch.Generator().manual_seed(0)))
    assert xt.shape == (9, 3, 224, 224) and yt.dtype == torch.int64
    # solid-colour images: the colour identifies the class even after crop and flip
    assert torch.equal(xt[:, :, 112, 112].argmax(1), yt)
    limited = load_task(
        task(dataset="imagefolder", data_root=str(tmp_path), val_fraction=0.25, train_limit=2, num_workers=0), CPU
    )
    assert limited.size("train") == 2 and limited.size("val") == 3


def test_imagefolder_errors(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, {"a": (0, 0, 0), "b": (9, 9, 9)}, {"train": 2})
    with pytest.raises(DataError, match=r"task.dataRoot: no ImageFolder tree .*expected train/ and val/"):
        load_task(task(dataset="imagefolder", data_root=str(tmp_path)), CPU)
    write_imagefolder(tmp_path, {"a": (0, 0, 0), "zebra": (9, 9, 9)}, {"test": 1})
    with pytest.raises(DataError, match="test/ has classes missing from train/ \\(zebra\\)"):
        load_task(task(dataset="imagefolder", data_root=str(tmp_path)), CPU)
