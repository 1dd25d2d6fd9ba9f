"""Networks for the trainer: a feature extractor plus a linear or cosine classifier head.

Every model is a `Classifier` with `.features` (inputs -> (N, feature_dim)) and `.head`. With
`model.head: linear` the head returns logits; with `model.head: cosine` it returns the cosine
similarities between L2-normalised features and L2-normalised class weights, in [-1, 1] and *unscaled*
(the loss multiplies by `model.scale`). The feature extractor is the same for both heads.

Models:
- `mlp`: flatten, two hidden layers of 4*width (Linear-BN-ReLU). Any input shape.
- `small-cnn`: three stages of 3x3 conv-BN-ReLU (width, 2*width, 4*width channels; stride-2 convs between
  stages), global average pooling. Images (C, H, W) with H, W >= 4.
- `cnn1d`: the MNIST-1D paper's CNN (three Conv1d + ReLU: kernel 5 stride 2, then kernel 3 stride 2 twice,
  `width` channels), flattened. Signals (C, L) with L >= 8.
- `resnet20/32/56`: the CIFAR ResNets of He et al. (2016), 3 stages of 16/32/64 channels, option-A
  (parameter-free, zero-padded) shortcuts, Kaiming-normal init; 0.27M / 0.46M / 0.85M parameters on
  CIFAR-10. Images (C, H, W) with H, W >= 8.
- `resnet18/50`: torchvision's, weights=None. For inputs of at most 64 pixels a side the stem is replaced
  by a 3x3 stride-1 conv and the max-pool is dropped (the usual CIFAR adaptation); otherwise the stem is
  the ImageNet 7x7 stride-2 conv + max-pool (rebuilt for inputs that do not have 3 channels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amlfs.contract import ConfigError
from amlfs.spec import ModelSpec

SMALL_INPUT = 64  # resnet18/50 use the CIFAR stem up to this side length


class ModelError(ConfigError):
    """A model that cannot take the task's inputs. `str()` is one line naming the field and the fix."""


