"""``mobilenet.create_model`` with timm's arguments, checked against timm itself (same feature_info channels and
reductions, same headless output shape) and against torchvision's weights served offline in their own format."""

from __future__ import annotations

import pytest
import torch

import mobilenet
from mobilenet.errors import MobileNetError
from mobilenet.hub import adapt_input_conv, create_model
from mobilenet.spec import ALIASES, MODELS

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

PAIRS = [("mobilenet_v1_1.0_224", "mobilenetv1_100"), ("mobilenet_v2_1.0_224", "mobilenetv2_100"),
         ("mobilenet_v2_0.5_224", "mobilenetv2_050")]  # fmt: skip


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_features_only_matches_timms_feature_info(ours, theirs):
    reference = timm.create_model(theirs, features_only=True, pretrained=False)
    backbone = create_model(ours, features_only=True)
    assert list(backbone.channels.values()) == reference.feature_info.channels()
    assert list(backbone.reductions.values()) == reference.feature_info.reduction()
    outputs = backbone.eval()(torch.randn(1, 3, 224, 224))
    assert [tuple(o.shape[1:]) for o in outputs.values()] == [
        (c, 224 // r, 224 // r)
        for c, r in zip(reference.feature_info.channels(), reference.feature_info.reduction(), strict=True)
    ]
    picked = create_model(ours, features_only=True, out_indices=(1, 3))
    assert (
        list(picked.channels.values())
        == timm.create_model(theirs, features_only=True, out_indices=(1, 3)).feature_info.channels()
    )


@pytest.mark.parametrize(("ours", "theirs"), PAIRS[:2])
def test_headless_output_matches_timm(ours, theirs):
    x = torch.randn(2, 3, 96, 96)
    theirs_out = timm.create_model(theirs, num_classes=0).eval()(x)
    ours_out = create_model(ours, num_classes=0).eval()(x)
    assert ours_out.shape == theirs_out.shape
    assert mobilenet.count_costs(ours, num_classes=0).params < mobilenet.count_costs(ours).params


def test_drop_rate_and_in_chans_without_weights():
    model = create_model("mobilenet_v2_0.5_96", drop_rate=0.1, in_chans=1)
    assert model.dropout.p == 0.1 and model.config.in_channels == 1
    assert model(torch.randn(1, 1, 96, 96)).shape == (1, 1000)


def _serve_torchvision_weights(monkeypatch) -> torch.nn.Module:
    reference = torchvision.models.mobilenet_v2().eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: reference.state_dict())
    return reference


def test_pretrained_true_takes_the_published_weights(monkeypatch):
    reference = _serve_torchvision_weights(monkeypatch)
    model = create_model("mobilenet_v2", pretrained=True, resolution=96)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        gap = (model(x) - reference(x)).abs().max().item()
    assert gap <= 1e-5 * reference(x).abs().max().item()
    assert model.classes[0] == "tench"
    fine_tune = create_model("mobilenet_v2_1.0_224", pretrained="torchvision", num_classes=10)
    assert fine_tune.classifier.out_features == 10 and fine_tune.classes is None
    torch.testing.assert_close(fine_tune.features[0].conv.weight, model.features[0].conv.weight)


def test_pretrained_in_chans_one_sums_the_stem(monkeypatch):
    """A grey image in the 1-channel model gives the logits the RGB model gives for that image in all three
    channels (timm's adapt_input_conv: the stem's RGB weights summed)."""
    _serve_torchvision_weights(monkeypatch)
    rgb = create_model("mobilenet_v2_1.0_224", pretrained=True, resolution=64)
    grey = create_model("mobilenet_v2_1.0_224", pretrained=True, resolution=64, in_chans=1)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def test_adapt_input_conv_for_more_channels_repeats_and_rescales_as_timm():
    from timm.models._manipulate import adapt_input_conv as timm_adapt

    weight = torch.randn(8, 3, 3, 3)
    for channels in (1, 2, 5, 6):
        torch.testing.assert_close(adapt_input_conv(channels, weight), timm_adapt(channels, weight.clone()))


def test_pretrained_errors_name_what_is_published():
    with pytest.raises(MobileNetError, match=r"timm publishes no ImageNet weights for mobilenet_v2_0\.35_224"):
        create_model("mobilenet_v2_0.35_224", pretrained="timm")
    with pytest.raises(MobileNetError, match=r"no ImageNet weights are published.*timm: v1 1\.0, v1 1\.25"):
        create_model("mobilenet_v1_0.25_224", pretrained=True)
    with pytest.raises(MobileNetError, match="alpha changes the weights' shapes"):
        create_model("mobilenet_v2_1.0_224", pretrained=True, alpha=0.5)
    with pytest.raises(MobileNetError, match="out_indices applies to features_only"):
        create_model("mobilenet_v2_1.0_224", out_indices=(1,))
    with pytest.raises(MobileNetError, match="stage indices from 0 to 4"):
        create_model("mobilenet_v2_1.0_224", features_only=True, out_indices=(7,))


def test_published_table_matches_timm_and_torchvision():
    from mobilenet.convert import PUBLISHED, TIMM_NAMES

    timm_published = {name.split(".")[0] for name in timm.list_pretrained("mobilenetv[12]_*")}
    ours = {TIMM_NAMES[key] for key in PUBLISHED["timm"]}
    assert ours == timm_published & set(TIMM_NAMES.values())
    assert PUBLISHED["torchvision"] == {("v2", 1.0)}
    assert torchvision.models.MobileNet_V2_Weights.DEFAULT.url.startswith("https://")


def test_aliases_and_suggestions():
    for alias, name in ALIASES.items():
        assert name in MODELS, alias
    assert create_model("mobilenetv2_100").name == "mobilenet_v2_1.0_224"
    with pytest.raises(MobileNetError, match=r"did you mean mobilenet_v2_1\.0_224"):
        create_model("mobilenet_v2_1")
    for bad in (None, 5):
        with pytest.raises(MobileNetError, match="model name must be a string"):
            create_model(bad)
