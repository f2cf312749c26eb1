"""Our own CPU kernel for whole MobileNet blocks (the C extension ``mobilenet._fused_kernels``).

The V2 paper (section 5.1, "memory efficient inference") observes that an inverted residual block (Table 1: 1x1
expansion + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear projection, shortcut) can be computed tile by tile, so the
t-times expanded tensor never exists in full. The kernel does that on NHWC float32: for a tile of output rows it
expands only the input rows the depthwise conv needs that are not in a small ring buffer yet, runs the depthwise
conv of the tile, and projects the tile straight into the output, adding the shortcut. V1's depthwise separable
block (V1 paper Figure 3: 3x3 depthwise + ReLU, 1x1 pointwise + ReLU) runs on the same kernel with no expansion.

:func:`pack_block` turns a :class:`mobilenet.layers.InvertedResidual` or
:class:`~mobilenet.layers.DepthwiseSeparable` (BatchNorm folded by :func:`mobilenet.export.fold_batchnorm`) into a
:class:`FusedBlock` once: weights transposed to input-channel-major and zero padded to 16 output channels, the
layout the kernel's register-blocked 1x1 micro-kernels read. The kernel picks AVX-512, AVX2+FMA or portable C at
run time; ``isa=`` or the ``MOBILENET_FUSED_ISA`` environment variable forces one.

The extension is optional: :func:`fused_available` says whether it was built, and every entry point raises a
:class:`~mobilenet.errors.MobileNetError` naming how to build it when it was not.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mobilenet.errors import MobileNetError
from mobilenet.export import fold_batchnorm
from mobilenet.layers import ConvBNAct, DepthwiseSeparable, InvertedResidual
from mobilenet.models import MobileNet

try:
    from mobilenet import _fused_kernels as _kernels
except ImportError:  # built without a C compiler: the package works, the fused kernel does not
    _kernels = None

__all__ = [
    "BUILD_HINT",
    "ISA_ENV",
    "FusedBlock",
    "FusedNetwork",
    "MemoryPlan",
    "best_isa",
    "fused_available",
    "pack_block",
    "supported_isas",
]

BUILD_HINT = (
    "the fused kernel is the C extension mobilenet._fused_kernels, compiled when mobilenet is installed: "
    "`pip install -e .` needs a C compiler (gcc); in a source checkout run `python setup.py build_ext --inplace`"
)
#: Forces the kernel's instruction set: portable, avx2 or avx512 (default: the best this CPU runs).
ISA_ENV = "MOBILENET_FUSED_ISA"
_ISA_CODES = {"auto": 0, "portable": 1, "avx2": 2, "avx512": 3}
#: Bytes of ring buffer + depthwise tile per thread: half of a 1 MiB L2, so the tile stays there with the weights.
CACHE_BUDGET = 512 * 1024
#: The kernel pads channel counts to this many floats (one AVX-512 vector).
CHANNEL_ALIGN = 16
MAX_THREADS = 64
# Dimensions travel as C ints.
_MAX_DIM = 2**31 - 1

_BOUNDS = {nn.ReLU: (0.0, math.inf), nn.ReLU6: (0.0, 6.0), nn.Identity: (-math.inf, math.inf)}


def fused_available() -> bool:
    """Whether the C extension was built (it needs a C compiler at install time)."""
    return _kernels is not None


def _require_kernels() -> Any:
    if _kernels is None:
        raise MobileNetError(f"the fused kernel is not available: {BUILD_HINT}")
    return _kernels


def supported_isas() -> list[str]:
    """The kernel's instruction sets this CPU runs, from ``portable`` up (``avx2``, ``avx512``)."""
    return list(_require_kernels().supported_isas())


def best_isa() -> str:
    """The instruction set the kernel uses when none is forced."""
    return str(_require_kernels().best_isa())


def _isa_code(isa: str | None) -> int:
    """``isa``, else ``$MOBILENET_FUSED_ISA``, else the best one, as the kernel's code; refuses one this CPU lacks."""
    name = isa if isa is not None else (os.environ.get(ISA_ENV) or "auto")
    if not isinstance(name, str) or name not in _ISA_CODES:
        raise MobileNetError(
            f"unknown instruction set {name!r} for the fused kernel; expected one of {list(_ISA_CODES)}"
        )
    if name != "auto" and name not in supported_isas():
        raise MobileNetError(f"this CPU does not run the fused kernel's {name} build; it runs {supported_isas()}")
    return _ISA_CODES[name]


def check_threads(threads: Any) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise MobileNetError(f"threads must be an integer in 1..{MAX_THREADS}, got {threads!r}")
    return threads