class CosineLinear(nn.Module):
    """cos(theta_j) between L2-normalised inputs and L2-normalised class weights; no scale, in [-1, 1].

    Computed in float32 even under autocast, so normalisation stays accurate in low precision.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            cos = F.linear(F.normalize(x.float(), dim=1), F.normalize(self.weight.float(), dim=1))
        return cos.clamp(-1.0, 1.0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Classifier(nn.Module):
    """`head(features(x))`; `feature_dim` is the width of the features fed to the head. With `bn_neck` a
    BatchNorm1d sits between them (absent otherwise, so a model without it has exactly the plain state)."""

    def __init__(
        self, features: nn.Module, feature_dim: int, num_classes: int, head: str, bn_neck: bool = False
    ) -> None:
        super().__init__()
        self.features = features
        self.feature_dim = feature_dim
        self.neck: nn.Module | None = nn.BatchNorm1d(feature_dim) if bn_neck else None
        self.head: nn.Module = (
            CosineLinear(feature_dim, num_classes) if head == "cosine" else nn.Linear(feature_dim, num_classes)
        )

    def embed(self, x: Tensor) -> Tensor:
        """The embedding retrieval and verification compare: the features (after the BN-neck, if any)."""
        f = self.features(x)
        return self.neck(f) if self.neck is not None else f

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


def _kaiming(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --- mlp, small-cnn, cnn1d ------------------------------------------------------------------------


def _mlp(input_shape: tuple[int, ...], width: int) -> tuple[nn.Module, int]:
    hidden = 4 * width
    features = nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
    )
    return features, hidden


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _small_cnn(input_shape: tuple[int, ...], width: int) -> tuple[nn.Module, int]:
    c = input_shape[0]
    w1, w2, w3 = width, 2 * width, 4 * width
    layers = [
        *_conv_bn(c, w1),
        *_conv_bn(w1, w1),
        *_conv_bn(w1, w2, 2),
        *_conv_bn(w2, w2),
        *_conv_bn(w2, w3, 2),
        *_conv_bn(w3, w3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ]
    features = nn.Sequential(*layers)
    _kaiming(features)
    return features, w3


def _conv1d_len(n: int, kernel: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - kernel) // stride + 1


def _cnn1d(input_shape: tuple[int, ...], width: int) -> tuple[nn.Module, int]:
    c, length = input_shape
    out_len = _conv1d_len(_conv1d_len(_conv1d_len(length, 5, 2, 1), 3, 2, 1), 3, 2, 1)
    features = nn.Sequential(
        nn.Conv1d(c, width, 5, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv1d(width, width, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv1d(width, width, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Flatten(),
    )
    return features, width * out_len


# --- CIFAR ResNets (He et al. 2016, section 4.2) --------------------------------------------------


class _ShortcutA(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = _ShortcutA(cout - cin) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class CifarResNet(nn.Module):
    """Stem conv 3x3/16, three stages of n basic blocks (16, 32, 64 channels), global average pooling."""

    def __init__(self, depth: int, in_channels: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(*_conv_bn(in_channels, 16))
        blocks: list[nn.Module] = []
        cin = 16
        for i, cout in enumerate((16, 32, 64)):
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        _kaiming(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.blocks(self.stem(x)))


# --- torchvision ResNets --------------------------------------------------------------------------


def _torchvision_resnet(name: str, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    c, h, w = input_shape
    if max(h, w) <= SMALL_INPUT:
        net.conv1 = nn.Conv2d(c, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif c != 3:
        net.conv1 = nn.Conv2d(c, 64, 7, 2, 3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


# --- build_model ----------------------------------------------------------------------------------

_IMAGE_MODELS = {"small-cnn": 4, "resnet20": 8, "resnet32": 8, "resnet56": 8, "resnet18": 8, "resnet50": 8}
_RESNET_DEPTH = {"resnet20": 20, "resnet32": 32, "resnet56": 56}


def _check_shape(spec: ModelSpec, input_shape: tuple[int, ...]) -> None:
    shape = tuple(input_shape)
    if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
        raise ModelError(
            f"model.name: {spec.name} got an invalid input shape {shape}; the dataset must give "
            "positive (C, ...) dimensions"
        )
    if spec.name in _IMAGE_MODELS:
        side = _IMAGE_MODELS[spec.name]
        if len(shape) != 3:
            raise ModelError(
                f"model.name: {spec.name} needs images (C, H, W) but the inputs are {shape}; use "
                "cnn1d or mlp for 1-D signals such as mnist1d"
            )
        if min(shape[1:]) < side:
            raise ModelError(
                f"model.name: {spec.name} needs images of at least {side}x{side} but the inputs are "
                f"{shape}; use small-cnn or mlp for tiny images"
            )
    elif spec.name == "cnn1d":
        if len(shape) != 2:
            raise ModelError(
                f"model.name: cnn1d needs 1-D signals (C, L) but the inputs are {shape}; use "
                "small-cnn, a resnet or mlp for images"
            )
        if shape[1] < 8:
            raise ModelError(f"model.name: cnn1d needs signals of length >= 8 but the inputs are {shape}; use mlp")


def build_model(spec: ModelSpec, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """The network named by `spec.name` for `input_shape` (per example) and `num_classes` outputs."""
    if num_classes < 2:
        raise ModelError(
            f"model.name: {spec.name} needs at least 2 classes, the dataset has {num_classes}; "
            "check task.dataset / task.dataRoot"
        )
    _check_shape(spec, input_shape)
    shape = tuple(input_shape)
    if spec.name == "mlp":
        features, dim = _mlp(shape, spec.width)
    elif spec.name == "small-cnn":
        features, dim = _small_cnn(shape, spec.width)
    elif spec.name == "cnn1d":
        features, dim = _cnn1d(shape, spec.width)
    elif spec.name in _RESNET_DEPTH:
        features, dim = CifarResNet(_RESNET_DEPTH[spec.name], shape[0]), 64
    elif spec.name in ("resnet18", "resnet50"):
        features, dim = _torchvision_resnet(spec.name, shape)
    else:
        raise ModelError(
            f"model.name: unknown model {spec.name!r}; use mlp, small-cnn, cnn1d, resnet20, "
            "resnet32, resnet56, resnet18 or resnet50"
        )
    model = Classifier(features, dim, num_classes, spec.head, spec.bn_neck)
    if spec.head == "linear" and spec.name in _RESNET_DEPTH:
        assert isinstance(model.head, nn.Linear)
        nn.init.kaiming_normal_(model.head.weight)
    return model
