"""The fused block kernel (mobilenet.fused) against the PyTorch blocks it replaces, on every instruction set this CPU
runs (the portable C build included), and its wrapper's refusals of bad input."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from torch import nn

from conftest import quick_train
from mobilenet.errors import MobileNetError
from mobilenet.layers import ConvBNAct, DepthwiseSeparable, InvertedResidual
from mobilenet.spec import Block, Layer

fused = pytest.importorskip("mobilenet.fused")
pytestmark = pytest.mark.skipif(
    not fused.fused_available(),
    reason="the C extension mobilenet._fused_kernels is not built (python setup.py build_ext --inplace)",
)
ISAS = fused.supported_isas() if fused.fused_available() else ["portable"]


def _layer(op, cin, cout, kernel, stride, groups, activation) -> Layer:
    return Layer("x", op, cin, cout, kernel, stride, groups, (8, 8), (8, 8), True, activation, False)


def inverted_residual(cin: int, cout: int, t: int, stride: int) -> InvertedResidual:
    hidden = cin * t
    layers = [_layer("pointwise", cin, hidden, 1, 1, 1, "relu6")] if t != 1 else []
    layers += [
        _layer("depthwise", hidden, hidden, 3, stride, hidden, "relu6"),
        _layer("pointwise", hidden, cout, 1, 1, 1, None),
    ]
    block = Block("b", "inverted_residual", tuple(layers), residual=stride == 1 and cin == cout)
    return _randomized(InvertedResidual(block))


def separable(cin: int, cout: int, stride: int, activation: str = "relu") -> DepthwiseSeparable:
    layers = (
        _layer("depthwise", cin, cin, 3, stride, cin, activation),
        _layer("pointwise", cin, cout, 1, 1, 1, activation),
    )
    return _randomized(DepthwiseSeparable(Block("b", "separable", layers)))


def _randomized(module: nn.Module) -> nn.Module:
    """Random weights and eval-mode BatchNorm statistics far from the identity (so folding them is tested)."""
    generator = torch.Generator().manual_seed(sum(p.numel() for p in module.parameters()))
    for parameter in module.parameters():
        parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.copy_(torch.rand(bn.num_features, generator=generator) * 2 - 1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) * 1.5 + 0.5)
            bn.weight.data.uniform_(0.5, 1.5, generator=generator)
    return module.eval()


def check_block(module: nn.Module, size: int, *, batch: int = 2, isa: str, threads: int = 2) -> None:
    packed = fused.pack_block(module)
    x = torch.randn(batch, packed.in_channels, size, size, generator=torch.Generator().manual_seed(size))
    with torch.inference_mode():
        expected = module(x).permute(0, 2, 3, 1)
    got = packed(x.permute(0, 2, 3, 1).contiguous(), threads=threads, isa=isa)
    assert got.shape == expected.shape
    scale = float(expected.abs().max())
    assert scale > 0
    assert float((got - expected).abs().max()) <= 1e-4 * scale


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("cin", "cout", "t", "stride"),
    [(16, 16, 6, 1), (24, 24, 6, 1), (24, 17, 6, 1), (24, 17, 6, 2), (32, 16, 1, 1), (19, 19, 1, 1), (13, 40, 3, 2)],
)
@pytest.mark.parametrize("size", [7, 15, 1, 12])
def test_inverted_residual_matches_pytorch(isa, cin, cout, t, stride, size):
    check_block(inverted_residual(cin, cout, t, stride), size, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("cin", "cout", "stride"), [(32, 64, 1), (64, 128, 2), (21, 35, 2), (9, 9, 1)])
@pytest.mark.parametrize("size", [7, 15, 1, 16])
def test_separable_matches_pytorch(isa, cin, cout, stride, size):
    check_block(separable(cin, cout, stride), size, isa=isa)


def test_separable_with_relu6_and_one_or_three_threads():
    module = separable(24, 40, 1, activation="relu6")
    for threads in (1, 3):
        check_block(module, 15, batch=3, isa="portable", threads=threads)
        check_block(module, 15, batch=3, isa=ISAS[-1], threads=threads)


def test_large_map_with_many_tiles_and_batch():
    """A 112x112 map runs in many tiles per thread, a batch of 3 crosses images inside one thread's rows."""
    check_block(inverted_residual(16, 24, 6, 2), 112, batch=3, isa=ISAS[-1])
    check_block(inverted_residual(24, 24, 6, 1), 57, batch=3, isa=ISAS[-1])


def test_forced_instruction_set_from_the_environment(monkeypatch):
    module = inverted_residual(24, 17, 6, 1)
    monkeypatch.setenv(fused.ISA_ENV, "portable")
    check_block(module, 9, isa=None)
    monkeypatch.setenv(fused.ISA_ENV, "sse9")
    with pytest.raises(MobileNetError, match="unknown instruction set"):
        check_block(module, 9, isa=None)


def test_out_buffer_is_written():
    packed = fused.pack_block(inverted_residual(16, 16, 6, 1))
    x = torch.randn(1, 9, 9, 16)
    out = torch.full((1, 9, 9, 16), math.nan)
    assert packed(x, out=out) is out
    assert torch.isfinite(out).all()


@pytest.fixture
def packed():
    return fused.pack_block(inverted_residual(24, 17, 6, 1))


@pytest.mark.parametrize(
    ("x", "match"),
    [
        ("not a tensor", "torch.Tensor"),
        (torch.zeros(1, 8, 8, 24, dtype=torch.float64), "float32"),
        (torch.zeros(1, 8, 8, 24, dtype=torch.int32), "float32"),
        (torch.zeros(8, 8, 24), r"NHWC batch"),
        (torch.zeros(1, 8, 8, 23), r"NHWC batch \(N, H, W, 24\)"),
        (torch.zeros(1, 24, 8, 8), r"NHWC batch"),
        (torch.zeros(1, 16, 8, 24)[:, ::2], "contiguous"),
        (torch.zeros(0, 8, 8, 24), "non-empty"),
        (torch.zeros(1, 0, 8, 24), "non-empty"),
    ],
)
def test_hostile_inputs_are_refused(packed, x, match):
    with pytest.raises(MobileNetError, match=match):
        packed(x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threads": 0}, "threads"),
        ({"threads": 65}, "threads"),
        ({"threads": 2.0}, "threads"),
        ({"threads": True}, "threads"),
        ({"isa": "sse9"}, "unknown instruction set"),
        ({"isa": 3}, "unknown instruction set"),
        ({"out": torch.zeros(1, 8, 8, 24)}, "shape"),
        ({"out": torch.zeros(1, 8, 8, 17, dtype=torch.float64)}, "float32"),
        ({"out": torch.zeros(1, 8, 17, 8).transpose(2, 3)}, "contiguous"),
        ({"out": "buffer"}, "float32"),
    ],
)
def test_hostile_arguments_are_refused(packed, kwargs, match):
    with pytest.raises(MobileNetError, match=match):
        packed(torch.zeros(1, 8, 8, 24), **kwargs)


