"""Our own CPU kernel for whole MobileNet blocks (the C extension ``mobilenet._fused_kernels``).

The V2 paper (section 5.1, "memory efficient inference") observes that an inverted residual block (Table 1: 1x1
expansion + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear projection, shortcut) can be computed tile by tile, so the
t-times expanded tensor never exists in full. The kernel does that on NHWC float32: for a tile of output rows it
expands only the input rows the depthwise conv needs that are not in a small ring buffer yet, runs the depthwise
conv of the tile, and projects the tile straight into the output, adding the shortcut. V1's depthwise separable
block (V1 paper Figure 3: 3x3 depthwise + ReLU, 1x1 pointwise + ReLU) runs on the same kernel with no expansion.

:func:`pack_block` turns a :class:`mobilenet.layers.InvertedResidual` or
:class:`~mobilenet.layers.DepthwiseSeparable` (BatchNorm folded by :func:`mobilenet.export.fold_batchnorm`) into a
:class:`FusedBlock` once: 1x1 weights transposed to input-channel-major and cut into zero-padded panels of 32
output channels, the layout the kernel's register-blocked 1x1 micro-kernels read. The kernel picks AVX-512,
AVX2+FMA or portable C at run time; ``isa=`` or the ``MOBILENET_FUSED_ISA`` environment variable forces one.

``precision="int8"`` runs the 1x1 convs (expansion, projection, V1's pointwise, V2's head conv), the fused stem
(its im2col columns as the GEMM's input) and the fused classifier as int8 GEMMs (:func:`pack_int8`): weights
symmetric per output channel, activations quantized per GEMM call from the values present (no calibration; the
stem's over their span, see fused_int8.h), products summed exactly in int32 (AVX512-VNNI where the CPU has it,
portable C elsewhere: on a CPU without VNNI, :func:`has_vnni` False, int8 is slower than float32), everything else
(the depthwise conv, the ring, the pool) in float32. The result is the same from call to call, but depends slightly
on how a block's rows are cut into calls (threads, tiles), as dynamic quantization does.

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

import numpy as np
import torch
from torch import nn

from mobilenet.errors import MobileNetError
from mobilenet.export import fold_batchnorm
from mobilenet.layers import ConvBNAct, DepthwiseSeparable, InvertedResidual
from mobilenet.models import MobileNet
from mobilenet.runtime import FUSED_ISA_ENV

try:
    from mobilenet import _fused_kernels as _kernels
except ImportError:  # built without a C compiler: the package works, the fused kernel does not
    _kernels = None

__all__ = [
    "BUILD_HINT",
    "ISA_ENV",
    "PRECISIONS",
    "FusedBlock",
    "FusedHead",
    "FusedNetwork",
    "FusedStem",
    "Int8Weights",
    "MemoryPlan",
    "best_isa",
    "fused_available",
    "has_vnni",
    "int8_gemm",
    "pack_block",
    "pack_head",
    "pack_int8",
    "pack_linear",
    "pack_stem",
    "supported_isas",
    "worker_spin_seconds",
]

BUILD_HINT = (
    "the fused kernel is the C extension mobilenet._fused_kernels, compiled when mobilenet is installed: "
    "`pip install -e .` needs a C compiler (gcc); in a source checkout run `python setup.py build_ext --inplace`"
)
#: Forces the kernel's instruction set: portable, avx2 or avx512 (default: the best this CPU runs).
ISA_ENV = FUSED_ISA_ENV
_ISA_CODES = {"auto": 0, "portable": 1, "avx2": 2, "avx512": 3}
#: Bytes of ring buffer + depthwise tile per thread: half of a 1 MiB L2, so the tile stays there with the weights.
CACHE_BUDGET = 512 * 1024
#: Where a batch has at most this many output rows, a block's threads split its expanded channels instead of its
#: rows: cutting few rows re-expands the depthwise conv's overlap rows and makes every thread read all the weights.
CHANNEL_SPLIT_ROWS = 7
#: What the 1x1 convs compute in: float32, or int8 weights and activations with int32 sums.
PRECISIONS = ("fp32", "int8")
#: The kernel pads channel counts to this many floats (one AVX-512 vector).
CHANNEL_ALIGN = 16
#: 1x1 weights are stored in panels of this many output channels (fused.c's PANEL).
PANEL = 32
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


def worker_spin_seconds() -> float:
    """How long the pool's idle workers keep a core busy after a call, waiting for the next (then they sleep)."""
    return float(_require_kernels().spin_seconds())


def supported_isas() -> list[str]:
    """The kernel's instruction sets this CPU runs, from ``portable`` up (``avx2``, ``avx512``)."""
    return list(_require_kernels().supported_isas())


def best_isa() -> str:
    """The instruction set the kernel uses when none is forced."""
    return str(_require_kernels().best_isa())


def _isa_code(isa: str | None) -> int:
    """``isa``, else ``$MOBILENET_FUSED_ISA``, else the best one, as the kernel's code; refuses one this CPU lacks."""
    name = isa if isa is not None else (os.environ.get(ISA_ENV) or "auto")
    # A name from the environment may have been set long before: the message says where it came from.
    where = "" if isa is not None else f" (from the environment variable {ISA_ENV})"
    if not isinstance(name, str) or name not in _ISA_CODES:
        raise MobileNetError(
            f"unknown instruction set {name!r}{where} for the fused kernel; expected one of {list(_ISA_CODES)}"
        )
    if name != "auto" and name not in supported_isas():
        raise MobileNetError(
            f"this CPU does not run the fused kernel's {name} build{where}; it runs {supported_isas()}"
        )
    return _ISA_CODES[name]


def check_threads(threads: Any) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise MobileNetError(f"threads must be an integer in 1..{MAX_THREADS}, got {threads!r}")
    return threads


