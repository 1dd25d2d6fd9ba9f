"""Label noise and long-tailed subsets for robustness studies: realised as asked, seeded, never on test."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from amlfs.spec import ImbalanceSpec, LabelNoiseSpec, TaskSpec
from amlfs_trainer.corruption import class_counts, corrupt, long_tail_counts, long_tail_indices, noisy_labels
from amlfs_trainer.data import load_task

C = 10


def labels(n: int = 5000, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, C, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_noise_rate_and_type_are_realised_exactly(kind: str, rate: float) -> None:
    y = labels()
    noisy = noisy_labels(y, C, LabelNoiseSpec(type=kind, rate=rate))  # type: ignore[arg-type]
    changed = noisy != y
    assert int(changed.sum()) == round(rate * len(y))
    assert noisy.min() >= 0 and noisy.max() < C
    if kind == "pairflip":
        assert torch.equal(noisy[changed], (y[changed] + 1) % C)
    else:  # the wrong label is uniform over the other 9 classes
        offset = (noisy[changed] - y[changed]) % C
        freq = torch.bincount(offset, minlength=C).float() / len(offset)
        assert freq[0] == 0 and (freq[1:] - 1 / 9).abs().max() < 0.03
        # and a noisy example's class does not predict being chosen
        per_class = torch.tensor([changed[y == k].float().mean().item() for k in range(C)])
        assert (per_class - rate).abs().max() < 0.06


def test_noise_is_a_pure_function_of_its_seed() -> None:
    y = labels()
    a = noisy_labels(y, C, LabelNoiseSpec(rate=0.4, seed=1))
    assert torch.equal(a, noisy_labels(y, C, LabelNoiseSpec(rate=0.4, seed=1)))
    assert not torch.equal(a, noisy_labels(y, C, LabelNoiseSpec(rate=0.4, seed=2)))
    assert torch.equal(noisy_labels(y, C, LabelNoiseSpec(rate=0.0)), y)


def test_long_tail_follows_the_exponential_profile() -> None:
    assert long_tail_counts([400, 380, 420], 100.0) == [380, 38, 4]
    counts = long_tail_counts([500] * C, 50.0)
    assert counts[0] == 500 and counts[-1] == 10 and counts == sorted(counts, reverse=True)
    y = labels(8000)
    keep = long_tail_indices(y, C, ImbalanceSpec(ratio=50.0, seed=3))
    got = torch.bincount(y[keep], minlength=C).tolist()
    assert got == long_tail_counts(torch.bincount(y, minlength=C).tolist(), 50.0)
    assert got[0] / got[-1] == pytest.approx(50.0, rel=0.1)
    assert torch.equal(keep, long_tail_indices(y, C, ImbalanceSpec(ratio=50.0, seed=3)))
    assert not torch.equal(keep, long_tail_indices(y, C, ImbalanceSpec(ratio=50.0, seed=4)))
    assert torch.equal(keep, keep.unique())  # each example at most once


def test_corruption_touches_train_and_val_never_test() -> None:
    clean = TaskSpec(dataset="digits", augment=False)
    # the same seed as the split's: the noise must still fall on train and validation alike
    noisy = TaskSpec(dataset="digits", augment=False, label_noise=LabelNoiseSpec(rate=0.4, seed=0))
    x, y = torch.randn(1437, 1, 8, 8), labels(1437)
    xt, yt = torch.randn(360, 1, 8, 8), labels(360, 1)
    out = corrupt((x, y, xt, yt), noisy, C)
    assert out[2] is xt and out[3] is yt and torch.equal(out[0], x)
    assert int((out[1] != y).sum()) == round(0.4 * 1437)
    # through the loader: the validation split is as noisy as the training split, the test split is clean
    ref, got = load_task(clean, torch.device("cpu")), load_task(noisy, torch.device("cpu"))

    def split(data, name):
        xs, ys = zip(*data.eval_batches(name, 10_000), strict=True)
        return torch.cat(xs), torch.cat(ys)

    for name in ("train", "val"):
        (xa, ya), (xb, yb) = split(ref, name), split(got, name)
        assert torch.equal(xa, xb)
        assert 0.33 < (ya != yb).float().mean().item() < 0.47, name
    (xa, ya), (xb, yb) = split(ref, "test"), split(got, "test")
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    tail = load_task(TaskSpec(dataset="digits", imbalance=ImbalanceSpec(ratio=20.0)), torch.device("cpu"))
    train, test = class_counts(tail, "train"), class_counts(tail, "test")
    assert train[0] > 10 * train[-1]
    assert test == class_counts(ref, "test") and max(test) < 1.5 * min(test)  # the test split stays as it was


def test_bad_corruption_settings_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"below 0\.5 for pairflip"):
        TaskSpec(label_noise=LabelNoiseSpec(type="pairflip", rate=0.5))
    with pytest.raises(ValidationError, match=r"in-memory datasets only"):
        TaskSpec(dataset="imagefolder", imbalance=ImbalanceSpec(ratio=10))
    with pytest.raises(ValidationError):
        ImbalanceSpec(ratio=0.5)