def test_output_overlapping_the_input_is_refused():
    packed = fused.pack_block(inverted_residual(16, 16, 6, 1))
    x = torch.zeros(1, 8, 8, 16)
    with pytest.raises(MobileNetError, match="overlap"):
        packed(x, out=x)


def test_unsupported_modules_are_refused():
    with pytest.raises(MobileNetError, match="InvertedResidual and DepthwiseSeparable"):
        fused.pack_block(nn.Conv2d(3, 3, 3))
    module = separable(8, 8, 1)
    module.depthwise.act = nn.GELU()
    with pytest.raises(MobileNetError, match="GELU"):
        fused.pack_block(module)
    module = separable(8, 8, 1)
    module.depthwise.conv.padding = (0, 0)
    with pytest.raises(MobileNetError, match="3x3 depthwise conv"):
        fused.pack_block(module)
    module = separable(8, 8, 1)
    module.pointwise = ConvBNAct(_layer("standard", 8, 8, 3, 1, 1, "relu"))
    with pytest.raises(MobileNetError, match="1x1 conv"):
        fused.pack_block(module)


def test_missing_extension_names_how_to_build(monkeypatch):
    monkeypatch.setattr(fused, "_kernels", None)
    assert not fused.fused_available()
    packed = fused.pack_block(inverted_residual(16, 16, 6, 1))
    with pytest.raises(MobileNetError, match=r"build_ext --inplace"):
        packed(torch.zeros(1, 8, 8, 16))
    with pytest.raises(MobileNetError, match="gcc"):
        fused.supported_isas()


# ---------------------------------------------------------------------------------------------------------------
# Whole networks and the "fused" backend
# ---------------------------------------------------------------------------------------------------------------


def _model_with_statistics(name: str, **overrides) -> nn.Module:
    from mobilenet.models import create_model

    model = create_model(name, **overrides)
    _randomized_statistics(model)
    return model.eval()


def _randomized_statistics(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.copy_((torch.rand(bn.num_features, generator=generator) - 0.5) * 0.2)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)


@pytest.mark.parametrize(
    ("name", "alpha"),
    [
        ("mobilenet_v1_1.0_224", 0.25),
        ("mobilenet_v1_1.0_224", 0.5),
        ("mobilenet_v1_1.0_224", 1.0),
        ("mobilenet_v2_1.0_224", 0.35),
        ("mobilenet_v2_1.0_224", 1.0),
    ],
)
@pytest.mark.parametrize("size", [224, 97, 130])
def test_network_matches_pytorch(name, alpha, size):
    model = _model_with_statistics(name, alpha=alpha)
    network = fused.FusedNetwork(model, threads=2)
    for batch in (1, 3):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            expected = model(x)
        got = network(x)
        assert got.shape == expected.shape
        assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())


def test_network_memory_plan_is_a_third_of_the_layer_by_layer_peak():
    """Ping-pong buffers: two NHWC buffers sized by the largest block outputs of each parity."""
    model = _model_with_statistics("mobilenet_v2_1.0_224")
    plan = fused.FusedNetwork(model).memory_plan(1, 224, 224)
    # V2 Table 2: block 1 writes 112x112x16, block 2 56x56x24 (the largest outputs of each parity).
    assert plan.buffer_floats == (112 * 112 * 16, 56 * 56 * 24)
    assert plan.peak_bytes >= plan.buffer_bytes


def test_network_refuses_what_it_cannot_run():
    from mobilenet.models import create_model

    with pytest.raises(MobileNetError, match="V1/V2"):
        fused.FusedNetwork(nn.Sequential(nn.Conv2d(3, 8, 3)))
    with pytest.raises(MobileNetError, match="no depthwise separable"):
        fused.FusedNetwork(create_model("mobilenet_v1_conv_0.25_224", resolution=32))
    network = fused.FusedNetwork(_model_with_statistics("mobilenet_v2_1.0_224", alpha=0.35))
    with pytest.raises(MobileNetError, match="NCHW batch with 3 channels"):
        network(torch.zeros(1, 4, 32, 32))
    with pytest.raises(MobileNetError, match="NCHW batch"):
        network("image")
    with pytest.raises(MobileNetError, match="threads"):
        fused.FusedNetwork(_model_with_statistics("mobilenet_v2_1.0_224", alpha=0.35), threads=0)


def test_fused_backend_runs_and_checks_parity():
    from mobilenet.backends import BACKENDS, load_source

    model = _model_with_statistics("mobilenet_v2_1.0_224", alpha=0.35, resolution=96)
    backend = BACKENDS["fused"](load_source(model), num_threads=2)
    assert backend.max_abs_diff is not None and backend.max_abs_diff <= 1e-4
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        expected = model(x)
    assert torch.allclose(backend(x), expected, atol=1e-4 * float(expected.abs().max()))
    with pytest.raises(MobileNetError, match="CPU"):
        BACKENDS["fused"](load_source(model), device="meta")


# ---------------------------------------------------------------------------------------------------------------
# The fused stem (the first conv computed inside the first block's call) and the fused head (1x1 conv + pool)
# ---------------------------------------------------------------------------------------------------------------


def _stem(cin: int, cout: int, stride: int, activation: str = "relu6") -> ConvBNAct:
    return _randomized(ConvBNAct(_layer("standard", cin, cout, 3, stride, 1, activation)))


def _folded(module: nn.Module) -> nn.Module:
    from mobilenet.export import fold_batchnorm

    return fold_batchnorm(module).eval()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("size", "stride", "channels"), [(224, 2, 32), (97, 2, 8), (130, 2, 48), (31, 1, 16)])
