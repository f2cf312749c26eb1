"""Checkpoints (save / load / read_header) and weight import from torchvision and timm."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch

from mobilenet.checkpoint import Checkpoint, load, load_checkpoint, read_header, save
from mobilenet.errors import MobileNetError
from mobilenet.models import create_model

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
        "weights_sha256": info["weights_sha256"],
    }
    assert len(info["weights_sha256"]) == 64


def test_flipped_data_byte_is_refused(tmp_path, small_model):
    """safetensors itself has no checksum; the stored SHA-256 of the tensors catches a changed byte."""
    path = save(small_model, tmp_path / "c.safetensors")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # inside the last tensor's bytes
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(MobileNetError, match="does not match the checksum"):
        load(bad)


def test_preprocessing_object_with_to_dict(tmp_path, small_model):
    class Prep:
        def to_dict(self):
            return dict(PREPROCESSING, mean=tuple(PREPROCESSING["mean"]))

    path = save(small_model, tmp_path / "c.safetensors", preprocessing=Prep())
    assert read_header(path)["preprocessing"] == PREPROCESSING


def test_save_is_atomic(tmp_path, small_model, monkeypatch):
    """A failure while writing keeps the previous checkpoint and leaves no temporary file."""
    import mobilenet.checkpoint

    path = save(small_model, tmp_path / "c.safetensors", metadata={"v": 1})
    before = path.read_bytes()

    def exploding_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(mobilenet.checkpoint, "save_file", exploding_save)
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


def test_a_training_state_given_as_a_checkpoint_is_named_as_such(tmp_path, small_model):
    """``--init RUN/train_state.safetensors`` or ``eval`` of it was told to convert a timm state_dict."""
    from mobilenet.checkpoint import write_state

    path = tmp_path / "train_state.safetensors"
    write_state(path, {"model": small_model.state_dict()}, {"epoch": 1})
    for reader in (load, load_checkpoint, read_header):
        with pytest.raises(MobileNetError, match=r"is a training state, not a checkpoint; use last\.safetensors"):
            reader(path)


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


# ---------------------------------------------------------------------------------------------------------------
# Import from torchvision / timm
# ---------------------------------------------------------------------------------------------------------------


def _logit_gap(ours: torch.nn.Module, theirs: torch.nn.Module, size: int = 64) -> tuple[float, float]:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours.eval()(x), theirs.eval()(x)
    return (a - b).abs().max().item(), b.abs().max().item()


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("width", [0.5, 0.75, 1.0, 1.4])
def test_torchvision_v2_weights_give_same_logits(width):
    """Our mobilenet_v2_{w}_224 with torchvision's mobilenet_v2(width_mult=w) weights: same logits (randomised BN
    statistics and affine parameters, else logits are ~1e-9 and any two networks agree) and same parameter count."""
    torchvision = pytest.importorskip("torchvision")
    from mobilenet.convert import import_weights

    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2(width_mult=width)
    _randomize_bn(reference, seed=int(width * 100))
    ours = import_weights(create_model(f"mobilenet_v2_{width}_224"), reference.state_dict(), source="torchvision")
    gap, scale = _logit_gap(ours, reference)
    assert scale > 1e-3  # the comparison is not between two near-zero outputs
    assert gap <= 1e-5 * scale  # the tolerance
    assert _params(ours) == _params(reference)


@pytest.mark.parametrize(
    ("timm_name", "ours_name"),
    [("mobilenetv1_100", "mobilenet_v1_1.0_224"), ("mobilenetv2_100", "mobilenet_v2_1.0_224")],
)
def test_timm_weights_give_same_logits(timm_name, ours_name):
    timm = pytest.importorskip("timm")
    from mobilenet.convert import import_weights

    torch.manual_seed(0)
    reference = timm.create_model(timm_name, pretrained=False)
    _randomize_bn(reference, seed=3)
    ours = import_weights(create_model(ours_name), reference.state_dict(), source="timm")
    gap, scale = _logit_gap(ours, reference)
    assert scale > 1e-3
    assert gap <= 1e-5 * scale
    assert _params(ours) == _params(reference)


def test_timm_v1_uses_relu6_and_checkpoint_keeps_it(tmp_path):
    """timm's (and TF-slim's) V1 clips at 6 where the paper's Figure 3 says ReLU: imported V1 weights switch our
    model to ReLU6, which matters once activations exceed 6, and the checkpoint rebuilds it."""
    timm = pytest.importorskip("timm")
    from mobilenet.convert import import_weights

    torch.manual_seed(0)
    reference = timm.create_model("mobilenetv1_100", pretrained=False)
    _randomize_bn(reference, seed=4)
    with torch.no_grad():
        reference.bn1.bias.add_(8.0)  # push the stem's activations above 6
    plain = create_model("mobilenet_v1_1.0_224")
    renamed = {k: v for k, v in reference.state_dict().items()}
    imported = import_weights(create_model("mobilenet_v1_1.0_224"), renamed, source="timm")
    from mobilenet.convert import map_state_dict

    plain.load_state_dict(map_state_dict(plain, renamed, "timm")[0])
    gap_plain, scale = _logit_gap(plain, reference)
    gap_relu6, _ = _logit_gap(imported, reference)
    assert gap_plain > 1e-3 * scale
    assert gap_relu6 <= 1e-5 * scale
    path = save(imported, tmp_path / "v1.safetensors")
    assert read_header(path)["config"]["activation"] == "relu6"
    restored = load(path)
    assert _logit_gap(restored, reference)[0] <= 1e-5 * scale


def test_wrong_architecture_lists_keys():
    torchvision = pytest.importorskip("torchvision")
    from mobilenet.convert import import_weights

    state = torchvision.models.mobilenet_v2().state_dict()
    with pytest.raises(MobileNetError) as info:
        import_weights(create_model("mobilenet_v1_1.0_224"), state, source="torchvision")
    message = str(info.value)
    assert "missing keys" in message and "unexpected keys" in message and "mis-shaped keys" in message
    assert "features.1.conv.1.weight (16, 32, 1, 1) vs features.1.pointwise.conv.weight (64, 32, 1, 1)" in message
    assert "and 205 more" in message  # long lists are cut
    with pytest.raises(MobileNetError, match=r"mis-shaped keys .*features\.0\.0\.weight \(32, 3, 3, 3\) vs"):
        import_weights(create_model("mobilenet_v2_0.5_224"), state, source="torchvision")
    with pytest.raises(MobileNetError, match="unknown weight source 'tf'"):
        import_weights(create_model("mobilenet_v2_1.0_224"), state, source="tf")
    with pytest.raises(MobileNetError, match="missing keys"):
        import_weights(create_model("mobilenet_v2_1.0_224"), state, source="timm")


def test_tf_style_1001_class_head():
    """A head with a background class first (TF-slim's 1001 outputs): row 0 is dropped for a 1000-class model."""
    torchvision = pytest.importorskip("torchvision")
    from mobilenet.convert import import_weights

    reference = torchvision.models.mobilenet_v2(width_mult=0.5, num_classes=1001)
    _randomize_bn(reference)
    ours = import_weights(create_model("mobilenet_v2_0.5_96"), reference.state_dict(), source="torchvision")
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ours_logits, their_logits = ours.eval()(x), reference.eval()(x)
    assert torch.allclose(ours_logits, their_logits[:, 1:], rtol=0, atol=1e-5 * their_logits.abs().max().item())
    kept = import_weights(create_model("mobilenet_v2_0.5_96", num_classes=1001), reference.state_dict())
    assert kept.classifier.weight.shape[0] == 1001
    with pytest.raises(MobileNetError, match=r"classifier\.1\.weight \(1001, 1280\) vs classifier\.weight"):
        import_weights(create_model("mobilenet_v2_0.5_96"), reference.state_dict(), drop_background=False)


def test_timm_module_map_follows_timm_stages():
    """Stage/block positions for timm come from the tables; compare with a timm model's own module names."""
    timm = pytest.importorskip("timm")
    from mobilenet.convert import timm_module_map
    from mobilenet.spec import network_for

    for timm_name, ours_name in (
        ("mobilenetv1_100", "mobilenet_v1_1.0_224"),
        ("mobilenetv2_140", "mobilenet_v2_1.4_224"),
    ):
        theirs = {name for name, _ in timm.create_model(timm_name).named_modules()}
        mapping = timm_module_map(network_for(ours_name))
        assert set(mapping.values()) <= theirs
        assert len(set(mapping.values())) == len(mapping)


def test_imagenet_classes_equal_torchvision():
    torchvision = pytest.importorskip("torchvision")
    from mobilenet.convert import imagenet_classes

    names = imagenet_classes()
    assert names == torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    assert len(names) == 1000 and names[0] == "tench"


def test_pretrained_offline_is_a_clear_error(monkeypatch):
    import urllib.error

    from mobilenet.convert import pretrained

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(MobileNetError, match=r"network unreachable.*mobilenet convert --from torchvision FILE"):
        pretrained("mobilenet_v2_1.0_224", source="torchvision")
    with pytest.raises(MobileNetError, match=r"torchvision publishes no ImageNet weights for mobilenet_v1_1\.0_224"):
        pretrained("mobilenet_v1_1.0_224", source="torchvision")


def test_pretrained_converts_the_downloaded_weights(monkeypatch):
    """The conversion part of `pretrained`, with torch.hub answering from a local state_dict (no network)."""
    torchvision = pytest.importorskip("torchvision")
    from mobilenet.convert import pretrained

    reference = torchvision.models.mobilenet_v2()
    _randomize_bn(reference, seed=5)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: reference.state_dict())
    model = pretrained("mobilenet_v2_1.0_96", source="torchvision")  # checked at 96 px to keep the test fast
    gap, scale = _logit_gap(model, reference)
    assert gap <= 1e-5 * scale
    assert model.classes[:2] == ["tench", "goldfish"]
    # torchvision's DEFAULT (IMAGENET1K_V2) weights are evaluated at a 232 px resize, 224 crop.
    assert model.preprocessing["resize_size"] == 232 and model.preprocessing["input_size"] == 224
    check = model.info.origin["logit_check"]
    assert check["max_abs_diff"] <= 1e-5 * check["max_abs_reference"]


