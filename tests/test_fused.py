"""The fused block kernel (mobilenet.fused) against the PyTorch blocks it replaces, on every instruction set this CPU
runs (the portable C build included), and its wrapper's refusals of bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

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