def test_stem_feeds_the_first_block_like_pytorch(isa, size, stride, channels):
    stem_module = _stem(3, channels, stride)
    for block_module in (inverted_residual(channels, 24, 1, 1), separable(channels, 24, 2)):
        stem, block = fused.pack_stem(_folded(stem_module)), fused.pack_block(block_module)
        image = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.inference_mode():
            expected = block_module(stem_module(image)).permute(0, 2, 3, 1)
        got = block(image, stem=stem, isa=isa)
        assert got.shape == expected.shape
        assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("channels", "out_channels", "size"), [(320, 1280, 7), (112, 1280, 4), (448, 1792, 5), (56, 40, 9)]
)
def test_head_conv_and_pool_match_pytorch(isa, channels, out_channels, size):
    head_module = _randomized(ConvBNAct(_layer("pointwise", channels, out_channels, 1, 1, 1, "relu6")))
    x = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(channels))
    with torch.inference_mode():
        expected = head_module(x).mean(dim=(2, 3))
    head = fused.pack_head(_folded(head_module), channels)
    got = head(x.permute(0, 2, 3, 1).contiguous(), isa=isa)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    pool = fused.pack_head(None, channels)
    assert torch.allclose(pool(x.permute(0, 2, 3, 1).contiguous(), isa=isa), x.mean(dim=(2, 3)), atol=1e-5)


def test_stem_and_head_refuse_what_they_cannot_run():
    with pytest.raises(MobileNetError, match="ConvBNAct"):
        fused.pack_stem(nn.Conv2d(3, 8, 3))
    with pytest.raises(MobileNetError, match="folded"):
        fused.pack_stem(_stem(3, 8, 2))
    with pytest.raises(MobileNetError, match="3x3 conv"):
        fused.pack_stem(_folded(_randomized(ConvBNAct(_layer("standard", 3, 8, 5, 2, 1, "relu")))))
    with pytest.raises(MobileNetError, match="3x3 conv"):
        fused.pack_stem(_folded(_randomized(ConvBNAct(_layer("standard", 8, 8, 3, 2, 8, "relu")))))
    stem = fused.pack_stem(_folded(_stem(3, 16, 2)))
    image = torch.randn(1, 3, 20, 20)
    with pytest.raises(MobileNetError, match="FusedStem"):
        fused.pack_block(separable(16, 16, 1))(image, stem="stem")
    with pytest.raises(MobileNetError, match="without expansion or shortcut"):
        fused.pack_block(inverted_residual(16, 16, 6, 1))(image, stem=stem)
    with pytest.raises(MobileNetError, match="without expansion or shortcut"):
        fused.pack_block(separable(8, 8, 1))(image, stem=stem)
    block = fused.pack_block(separable(16, 16, 1))
    with pytest.raises(MobileNetError, match="contiguous NCHW"):
        block(torch.randn(1, 20, 20, 3).permute(0, 3, 1, 2), stem=stem)
    with pytest.raises(MobileNetError, match=r"\(N, H, W, 3\)"):
        block(torch.randn(1, 4, 20, 20), stem=stem)
    with pytest.raises(MobileNetError, match="float32"):
        block(image.double(), stem=stem)
    with pytest.raises(MobileNetError, match=r"torch\.Tensor"):
        block(image.numpy(), stem=stem)
    with pytest.raises(MobileNetError, match="overlap"):
        storage = torch.randn(3 * 20 * 20 + 10 * 10 * 16)
        block(storage[:1200].view(1, 3, 20, 20), stem=stem, out=storage[400:2000].view(1, 10, 10, 16))
    with pytest.raises(MobileNetError, match="positive channel count"):
        fused.pack_head(None, 0)
    with pytest.raises(MobileNetError, match="positive channel count"):
        fused.pack_head(None, True)
    with pytest.raises(MobileNetError, match="ConvBNAct"):
        fused.pack_head(nn.Conv2d(8, 8, 1), 8)
    head_module = _folded(_randomized(ConvBNAct(_layer("pointwise", 8, 32, 1, 1, 1, "relu6"))))
    with pytest.raises(MobileNetError, match="takes 8 channels"):
        fused.pack_head(head_module, 16)
    head = fused.pack_head(head_module, 8)
    with pytest.raises(MobileNetError, match=r"\(N, H, W, 8\)"):
        head(torch.zeros(1, 8, 4, 4))
    with pytest.raises(MobileNetError, match="threads"):
        head(torch.zeros(1, 4, 4, 8), threads=0)
    with pytest.raises(MobileNetError, match="instruction set"):
        head(torch.zeros(1, 4, 4, 8), isa="sse9")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("name", "alpha", "size"),
    [("mobilenet_v1_1.0_224", 1.4, 97), ("mobilenet_v2_1.0_224", 1.4, 130), ("mobilenet_v2_1.0_224", 0.35, 97)],
)
def test_network_fuses_stem_and_head_on_every_isa(isa, name, alpha, size):
    model = _model_with_statistics(name, alpha=alpha)
    network = fused.FusedNetwork(model, threads=2, isa=isa)
    assert network.stem is not None and network.head is not None
    assert (network.head.weight is None) == name.startswith("mobilenet_v1")
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.inference_mode():
        expected, features = model(x), model.forward_features(x)
    got = network(x)
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    got_features = network.features(x)
    assert got_features.shape == features.shape
    assert float((got_features - features).abs().max()) <= 1e-4 * float(features.abs().max())


