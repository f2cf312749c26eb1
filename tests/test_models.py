"""Models built from the layer list: shapes, shortcuts, initialisation, backbone, registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mobilenet.errors import MobileNetError
from mobilenet.layers import InvertedResidual
from mobilenet.models import create_backbone, create_model
from mobilenet.spec import list_models


def test_v2_trainable_parameters_equal_torchvision():
    torchvision = pytest.importorskip("torchvision")
    ours = sum(p.numel() for p in create_model("mobilenet_v2_1.0_224").parameters())
    theirs = sum(p.numel() for p in torchvision.models.mobilenet_v2().parameters())
    assert ours == theirs == 3_504_872  # the figure torchvision's model card states


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_runs_at_its_resolution(name):
    model = create_model(name, num_classes=7).eval()
    res = model.config.resolution
    with torch.no_grad():
        out = model(torch.randn(2, 3, res, res))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_residual_blocks_add_their_input():
    model = create_model("mobilenet_v2_1.0_224").eval()
    block = model.features[3]  # second block of the (6, 24, 2, 2) row: stride 1, 24 -> 24
    assert isinstance(block, InvertedResidual) and block.use_residual
    x = torch.randn(1, 24, 56, 56)
    with torch.no_grad():
        branch = block.project(block.depthwise(block.expand(x)))
        assert torch.allclose(block(x), x + branch)
    assert not model.features[2].use_residual  # stride 2


def test_linear_bottleneck_has_no_activation():
    model = create_model("mobilenet_v2_1.0_224")
    for block in model.features[1:-1]:
        assert isinstance(block.project.act, nn.Identity)
        assert isinstance(block.depthwise.act, nn.ReLU6)


def test_initialisation_follows_references():
    torch.manual_seed(0)
    model = create_model("mobilenet_v1_1.0_224")
    conv = model.features[13].pointwise.conv  # 1024 -> 1024, fan_out = 1024
    assert conv.weight.std().item() == pytest.approx((2.0 / 1024) ** 0.5, rel=0.05)
    assert model.classifier.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(model.features[0].bn.weight == 1) and torch.all(model.features[0].bn.bias == 0)


def test_backbone_outputs_match_feature_info():
    backbone = create_backbone("mobilenet_v1_1.0_224").eval()
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, 224, 224))
    assert list(outputs) == ["stage1", "stage2", "stage3", "stage4", "stage5"]
    for info in backbone.feature_info:
        assert outputs[info.name].shape == (1, info.channels, 224 // info.reduction, 224 // info.reduction)
    with pytest.raises(MobileNetError, match="unknown stage"):
        create_backbone("mobilenet_v1_1.0_224", out_stages=("stage9",))


def test_reset_classifier():
    model = create_model("mobilenet_v2_0.5_96")
    model.reset_classifier(5)
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 5) and model.config.num_classes == 5


# --------------------------------------------------------------------------------------------------------------
# VGG-16, the V1 paper's Table 8 baseline, from the same layer plan
# --------------------------------------------------------------------------------------------------------------


def _torchvision_vgg16_key_map(ours, theirs) -> dict[str, str]:
    """torchvision's vgg16 keys -> ours: its convs in order onto our conv layers, its classifier.0/3/6 onto our
    hidden.0.linear, hidden.1.linear and classifier."""
    their_convs = [f"features.{i}" for i, module in enumerate(theirs.features) if isinstance(module, nn.Conv2d)]
    our_convs = [layer.name for layer in ours.network.layers if layer.op == "conv"]
    pairs = [*zip(their_convs, our_convs, strict=True)]
    pairs += [("classifier.0", "hidden.0.linear"), ("classifier.3", "hidden.1.linear"), ("classifier.6", "classifier")]
    return {f"{t}.{p}": f"{o}.{p}" for t, o in pairs for p in ("weight", "bias")}


def test_vgg16_equals_torchvision():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    theirs = torchvision.models.vgg16(weights=None).eval()
    ours = create_model("vgg16_224").eval()
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) == 138_357_544  # torchvision's model card
    mapping = _torchvision_vgg16_key_map(ours, theirs)
    state = theirs.state_dict()
    assert sorted(mapping.values()) == sorted(ours.state_dict()) and sorted(mapping) == sorted(state)
    ours.load_state_dict({mapping[key]: value for key, value in state.items()})
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(ours(images), theirs(images))
        # Any resolution: both pool the last map to 7x7 before the first FC layer.
        small = torch.randn(1, 3, 80, 80)
        assert torch.equal(ours(small), theirs(small))


def test_vgg16_plan_and_dropout():
    model = create_model("vgg16_224", num_classes=7, resolution=32)
    assert model.config.dropout == 0.5
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 5
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 13
    # VGG drops out the outputs of its first two FC layers: the inputs of the second and of the classifier.
    assert isinstance(model.hidden[0].dropout, nn.Identity) and model.hidden[1].dropout.p == 0.5
    assert model.dropout.p == 0.5
    assert [type(block.bn) for block in model.features if hasattr(block, "bn")] == [nn.Identity] * 13
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    model.reset_classifier(3)
    assert model.classifier.in_features == 4096 and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_vgg16_options_are_checked():
    with pytest.raises(MobileNetError, match="no width multiplier"):
        create_model("vgg16_224", alpha=0.5)
    with pytest.raises(MobileNetError, match="small_input"):
        create_model("vgg16_224", small_input=True)
    assert "vgg16_224" not in list_models() and list_models("vgg", baselines=True) == ["vgg16_224"]


def test_factored_classifier_model():
    model = create_model("mobilenet_v2_0.5_96", num_classes=10, classifier_rank=4)
    first, second = model.classifier
    assert (first.in_features, first.out_features, first.bias) == (1280, 4, None)
    assert (second.in_features, second.out_features) == (4, 10) and second.bias is not None
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 10)
    model.reset_classifier(5)
    assert model.config.classifier_rank == 4 and model.classifier[1].out_features == 5


def test_a_training_step_copies_no_activation():
    # An in-place ReLU6 (hardtanh_) is computed out of place and cloned back by torch: V2's 35 ReLU6 layers would
    # each add a copy of their tensor to every training step.
    from torch.profiler import profile

    model = create_model("mobilenet_v2_0.35_96", num_classes=10).train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    with profile() as trace:
        model(x).sum().backward()
    events = trace.events()
    names = [event.name for event in events]
    assert "aten::hardtanh" in names and "aten::hardtanh_" not in names
    copies = [e for e in events if e.name == "aten::clone" and e.cpu_parent and "hardtanh" in e.cpu_parent.name]
    assert not copies
