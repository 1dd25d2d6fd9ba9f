"""The trainer's networks: shapes, heads, parameter counts, gradients and shape errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amlfs.spec import ModelSpec
from amlfs_trainer.models import Classifier, CosineLinear, ModelError, build_model

CASES = [  # (model, input shape of one example)
    ("mlp", (1, 8, 8)),
    ("mlp", (1, 40)),
    ("small-cnn", (1, 8, 8)),
    ("small-cnn", (1, 28, 28)),
    ("small-cnn", (3, 32, 32)),
    ("cnn1d", (1, 40)),
    ("resnet20", (3, 32, 32)),
    ("resnet32", (1, 28, 28)),
    ("resnet56", (3, 32, 32)),
    ("resnet18", (3, 32, 32)),
    ("resnet50", (3, 32, 32)),
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("head", ["linear", "cosine"])
@pytest.mark.parametrize(("name", "shape"), CASES)
def test_builds_and_outputs_one_row_per_example(name: str, shape: tuple[int, ...], head: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(name=name, head=head, width=8), 7, shape)
    assert isinstance(model, Classifier)
    assert isinstance(model.head, CosineLinear if head == "cosine" else nn.Linear)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7) and out.dtype == torch.float32 and torch.isfinite(out).all()
    if head == "cosine":
        assert out.abs().max() <= 1.0


def test_cosine_head_is_unscaled_cosine_of_features_and_weights() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="small-cnn", head="cosine", width=8), 5, (1, 8, 8)).eval()
    x = torch.randn(4, 1, 8, 8)
    feats = model.features(x)
    assert feats.shape == (4, model.feature_dim)
    expected = F.normalize(feats, dim=1) @ F.normalize(model.head.weight, dim=1).T
    torch.testing.assert_close(model(x), expected)
    # invariant to the scale of the features and of the weights
    head = model.head
    torch.testing.assert_close(head(feats * 37.0), head(feats))
    with torch.no_grad():
        head.weight.mul_(0.01)
    torch.testing.assert_close(head(feats), expected)
    # a feature equal to a class weight gives exactly cos = 1 there, and nothing above 1
    aligned = head(head.weight.detach()[:3] * 5)
    torch.testing.assert_close(aligned.diagonal(), torch.ones(3))
    assert aligned.max() <= 1.0 and aligned.min() >= -1.0


def test_same_feature_extractor_for_both_heads() -> None:
    for name, shape in CASES:
        a = build_model(ModelSpec(name=name, head="linear", width=8), 10, shape)
        b = build_model(ModelSpec(name=name, head="cosine", width=8), 10, shape)
        assert a.feature_dim == b.feature_dim
        assert n_params(a.features) == n_params(b.features)
        assert n_params(a) - n_params(b) == 10  # the linear head's bias


def test_cifar_resnet_parameter_counts() -> None:
    counts = {
        name: n_params(build_model(ModelSpec(name=name), 10, (3, 32, 32)))
        for name in ("resnet20", "resnet32", "resnet56")
    }
    assert counts["resnet20"] == pytest.approx(0.27e6, rel=0.01)
    assert counts["resnet32"] == pytest.approx(0.46e6, rel=0.01)
    assert counts["resnet56"] == pytest.approx(0.85e6, rel=0.01)
    assert all(
        n_params(b.shortcut) == 0 for b in build_model(ModelSpec(name="resnet20"), 10, (3, 32, 32)).features.blocks
    ), "option-A shortcuts have no parameters"


def test_torchvision_resnet_stem_depends_on_input_size() -> None:
    small = build_model(ModelSpec(name="resnet18"), 10, (3, 32, 32)).features
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    big = build_model(ModelSpec(name="resnet18"), 10, (1, 96, 96)).features
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2) and big.conv1.in_channels == 1
    assert isinstance(big.maxpool, nn.MaxPool2d)
    assert build_model(ModelSpec(name="resnet50"), 10, (3, 32, 32)).feature_dim == 2048


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("mlp", (1, 8, 8)),
        ("small-cnn", (1, 8, 8)),
        ("cnn1d", (1, 40)),
        ("resnet20", (3, 32, 32)),
        ("resnet18", (3, 16, 16)),
    ],
)
@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_gradient_reaches_every_parameter(name: str, shape: tuple[int, ...], head: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(name=name, head=head, width=8), 10, shape).train()
    logits = model(torch.randn(4, *shape))
    scale = 16.0 if head == "cosine" else 1.0
    F.cross_entropy(scale * logits, torch.tensor([0, 1, 2, 3])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)))
    assert first.weight.grad.abs().sum() > 0


def test_channels_last_gives_the_same_outputs() -> None:
    torch.manual_seed(0)
    for name in ("small-cnn", "resnet20"):
        model = build_model(ModelSpec(name=name, width=8), 10, (3, 32, 32)).eval()
        x = torch.randn(2, 3, 32, 32)
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-4, rtol=1e-4)


def test_same_seed_same_initial_weights() -> None:
    torch.manual_seed(3)
    a = build_model(ModelSpec(name="resnet20", head="cosine"), 10, (3, 32, 32))
    torch.manual_seed(3)
    b = build_model(ModelSpec(name="resnet20", head="cosine"), 10, (3, 32, 32))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize(
    ("name", "shape", "classes", "fragment"),
    [
        ("small-cnn", (1, 40), 10, "needs images (C, H, W) but the inputs are (1, 40); use cnn1d or mlp"),
        ("resnet20", (1, 40), 10, "needs images"),
        ("resnet20", (3, 4, 4), 10, "at least 8x8"),
        ("resnet18", (1, 8), 10, "needs images"),
        ("cnn1d", (3, 32, 32), 10, "needs 1-D signals (C, L)"),
        ("cnn1d", (1, 5), 10, "length >= 8"),
        ("mlp", (1, 0, 8), 10, "invalid input shape"),
        ("mlp", (1, 8, 8), 1, "at least 2 classes"),
    ],
)
def test_bad_shape_is_a_model_error(name: str, shape: tuple[int, ...], classes: int, fragment: str) -> None:
    with pytest.raises(ModelError) as err:
        build_model(ModelSpec(name=name), classes, shape)
    msg = str(err.value)
    assert msg.startswith(f"model.name: {name} ") and "\n" not in msg and fragment in msg