def test_network_peak_activations_are_under_a_third_of_layer_by_layer():
    """The layer-by-layer peak: the largest input + output of one conv (PyTorch's own tensors, from hooks)."""
    model = _model_with_statistics("mobilenet_v2_1.0_224")
    peak = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal peak
        peak = max(peak, 4 * (inputs[0].numel() + output.numel()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.inference_mode():
        model(torch.zeros(1, 3, 224, 224))
    for handle in handles:
        handle.remove()
    plan = fused.FusedNetwork(model).memory_plan(1, 224, 224)
    assert plan.peak_bytes <= peak / 3


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("features", "classes", "batch"), [(1280, 1000, 1), (1024, 10, 3), (17, 5, 2)])
def test_linear_classifier_matches_pytorch(isa, features, classes, batch):
    linear = nn.Linear(features, classes).eval()
    x = torch.randn(batch, features, generator=torch.Generator().manual_seed(features))
    with torch.inference_mode():
        expected = linear(x)
    got = fused.pack_linear(linear)(x.view(batch, 1, 1, features), isa=isa)
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    with pytest.raises(MobileNetError, match=r"nn\.Linear"):
        fused.pack_linear(nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("split_rows", [0, 10**6])
@pytest.mark.parametrize(
    "module",
    [
        inverted_residual(160, 160, 6, 1),
        inverted_residual(24, 17, 6, 2),
        inverted_residual(40, 40, 1, 1),
        separable(72, 50, 1),
        separable(33, 64, 2),
    ],
    ids=["residual", "stride2", "t1", "separable", "separable-stride2"],
)
def test_row_and_channel_split_both_match_pytorch(monkeypatch, isa, split_rows, module):
    """Threads split a block's rows, or (few rows) its expanded channels with partial projections summed."""
    monkeypatch.setattr(fused, "CHANNEL_SPLIT_ROWS", split_rows)
    for size, batch, threads in ((7, 1, 2), (9, 3, 3), (5, 2, 1)):
        check_block(module, size, batch=batch, isa=isa, threads=threads)


def test_whole_network_runs_in_one_kernel_call_like_step_by_step(monkeypatch):
    model = _model_with_statistics("mobilenet_v2_1.0_224", alpha=0.5)
    network = fused.FusedNetwork(model, threads=2)
    assert network._one_call()
    x = torch.randn(2, 3, 97, 97, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = model(x)
    one_call = network(x)
    monkeypatch.setattr(network, "_one_call", lambda: False)
    step_by_step = network(x)
    for got in (one_call, step_by_step):
        assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    second = network(torch.zeros(2, 3, 97, 97))  # the cached steps write new buffers, not the returned logits
    assert not torch.equal(second, one_call)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_later_calls_reuse_the_first_blocks_checked_arguments_with_the_new_image(monkeypatch, precision):
    """After one call at a shape, a plain contiguous float32 image of that shape skips building and checking the
    first block's arguments again; the result is the full path's, and anything else still takes the full path."""
    model = _model_with_statistics("mobilenet_v2_1.0_224", alpha=0.35)
    network = fused.FusedNetwork(model, threads=2, precision=precision)
    generator = torch.Generator().manual_seed(5)
    first, second = torch.randn(2, 3, 64, 64, generator=generator), torch.randn(2, 3, 64, 64, generator=generator)
    expected = network(second).clone()  # the full path, at the shape's first call
    network_first = network(first).clone()
    calls = []
    original = fused.FusedBlock.arguments
    monkeypatch.setattr(fused.FusedBlock, "arguments", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert torch.equal(network(second), expected)  # the fast path: the same kernel call, the new address
    assert torch.equal(network(first), network_first)
    assert calls == []
    with torch.inference_mode():
        reference = model(second)
    assert _relative_error(expected, reference) < (INT8_TOLERANCE if precision == "int8" else 1e-5)
    wide = second.repeat_interleave(2, dim=3)[..., ::2]  # same values, not contiguous
    for other in (wide, second.double(), nn.Parameter(second.clone())):
        calls.clear()
        assert torch.equal(network(other), expected)
        assert calls, type(other)  # the full path, with its checks
    calls.clear()
    single = network(second[:1])  # a new shape: the full path once, then the fast one
    assert calls
    calls.clear()
    assert torch.equal(network(second[:1].clone()), single) and calls == []


def test_run_plan_refuses_malformed_steps():
    kernels = fused._require_kernels()
    with pytest.raises(TypeError):
        kernels.run_plan("steps")
    with pytest.raises(TypeError, match="argument tuple"):
        kernels.run_plan([1])
    with pytest.raises(TypeError):
        kernels.run_plan([(1, 2)])
    with pytest.raises(ValueError, match="inconsistent"):
        kernels.run_plan([(0, 0, 1, 1, 8, 8, 16, 0, 0, 0.0, 0.0, 2, 1)])  # a head step with null pointers
    kernels.run_plan([])
    head = fused.pack_head(None, 8)
    with pytest.raises(MobileNetError, match="out must be"):
        head.arguments(torch.zeros(1, 2, 2, 8), torch.zeros(2, 8))


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("name", ["mobilenet_v1_1.0_224", "mobilenet_v2_1.0_224"])
def test_network_on_non_square_input_and_other_thread_counts(name, threads):
    model = _model_with_statistics(name, alpha=0.75)
    network = fused.FusedNetwork(model, threads=threads)
    x = torch.randn(2, 3, 113, 67, generator=torch.Generator().manual_seed(threads))
    with torch.inference_mode():
        expected = model(x)
    got = network(x)
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())


# ---------------------------------------------------------------------------------------------------------------
# The int8 precision: 1x1 convs as int8 GEMMs (weights per output channel, activations per call, int32 sums)
# ---------------------------------------------------------------------------------------------------------------

#: ||int8 - fp32|| / ||fp32|| of a block's output or a network's logits: two 8-bit roundings per 1x1 conv of
#: Gaussian-like activations (max about 5 times the rms) cost about 1% each.
INT8_TOLERANCE = 0.03


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def _emulated_int8_gemm(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bounds) -> torch.Tensor:
    """The int8 scheme in torch, independently of the kernel: weights symmetric per output channel (scale max|W| /
    127), activations per call (all >= 0: scale max / 255, zero point 0; else scale max|A| / 127, values shifted by
    128), integer products summed exactly (float64 holds these sums exactly), dequantized, biased and clamped."""
    w_scale = weight.abs().amax(dim=0) / 127
    w_int = (weight / torch.where(w_scale > 0, w_scale, 1)).round().clamp(-127, 127)
    low, high = min(float(a.min()), 0.0), max(float(a.max()), 0.0)
    signed = low < 0
    a_max = torch.tensor(max(high, -low) if signed else high, dtype=torch.float32)
    a_scale = a_max / (127 if signed else 255)
    inverse = 1 / a_scale if a_scale > 0 else torch.tensor(0.0)
    a_int = (a * inverse).clamp(-127 if signed else 0, 127 if signed else 255).round()
    total = a_int.double() @ w_int.double()
    return (total * (a_scale.double() * w_scale.double()) + bias.double()).clamp(*bounds).float()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("rows", "k", "n"),
    [(1, 3, 5), (13, 17, 33), (12, 4, 32), (25, 64, 16), (100, 24, 144), (49, 960, 160), (7, 320, 1280)],
)
@pytest.mark.parametrize("sign", ["signed", "non-negative"])
def test_int8_gemm_matches_an_emulation_of_its_quantization(isa, rows, k, n, sign):
    """Exact up to float rounding: a wrong packing, zero point or column sum shows far above 1e-4."""
    generator = torch.Generator().manual_seed(rows * k + n)
    a = torch.randn(rows, k, generator=generator)
    a = a.clamp(min=0) if sign == "non-negative" else a
    weight, bias = torch.randn(k, n, generator=generator), torch.randn(n, generator=generator)
    packed = fused.pack_int8(weight)
    for bounds in ((-math.inf, math.inf), (0.0, 6.0)):
        expected = _emulated_int8_gemm(a, weight, bias, bounds)
        scale = float(expected.abs().max())
        for column_sums in (True, False):
            got = fused.int8_gemm(a, packed, bias, bounds=bounds, column_sums=column_sums, isa=isa)
            assert got.shape == (rows, n)
            assert float((got - expected).abs().max()) <= 1e-4 * scale
    unquantized = (a @ weight + bias).clamp(0.0, 6.0)
    assert float((unquantized - expected).abs().max()) > 1e-3 * scale  # the emulation is not float32 in disguise


@pytest.mark.parametrize("isa", ISAS)
def test_int8_gemm_on_zero_tiny_huge_and_nonfinite_activations(isa):
    weight, bias = torch.randn(40, 20), torch.randn(20)
    packed = fused.pack_int8(weight)
    for a in (torch.zeros(5, 40), torch.full((5, 40), 1e-40)):  # scale 0 (or subnormal): no division by zero
        assert torch.equal(fused.int8_gemm(a, packed, bias, isa=isa), bias.expand(5, 20))
    huge = torch.randn(5, 40, generator=torch.Generator().manual_seed(0)) * 1e30
    expected = _emulated_int8_gemm(huge, weight, bias, (-math.inf, math.inf))
    assert float((fused.int8_gemm(huge, packed, bias, isa=isa) - expected).abs().max()) <= 1e-4 * float(
        expected.abs().max()
    )
    for bad in (math.nan, math.inf, -math.inf):  # every output of the call is NaN before its clamp, as in fp32
        a = torch.randn(5, 40)
        a[2, 7] = bad
        assert torch.equal(fused.int8_gemm(a, packed, bias, bounds=(0.0, 6.0), isa=isa), torch.zeros(5, 20))
        assert bool((fused.int8_gemm(a, packed, bias, isa=isa) == -math.inf).all())


def test_pack_int8_layout_and_refusals():
    weight = torch.randn(6, 3)
    packed = fused.pack_int8(weight)
    assert (packed.rows, packed.columns) == (6, 3)
    assert packed.weight.dtype == torch.int8 and packed.weight.numel() == 8 * fused.PANEL  # K padded to 8
    grid = packed.weight.view(2, fused.PANEL, 4)  # [K / 4 groups][PANEL columns][4 consecutive k]
    scale = weight.abs().amax(dim=0) / 127
    expected = (weight / scale).round()
    assert torch.equal(grid[:, :3].permute(0, 2, 1).reshape(8, 3)[:6].float(), expected)
    assert torch.equal(grid[1, :, 2:], torch.zeros(fused.PANEL, 2, dtype=torch.int8))  # the K padding
    assert torch.equal(packed.colsum[:3], expected.sum(dim=0).int())
    assert torch.equal(fused.pack_int8(torch.zeros(4, 2)).scale[:2], torch.zeros(2))
    for bad, match in (
        ("weights", "matrix"),
        (torch.zeros(4), "matrix"),
        (torch.zeros(0, 3), "matrix"),
        (torch.tensor([[1.0, math.nan]]), "NaN"),
    ):
        with pytest.raises(MobileNetError, match=match):
            fused.pack_int8(bad)
    with pytest.raises(MobileNetError, match=r"\(P, 6\)"):
        fused.int8_gemm(torch.zeros(2, 5), packed)
    with pytest.raises(MobileNetError, match="float32"):
        fused.int8_gemm(torch.zeros(2, 6, dtype=torch.float64), packed)
    with pytest.raises(MobileNetError, match="Int8Weights"):
        fused.int8_gemm(torch.zeros(2, 6), weight)
    with pytest.raises(MobileNetError, match="bias"):
        fused.int8_gemm(torch.zeros(2, 6), packed, torch.zeros(4))
    with pytest.raises(MobileNetError, match="bias"):
        fused.int8_gemm(torch.zeros(2, 6), packed, [0.0, 0.0, 0.0])
    with pytest.raises(MobileNetError, match="bounds"):
        fused.int8_gemm(torch.zeros(2, 6), packed, bounds=(0.0,))
    forged = dataclasses.replace(packed, weight=packed.weight[:-4])  # the kernel would read past its end
    with pytest.raises(MobileNetError, match=r"Int8Weights\.weight"):
        fused.int8_gemm(torch.zeros(2, 6), forged)
    with pytest.raises(MobileNetError, match=r"Int8Weights\.scale"):
        fused.int8_gemm(torch.zeros(2, 6), dataclasses.replace(packed, scale=packed.scale.double()))


def check_int8_block(module: nn.Module, size: int, *, batch: int = 2, isa: str, threads: int = 2) -> None:
    packed = fused.pack_block(module, "int8")
    assert packed.precision == "int8"
    x = torch.randn(batch, packed.in_channels, size, size, generator=torch.Generator().manual_seed(size))
    with torch.inference_mode():
        expected = module(x).permute(0, 2, 3, 1)
    got = packed(x.permute(0, 2, 3, 1).contiguous(), threads=threads, isa=isa)
    assert got.shape == expected.shape
    assert 1e-5 < _relative_error(got, expected) < INT8_TOLERANCE  # quantized, and close


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("split_rows", [0, 10**6])
@pytest.mark.parametrize(
    "module",
    [
        inverted_residual(160, 160, 6, 1),
        inverted_residual(24, 17, 6, 2),
        inverted_residual(13, 40, 3, 2),
        inverted_residual(40, 40, 1, 1),
        separable(72, 50, 1),
        separable(33, 64, 2),
        separable(24, 40, 1, activation="relu6"),
    ],
    ids=["residual", "stride2", "odd-channels", "t1", "separable", "separable-stride2", "separable-relu6"],
)
def test_int8_blocks_are_close_to_pytorch_in_rows_and_channel_split(monkeypatch, isa, split_rows, module):
    """Rows split between threads, or (few rows) the expanded channels, each slice's projection summing its own
    int8 partial (with the column sums of its slice of K)."""
    monkeypatch.setattr(fused, "CHANNEL_SPLIT_ROWS", split_rows)
    for size, batch, threads in ((7, 1, 2), (9, 3, 3), (5, 2, 1), (15, 2, 2)):
        check_int8_block(module, size, batch=batch, isa=isa, threads=threads)


def test_int8_block_on_a_large_map_and_on_zeros():
    check_int8_block(inverted_residual(16, 24, 6, 2), 112, batch=2, isa=ISAS[-1])
    module = inverted_residual(24, 24, 6, 1)
    zeros = torch.zeros(1, 9, 9, 24)  # every expansion GEMM quantizes an all-zero A (scale 0)
    with torch.inference_mode():
        expected = module(zeros.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    for isa in ISAS:
        got = fused.pack_block(module, "int8")(zeros, isa=isa)
        assert _relative_error(got, expected) < INT8_TOLERANCE


@pytest.mark.parametrize("precision", ["int4", "FP32", "", None, 8, ("int8",)])
def test_bad_precision_is_refused(precision):
    module = inverted_residual(16, 16, 6, 1)
    for make in (
        lambda: fused.pack_block(module, precision),
        lambda: fused.pack_head(
            _folded(_randomized(ConvBNAct(_layer("pointwise", 8, 32, 1, 1, 1, "relu6")))), 8, precision
        ),
        lambda: fused.FusedNetwork(_model_with_statistics("mobilenet_v2_1.0_224", alpha=0.35), precision=precision),
    ):
        with pytest.raises(MobileNetError, match=r"unknown precision .*expected one of \['fp32', 'int8'\]"):
            make()


def test_fp32_stays_the_default():
    assert fused.pack_block(inverted_residual(16, 16, 6, 1)).int8 is None
    network = fused.FusedNetwork(_model_with_statistics("mobilenet_v2_1.0_224", alpha=0.35))
    assert network.precision == "fp32" and network.head is not None and network.head.int8 is None


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("channels", "out_channels", "size"), [(320, 1280, 7), (112, 1280, 4), (56, 40, 9), (17, 33, 1)]
)
def test_int8_head_conv_is_close_to_pytorch(isa, channels, out_channels, size):
    head_module = _randomized(ConvBNAct(_layer("pointwise", channels, out_channels, 1, 1, 1, "relu6")))
    x = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(channels))
    with torch.inference_mode():
        expected = head_module(x).mean(dim=(2, 3))
    head = fused.pack_head(_folded(head_module), channels, "int8")
    assert head.int8 is not None
    got = head(x.permute(0, 2, 3, 1).contiguous(), isa=isa)
    assert 1e-5 < _relative_error(got, expected) < INT8_TOLERANCE


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("features", "classes", "batch"), [(1280, 1000, 1), (1024, 10, 3), (17, 5, 2)])
def test_int8_classifier_matches_an_emulation_of_its_quantization(isa, features, classes, batch):
    """The classifier of an int8 network is an int8 GEMM over one pixel per image: each image's pooled vector is
    its own call, so its own activation scale."""
    linear = _randomized(nn.Linear(features, classes)).eval()
    x = torch.rand(batch, features, generator=torch.Generator().manual_seed(features)) * 6  # pooled ReLU6 features
    packed = fused.pack_linear(linear, "int8")
    assert packed.int8 is not None and (packed.int8.rows, packed.int8.columns) == (features, classes)
    assert fused.pack_linear(linear).int8 is None
    weight, bias = linear.weight.detach().t(), linear.bias.detach()
    expected = torch.cat([_emulated_int8_gemm(row[None], weight, bias, (-math.inf, math.inf)) for row in x])
    got = packed(x.view(batch, 1, 1, features), isa=isa)
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    for precision in ("int4", None, 8, "INT8"):
        with pytest.raises(MobileNetError, match="precision"):
            fused.pack_linear(linear, precision)
    broken = nn.Linear(features, classes)
    with torch.no_grad():
        broken.weight[0, 0] = math.nan
    with pytest.raises(MobileNetError, match="NaN"):  # no scale can hold it: refused, not packed as garbage
        fused.pack_linear(broken, "int8")