def test_compare_logits_fails_loudly():
    torchvision = pytest.importorskip("torchvision")
    from mobilenet.convert import compare_logits, import_weights

    reference = torchvision.models.mobilenet_v2(width_mult=0.5)
    _randomize_bn(reference)
    ours = import_weights(create_model("mobilenet_v2_0.5_96"), reference.state_dict())
    compare_logits(ours, reference, 96)
    with torch.no_grad():  # a mapping slip: one BN's weight and bias exchanged
        bn = ours.features[5].project.bn
        weight = bn.weight.clone()
        bn.weight.copy_(bn.bias)
        bn.bias.copy_(weight)
    with pytest.raises(MobileNetError, match="disagrees with the reference"):
        compare_logits(ours, reference, 96)


def test_save_unwraps_compiled_and_keeps_loaded_attributes(tmp_path, small_model):
    """torch.compile prefixes state_dict keys with "_orig_mod."; the checkpoint must hold the plain model's keys.
    A model from load() keeps its classes and preprocessing when saved again (e.g. after fine-tuning)."""
    compiled = torch.compile(small_model)  # compilation is lazy: nothing runs until the first call
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    first = save(compiled, tmp_path / "a.safetensors", classes=CLASSES, preprocessing=PREPROCESSING)
    model = load(first)
    second = save(model, tmp_path / "b.safetensors")
    header = read_header(second)
    assert header["classes"] == CLASSES and header["preprocessing"] == PREPROCESSING
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load(second)(x), small_model(x))
