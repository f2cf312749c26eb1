"""Shared test helpers: where the real CIFAR-10 lives (../shared/data/cifar10 or $MOBILENET_CIFAR10), and
``backend="auto"`` in its fixed order (no measuring) for every test, so that tests stay fast and deterministic;
tests/test_autotune.py turns measuring on with a fake timer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_png

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def cifar10_root() -> Path | None:
    candidate = Path(os.environ.get("MOBILENET_CIFAR10", PROJECT_ROOT.parent / "shared" / "data" / "cifar10"))
    return candidate if (candidate / "train").is_dir() and (candidate / "test").is_dir() else None


@pytest.fixture
def cifar10() -> Path:
    root = cifar10_root()
    if root is None:
        pytest.skip("real CIFAR-10 not found at ../shared/data/cifar10 (set MOBILENET_CIFAR10 to point elsewhere)")
    return root


@pytest.fixture(autouse=True)
def _auto_backend_does_not_measure(monkeypatch):
    monkeypatch.setenv("MOBILENET_AUTO_MEASURE", "0")


def tiny_folder(root: Path, classes=("a", "b", "c"), per_class: int = 8, size: int = 32) -> Path:
    """Class-dependent images (a colour per class plus noise) so a few steps can learn something."""
    g = torch.Generator().manual_seed(0)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = torch.zeros(3, size, size)
            base[label % 3] = 0.8
            image = ((base + 0.2 * torch.rand(3, size, size, generator=g)) * 255).clamp(0, 255).to(torch.uint8)
            (root / name / f"{i}.png").write_bytes(bytes(encode_png(image).numpy()))
    return root