def _padded(channels: int) -> int:
    return -(-channels // CHANNEL_ALIGN) * CHANNEL_ALIGN


def _bounds(act: nn.Module, where: str) -> tuple[float, float]:
    """The clamp an activation module is: ReLU [0, inf), ReLU6 [0, 6], none (-inf, inf)."""
    for kind, bounds in _BOUNDS.items():
        if type(act) is kind:
            return bounds
    raise MobileNetError(f"the fused kernel runs ReLU, ReLU6 or no activation; {where} has {type(act).__name__}")


def _conv_parts(unit: ConvBNAct, where: str, *, depthwise: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The folded conv's weight and bias (zeros where it has none) and its stride, after checking it is the conv the
    kernel computes: a 1x1 dense conv, or a 3x3 depthwise conv with padding 1 and stride 1 or 2."""
    conv = unit.conv
    if not isinstance(unit.bn, nn.Identity):
        raise MobileNetError(f"{where}: BatchNorm must be folded first (mobilenet.export.fold_batchnorm)")
    kernel = (3, 3) if depthwise else (1, 1)
    padding = (1, 1) if depthwise else (0, 0)
    groups = conv.in_channels if depthwise else 1
    if (
        conv.kernel_size != kernel
        or conv.padding != padding
        or conv.groups != groups
        or conv.dilation != (1, 1)
        or conv.stride[0] != conv.stride[1]
        or conv.stride[0] not in ((1, 2) if depthwise else (1,))
        or (depthwise and conv.out_channels != conv.in_channels)
        or conv.padding_mode != "zeros"
    ):
        wanted = "a 3x3 depthwise conv, padding 1, stride 1 or 2" if depthwise else "a 1x1 conv, stride 1"
        raise MobileNetError(f"{where}: the fused kernel computes {wanted}; got {conv}")
    weight = conv.weight.detach().float().cpu()
    bias = conv.bias.detach().float().cpu() if conv.bias is not None else torch.zeros(conv.out_channels)
    return weight, bias, int(conv.stride[0])


def _pad_columns(matrix: torch.Tensor, columns: int) -> torch.Tensor:
    out = torch.zeros(matrix.shape[0], columns)
    out[:, : matrix.shape[1]] = matrix
    return out.contiguous()


def _pad_vector(vector: torch.Tensor, length: int) -> torch.Tensor:
    return _pad_columns(vector.reshape(1, -1), length).reshape(-1)


@dataclass(frozen=True)
class FusedBlock:
    """A block packed for the kernel: 1x1 weights as (input channels, padded output channels), depthwise weights as
    (9 taps, padded channels), biases padded; ``bounds`` are the three stages' activation clamps."""

    kind: str
    in_channels: int
    expanded: int
    out_channels: int
    stride: int
    residual: bool
    tensors: dict[str, torch.Tensor | None]
    bounds: tuple[float, float, float, float, float, float]

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The output's spatial size for an input of ``height`` x ``width`` (3x3 kernel, padding 1)."""
        return (height - 1) // self.stride + 1, (width - 1) // self.stride + 1

    def macs(self, height: int, width: int) -> int:
        """Multiply-accumulates of one image (expansion, depthwise, projection)."""
        out_h, out_w = self.output_size(height, width)
        expand = height * width * self.in_channels * self.expanded if self.tensors["we"] is not None else 0
        return expand + out_h * out_w * self.expanded * (9 + self.out_channels)

    def __call__(
        self, x: torch.Tensor, *, out: torch.Tensor | None = None, threads: int = 2, isa: str | None = None
    ) -> torch.Tensor:
        """The block on a contiguous NHWC float32 CPU batch; writes into ``out`` (NHWC, not overlapping ``x``)
        when given. ``threads`` threads split the output rows."""
        kernels = _require_kernels()
        batch, height, width = _check_input(x, self.in_channels)
        out_h, out_w = self.output_size(height, width)
        out = _check_output(out, x, (batch, out_h, out_w, self.out_channels))
        threads, code = check_threads(threads), _isa_code(isa)
        t = self.tensors
        kernels.run_block(
            x.data_ptr(), out.data_ptr(), batch, height, width, self.in_channels, out_h, out_w, self.out_channels,
            self.stride, self.expanded, _padded(self.expanded), _padded(self.out_channels),
            0 if t["we"] is None else t["we"].data_ptr(), 0 if t["be"] is None else t["be"].data_ptr(),
            t["wd"].data_ptr(), t["bd"].data_ptr(), t["wp"].data_ptr(), t["bp"].data_ptr(),
            *self.bounds, int(self.residual), threads, code, CACHE_BUDGET,
        )  # fmt: skip
        return out


def _check_input(x: Any, channels: int) -> tuple[int, int, int]:
    if not isinstance(x, torch.Tensor):
        raise MobileNetError(f"the fused kernel takes a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise MobileNetError(f"the fused kernel takes float32 CPU tensors, got {x.dtype} on {x.device}")
    if x.dim() != 4 or x.shape[3] != channels:
        raise MobileNetError(f"the fused kernel takes an NHWC batch (N, H, W, {channels}), got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise MobileNetError("the fused kernel takes a contiguous NHWC tensor; call .contiguous() first")
    batch, height, width = (int(s) for s in x.shape[:3])
    if min(batch, height, width) < 1 or max(batch * height, width, channels) > _MAX_DIM or x.numel() > 2**40:
        raise MobileNetError(f"the fused kernel takes a non-empty batch of sane size, got shape {tuple(x.shape)}")
    return batch, height, width


def _check_output(out: Any, x: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.float32)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.device.type != "cpu":
        raise MobileNetError("out must be a float32 CPU tensor")
    if tuple(out.shape) != shape or not out.is_contiguous():
        raise MobileNetError(f"out must be a contiguous tensor of shape {shape}, got {tuple(out.shape)}")
    x_start, out_start = x.data_ptr(), out.data_ptr()
    if x_start < out_start + 4 * out.numel() and out_start < x_start + 4 * x.numel():
        raise MobileNetError("out must not overlap the input: the kernel reads input rows after writing output rows")
    return out


def pack_block(module: nn.Module) -> FusedBlock:
    """Pack an :class:`~mobilenet.layers.InvertedResidual` or :class:`~mobilenet.layers.DepthwiseSeparable` for the
    kernel, folding its BatchNorms (eval-mode statistics) first; the module is not modified."""
    if not isinstance(module, InvertedResidual | DepthwiseSeparable):
        raise MobileNetError(
            f"the fused kernel runs InvertedResidual and DepthwiseSeparable blocks, got {type(module).__name__}"
        )
    folded = fold_batchnorm(module)
    if isinstance(folded, InvertedResidual):
        expand, depthwise, project, kind = folded.expand, folded.depthwise, folded.project, "inverted_residual"
    else:
        expand, depthwise, project, kind = None, folded.depthwise, folded.pointwise, "separable"
    wd, bd, stride = _conv_parts(depthwise, "the depthwise conv", depthwise=True)
    wp, bp, _ = _conv_parts(project, "the pointwise conv", depthwise=False)
    expanded, out_channels = wd.shape[0], wp.shape[0]
    if wp.shape[1] != expanded:
        raise MobileNetError(f"the pointwise conv takes {wp.shape[1]} channels, the depthwise conv gives {expanded}")
    tensors: dict[str, torch.Tensor | None] = {"we": None, "be": None}
    lo1, hi1 = -math.inf, math.inf
    in_channels = expanded
    if expand is not None:
        we, be, _ = _conv_parts(expand, "the expansion conv", depthwise=False)
        if we.shape[0] != expanded:
            raise MobileNetError(
                f"the expansion conv gives {we.shape[0]} channels, the depthwise conv takes {expanded}"
            )
        in_channels = we.shape[1]
        tensors["we"] = _pad_columns(we.reshape(expanded, in_channels).t(), _padded(expanded))
        tensors["be"] = _pad_vector(be, _padded(expanded))
        lo1, hi1 = _bounds(expand.act, "the expansion conv")
    tensors["wd"] = _pad_columns(wd.reshape(expanded, 9).t(), _padded(expanded))
    tensors["bd"] = _pad_vector(bd, _padded(expanded))
    tensors["wp"] = _pad_columns(wp.reshape(out_channels, expanded).t(), _padded(out_channels))
    tensors["bp"] = _pad_vector(bp, _padded(out_channels))
    residual = bool(getattr(folded, "use_residual", False))
    if residual and (stride != 1 or in_channels != out_channels):
        raise MobileNetError("a shortcut needs stride 1 and as many output channels as input channels")
    bounds = (lo1, hi1, *_bounds(depthwise.act, "the depthwise conv"), *_bounds(project.act, "the pointwise conv"))
    return FusedBlock(kind, int(in_channels), int(expanded), int(out_channels), stride, residual, tensors, bounds)


# ---------------------------------------------------------------------------------------------------------------
# Whole networks
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """The activation memory of one input shape: the two ping-pong NHWC buffers every fused block writes into
    (``buffer_bytes``), and ``peak_bytes``, the most activation bytes alive at once (the buffers plus what the torch
    stages allocate: the channels-last copy of the input, the stem's and the head conv's outputs). The kernel's
    per-thread ring and tile buffers are ``scratch_bytes`` (read from the extension after a run)."""

    buffer_floats: tuple[int, int]
    peak_bytes: int

    @property
    def buffer_bytes(self) -> int:
        return 4 * sum(self.buffer_floats)


@contextlib.contextmanager
def _torch_single_threaded() -> Iterator[None]:
    """torch's stages (stem, head conv, pool, classifier) on one thread: torch's OpenMP workers keep spinning after
    each op, and with as many threads as cores they would take the cores from the kernel's own pool in between."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


class FusedNetwork:
    """A V1 or V2 MobileNet (any width, any resolution) with every depthwise separable / inverted residual block on
    the fused kernel; the stem conv, V2's head 1x1 conv, the pool and the classifier run as torch ops on the
    BatchNorm-folded model (channels-last, so their outputs are NHWC without a copy). Fused blocks write into two
    ping-pong buffers allocated once per input shape. Takes and returns what the model does (NCHW in, logits)."""

    def __init__(self, model: nn.Module, *, threads: int = 2, isa: str | None = None) -> None:
        _require_kernels()
        if not isinstance(model, MobileNet) or model.config.family not in ("v1", "v2"):
            raise MobileNetError(
                f"the fused runtime runs MobileNet V1/V2 models, got {type(model).__name__} "
                f"{getattr(getattr(model, 'config', None), 'family', '')}".rstrip()
            )
        self.threads, self.isa = check_threads(threads), isa
        _isa_code(isa)
        self.model = fold_batchnorm(model).cpu().float().eval()
        self.stages: list[FusedBlock | nn.Module] = []
        for block in self.model.features:
            if isinstance(block, InvertedResidual | DepthwiseSeparable):
                self.stages.append(pack_block(block))
            elif isinstance(block, ConvBNAct):
                self.stages.append(block.to(memory_format=torch.channels_last))
            else:
                raise MobileNetError(f"the fused runtime cannot run a {type(block).__name__} block")
        if not any(isinstance(stage, FusedBlock) for stage in self.stages):
            raise MobileNetError(
                f"{model.name or 'this model'} has no depthwise separable or inverted residual block to fuse "
                "(the 'conv' variant of V1 is the paper's baseline of standard convs: run it with torch-jit)"
            )
        self._buffers: dict[tuple[int, int, int], tuple[list[torch.Tensor], MemoryPlan]] = {}

    def memory_plan(self, batch: int, height: int, width: int) -> MemoryPlan:
        """The buffers and the peak activation bytes for a ``batch`` x C x ``height`` x ``width`` input."""
        return self._plan(batch, height, width)[1]

    def _plan(self, batch: int, height: int, width: int) -> tuple[list[torch.Tensor], MemoryPlan]:
        key = (batch, height, width)
        if key not in self._buffers:
            sizes, peak = [0, 0], 0
            channels = int(self.model.config.in_channels)
            live_input = batch * channels * height * width  # the channels-last copy of the input
            index = 0
            for stage in self.stages:
                if isinstance(stage, FusedBlock):
                    height, width = stage.output_size(height, width)
                    channels = stage.out_channels
                    sizes[index % 2] = max(sizes[index % 2], batch * height * width * channels)
                    index += 1
                    live_input = 0  # the next block's input is a ping-pong buffer
                    continue
                conv = stage.conv
                height = (height + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
                width = (width + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
                channels = conv.out_channels
                output = batch * height * width * channels
                peak = max(peak, live_input + output)
                live_input = output
            plan = MemoryPlan((sizes[0], sizes[1]), 4 * (peak + sizes[0] + sizes[1]))
            self._buffers[key] = ([torch.empty(size) for size in sizes], plan)
        return self._buffers[key]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map (NCHW view of an NHWC tensor) of a float32 NCHW batch."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.model.config.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise MobileNetError(f"expected an NCHW batch with {self.model.config.in_channels} channels, got {shape}")
        x = x.detach().to("cpu", torch.float32)
        buffers, _ = self._plan(int(x.shape[0]), int(x.shape[2]), int(x.shape[3]))
        current = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # NHWC, contiguous
        index = 0
        with torch.inference_mode(), _torch_single_threaded():
            for stage in self.stages:
                if isinstance(stage, FusedBlock):
                    out_h, out_w = stage.output_size(int(current.shape[1]), int(current.shape[2]))
                    shape = (int(current.shape[0]), out_h, out_w, stage.out_channels)
                    out = buffers[index % 2][: math.prod(shape)].view(shape)
                    current = stage(current, out=out, threads=self.threads, isa=self.isa)
                    index += 1
                else:
                    nchw = stage(current.permute(0, 3, 1, 2))
                    current = nchw.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        return current.permute(0, 3, 1, 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a float32 NCHW batch (as the model's forward)."""
        features = self.features(x)
        with torch.inference_mode(), _torch_single_threaded():
            return self.model.forward_head(features).clone()