def test_int8_network_runs_its_classifier_in_int8():
    model = _model_with_statistics("mobilenet_v2_1.0_224", alpha=0.35)
    assert fused.FusedNetwork(model, precision="int8").classifier.int8 is not None
    assert fused.FusedNetwork(model).classifier.int8 is None


def _int8_stem_and_block(channels: int, stride: int, activation: str = "relu6"):
    """A random stem packed in int8 feeding a float32 separable block: only the stem is quantized."""
    stem_module, block_module = _stem(3, channels, stride, activation), separable(channels, 24, 1)
    stem = fused.pack_stem(_folded(stem_module), "int8")
    assert stem.int8 is not None and (stem.int8.rows, stem.int8.columns) == (27, channels)
    return stem_module, block_module, stem, fused.pack_block(block_module)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("size", "stride", "channels"), [(224, 2, 32), (97, 2, 8), (130, 2, 48), (31, 1, 16)])
def test_int8_stem_is_close_to_pytorch(isa, size, stride, channels):
    """The stem's im2col columns quantized per row (asymmetric, over their span) and its weights per channel."""
    stem_module, block_module, stem, block = _int8_stem_and_block(channels, stride)
    image = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.inference_mode():
        expected = block_module(stem_module(image)).permute(0, 2, 3, 1)
    got = block(image, stem=stem, isa=isa)
    assert got.shape == expected.shape
    assert 1e-5 < _relative_error(got, expected) < INT8_TOLERANCE


