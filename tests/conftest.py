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


def quick_train(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int) -> None:
    """A short real training run (Adam, batches of 64): enough to classify digits well above chance. A network
    with random or only partly fitted weights is no test of quantization: its decisions hang on feature
    differences far below int8 resolution, which no trained network has."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(images), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def busy_batchnorm_model(name: str, *, seed: int = 0, classifier_std: float = 0.3) -> torch.nn.Module:
    """``name`` at 32 px, 10 classes, with BatchNorms far from identity (so a wrong fold changes the logits
    visibly) and the classifier drawn from N(0, ``classifier_std``) (4.0: logits well above 1, so a wrong layout or
    weight shows too)."""
    from mobilenet.models import create_model

    torch.manual_seed(seed)
    model = create_model(name, resolution=32, small_input=True, num_classes=10)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.5, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.normal_(0.0, 0.2, generator=generator)
    model.classifier.weight.data.normal_(0.0, classifier_std, generator=generator)
    return model.eval()


#: The preprocessing of the small test models' exports: CIFAR-10's statistics at 32 px.
SMALL_PREPROCESSING = {
    "input_size": 32,
    "resize_size": 32,
    "mean": [0.4914, 0.4822, 0.4465],
    "std": [0.247, 0.2435, 0.2616],
    "interpolation": "bilinear",
    "style": "small",
}


def trained_digits_checkpoint(root: Path, steps: int) -> tuple:
    """MobileNetV2 0.35 at 32 px (stride 32 on 32x32 digits keeps training cheap; the graph is V2's whole: 52 convs,
    35 ReLU6, 10 residuals) trained ``steps`` steps on scikit-learn's digits and saved under ``root``: (the digits
    bundle, the model, its eval transform, the checkpoint path)."""
    from mobilenet.checkpoint import save
    from mobilenet.data import build_eval_transform, load_digits
    from mobilenet.models import create_model

    bundle = load_digits(size=32)
    preprocessing = bundle.preprocessing(32)
    transform = build_eval_transform(preprocessing)
    torch.manual_seed(0)
    model = create_model("mobilenet_v2_0.35_96", resolution=32, num_classes=10, dropout=0.0)
    quick_train(model, torch.stack([transform(img) for img in bundle.train.images]), bundle.train.labels, steps)
    checkpoint = save(model, root / "digits.safetensors", classes=bundle.classes, preprocessing=preprocessing)
    return bundle, model, transform, checkpoint


def write_images(dataset, folder: Path, indices) -> tuple[list[Path], list[int]]:
    """Images ``indices`` of an in-memory dataset as PNG files under ``folder/<label>/``: (paths, labels)."""
    from PIL import Image

    files, labels = [], []
    for i in indices:
        label = int(dataset.labels[i])
        path = folder / str(label) / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(dataset.images[i].permute(1, 2, 0).numpy()).save(path)
        files.append(path)
        labels.append(label)
    return files, labels


def flip_onnx_weight_byte(source: Path, target: Path) -> Path:
    """Copy an .onnx file with one byte of its largest initializer's stored values flipped in place, as a damaged
    disk or download leaves it: the tensor's bytes are found by searching the file for them (once, whole), so the
    protobuf around them stays parseable."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    values = numpy_helper.to_array(max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).nbytes))
    pattern, data = values.tobytes(), bytearray(source.read_bytes())
    at = data.find(pattern)
    assert at >= 0 and data.find(pattern, at + 1) < 0, "the weight's bytes are not stored once, as they are"
    data[at + len(pattern) // 2] ^= 0x40
    target.write_bytes(bytes(data))
    return target