def check_precision(precision: Any) -> str:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise MobileNetError(
            f"unknown precision {precision!r} for the fused kernel; expected one of {list(PRECISIONS)}"
        )
    return precision


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


def _panels(matrix: torch.Tensor) -> torch.Tensor:
    """A (K, N) 1x1 weight matrix in the kernel's layout: panels of PANEL columns (zero padded), each K rows of PANEL
    floats, contiguous, so a micro-kernel's weight block never strides by a power of two (which would map its rows
    onto a few cache sets)."""
    rows, columns = matrix.shape
    count = -(-columns // PANEL)
    padded = _pad_columns(matrix, count * PANEL)
    return padded.reshape(rows, count, PANEL).permute(1, 0, 2).contiguous().reshape(-1)


def _pad_vector(vector: torch.Tensor, length: int) -> torch.Tensor:
    return _pad_columns(vector.reshape(1, -1), length).reshape(-1)


@dataclass(frozen=True)
class Int8Weights:
    """A (K, N) 1x1 weight matrix in int8 for the kernel's VNNI layout: ``weight`` holds panels of PANEL output
    channels, each ceil(K / 4) groups of PANEL x 4 bytes (four consecutive input channels of one output channel, the
    four products one vpdpbusd lane sums; K zero padded to a multiple of 4), flattened; ``colsum`` (int32) the sum of
    each output channel's int8 weights, for the activations' zero point; ``scale`` (float32) each output channel's
    scale. The three are padded to whole panels with zeros."""

    rows: int
    columns: int
    weight: torch.Tensor
    colsum: torch.Tensor
    scale: torch.Tensor

    def addresses(self) -> tuple[int, int, int]:
        return self.weight.data_ptr(), self.colsum.data_ptr(), self.scale.data_ptr()

    def check(self) -> None:
        """Refuses tensors that do not hold the layout (the kernel reads them by address, unchecked)."""
        columns = -(-self.columns // PANEL) * PANEL
        expected = {
            "weight": (self.weight, torch.int8, -(-self.rows // 4) * 4 * columns),
            "colsum": (self.colsum, torch.int32, columns),
            "scale": (self.scale, torch.float32, columns),
        }
        for name, (tensor, dtype, size) in expected.items():
            if not (
                isinstance(tensor, torch.Tensor)
                and tensor.dtype == dtype
                and tensor.device.type == "cpu"
                and tensor.is_contiguous()
                and tensor.numel() == size
            ):
                raise MobileNetError(
                    f"Int8Weights.{name} must be a contiguous {dtype} CPU tensor of {size} values "
                    f"(mobilenet.fused.pack_int8 makes them), got {_describe(tensor)}"
                )


def pack_int8(matrix: torch.Tensor) -> Int8Weights:
    """Quantize a (K, N) float 1x1 weight matrix symmetrically per output channel (scale max|W[:, n]| / 127, q =
    round(W / scale) in [-127, 127]; an all-zero channel has scale 0) and pack it (:class:`Int8Weights`)."""
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or min(matrix.shape) < 1:
        raise MobileNetError(f"pack_int8 takes a non-empty (K, N) weight matrix, got {_describe(matrix)}")
    if not matrix.is_floating_point() or matrix.device.type == "meta":
        raise MobileNetError(f"pack_int8 takes real float weights, got a {matrix.dtype} matrix on {matrix.device}")
    matrix = matrix.detach().float().cpu()
    if not bool(torch.isfinite(matrix).all()):
        raise MobileNetError("pack_int8: the weight matrix holds NaN or infinite values")
    rows, columns = int(matrix.shape[0]), int(matrix.shape[1])
    scale = matrix.abs().amax(dim=0) / 127
    quantized = (matrix / torch.where(scale > 0, scale, 1)).round().clamp(-127, 127).to(torch.int8)
    count, kpad = -(-columns // PANEL), -(-rows // 4) * 4
    padded = torch.zeros(kpad, count * PANEL, dtype=torch.int8)
    padded[:rows, :columns] = quantized
    packed = padded.reshape(kpad // 4, 4, count, PANEL).permute(2, 0, 3, 1).contiguous().reshape(-1)
    colsum = padded.sum(dim=0, dtype=torch.int32).contiguous()
    return Int8Weights(rows, columns, packed, colsum, _pad_vector(scale, count * PANEL))


def _describe(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def int8_gemm(
    a: torch.Tensor,
    weights: Int8Weights,
    bias: torch.Tensor | None = None,
    *,
    bounds: tuple[float, float] = (-math.inf, math.inf),
    column_sums: bool = True,
    isa: str | None = None,
) -> torch.Tensor:
    """The kernel's int8 1x1 conv GEMM on its own, on one thread: ``clamp(dequantize(quantize(a) @ W) + bias)`` for
    a (P, K) float32 ``a`` (quantized as one call quantizes its pixels, see fused_int8.h), as (P, N) float32.
    ``column_sums=False`` makes the kernel sum the weights' columns itself, as it does for a slice of K rows
    (channel-split mode). For checking the int8 arithmetic against an emulation of the quantization."""
    kernels = _require_kernels()
    if not isinstance(weights, Int8Weights):
        raise MobileNetError(f"weights must be Int8Weights (mobilenet.fused.pack_int8), got {type(weights).__name__}")
    weights.check()
    rows, columns = weights.rows, weights.columns
    if not isinstance(a, torch.Tensor) or a.dim() != 2 or a.shape[1] != rows or not 1 <= a.shape[0] <= _MAX_DIM:
        raise MobileNetError(f"int8_gemm takes a (P, {rows}) float32 tensor, got {_describe(a)}")
    if a.dtype != torch.float32 or a.device.type != "cpu":
        raise MobileNetError(f"int8_gemm takes a float32 CPU tensor, got {a.dtype} on {a.device}")
    bias = torch.zeros(columns) if bias is None else bias
    if not isinstance(bias, torch.Tensor) or bias.numel() != columns:
        raise MobileNetError(f"int8_gemm: bias must be a tensor of {columns} values, got {_describe(bias)}")
    if not (isinstance(bounds, tuple) and len(bounds) == 2 and all(isinstance(b, int | float) for b in bounds)):
        raise MobileNetError(f"int8_gemm: bounds must be a (low, high) pair of numbers, got {bounds!r}")
    bias = _pad_vector(bias.detach().float().cpu().reshape(-1), -(-columns // PANEL) * PANEL)
    a = a.contiguous()
    out = torch.empty(int(a.shape[0]), columns)
    w, colsum, scale = weights.addresses()
    kernels.gemm_int8(
        a.data_ptr(), out.data_ptr(), int(a.shape[0]), rows, columns, w, colsum if column_sums else 0, scale,
        bias.data_ptr(), float(bounds[0]), float(bounds[1]), _isa_code(isa),
    )  # fmt: skip
    return out


def has_vnni() -> bool:
    """Whether the avx512 build's int8 GEMM runs AVX512-VNNI micro-kernels on this CPU (else portable C)."""
    return bool(_require_kernels().has_vnni())


@dataclass(frozen=True)
class FusedBlock:
    """A block packed for the kernel: 1x1 weights as panels of PANEL output channels (each input channels x PANEL,
    flattened), depthwise weights as (9 taps, padded channels), biases padded; ``bounds`` are the three stages'
    activation clamps."""

    kind: str
    in_channels: int
    expanded: int
    out_channels: int
    stride: int
    residual: bool
    tensors: dict[str, torch.Tensor | None]
    bounds: tuple[float, float, float, float, float, float]
    #: int8 (``precision="int8"``): the expansion's (None without one) and the projection's int8 weights.
    int8: tuple[Int8Weights | None, Int8Weights] | None = None

    @property
    def precision(self) -> str:
        return "fp32" if self.int8 is None else "int8"

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The output's spatial size for an input of ``height`` x ``width`` (3x3 kernel, padding 1)."""
        return (height - 1) // self.stride + 1, (width - 1) // self.stride + 1

    def macs(self, height: int, width: int) -> int:
        """Multiply-accumulates of one image (expansion, depthwise, projection)."""
        out_h, out_w = self.output_size(height, width)
        expand = height * width * self.in_channels * self.expanded if self.tensors["we"] is not None else 0
        return expand + out_h * out_w * self.expanded * (9 + self.out_channels)

    def __call__(
        self,
        x: torch.Tensor,
        *,
        out: torch.Tensor | None = None,
        threads: int = 2,
        isa: str | None = None,
        stem: FusedStem | None = None,
    ) -> torch.Tensor:
        """The block on a contiguous NHWC float32 CPU batch; writes into ``out`` (NHWC, not overlapping ``x``)
        when given. ``threads`` threads split the output rows. With ``stem``, ``x`` is the network's contiguous
        NCHW image and the kernel computes the stem's output rows as this block's input, on demand."""
        kernels = _require_kernels()
        out, arguments = self.arguments(x, out=out, threads=threads, isa=isa, stem=stem)
        kernels.run_block(*arguments)
        return out

    def arguments(
        self,
        x: torch.Tensor,
        *,
        out: torch.Tensor | None = None,
        threads: int = 2,
        isa: str | None = None,
        stem: FusedStem | None = None,
        nonfinite: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[Any, ...]]:
        """The output tensor and the kernel's argument tuple of :meth:`__call__` (checked as it checks them), for
        running several steps in one kernel call (:class:`FusedNetwork`). With a stem, ``nonfinite`` (a contiguous
        int32 CPU tensor of one flag per image) receives 1 for each image holding a NaN or an infinity, and the
        kernel call returns how many did (the stem reads every pixel anyway, so the check costs no pass of its own)."""
        batch, height, width = (
            self._check_stem_input(x, stem) if stem is not None else _check_input(x, self.in_channels)
        )
        if nonfinite is not None:
            _check_flags(nonfinite, batch, stem)
        out_h, out_w = self.output_size(height, width)
        out = _check_output(out, x, (batch, out_h, out_w, self.out_channels))
        threads, code = check_threads(threads), _isa_code(isa)
        t = self.tensors
        return out, (
            x.data_ptr(), out.data_ptr(), batch, height, width, self.in_channels, out_h, out_w, self.out_channels,
            self.stride, self.expanded, _padded(self.expanded), _padded(self.out_channels),
            0 if t["we"] is None else t["we"].data_ptr(), 0 if t["be"] is None else t["be"].data_ptr(),
            t["wd"].data_ptr(), t["bd"].data_ptr(), t["wp"].data_ptr(), t["bp"].data_ptr(),
            *self.bounds, int(self.residual), threads, code, CACHE_BUDGET,
            None if stem is None else stem.arguments(x, nonfinite), CHANNEL_SPLIT_ROWS, self._int8_arguments(),
        )  # fmt: skip

    @staticmethod
    def with_image(arguments: tuple[Any, ...], image: torch.Tensor) -> tuple[Any, ...]:
        """``arguments`` (built by :meth:`arguments` with a stem) for another image of the same shape, dtype and
        layout: only its address changes, in the block's input slot and in the stem's tuple (third from the end)."""
        address = image.data_ptr()
        stem = arguments[-3]
        return (address, *arguments[1:-3], (address, *stem[1:]), *arguments[-2:])

    def _int8_arguments(self) -> tuple[int, ...] | None:
        if self.int8 is None:
            return None
        expand, project = self.int8
        return (*(expand.addresses() if expand is not None else (0, 0, 0)), *project.addresses())

    def _check_stem_input(self, image: Any, stem: Any) -> tuple[int, int, int]:
        """The batch size and the stem's output size for an NCHW ``image``, after checking the stem can feed this
        block (no expansion, no shortcut: the ring holds the stem's rows)."""
        if not isinstance(stem, FusedStem):
            raise MobileNetError(f"stem must be a FusedStem (mobilenet.fused.pack_stem), got {type(stem).__name__}")
        stem.check()
        if self.tensors["we"] is not None or self.residual or stem.out_channels != self.in_channels:
            raise MobileNetError(
                f"a fused stem feeds a block without expansion or shortcut taking its {stem.out_channels} channels; "
                f"this block takes {self.in_channels} (expansion {self.tensors['we'] is not None}, "
                f"shortcut {self.residual})"
            )
        if isinstance(image, torch.Tensor) and image.dim() == 4 and not image.is_contiguous():
            raise MobileNetError("the fused stem takes a contiguous NCHW image; call .contiguous() first")
        if isinstance(image, torch.Tensor) and image.dim() == 4:
            image = image.permute(0, 2, 3, 1)  # checked as NHWC below; the kernel reads the NCHW original
        batch, height, width = _check_input(image, stem.in_channels, contiguous=False)
        return (batch, *stem.output_size(height, width))


def _check_input(x: Any, channels: int, *, contiguous: bool = True) -> tuple[int, int, int]:
    if not isinstance(x, torch.Tensor):
        raise MobileNetError(f"the fused kernel takes a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise MobileNetError(f"the fused kernel takes float32 CPU tensors, got {x.dtype} on {x.device}")
    if x.dim() != 4 or x.shape[3] != channels:
        raise MobileNetError(f"the fused kernel takes an NHWC batch (N, H, W, {channels}), got shape {tuple(x.shape)}")
    if contiguous and not x.is_contiguous():
        raise MobileNetError("the fused kernel takes a contiguous NHWC tensor; call .contiguous() first")
    batch, height, width = (int(s) for s in x.shape[:3])
    if min(batch, height, width) < 1 or max(batch * height, width, channels) > _MAX_DIM or x.numel() > 2**40:
        raise MobileNetError(f"the fused kernel takes a non-empty batch of sane size, got shape {tuple(x.shape)}")
    return batch, height, width


def _check_flags(flags: Any, batch: int, stem: FusedStem | None) -> None:
    if stem is None:
        raise MobileNetError("nonfinite flags come from the fused stem: pass stem= too")
    if (
        not isinstance(flags, torch.Tensor)
        or flags.dtype != torch.int32
        or flags.device.type != "cpu"
        or not flags.is_contiguous()
        or flags.numel() != batch
    ):
        described = f"{flags.dtype} {_describe(flags)}" if isinstance(flags, torch.Tensor) else _describe(flags)
        raise MobileNetError(f"nonfinite must be a contiguous int32 CPU tensor of {batch} flags, got {described}")


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


def pack_block(module: nn.Module, precision: str = "fp32") -> FusedBlock:
    """Pack an :class:`~mobilenet.layers.InvertedResidual` or :class:`~mobilenet.layers.DepthwiseSeparable` for the
    kernel, folding its BatchNorms (eval-mode statistics) first; the module is not modified. ``precision="int8"``
    also packs its 1x1 convs' weights in int8 (:func:`pack_int8`), which the kernel then runs them from."""
    check_precision(precision)
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
        tensors["we"] = _panels(we.reshape(expanded, in_channels).t())
        tensors["be"] = _pad_vector(be, _padded(expanded))
        lo1, hi1 = _bounds(expand.act, "the expansion conv")
    tensors["wd"] = _pad_columns(wd.reshape(expanded, 9).t(), _padded(expanded))
    tensors["bd"] = _pad_vector(bd, _padded(expanded))
    tensors["wp"] = _panels(wp.reshape(out_channels, expanded).t())
    int8 = None
    if precision == "int8":
        expand_int8 = pack_int8(we.reshape(expanded, in_channels).t()) if expand is not None else None
        int8 = (expand_int8, pack_int8(wp.reshape(out_channels, expanded).t()))
    tensors["bp"] = _pad_vector(bp, _padded(out_channels))
    residual = bool(getattr(folded, "use_residual", False))
    if residual and (stride != 1 or in_channels != out_channels):
        raise MobileNetError("a shortcut needs stride 1 and as many output channels as input channels")
    bounds = (lo1, hi1, *_bounds(depthwise.act, "the depthwise conv"), *_bounds(project.act, "the pointwise conv"))
    return FusedBlock(kind, int(in_channels), int(expanded), int(out_channels), stride, residual, tensors, bounds, int8)


# ---------------------------------------------------------------------------------------------------------------
# Whole networks
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusedStem:
    """The network's first conv (V1 paper Table 1, V2 paper Table 2: 3x3, stride 2, on the RGB image) packed to run
    inside the first block's kernel call: the kernel computes the stem's output rows on demand into that block's
    ring buffer, reading the NCHW image directly, so neither the stem's output nor a channels-last copy of the
    input exists. ``weight`` is in panels of PANEL output channels (each in_channels * 9 rows, taps ordered
    channel, row, column), flattened."""

    in_channels: int
    out_channels: int
    stride: int
    weight: torch.Tensor
    bias: torch.Tensor
    bounds: tuple[float, float]
    #: int8 (``precision="int8"``): the conv's int8 weights (a (in_channels * 9, out_channels) matrix), which the
    #: kernel then runs it from, the im2col columns quantized per output row like any int8 GEMM's input.
    int8: Int8Weights | None = None

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return (height - 1) // self.stride + 1, (width - 1) // self.stride + 1

    def arguments(self, image: torch.Tensor, nonfinite: torch.Tensor | None = None) -> tuple[Any, ...]:
        """The kernel's stem tuple for a contiguous NCHW float32 ``image`` (and the address of its per-image
        non-finite flags, checked by :meth:`FusedBlock.arguments`)."""
        _, channels, height, width = image.shape
        return (
            image.data_ptr(), int(channels), int(height), int(width), self.stride, self.weight.data_ptr(),
            self.bias.data_ptr(), *self.bounds, None if self.int8 is None else self.int8.addresses(),
            0 if nonfinite is None else nonfinite.data_ptr(),
        )  # fmt: skip

    def check(self) -> None:
        """Refuses int8 weights that do not fit this stem (the kernel reads them by address, unchecked)."""
        if self.int8 is None:
            return
        if not isinstance(self.int8, Int8Weights):
            raise MobileNetError(f"FusedStem.int8 must be Int8Weights or None, got {type(self.int8).__name__}")
        if (self.int8.rows, self.int8.columns) != (self.in_channels * 9, self.out_channels):
            raise MobileNetError(
                f"FusedStem.int8 must be a ({self.in_channels * 9}, {self.out_channels}) matrix (pack_stem makes it), "
                f"got ({self.int8.rows}, {self.int8.columns})"
            )
        self.int8.check()


def pack_stem(unit: nn.Module, precision: str = "fp32") -> FusedStem:
    """Pack a BatchNorm-folded 3x3 :class:`~mobilenet.layers.ConvBNAct` (padding 1, stride 1 or 2, no groups) as
    the producer of the first block's input; ``precision="int8"`` also packs its weights in int8
    (:func:`pack_int8`), which the kernel then runs it from."""
    precision = check_precision(precision)
    if not isinstance(unit, ConvBNAct):
        raise MobileNetError(f"the fused stem is a ConvBNAct, got {type(unit).__name__}")
    conv = unit.conv
    if not isinstance(unit.bn, nn.Identity):
        raise MobileNetError("the stem: BatchNorm must be folded first (mobilenet.export.fold_batchnorm)")
    if (
        conv.kernel_size != (3, 3)
        or conv.padding != (1, 1)
        or conv.groups != 1
        or conv.dilation != (1, 1)
        or conv.stride not in ((1, 1), (2, 2))
        or conv.padding_mode != "zeros"
    ):
        raise MobileNetError(f"the fused stem is a 3x3 conv, padding 1, stride 1 or 2, no groups; got {conv}")
    weight = conv.weight.detach().float().cpu()
    out_channels, in_channels = int(weight.shape[0]), int(weight.shape[1])
    bias = conv.bias.detach().float().cpu() if conv.bias is not None else torch.zeros(out_channels)
    matrix = weight.reshape(out_channels, in_channels * 9).t()
    bounds = _bounds(unit.act, "the stem")
    int8 = pack_int8(matrix) if precision == "int8" else None
    return FusedStem(
        in_channels,
        out_channels,
        int(conv.stride[0]),
        _panels(matrix),
        _pad_vector(bias, _padded(out_channels)),
        bounds,
        int8,
    )


@dataclass(frozen=True)
class FusedHead:
    """The network's end up to the classifier: V2's last 1x1 conv (+ ReLU6) and the global average pool (V2 paper
    Table 2: conv2d 1x1, avgpool 7x7), computed by the kernel a tile of pixels at a time and summed per channel, so
    the conv's output never exists in full; for V1 (``weight`` None) the pool alone (V1 paper Table 1)."""

    in_channels: int
    out_channels: int
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    bounds: tuple[float, float]
    #: int8 (``precision="int8"``): the conv's int8 weights, which the kernel then runs it from.
    int8: Int8Weights | None = None

    def __call__(self, x: torch.Tensor, *, threads: int = 2, isa: str | None = None) -> torch.Tensor:
        """The pooled (N, out_channels) features of a contiguous NHWC float32 CPU batch."""
        kernels = _require_kernels()
        out = torch.empty(int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else 1, self.out_channels)
        kernels.run_head(*self.arguments(x, out, threads=threads, isa=isa))
        return out

    def arguments(
        self, x: torch.Tensor, out: torch.Tensor, *, threads: int = 2, isa: str | None = None
    ) -> tuple[Any, ...]:
        """The kernel's argument tuple of :meth:`__call__` writing into ``out`` (N, out_channels), checked."""
        batch, height, width = _check_input(x, self.in_channels)
        threads, code = check_threads(threads), _isa_code(isa)
        if out.shape != (batch, self.out_channels) or out.dtype != torch.float32 or not out.is_contiguous():
            raise MobileNetError(f"out must be a contiguous float32 tensor of shape {(batch, self.out_channels)}")
        return (
            x.data_ptr(), out.data_ptr(), batch, height * width, self.in_channels, self.out_channels,
            _padded(self.out_channels), 0 if self.weight is None else self.weight.data_ptr(),
            0 if self.bias is None else self.bias.data_ptr(), *self.bounds, threads, code,
        ) + ((self.int8.addresses(),) if self.int8 is not None else ())  # fmt: skip


def pack_head(unit: nn.Module | None, channels: int, precision: str = "fp32") -> FusedHead:
    """Pack a BatchNorm-folded 1x1 :class:`~mobilenet.layers.ConvBNAct` taking ``channels`` channels (None: the
    pool alone) as the head run before the global average pool; ``precision="int8"`` runs the conv in int8."""
    check_precision(precision)
    check_channels = isinstance(channels, int) and not isinstance(channels, bool) and 1 <= channels <= _MAX_DIM
    if not check_channels:
        raise MobileNetError(f"the fused head takes a positive channel count, got {channels!r}")
    if unit is None:
        return FusedHead(channels, channels, None, None, (-math.inf, math.inf))
    if not isinstance(unit, ConvBNAct):
        raise MobileNetError(f"the fused head is a ConvBNAct, got {type(unit).__name__}")
    weight, bias, _ = _conv_parts(unit, "the head conv", depthwise=False)
    out_channels = int(weight.shape[0])
    if weight.shape[1] != channels:
        raise MobileNetError(f"the head conv takes {weight.shape[1]} channels, the last block gives {channels}")
    matrix = weight.reshape(out_channels, channels).t()
    bounds = _bounds(unit.act, "the head conv")
    int8 = pack_int8(matrix) if precision == "int8" else None
    return FusedHead(channels, out_channels, _panels(matrix), _pad_vector(bias, _padded(out_channels)), bounds, int8)


def pack_linear(linear: nn.Module, precision: str = "fp32") -> FusedHead:
    """Pack an ``nn.Linear`` (the classifier) as a head over one pixel: a fully connected layer on the pooled
    features is a 1x1 conv of a 1x1 image, and the pool of one pixel is that pixel. ``precision="int8"`` runs it
    as an int8 GEMM like the 1x1 convs (at batch 1 the layer reads its whole weight matrix for one vector, so it
    is bound by the bytes read: a quarter of them in int8)."""
    check_precision(precision)
    if not isinstance(linear, nn.Linear):
        raise MobileNetError(f"the fused classifier is an nn.Linear, got {type(linear).__name__}")
    if min(linear.weight.shape) < 1:  # the kernel would refuse the empty matrix only when called
        raise MobileNetError(f"the fused classifier needs in and out features >= 1, got {linear}")
    weight = linear.weight.detach().float().cpu()
    out_features, in_features = int(weight.shape[0]), int(weight.shape[1])
    bias = linear.bias.detach().float().cpu() if linear.bias is not None else torch.zeros(out_features)
    packed = _panels(weight.t())
    int8 = pack_int8(weight.t()) if precision == "int8" else None
    unbounded = (-math.inf, math.inf)
    return FusedHead(in_features, out_features, packed, _pad_vector(bias, _padded(out_features)), unbounded, int8)


@dataclass(frozen=True)
class MemoryPlan:
    """The activation memory of one input shape: the two ping-pong NHWC buffers every fused block writes into
    (``buffer_floats``), and ``peak_bytes``, the most activation bytes alive at once: the buffers, the input image
    while the fused stem reads it (or the torch stages' tensors where a stem or head runs in torch: the channels-last
    copy of the input, their outputs) and the pooled features. The kernel's per-thread ring and tile buffers are
    ``scratch_bytes`` (read from the extension after a run)."""

    buffer_floats: tuple[int, int]
    peak_bytes: int

    @property
    def buffer_bytes(self) -> int:
        return 4 * sum(self.buffer_floats)


@contextlib.contextmanager
def _torch_single_threaded() -> Iterator[None]:
    """torch's stages (classifier, any stem or head left in torch) on one thread: torch's OpenMP workers keep
    spinning after each op, and with as many threads as cores they would take the cores from the kernel's own pool
    in between."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def _fusable_stem(model: MobileNet) -> bool:
    """Whether the first layer is a 3x3 conv the kernel runs as the producer of the first block (which must have no
    expansion and no shortcut: its ring holds the stem's rows)."""
    features = list(model.features)
    if len(features) < 2 or not isinstance(features[0], ConvBNAct):
        return False
    try:
        stem = pack_stem(features[0])
    except MobileNetError:
        return False
    block = features[1]
    if not isinstance(block, InvertedResidual | DepthwiseSeparable):
        return False
    packed = pack_block(block)
    return packed.tensors["we"] is None and not packed.residual and packed.in_channels == stem.out_channels


@dataclass
class _Steps:
    """What :class:`FusedNetwork` runs for one input shape in one kernel call: the first block's output buffer, the
    argument tuples of the later steps, the pooled vector and the logits they write, the per-image non-finite flags
    the fused stem sets (None without one), and the first block's checked arguments once known."""

    first_out: torch.Tensor
    later: list[tuple[Any, ...]]
    logits: torch.Tensor
    pooled: torch.Tensor
    nonfinite: torch.Tensor | None
    first: tuple[Any, ...] | None = None


class FusedNetwork:
    """A V1 or V2 MobileNet (any width, any resolution) on the fused kernel: the stem conv is computed inside the
    first block's call (its rows go straight into that block's ring buffer), every depthwise separable / inverted
    residual block runs fused, V2's head 1x1 conv and the global average pool run fused (a tile at a time), and the
    classifier (an ``nn.Linear``) runs on the kernel as a 1x1 conv of the pooled vector; anything else (a factored
    classifier, a pool that is not global) runs in torch, on the BatchNorm-folded model. Fused blocks write into two
    ping-pong NHWC buffers allocated once per input shape. Takes and returns what the model does (NCHW in, logits).
    ``precision="int8"`` runs the blocks' 1x1 convs, V2's head conv, the fused stem and the fused classifier as int8
    GEMMs (see the module docstring); the depthwise convs stay float32."""

    def __init__(self, model: nn.Module, *, threads: int = 2, isa: str | None = None, precision: str = "fp32") -> None:
        _require_kernels()
        self.precision = check_precision(precision)
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
                self.stages.append(pack_block(block, precision))
            elif isinstance(block, ConvBNAct):
                self.stages.append(block.to(memory_format=torch.channels_last))
            else:
                raise MobileNetError(f"the fused runtime cannot run a {type(block).__name__} block")
        if not any(isinstance(stage, FusedBlock) for stage in self.stages):
            raise MobileNetError(
                f"{model.name or 'this model'} has no depthwise separable or inverted residual block to fuse "
                "(the 'conv' variant of V1 is the paper's baseline of standard convs: run it with torch-jit)"
            )
        self.stem = pack_stem(self.stages[0], self.precision) if _fusable_stem(self.model) else None
        self.head = self._pack_head()
        classifier = self.model.classifier
        fc_fusable = self.head is not None and self.model.hidden is None and isinstance(classifier, nn.Linear)
        self.classifier = pack_linear(classifier, self.precision) if fc_fusable else None
        self._buffers: dict[tuple[int, int, int], tuple[list[torch.Tensor], MemoryPlan]] = {}
        self._step_cache: dict[tuple[int, int, int], _Steps] = {}
        #: The steps per NCHW input shape whose first block's checked arguments are known (with a fused stem), for
        #: :meth:`_fast_arguments`.
        self._checked_shapes: dict[tuple[int, ...], _Steps] = {}
        self._single_call = (
            self.classifier is not None
            and self.head is not None
            and all(isinstance(stage, FusedBlock) for stage in self._body)
        )

    def _pack_head(self) -> FusedHead | None:
        """The fused head: V2's last 1x1 conv + pool, or V1's pool alone; None where the pool is not global."""
        pool = self.model.pool
        if not isinstance(pool, nn.AdaptiveAvgPool2d) or pool.output_size not in (1, (1, 1)):
            return None
        last = self.stages[-1]
        if isinstance(last, FusedBlock):
            return pack_head(None, last.out_channels)
        previous = self.stages[-2] if len(self.stages) > 1 else None
        conv = last.conv
        if not isinstance(previous, FusedBlock) or conv.kernel_size != (1, 1) or conv.groups != 1:
            return None
        return pack_head(last, previous.out_channels, self.precision)

    @property
    def _body(self) -> list[FusedBlock | nn.Module]:
        """The stages run before the head: the stem stays out where it is fused, the head conv where it is."""
        first = 1 if self.stem is not None else 0
        last = len(self.stages) - (1 if self.head is not None and self.head.weight is not None else 0)
        return self.stages[first:last]

    def memory_plan(self, batch: int, height: int, width: int) -> MemoryPlan:
        """The buffers and the peak activation bytes for a ``batch`` x C x ``height`` x ``width`` input."""
        return self._plan(batch, height, width)[1]

    def _plan(self, batch: int, height: int, width: int) -> tuple[list[torch.Tensor], MemoryPlan]:
        key = (batch, height, width)
        if key not in self._buffers:
            sizes, peak = [0, 0], 0
            channels = int(self.model.config.in_channels)
            image = batch * channels * height * width
            live_input = image if self.stem is not None else 2 * image  # the image (and its channels-last copy)
            if self.stem is not None:
                height, width = self.stem.output_size(height, width)
            index = 0
            for stage in self._body:
                if isinstance(stage, FusedBlock):
                    height, width = stage.output_size(height, width)
                    sizes[index % 2] = max(sizes[index % 2], batch * height * width * stage.out_channels)
                    index += 1
                    live_input = 0 if index > 1 else live_input  # the image is freed after the first block
                    continue
                conv = stage.conv
                height = (height + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
                width = (width + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
                output = batch * height * width * conv.out_channels
                peak = max(peak, live_input + output)
                live_input = output
            pooled = batch * (self.head.out_channels if self.head is not None else channels)
            image_alive = image if self.stem is not None else 0
            plan = MemoryPlan((sizes[0], sizes[1]), 4 * (max(peak, image_alive) + sizes[0] + sizes[1] + pooled))
            self._buffers[key] = ([torch.empty(size) for size in sizes], plan)
        return self._buffers[key]

    def _checked_batch(self, x: Any) -> torch.Tensor:
        """``x`` as the kernel reads it (float32, on the CPU, detached), after checking that it is what the model
        takes: a non-empty NCHW batch of real numbers with the model's channels (the model refuses integer,
        boolean and complex tensors too; a meta tensor holds no pixels)."""
        channels = self.model.config.in_channels
        expected = f"expected a non-empty float NCHW batch with {channels} channels"
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels or 0 in x.shape:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise MobileNetError(f"{expected}, got {shape}")
        if not x.is_floating_point() or x.device.type == "meta":
            raise MobileNetError(f"{expected}, got a {x.dtype} tensor on {x.device}")
        return x.detach().to("cpu", torch.float32)

    def _run_body(self, x: torch.Tensor) -> torch.Tensor:
        """The stem and the blocks (and any stage left in torch) on a float32 NCHW batch: an NHWC tensor."""
        x = self._checked_batch(x)
        buffers, _ = self._plan(int(x.shape[0]), int(x.shape[2]), int(x.shape[3]))
        stem = self.stem
        if stem is not None:
            current = x.contiguous()  # NCHW: the fused stem reads it directly
        else:
            current = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # NHWC, contiguous
        index = 0
        for stage in self._body:
            if isinstance(stage, FusedBlock):
                if stem is not None:
                    height, width = stem.output_size(int(current.shape[2]), int(current.shape[3]))
                else:
                    height, width = int(current.shape[1]), int(current.shape[2])
                out_h, out_w = stage.output_size(height, width)
                shape = (int(current.shape[0]), out_h, out_w, stage.out_channels)
                out = buffers[index % 2][: math.prod(shape)].view(shape)
                current = stage(current, out=out, threads=self.threads, isa=self.isa, stem=stem)
                stem = None
                index += 1
            else:
                with _torch_single_threaded():
                    nchw = stage(current.permute(0, 3, 1, 2))
                current = nchw.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        return current

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map (NCHW view of an NHWC tensor) of a float32 NCHW batch (V2's head conv included, run in
        torch in float32 whatever the precision)."""
        with torch.inference_mode():
            current = self._run_body(x)
            if self.head is not None and self.head.weight is not None:
                with _torch_single_threaded():
                    nchw = self.stages[-1](current.permute(0, 3, 1, 2))
                current = nchw.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        return current.permute(0, 3, 1, 2)

    def _one_call(self) -> bool:
        """Whether the whole forward is kernel steps (no torch op left): then it runs in one kernel call."""
        return self._single_call

    def _run_plan(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the whole network in one kernel call (:meth:`_one_call`): no Python between the steps, so the
        kernel's workers, spinning between jobs, are still on their cores when the next step starts. Every step's
        arguments but the first block's (it reads the caller's image) are built once per input shape. With a fused
        stem the kernel flags images holding a NaN or an infinity as it reads them; their logits are NaN."""
        fast = self._fast_arguments(x)
        if fast is None:
            # image: what the kernel reads (maybe a converted copy of x); it must outlive the call
            steps, arguments, image = self._checked_arguments(x)
        else:
            (steps, arguments), image = fast, x
        flagged = _require_kernels().run_plan([arguments, *steps.later])
        del image  # the kernel has read it
        logits = steps.logits.clone()
        if steps.nonfinite is None:
            return _nan_where_not_finite(x, logits)
        if flagged:
            logits[steps.nonfinite.bool()] = math.nan
        return logits

    def _checked_arguments(self, x: torch.Tensor) -> tuple[_Steps, tuple[Any, ...], torch.Tensor]:
        """The steps for ``x``'s shape, the first block's arguments, built and checked, and the image they point to
        (``x``, or its float32 contiguous copy, which the caller keeps alive until the kernel has run)."""
        x = self._checked_batch(x)
        steps = self._steps((int(x.shape[0]), int(x.shape[2]), int(x.shape[3])))
        if self.stem is not None:
            image = x.contiguous()  # NCHW: the fused stem reads it directly
        else:
            image = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # NHWC, contiguous
        first = self._body[0]
        assert isinstance(first, FusedBlock)
        _, arguments = first.arguments(
            image, out=steps.first_out, threads=self.threads, isa=self.isa, stem=self.stem, nonfinite=steps.nonfinite
        )
        if self.stem is not None:
            steps.first = arguments
            self._checked_shapes[tuple(image.shape)] = steps
        return steps, arguments, image

    def _fast_arguments(self, x: torch.Tensor) -> tuple[_Steps, tuple[Any, ...]] | None:
        """The steps and the first block's arguments without building and checking them again, where ``x`` is
        already what the fused stem reads (a plain contiguous float32 CPU tensor of a shape checked before): only
        its address differs. Every torch call in a batch-1 forward costs time, most of all in the first call after
        the machine was idle, when their code is no longer in the caches; None where the full path must run."""
        if type(x) is not torch.Tensor or x.dtype != torch.float32 or not x.is_cpu or not x.is_contiguous():
            return None
        steps = self._checked_shapes.get(x.shape)
        if steps is None or steps.first is None:
            return None
        return steps, FusedBlock.with_image(steps.first, x)

    def _steps(self, key: tuple[int, int, int]) -> _Steps:
        """For one input shape (batch, height, width): the first block's output buffer, the argument tuples of the
        later blocks, the head and the classifier, and the tensors they write (kept with the tuples: these hold
        their addresses)."""
        if key not in self._step_cache:
            buffers, _ = self._plan(*key)
            batch, height, width = key
            if self.stem is not None:
                height, width = self.stem.output_size(height, width)
            outputs = []
            for index, block in enumerate(self._body):
                assert isinstance(block, FusedBlock)
                height, width = block.output_size(height, width)
                shape = (batch, height, width, block.out_channels)
                outputs.append(buffers[index % 2][: math.prod(shape)].view(shape))
            later = []
            for index in range(1, len(outputs)):
                block = self._body[index]
                assert isinstance(block, FusedBlock)
                _, arguments = block.arguments(
                    outputs[index - 1], out=outputs[index], threads=self.threads, isa=self.isa
                )
                later.append(arguments)
            assert self.head is not None and self.classifier is not None
            pooled = torch.empty(batch, self.head.out_channels)
            logits = torch.empty(batch, self.classifier.out_channels)
            later.append(self.head.arguments(outputs[-1], pooled, threads=self.threads, isa=self.isa))
            flat = pooled.view(batch, 1, 1, self.head.out_channels)
            later.append(self.classifier.arguments(flat, logits, threads=self.threads, isa=self.isa))
            nonfinite = torch.zeros(batch, dtype=torch.int32) if self.stem is not None else None
            self._step_cache[key] = _Steps(outputs[0], later, logits, pooled, nonfinite)
        return self._step_cache[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a float32 NCHW batch (as the model's forward); an image holding a NaN or an infinity gets NaN
        logits, as in PyTorch (the kernel's clamps would map those values to bounds and answer with confidence)."""
        if self._one_call():
            return self._run_plan(x)
        return _nan_where_not_finite(x, self._logits(x))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, step by step (a stage runs in torch), NaN or infinite inputs not marked."""
        if self.head is None:
            features = self.features(x)
            with torch.inference_mode(), _torch_single_threaded():
                return self.model.forward_head(features).clone()
        with torch.inference_mode():
            pooled = self.head(self._run_body(x), threads=self.threads, isa=self.isa)
            if self.classifier is not None:  # dropout is the identity at inference
                flat = pooled.view(pooled.shape[0], 1, 1, pooled.shape[1])
                return self.classifier(flat, threads=self.threads, isa=self.isa)
            with _torch_single_threaded():
                if self.model.hidden is not None:
                    pooled = self.model.hidden(pooled)
                return self.model.classifier(self.model.dropout(pooled))


def _nan_where_not_finite(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` with the rows of images that hold a NaN or an infinity set to NaN. Checked in numpy, on the calling
    thread: a torch reduction would wake torch's thread pool next to the kernel's."""
    values = x.detach().to("cpu", torch.float32).numpy()  # as the kernel reads it (numpy has no bfloat16)
    if np.isfinite(values).all():
        return logits
    with torch.inference_mode():
        logits[torch.from_numpy(~np.isfinite(values).reshape(len(values), -1).all(axis=1))] = math.nan
    return logits
