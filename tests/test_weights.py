"""Checkpoints (save / load / read_header) and weight import from torchvision and timm."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch

from mobilenet.errors import MobileNetError
from mobilenet.models import create_model
from mobilenet.weights import Checkpoint, load, load_checkpoint, read_header, save

PREPROCESSING = {
    "input_size": 32,
    "resize_size": 32,
    "mean": [0.4914, 0.4822, 0.4465],
    "std": [0.247, 0.2435, 0.2616],
    "interpolation": "bilinear",
    "style": "small",
}
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine parameters, so outputs depend on every buffer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.num_batches_tracked.fill_(7)


@pytest.fixture
def small_model():
    torch.manual_seed(0)
    model = create_model("mobilenet_v2_0.5_96", num_classes=10, small_input=True, resolution=32)
    _randomize_bn(model)
    return model.eval()


def test_round_trip_preserves_weights_logits_and_header(tmp_path, small_model):
    path = save(
        small_model,
        tmp_path / "ckpt.safetensors",
        classes=CLASSES,
        preprocessing=PREPROCESSING,
        metadata={"epochs": 3, "note": "test"},
    )
    checkpoint = load_checkpoint(path)
    assert isinstance(checkpoint, Checkpoint)
    assert checkpoint.name == "mobilenet_v2_0.5_96"
    assert checkpoint.config == small_model.config
    assert checkpoint.classes == CLASSES
    assert checkpoint.preprocessing == PREPROCESSING
    assert checkpoint.metadata == {"epochs": 3, "note": "test"}
    ours, theirs = small_model.state_dict(), checkpoint.model.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
        assert ours[key].dtype == theirs[key].dtype
    assert not checkpoint.model.training
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(small_model(x), checkpoint.model(x))

    model = load(path)
    assert model.classes == CLASSES and model.preprocessing == PREPROCESSING
    header = read_header(path)
    assert header["format_version"] == 1 and header["config"] == small_model.config.to_dict()
    assert header["name"] == "mobilenet_v2_0.5_96"


def test_file_is_plain_safetensors(tmp_path, small_model):
    """Any safetensors reader gets the weights and our JSON; nothing is pickled."""
    from safetensors import safe_open

    path = save(small_model, tmp_path / "c.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        info = json.loads(handle.metadata()["mobilenet"])
        assert set(handle.keys()) == set(small_model.state_dict())
    assert info == {
        "format_version": 1,
        "name": "mobilenet_v2_0.5_96",
        "config": small_model.config.to_dict(),
        "classes": None,
        "preprocessing": None,
        "metadata": {},
    }


def test_preprocessing_object_with_to_dict(tmp_path, small_model):
    class Prep:
        def to_dict(self):
            return dict(PREPROCESSING, mean=tuple(PREPROCESSING["mean"]))

    path = save(small_model, tmp_path / "c.safetensors", preprocessing=Prep())
    assert read_header(path)["preprocessing"] == PREPROCESSING


def test_save_is_atomic(tmp_path, small_model, monkeypatch):
    """A failure while writing keeps the previous checkpoint and leaves no temporary file."""
    import safetensors.torch

    path = save(small_model, tmp_path / "c.safetensors", metadata={"v": 1})
    before = path.read_bytes()

    def exploding_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        save(small_model, path, metadata={"v": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_bad_save_arguments(tmp_path, small_model):
    with pytest.raises(MobileNetError, match="3 class names for a classifier with 10 outputs"):
        save(small_model, tmp_path / "c.safetensors", classes=["a", "b", "c"])
    with pytest.raises(MobileNetError, match="JSON-serialisable"):
        save(small_model, tmp_path / "c.safetensors", metadata={"x": object()})
    with pytest.raises(MobileNetError, match="mobilenet model"):
        save(torch.nn.Linear(2, 2), tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("keep", [0, 5, 100, -1000, -1])
def test_truncated_file_is_refused(tmp_path, small_model, keep):
    path = save(small_model, tmp_path / "c.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:keep])
    with pytest.raises(MobileNetError, match=r"truncated|empty|not a safetensors"):
        load_checkpoint(cut)


def test_corrupt_header_is_refused(tmp_path, small_model):
    path = save(small_model, tmp_path / "c.safetensors")
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8 + header_len // 2] = ord("\x01")  # a control byte inside the JSON
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(MobileNetError, match="corrupt"):
        load_checkpoint(bad)


def test_random_bytes_are_refused(tmp_path):
    bad = tmp_path / "noise.safetensors"
    bad.write_bytes(bytes(range(7, 250)) * 10)
    with pytest.raises(MobileNetError, match="not a safetensors file"):
        read_header(bad)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(MobileNetError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(MobileNetError, match="directory"):
        load(tmp_path)


def test_safetensors_without_our_metadata(tmp_path, small_model):
    from safetensors.torch import save_file

    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in small_model.state_dict().items()}, str(path))
    with pytest.raises(MobileNetError, match=r"without mobilenet metadata.*mobilenet convert"):
        load(path)


def test_other_architecture_lists_keys(tmp_path, small_model):
    """A header whose config disagrees with the stored tensors (V1 config, V2 weights) is refused with the lists."""
    from safetensors.torch import save_file

    v1 = create_model("mobilenet_v1_0.25_128")
    header = {
        "format_version": 1,
        "name": "mobilenet_v1_0.25_128",
        "config": v1.config.to_dict(),
        "classes": None,
        "preprocessing": None,
        "metadata": {},
    }
    path = tmp_path / "mixed.safetensors"
    save_file(
        {k: v.contiguous() for k, v in small_model.state_dict().items()},
        str(path),
        metadata={"mobilenet": json.dumps(header)},
    )
    with pytest.raises(MobileNetError) as info:
        load(path)
    message = str(info.value)
    # V1 blocks have depthwise + pointwise, V2 blocks expand/depthwise/project; the stems differ in width.
    assert "missing keys (78)" in message and "features.1.pointwise.conv.weight" in message
    assert "unexpected keys (228): features.1.project." in message
    assert "mis-shaped keys" in message and "features.0.conv.weight (16, 3, 3, 3) vs (8, 3, 3, 3)" in message
    assert "more" in message  # long lists are truncated


def test_newer_format_version_is_refused(tmp_path, small_model):
    from safetensors.torch import save_file

    header = dict(read_header(save(small_model, tmp_path / "c.safetensors")), format_version=2)
    path = tmp_path / "future.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"mobilenet": json.dumps(header)})
    with pytest.raises(MobileNetError, match=r"format_version 2.*upgrade"):
        read_header(path)


def test_pytorch_pickles_are_refused_with_convert_hint(tmp_path, small_model):
    zip_path = tmp_path / "model.pth"
    torch.save(small_model.state_dict(), zip_path)  # torch's zip container
    assert zip_path.read_bytes()[:4] == b"PK\x03\x04"

    class Boom:
        def __reduce__(self):  # would run if anything unpickled the file
            return (pytest.fail, ("the file was unpickled",))

    pickle_path = tmp_path / "legacy.pth"
    pickle_path.write_bytes(pickle.dumps(Boom(), protocol=2))
    assert pickle_path.read_bytes()[:1] == b"\x80"
    for path in (zip_path, pickle_path):
        with pytest.raises(MobileNetError, match=r"PyTorch .*mobilenet convert --from torchvision\|timm"):
            load(path)
        with pytest.raises(MobileNetError, match="never loaded"):
            read_header(path)
