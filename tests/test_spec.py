"""The architecture spec against the papers' tables (V1 arXiv 1704.04861 Table 1; V2 arXiv 1801.04381 Table 2)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mobilenet.errors import MobileNetError
from mobilenet.spec import (
    ModelConfig,
    build_network,
    list_models,
    make_divisible,
    model_config,
    network_for,
    v1_channels,
)


def test_v1_table1_shapes():
    # V1 paper Table 1, "Input Size" column of each row at 224 (and the 7x7x1024 map before the pool).
    net = network_for("mobilenet_v1_1.0_224")
    sizes = [(block.in_size[0], block.in_channels) for block in net.blocks]
    assert sizes == [
        (224, 3), (112, 32), (112, 64), (56, 128), (56, 128), (28, 256), (28, 256),
        *[(14, 512)] * 6, (7, 1024),
    ]  # fmt: skip
    assert net.pool_size == (7, 7) and net.features_out == 1024
    assert len([b for b in net.blocks if b.kind == "separable"]) == 13
    assert [b.stride for b in net.blocks] == [2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]


def test_v2_table2_shapes():
    # V2 paper Table 2: input sizes 224^2x3, 112^2x32, 112^2x16, 56^2x24, 28^2x32, 14^2x64, 14^2x96, 7^2x160,
    # 7^2x320, then the 1x1 conv to 1280 on 7x7.
    net = network_for("mobilenet_v2_1.0_224")
    first_of_row = [net.blocks[i] for i in (0, 1, 2, 4, 7, 11, 14, 17, 18)]
    assert [(b.in_size[0], b.in_channels) for b in first_of_row] == [
        (224, 3), (112, 32), (112, 16), (56, 24), (28, 32), (14, 64), (14, 96), (7, 160), (7, 320),
    ]  # fmt: skip
    assert net.blocks[-1].out_channels == 1280 and net.pool_size == (7, 7)
    assert len(net.blocks[1].layers) == 2  # t = 1: no expansion conv
    assert all(len(b.layers) == 3 for b in net.blocks[2:-1])
    # Shortcuts only where stride is 1 and channels match: 10 of the 17 bottlenecks.
    residual = [b.name for b in net.blocks if b.residual]
    assert len(residual) == 10
    for block in net.blocks:
        if block.residual:
            assert block.stride == 1 and block.in_channels == block.out_channels


def test_v1_rounding_is_tf_slim():
    assert v1_channels(32, 0.25) == 8 and v1_channels(64, 0.25) == 16 and v1_channels(32, 0.1) == 8
    assert v1_channels(1024, 0.75) == 768


def test_make_divisible_never_loses_more_than_ten_percent():
    # Values from torchvision's _make_divisible: 32*0.35 = 11.2 -> 16 (8 would lose 29%), 16*0.35 -> 8.
    assert make_divisible(11.2) == 16
    assert make_divisible(5.6) == 8
    assert make_divisible(24 * 0.75) == 24
    assert make_divisible(1280 * 1.4) == 1792


@given(st.floats(min_value=0.5, max_value=5000))
def test_make_divisible_property(value):
    rounded = make_divisible(value)
    assert rounded % 8 == 0 and rounded >= 8
    assert rounded >= 0.9 * value
    assert rounded <= max(8, value + 8)


def test_v2_head_kept_for_small_alpha_and_scaled_for_large():
    assert network_for("mobilenet_v2_0.35_224").features_out == 1280
    assert network_for("mobilenet_v2_1.4_224").features_out == 1792


def test_variants():
    shallow = network_for("mobilenet_v1_shallow_1.0_224")
    assert len(shallow.blocks) == 14 - 5
    assert all(b.in_size != (14, 14) or b.in_channels != 512 or b.stride != 1 for b in shallow.blocks)
    conv = network_for("mobilenet_v1_conv_1.0_224")
    assert all(b.kind == "conv" for b in conv.blocks)
    assert [b.out_channels for b in conv.blocks] == [b.out_channels for b in network_for("mobilenet_v1_1.0_224").blocks]


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_small_input_ends_on_4x4(family):
    net = build_network(ModelConfig(family, resolution=32, small_input=True))
    assert net.pool_size == (4, 4) and net.total_stride == 8
    assert build_network(ModelConfig(family, resolution=32)).pool_size == (1, 1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": math.inf}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"resolution": 31}, "resolution"),
        ({"resolution": 224.0}, "resolution"),
        ({"num_classes": -1}, "num_classes"),
        ({"dropout": 1.0}, "dropout"),
        ({"variant": "deep"}, "variant"),
        ({"small_input": "no"}, "small_input must be True or False"),  # a non-empty string was taken as True
        ({"small_input": 2}, "small_input must be True or False"),
        ({"small_input": None}, "small_input must be True or False"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(MobileNetError, match=message):
        ModelConfig("v1", **options)


def test_unknown_name_suggests_closest():
    with pytest.raises(MobileNetError, match=r"did you mean .*mobilenet_v2_1\.0_224"):
        model_config("mobilenet_v2_1.0_244")


def test_registry_names():
    names = list_models()
    assert len(names) == 16 + 8 + 30
    assert "mobilenet_v1_conv_1.0_224" in names and "mobilenet_v1_shallow_0.75_224" in names
    assert list_models("mobilenet_v2_*_96") == [
        f"mobilenet_v2_{a}_96" for a in ("1.4", "1.3", "1.0", "0.75", "0.5", "0.35")
    ]


def test_overrides_and_round_trip():
    config = model_config("mobilenet_v2_1.0_224", alpha=0.6, resolution=100, num_classes=10)
    assert (config.alpha, config.resolution, config.num_classes) == (0.6, 100, 10)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(MobileNetError, match="cannot override"):
        model_config("mobilenet_v2_1.0_224", family="v1")


def test_small_input_allows_the_cifar_resolution_multiplier():
    # V1 paper Table 7 on CIFAR: 32x32 images resized to 28, 24, 20 px need the stride-8 network (src: spec.py).
    for resolution in (28, 24, 20, 8):
        network = build_network(ModelConfig("v1", resolution=resolution, small_input=True))
        assert network.pool_size[0] >= 1
    with pytest.raises(MobileNetError, match=r"resolution must be an integer >= 8, got 7"):
        ModelConfig("v1", resolution=7, small_input=True)
    with pytest.raises(MobileNetError, match=r">= 32 \(>= 8 with small_input\), got 20"):
        ModelConfig("v1", resolution=20)


def test_list_models_refuses_a_pattern_that_is_not_text():
    with pytest.raises(MobileNetError, match="got int"):  # was "argument of type 'int' is not iterable"
        list_models(5)