@pytest.mark.parametrize("isa", ISAS)
def test_int8_stem_on_zero_one_signed_huge_and_nonfinite_images(isa):
    # ReLU: no upper bound that would saturate the huge image's outputs (where a sign flip near 0 costs 6)
    stem_module, block_module, stem, block = _int8_stem_and_block(16, 2, "relu")
    fp32_stem = fused.pack_stem(_folded(stem_module))
    zeros, negative = torch.zeros(1, 3, 20, 20), torch.full((1, 3, 20, 20), -1.5)
    # all zeros: scale 0, the stem's output is its bias, as in float32
    assert torch.equal(block(zeros, stem=stem, isa=isa), block(zeros, stem=fp32_stem, isa=isa))
    with torch.inference_mode():
        expected = block_module(stem_module(negative)).permute(0, 2, 3, 1)
    assert _relative_error(block(negative, stem=stem, isa=isa), expected) < INT8_TOLERANCE  # one value, all < 0
    huge = torch.randn(1, 3, 20, 20, generator=torch.Generator().manual_seed(1)) * 1e30
    with torch.inference_mode():
        expected = block_module(stem_module(huge)).permute(0, 2, 3, 1)
    assert _relative_error(block(huge, stem=stem, isa=isa).double(), expected.double()) < INT8_TOLERANCE
    huge[0, 0, 3, 3], huge[0, 1, 9, 9], huge[0, 2, 15, 15] = math.nan, math.inf, -math.inf
    assert torch.isfinite(block(huge, stem=stem, isa=isa)).all()  # the clamps map NaN and infinities to bounds


