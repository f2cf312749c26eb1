"""Shared test helpers: where the real CIFAR-10 lives (../shared/data/cifar10 or $MOBILENET_CIFAR10), and
``backend="auto"`` in its fixed order (no measuring) for every test, so that tests stay fast and deterministic;
tests/test_autotune.py turns measuring on with a fake timer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
