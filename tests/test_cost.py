"""The analytic cost model against the papers, against torchvision/timm, and against two independent counts over
the built nn.Module (forward hooks, and torch's own FlopCounterMode)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from mobilenet.cost import count_costs, layer_cost, parse_shape
from mobilenet.errors import MobileNetError
from mobilenet.measure import measure_costs
from mobilenet.models import create_model, model_from_config
from mobilenet.paper import reproduce
from mobilenet.spec import ModelConfig, list_models, network_for


def _meta_model(config_or_name, **overrides):
    # Built on the meta device: shapes propagate through the real modules without allocating or computing, so
    # every registered model is checked in milliseconds.
    with torch.device("meta"):
        if isinstance(config_or_name, ModelConfig):
            return model_from_config(config_or_name)
        return create_model(config_or_name, **overrides)


def _assert_matches_module(model) -> None:
    table = count_costs(model)
    # One forward pass feeds both independent counts: the forward hooks of measure_costs (module attributes and
    # output shapes) and torch's own FLOP counter (2 FLOPs per multiply-add for conv and addmm; BN, ReLU, adds and
    # pooling are not counted), which sees the dispatched aten ops rather than the modules.
    with FlopCounterMode(display=False) as counter:
        measured = measure_costs(model)
    assert counter.get_total_flops() == 2 * table.macs
    # Layer by layer: the same modules in the same order, each with the same multiply-adds and weights.
    assert [m.name for m in measured] == [row.name for row in table.rows]
    for row, seen in zip(table.rows, measured, strict=True):
        assert (seen.macs, seen.params) == (row.macs, row.params), row.name
        assert seen.out_shape[0] == row.out_shape[2]
        if seen.kind == "conv":
            assert tuple(seen.out_shape[1:]) == row.out_shape[:2], row.name
    # Trainable parameters: weights, biases and BatchNorm scale/shift, as sum(p.numel()) counts them.
    assert table.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------------------------
# The "must hold" figures
# --------------------------------------------------------------------------------------------------------------


def test_v1_headline_figures():
    table = count_costs("mobilenet_v1_1.0_224")
    assert abs(table.macs - 569e6) <= 1e6  # V1 paper Tables 4, 6, 7: 569M Mult-Adds
    assert round(table.params / 1e6, 1) == 4.2  # V1 paper: 4.2M parameters
    # The exact count, worked by hand from V1 Table 1: 3,185,088 conv weights + 1024 * 1000 FC weights.
    assert table.params == 4_209_088


def test_conv_mobilenet_figures():
    table = count_costs("mobilenet_v1_conv_1.0_224")
    # V1 paper Table 4: 4866M and 29.3M. The paper's 4866 equals our count without the 1.024M FC layer.
    assert abs(table.macs - 4866e6) <= 1.5e6
    assert abs((table.macs - table.rows[-1].macs) - 4866e6) < 0.5e6
    assert round(table.params / 1e6, 1) == 29.3


def test_v2_headline_figures():
    table = count_costs("mobilenet_v2_1.0_224")
    assert abs(table.macs - 300e6) <= 1e6  # V2 paper Table 4: 300M
    assert int(table.params / 1e5) / 10 == 3.4  # V2 paper: 3.4M (truncated; the count is 3.4698M)
    slim = count_costs("mobilenet_v2_1.0_224", num_classes=1001)
    assert round(slim.params_with_bias / 1e6, 2) == 3.47  # TF-slim README: 3.47M with the FC bias, 1001 classes
    assert table.trainable_params == 3_504_872  # torchvision's MobileNet_V2_Weights meta "num_params"


def test_v2_trainable_count_equals_torchvision_and_timm_modules():
    torchvision = pytest.importorskip("torchvision")
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        theirs_tv = sum(p.numel() for p in torchvision.models.mobilenet_v2().parameters())
        theirs_timm = sum(p.numel() for p in timm.create_model("mobilenetv2_100", pretrained=False).parameters())
        theirs_tv_wide = sum(p.numel() for p in torchvision.models.mobilenet_v2(width_mult=1.4).parameters())
    assert count_costs("mobilenet_v2_1.0_224").trainable_params == theirs_tv == theirs_timm
    assert count_costs("mobilenet_v2_1.4_224").trainable_params == theirs_tv_wide


def test_v2_macs_equal_torchvision_flop_count():
    # torchvision's mobilenet_v2 is an independent implementation: FlopCounterMode over it must give twice our MACs.
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = torchvision.models.mobilenet_v2().eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 224, 224, device="meta"))
    assert counter.get_total_flops() == 2 * count_costs("mobilenet_v2_1.0_224").macs


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_matches_its_module(name):
    _assert_matches_module(_meta_model(name))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(["v1", "v2"]),
    alpha=st.floats(min_value=0.05, max_value=2.0, allow_nan=False),
    resolution=st.integers(min_value=32, max_value=260),
    num_classes=st.integers(min_value=1, max_value=2000),
    variant=st.sampled_from(["separable", "conv", "shallow"]),
    small_input=st.booleans(),
    in_channels=st.integers(min_value=1, max_value=4),
)
def test_random_configurations_match_their_modules(
    family, alpha, resolution, num_classes, variant, small_input, in_channels
):
    config = ModelConfig(
        family,
        alpha=alpha,
        resolution=resolution,
        num_classes=num_classes,
        variant=variant if family == "v1" else "separable",
        small_input=small_input,
        in_channels=in_channels,
    )
    _assert_matches_module(_meta_model(config))


def test_real_forward_agrees_with_meta_count():
    # The meta device must not hide anything: one real forward pass gives the same per-layer figures.
    model = create_model("mobilenet_v2_0.35_96")
    real = measure_costs(model)
    meta = measure_costs(_meta_model("mobilenet_v2_0.35_96"))
    assert real == meta
    assert sum(layer.macs for layer in real) == count_costs("mobilenet_v2_0.35_96").macs


# --------------------------------------------------------------------------------------------------------------
# The table itself
# --------------------------------------------------------------------------------------------------------------


def test_v1_table2_breakdown():
    # V1 paper Table 2: Conv 1x1 94.86% / 74.59%, Conv DW 3x3 3.06% / 1.06%, Conv 3x3 (1.19, a misprint of
    # 1.91: see paper.py) / 0.02%, FC 0.18% / 24.33%.
    shares = {share.label: share for share in count_costs("mobilenet_v1_1.0_224").by_op()}
    assert list(shares) == ["Conv 1x1", "Conv DW 3x3", "Conv 3x3", "Fully Connected"]
    expected = {"Conv 1x1": (94.86, 74.59), "Conv DW 3x3": (3.06, 1.06), "Conv 3x3": (1.91, 0.02)}
    expected["Fully Connected"] = (0.18, 24.33)
    for label, (macs, params) in expected.items():
        assert round(100 * shares[label].macs_share, 2) == macs
        assert round(100 * shares[label].params_share, 2) == params
    assert sum(share.macs_share for share in shares.values()) == pytest.approx(1.0)


def test_rows_carry_effective_channels_and_shapes():
    table = count_costs("mobilenet_v1_1.0_224", alpha=0.5, resolution=160)
    first, last_conv, fc = table.rows[0], table.rows[-2], table.rows[-1]
    assert first.in_shape == (160, 160, 3) and first.out_shape == (80, 80, 16)  # int(32 * 0.5)
    assert last_conv.out_shape == (5, 5, 512)  # 160 / 32 = 5; int(1024 * 0.5)
    assert fc.in_shape == (1, 1, 512) and fc.macs == fc.params == 512 * 1000
    assert table.activations == sum(row.activations for row in table.rows)
    # A V1 row: bias only on the FC; BN (2 per channel) on every conv.
    assert fc.bias_params == 1000 and fc.bn_params == 0 and first.bn_params == 32 and first.bias_params == 0


def test_width_and_resolution_scaling_laws():
    # V1 section 4.3: the resolution multiplier scales multiply-adds by rho^2 and leaves parameters unchanged
    # (exactly, where every feature map divides: 448 = 2 x 224 keeps all strides exact).
    base, double = count_costs("mobilenet_v1_1.0_224"), count_costs("mobilenet_v1_1.0_224", resolution=448)
    fc = base.rows[-1].macs
    assert double.macs - fc == 4 * (base.macs - fc)
    assert double.params == base.params
    # V1 section 4.2: the width multiplier scales the pointwise convs (94.86% of the cost) by alpha^2.
    half = count_costs("mobilenet_v1_1.0_224", alpha=0.5)
    pointwise = [row.macs for row in base.rows if row.op == "pointwise"]
    assert [row.macs for row in half.rows if row.op == "pointwise"] == [macs // 4 for macs in pointwise]


def test_formats():
    table = count_costs("mobilenet_v2_0.5_128")
    data = json.loads(table.to_json())
    assert data["macs"] == table.macs and data["flops"] == 2 * table.macs
    assert data["params"] == table.params and data["trainable_params"] == table.trainable_params
    assert len(data["layers"]) == len(table.rows) == len(network_for("mobilenet_v2_0.5_128").layers)
    assert {"name", "op", "macs", "params"} <= set(data["layers"][0])
    lines = table.to_csv().splitlines()
    assert len(lines) == len(table.rows) + 2 and lines[-1].startswith("total,")
    assert lines[-1].split(",")[8] == str(table.macs)
    markdown = table.to_markdown()
    assert f"**{table.macs:,}**" in markdown and "2 FLOPs" in markdown


def test_count_costs_accepts_network_config_and_model():
    network = network_for("mobilenet_v1_0.25_128")
    expected = count_costs("mobilenet_v1_0.25_128").macs
    assert count_costs(network).macs == count_costs(network.config).macs == expected
    assert count_costs(_meta_model("mobilenet_v1_0.25_128")).macs == expected
    with pytest.raises(MobileNetError, match="only with a registered model name"):
        count_costs(network, alpha=0.5)
    with pytest.raises(MobileNetError, match="expected a model name"):
        count_costs(42)
    with pytest.raises(MobileNetError, match="unknown model"):
        count_costs("mobilenet_v3")
    for bad in ({"alpha": 0.0}, {"alpha": float("nan")}, {"resolution": 31}, {"num_classes": -1}):
        with pytest.raises(MobileNetError):
            count_costs("mobilenet_v1_1.0_224", **bad)


# --------------------------------------------------------------------------------------------------------------
# One layer
# --------------------------------------------------------------------------------------------------------------


def test_layer_cost_worked_examples():
    cost = layer_cost(416, 416, 50, 10, kernel=3)
    assert cost.macs_ratio == pytest.approx(1 / 10 + 1 / 9)  # V1 equation 5
    assert round(cost.macs_ratio, 3) == 0.211
    assert cost.standard_macs == 3 * 3 * 50 * 10 * 416 * 416
    small = layer_cost(3, 3, 3, 3, kernel=3)
    assert (small.standard_params, small.separable_params) == (81, 36)


def test_layer_cost_table3():
    # V1 paper Table 3: 14x14x512 -> 512, Dk = 3: 462M / 2.36M standard, 52.3M / 0.27M separable.
    cost = layer_cost(14, 14, 512, 512)
    assert round(cost.standard_macs / 1e6) == 462 and round(cost.standard_params / 1e6, 2) == 2.36
    assert round(cost.separable_macs / 1e6, 1) == 52.3 and round(cost.separable_params / 1e6, 2) == 0.27


def test_layer_cost_stride_and_validation():
    cost = layer_cost(7, 7, 8, 16, kernel=3, stride=2)
    assert (cost.out_height, cost.out_width) == (4, 4)  # 'same' padding: ceil(7 / 2)
    assert cost.depthwise_macs == 9 * 8 * 16
    for args in ((0, 5, 3, 3), (5, 5, 3, -1), (5, 5, 3, 3, 0), (5, 5, 3.5, 3), (True, 5, 3, 3)):
        with pytest.raises(MobileNetError, match="must be an integer >= 1"):
            layer_cost(*args)


@pytest.mark.parametrize("text", ["416x416x50", "416 x 416 x 50", "416X416X50", "416×416×50"])
def test_parse_shape(text):
    assert parse_shape(text) == (416, 416, 50)


@pytest.mark.parametrize("text", ["416x416", "axbxc", "416x416x0", "", "1x2x3x4", "-1x2x3"])
def test_parse_shape_rejects(text):
    with pytest.raises(MobileNetError, match=r"HEIGHTxWIDTHxCHANNELS|positive"):
        parse_shape(text)


# --------------------------------------------------------------------------------------------------------------
# The papers' tables
# --------------------------------------------------------------------------------------------------------------


def test_reproduction_covers_every_table_and_explains_every_difference():
    tables = {table.key: table for table in reproduce()}
    assert set(tables) >= {f"v1-table{index}" for index in range(1, 8)} | {
        "v2-table2",
        "v2-table4",
        "tf-slim-v1",
        "tf-slim-v2",
    }
    for table in tables.values():
        for row in table.rows:
            if row.status == "differs":
                assert row.note, f"{table.key} {row.item} {row.quantity} differs without a note"
    # Tables 3, 5 and 6 match throughout; TF-slim's V2 table matches every checkpoint.
    for key in ("v1-table3", "v1-table5", "v1-table6", "tf-slim-v2"):
        assert tables[key].matches == len(tables[key].rows), key
    # Table 1: every row but the misprinted stride of the second-last depthwise conv.
    differing = [row.item for row in tables["v1-table1"].rows if row.status == "differs"]
    assert differing == ["26"]
    # V2 Table 2: every row; only the text's "19 bottleneck layers" disagrees with the table's 17.
    differing = [row.item for row in tables["v2-table2"].rows if row.status == "differs"]
    assert differing == ["bottleneck blocks"]


def test_comparison_status():
    from mobilenet.paper import Comparison

    assert Comparison("x", "M", 569, 568.74).status == "match"
    assert Comparison("x", "M", 290, 290.68).status == "match (truncated)"
    assert Comparison("x", "M", 575, 568.74).status == "differs"
    assert Comparison("x", "M", 4.2, 4.209).status == "match"
    assert Comparison("x", "M", 3.4, 3.4698).status == "match (truncated)"
    assert Comparison("x", "M", 0.27, 0.2668).status == "match"
    assert Comparison("x", "M", 300, 300.78).difference == pytest.approx(0.78)


# --------------------------------------------------------------------------------------------------------------
# VGG-16 (V1 paper Table 8: 15,300M multiply-adds, 138M parameters)
# --------------------------------------------------------------------------------------------------------------


def test_vgg16_table8_figures():
    table = count_costs("vgg16_224")
    convs = sum(row.macs for row in table.rows if row.op == "conv")
    fcs = sum(row.macs for row in table.rows if row.op == "fc")
    # Table 8's 15,300M is the 13 convolutions (15,347M, "15.3 billion" to three figures); the three FC layers add
    # 124M, so the total is 1.1% above the published figure.
    assert convs == 15_346_630_656 and abs(convs - 15_300e6) / 15_300e6 < 0.01 and round(convs / 1e9, 1) == 15.3
    assert fcs == 25088 * 4096 + 4096 * 4096 + 4096 * 1000
    assert table.macs == convs + fcs == 15_470_264_320
    # 138M parameters (conv + FC weights); with the biases, torchvision's count.
    assert table.params == 138_344_128 and abs(table.params - 138e6) / 138e6 < 0.01
    assert table.trainable_params == 138_357_544
    assert [row.op for row in table.rows].count("maxpool") == 5
    assert all(row.macs == row.params == 0 for row in table.rows if row.op == "maxpool")


def test_vgg16_matches_its_module():
    model = _meta_model("vgg16_224")
    table = count_costs(model)
    with FlopCounterMode(display=False) as counter:
        measured = measure_costs(model)
    assert counter.get_total_flops() == 2 * table.macs
    weighted = [row for row in table.rows if row.op != "maxpool"]
    assert [m.name for m in measured] == [row.name for row in weighted]
    assert [(m.macs, m.params) for m in measured] == [(row.macs, row.params) for row in weighted]
    assert table.trainable_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("resolution", [32, 100, 250])
def test_vgg16_any_resolution(resolution):
    table = count_costs("vgg16_224", resolution=resolution)
    side = resolution
    for _ in range(5):
        side //= 2
    assert table.rows[17].out_shape == (side, side, 512)
    assert table.rows[18].in_shape == (1, 1, 25088)  # pooled to 7x7 at every resolution
    _assert_matches_module_without_pools(_meta_model("vgg16_224", resolution=resolution))


def _assert_matches_module_without_pools(model) -> None:
    table = count_costs(model)
    measured = measure_costs(model)
    assert [(m.name, m.macs) for m in measured] == [(r.name, r.macs) for r in table.rows if r.op != "maxpool"]


def test_tables_8_and_9_put_vgg16_and_the_small_mobilenet_beside_the_paper():
    """V1 Table 8 (VGG 16: 15,300M mult-adds, 138M parameters) and Table 9 (0.50 MobileNet-160: 76M, 1.32M)."""
    tables = {table.key: table for table in reproduce()}
    rows = {(row.item, row.quantity): row for row in tables["v1-table8"].rows}
    assert rows[("VGG 16", "Parameters (M)")].status == "match"
    macs = rows[("VGG 16", "Mult-Adds (M)")]
    assert macs.status == "differs" and "convolutions only" in macs.note
    # The paper's figure is the convolutions alone, to its three significant figures.
    convolutions = sum(row.macs for row in count_costs("vgg16_224").rows if row.op == "conv")
    assert round(convolutions / 1e9, 1) == 15.3
    assert tables["v1-table9"].matches == len(tables["v1-table9"].rows)


def test_check_fits_memory_counts_weights_and_the_batch_activations():
    from mobilenet.cost import check_fits_memory, physical_memory_bytes
    from mobilenet.spec import model_config

    config = model_config("mobilenet_v2_1.0_224")
    table = count_costs(config)
    weights, activations = table.trainable_params * 4, table.peak_activations * 4
    check_fits_memory(config, memory=weights)  # exactly fits
    with pytest.raises(MobileNetError, match="GB of float32 weights"):
        check_fits_memory(config, memory=weights - 1)
    check_fits_memory(config, batch_size=8, memory=8 * activations)
    with pytest.raises(MobileNetError, match="batch 9: its largest layer needs"):
        check_fits_memory(config, batch_size=9, memory=8 * activations)
    assert physical_memory_bytes() is None or physical_memory_bytes() > weights
