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