def _flags_from_kernel(block, stem, image, isa):
    """The kernel's per-image non-finite flags for ``image`` through ``stem`` into ``block``, and its count."""
    flags = torch.full((image.shape[0],), 7, dtype=torch.int32)  # stale values: the kernel clears them first
    _, arguments = block.arguments(image, isa=isa, stem=stem, nonfinite=flags)
    count = fused._require_kernels().run_block(*arguments)
    return flags.tolist(), count


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize(("size", "stride"), [(20, 2), (21, 2), (9, 1), (2, 2), (1, 1)])
def test_stem_flags_every_image_holding_nan_or_inf_wherever_it_is(isa, precision, size, stride):
    """A 3x3 conv with padding 1 reads every pixel at stride 1 or 2, even and odd sizes: a NaN or an infinity in
    any pixel, the corners and the last row and column included, flags its image and no other."""
    stem = fused.pack_stem(_folded(_stem(3, 16, stride)), precision)
    block = fused.pack_block(separable(16, 16, 1))
    clean = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(size))
    assert _flags_from_kernel(block, stem, clean, isa) == ([0, 0, 0], 0)
    last = size - 1
    for channel, y, x in ((0, 0, 0), (1, last, last), (2, 0, last), (0, last, 0), (1, size // 2, size // 2)):
        for bad in (math.nan, math.inf, -math.inf):
            image = clean.clone()
            image[1, channel, y, x] = bad
            assert _flags_from_kernel(block, stem, image, isa) == ([0, 1, 0], 1), (channel, y, x, bad)
    image = clean.clone()
    image[0, 0, 0, 0], image[2, 2, last, last] = math.nan, math.inf
    assert _flags_from_kernel(block, stem, image, isa) == ([1, 0, 1], 2)
    huge = torch.full((3, 3, size, size), 3e38)  # finite: not flagged, though sums of it overflow
    assert _flags_from_kernel(block, stem, huge, isa) == ([0, 0, 0], 0)


def test_nonfinite_flags_refuse_what_the_kernel_could_not_write_safely():
    stem = fused.pack_stem(_folded(_stem(3, 16, 2)))
    block, image = fused.pack_block(separable(16, 16, 1)), torch.randn(2, 3, 20, 20)
    bad_flags = [
        torch.zeros(2, dtype=torch.int64),
        torch.zeros(3, dtype=torch.int32),
        torch.zeros(1, dtype=torch.int32),
        torch.zeros(4, dtype=torch.int32)[::2],
        torch.zeros(2, dtype=torch.int32, device="meta"),
        [0, 0],
        "0,0",
    ]
    for flags in bad_flags:
        with pytest.raises(MobileNetError, match="nonfinite must be a contiguous int32 CPU tensor of 2 flags"):
            block.arguments(image, stem=stem, nonfinite=flags)
    nhwc = torch.randn(2, 10, 10, 16)
    with pytest.raises(MobileNetError, match="pass stem= too"):
        block.arguments(nhwc, nonfinite=torch.zeros(2, dtype=torch.int32))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_network_with_a_fused_stem_marks_nonfinite_images_from_the_kernels_flags(monkeypatch, precision):
    """In one kernel call with a fused stem, the kernel's flags mark the NaN rows: no second pass over the image."""
    model = _model_with_statistics("mobilenet_v2_1.0_224", alpha=0.35)
    network = fused.FusedNetwork(model, precision=precision)
    assert network.stem is not None and network._one_call()
    x = torch.randn(3, 3, 33, 33, generator=torch.Generator().manual_seed(2))
    clean = network(x).clone()
    monkeypatch.setattr(fused, "_nan_where_not_finite", lambda *a: pytest.fail("the image was checked again"))
    x[1, 2, 32, 32] = math.inf  # the last pixel
    for _ in range(2):  # the checked path, then the fast one
        logits = network(x)
        assert torch.isnan(logits[1]).all() and not torch.isnan(logits[[0, 2]]).any()
        assert torch.equal(logits[[0, 2]], clean[[0, 2]])
    assert not torch.isnan(network(x[[0, 2]])).any()  # the flags are cleared for each call


def test_int8_stem_refuses_bad_precision_and_forged_weights():
    stem = fused.pack_stem(_folded(_stem(3, 16, 2)), "int8")
    block, image = fused.pack_block(separable(16, 16, 1)), torch.randn(1, 3, 20, 20)
    for precision in ("int4", None, 8):
        with pytest.raises(MobileNetError, match="precision"):
            fused.pack_stem(_folded(_stem(3, 16, 2)), precision)
    forged = [
        (dataclasses.replace(stem, int8="int8"), "Int8Weights or None"),
        (dataclasses.replace(stem, int8=fused.pack_int8(torch.randn(27, 8))), r"\(27, 16\) matrix"),
        (dataclasses.replace(stem, int8=fused.pack_int8(torch.randn(12, 16))), r"\(27, 16\) matrix"),
        (dataclasses.replace(stem, int8=dataclasses.replace(stem.int8, scale=stem.int8.scale.double())), "scale"),
        (dataclasses.replace(stem, int8=dataclasses.replace(stem.int8, weight=stem.int8.weight[:-4])), "weight"),
    ]
    for bad, match in forged:
        with pytest.raises(MobileNetError, match=match):
            block(image, stem=bad)


def _check_int8_network(network, model, x) -> None:
    """The logits' relative error. Not their top-1: these random networks give nearly the same logits for every
    input, their top two a hair apart (see conftest.quick_train); test_int8_network_agrees_with_pytorch_on_a_
    trained_model checks top-1 agreement where it means something."""
    with torch.inference_mode():
        expected = model(x)
    got = network(x)
    assert got.shape == expected.shape
    assert 1e-5 < _relative_error(got, expected) < INT8_TOLERANCE


@pytest.mark.parametrize(
    ("name", "alpha", "size"),
    [
        ("mobilenet_v1_1.0_224", 0.25, 224),
        ("mobilenet_v1_1.0_224", 1.0, 130),
        ("mobilenet_v2_1.0_224", 0.35, 224),
        ("mobilenet_v2_1.0_224", 1.0, 224),
        ("mobilenet_v2_1.0_224", 1.4, 97),
    ],
)
def test_int8_network_is_close_to_pytorch(name, alpha, size):
    model = _model_with_statistics(name, alpha=alpha)
    network = fused.FusedNetwork(model, threads=2, precision="int8")
    assert network.precision == "int8" and network._one_call()
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(size))
    _check_int8_network(network, model, x)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("name", ["mobilenet_v1_1.0_224", "mobilenet_v2_1.0_224"])
def test_int8_network_on_every_isa_and_thread_count(isa, threads, name):
    model = _model_with_statistics(name, alpha=0.5)
    network = fused.FusedNetwork(model, threads=threads, isa=isa, precision="int8")
    x = torch.randn(2, 3, 113, 67, generator=torch.Generator().manual_seed(threads))
    _check_int8_network(network, model, x)


def test_int8_network_in_one_call_and_step_by_step(monkeypatch):
    model = _model_with_statistics("mobilenet_v2_1.0_224", alpha=0.5)
    network = fused.FusedNetwork(model, threads=2, precision="int8")
    x = torch.randn(2, 3, 97, 97, generator=torch.Generator().manual_seed(3))
    one_call = network(x)
    assert torch.equal(network(x), one_call)  # deterministic: the same calls, the same scales
    monkeypatch.setattr(network, "_one_call", lambda: False)
    step_by_step = network(x)
    assert torch.allclose(one_call, step_by_step, rtol=0, atol=1e-5 * float(one_call.abs().max()))
    _check_int8_network(network, model, x)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_an_image_with_nan_or_inf_gets_nan_logits_and_the_others_stay(precision):
    """The stem's clamp would map a NaN to its lower bound and an infinity to a bound, answering with confidence;
    as PyTorch's, the logits of such an image are NaN, and the other images of the batch are untouched."""
    model = _model_with_statistics("mobilenet_v2_1.0_224", alpha=0.35)
    network = fused.FusedNetwork(model, precision=precision)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    clean = network(x)
    x[0, 0, 5, 5], x[1, 1, 3, 3], x[2, 2, 9, 9] = math.nan, math.inf, -math.inf
    logits = network(x)
    assert torch.isnan(logits[:3]).all()
    assert torch.isnan(model(x[:1])).all()  # the reference: PyTorch's logits of a NaN image
    assert torch.equal(logits[3], clean[3])
    huge = torch.full((1, 3, 64, 64), 3e38)  # finite, though its sum overflows: computed, not marked
    assert not torch.isnan(network(huge)).any()
    for dtype in (torch.bfloat16, torch.float16, torch.float64):  # read as float32, as the kernel reads them
        logits = network(x.to(dtype))
        assert torch.isnan(logits[:3]).all()
        assert torch.equal(logits[3], network(x.to(dtype).float())[3])


@pytest.fixture(scope="module")
def trained_digits_model():
    """MobileNetV1 0.25 at 32 px trained briefly on scikit-learn's digits (conftest.quick_train): a network whose
    decisions rest on real features, the only kind whose top-1 agreement says anything about quantization."""
    pytest.importorskip("sklearn")
    from mobilenet.data import build_eval_transform, load_digits
    from mobilenet.models import create_model

    bundle = load_digits(size=32)
    transform = build_eval_transform(bundle.preprocessing(32))
    torch.manual_seed(0)
    model = create_model("mobilenet_v1_0.25_128", resolution=32, num_classes=10, dropout=0.0)
    quick_train(model, torch.stack([transform(image) for image in bundle.train.images]), bundle.train.labels, 120)
    return model, torch.stack([transform(image) for image in bundle.val.images]), bundle.val.labels


def test_int8_network_agrees_with_pytorch_on_a_trained_model(trained_digits_model):
    model, images, labels = trained_digits_model
    with torch.inference_mode():
        expected = model(images)
    accuracy = float((expected.argmax(dim=1) == torch.as_tensor(labels)).float().mean())
    assert accuracy > 0.5  # trained (chance is 0.1)
    for isa in ISAS:
        got = fused.FusedNetwork(model, threads=2, isa=isa, precision="int8")(images)
        assert 1e-5 < _relative_error(got, expected) < 2 * INT8_TOLERANCE
        assert float((got.argmax(dim=1) == expected.argmax(dim=1)).float().mean()) >= 0.95


def test_an_instruction_set_from_the_environment_is_named_as_such(monkeypatch):
    """A MOBILENET_FUSED_ISA set long ago and forgotten: the refusal says where the name came from."""
    module = inverted_residual(24, 17, 6, 1)
    monkeypatch.setenv(fused.ISA_ENV, "AVX512 ")
    with pytest.raises(MobileNetError, match=f"'AVX512 ' \\(from the environment variable {fused.ISA_ENV}\\)"):
        check_block(module, 9, isa=None)
    with pytest.raises(MobileNetError) as error:
        check_block(module, 9, isa="sse9")
    assert fused.ISA_ENV not in str(error.value)  # asked for in the call, not by the environment


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_network_refuses_tensors_the_model_would_not_take(precision):
    """The eager model refuses integer, boolean and complex batches; the fused network read them as float32 (a
    complex batch lost its imaginary part silently), and a meta tensor raised NotImplementedError. An empty batch
    was refused by its internal NHWC shape."""
    if precision == "int8" and not fused.has_vnni():
        pytest.skip("int8 needs VNNI or ARM dot products")
    network = fused.FusedNetwork(_model_with_statistics("mobilenet_v1_1.0_224", alpha=0.25), precision=precision)
    network(torch.zeros(1, 3, 32, 32))  # a shape seen before: later calls may take the fast path
    for batch in (
        torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
        torch.zeros(1, 3, 32, 32, dtype=torch.int64),
        torch.zeros(1, 3, 32, 32, dtype=torch.bool),
        torch.zeros(1, 3, 32, 32, dtype=torch.complex64),
        torch.zeros(1, 3, 32, 32, device="meta"),
    ):
        with pytest.raises(MobileNetError, match=f"float NCHW batch with 3 channels, got a {batch.dtype} tensor"):
            network(batch)
    with pytest.raises(MobileNetError, match=re.escape("got (0, 3, 32, 32)")):
        network(torch.zeros(0, 3, 32, 32))


def test_packing_refuses_weights_it_cannot_run():
    """A complex matrix was packed without its imaginary part and a meta one raised NotImplementedError; a Linear
    with no in or out features packed, and its first call raised the kernel's ValueError."""
    for matrix in (torch.zeros(4, 4, dtype=torch.complex64), torch.zeros(4, 4, device="meta")):
        with pytest.raises(MobileNetError, match=f"real float weights, got a {matrix.dtype} matrix"):
            fused.pack_int8(matrix)
    for features in ((0, 3), (4, 0)):
        with pytest.raises(MobileNetError, match="in and out features >= 1"):
            fused.pack_linear(nn.Linear(*features))
