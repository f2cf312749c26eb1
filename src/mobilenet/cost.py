"""The analytic cost model: multiply-adds, parameters and activation sizes from the layer list alone.

No forward pass and no torch: every figure comes from :func:`mobilenet.spec.build_network`'s layer list, so
``mobilenet cost`` answers instantly for any alpha, resolution or variant. (:func:`mobilenet.measure.measure_costs`
is the independent count over a built ``nn.Module`` that the tests compare with this table.)

Counting convention (the papers'): 1 MAC = 1 multiply-add = 2 FLOPs.

- A convolution costs ``K * K * (Cin / groups) * Cout * Hout * Wout`` multiply-adds (V1 paper, equations 1-3:
  standard ``Dk*Dk*M*N*Df*Df``; depthwise, groups = M = N, ``Dk*Dk*M*Df*Df``; pointwise ``M*N*Df*Df``), a fully
  connected layer ``Cin * Cout`` (a factored classifier, features -> r -> classes, is two such layers).
- Nothing is counted for BatchNorm, activations, biases, residual adds or pooling: the V1 paper's Table 2 and the
  V2 paper's Table 4 count convolutions and the fully connected layer only. (VGG's max pools are rows of the
  table, with their shapes, at 0 multiply-adds and 0 parameters.)
- The papers' parameter column counts conv and FC *weights* (``params``). The V2 paper's 3.4M is that count;
  TF-slim prints 3.47M, which adds the FC bias (``params + bias_params``, at 1001 classes). The full trainable
  count (weights, biases and BatchNorm's scale and shift: what ``sum(p.numel() for p in model.parameters())``
  gives) is ``trainable_params``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from mobilenet.errors import MobileNetError
from mobilenet.spec import Layer, ModelConfig, Network, build_network, network_for

__all__ = [
    "FLOAT32_BYTES",
    "MAC_CONVENTION",
    "CostTable",
    "FactoredFcCost",
    "LayerCost",
    "LayerRow",
    "OpShare",
    "check_fits_memory",
    "check_input_fits",
    "count_costs",
    "factored_fc_cost",
    "layer_cost",
    "parse_fc",
    "parse_shape",
    "physical_memory_bytes",
]

#: Printed wherever a figure is: the papers' unit.
MAC_CONVENTION = (
    "1 MAC = 1 multiply-add = 2 FLOPs; papers' convention: conv and FC only (no BN, activation, bias, add, pool)"
)

#: V1 paper Table 2's layer types, in its row order.
TABLE2_ORDER = ("Conv 1x1", "Conv DW 3x3", "Conv 3x3", "Fully Connected")


def op_label(op: str, kernel: int) -> str:
    """The layer type as the V1 paper's Table 2 names it ("Conv 1x1", "Conv DW 3x3", "Conv 3x3", ...)."""
    if op == "fc":
        return "Fully Connected"
    if op == "maxpool":
        return f"Max Pool {kernel}x{kernel}"
    if op == "depthwise":
        return f"Conv DW {kernel}x{kernel}"
    return f"Conv {kernel}x{kernel}"


@dataclass(frozen=True)
class LayerRow:
    """One conv or FC layer's cost. Shapes are (height, width, channels), as the V1 paper's Table 1 writes them.

    ``macs`` and ``params`` follow the papers' convention (see the module docstring); ``bias_params`` and
    ``bn_params`` (BatchNorm's scale and shift, 2 per output channel) complete the trainable count;
    ``activations`` is the number of output elements for one image.
    """

    name: str
    op: str
    kernel: int
    stride: int
    groups: int
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    macs: int
    params: int
    bias_params: int
    bn_params: int
    activations: int

    @property
    def label(self) -> str:
        return op_label(self.op, self.kernel)

    @property
    def trainable_params(self) -> int:
        return self.params + self.bias_params + self.bn_params

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op,
            "type": self.label,
            "kernel": self.kernel,
            "stride": self.stride,
            "groups": self.groups,
            "in_shape": list(self.in_shape),
            "out_shape": list(self.out_shape),
            "macs": self.macs,
            "params": self.params,
            "bias_params": self.bias_params,
            "bn_params": self.bn_params,
            "trainable_params": self.trainable_params,
            "activations": self.activations,
        }


def row_for(layer: Layer) -> LayerRow:
    """The cost of one layer of the list (V1 paper equations 1-3 for convs; ``Cin * Cout`` for an FC layer; nothing
    for a max pool)."""
    out_h, out_w = layer.out_size
    weights = 0 if layer.op == "maxpool" else layer.kernel**2 * (layer.in_channels // layer.groups) * layer.out_channels
    return LayerRow(
        name=layer.name,
        op=layer.op,
        kernel=layer.kernel,
        stride=layer.stride,
        groups=layer.groups,
        in_shape=(*layer.in_size, layer.in_channels),
        out_shape=(out_h, out_w, layer.out_channels),
        macs=weights * out_h * out_w,
        params=weights,
        bias_params=layer.out_channels if layer.bias else 0,
        bn_params=2 * layer.out_channels if layer.batchnorm else 0,
        activations=out_h * out_w * layer.out_channels,
    )


@dataclass(frozen=True)
class OpShare:
    """One row of the V1 paper's Table 2: a layer type's multiply-adds and parameters and their shares."""

    label: str
    macs: int
    params: int
    macs_share: float
    params_share: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.label,
            "macs": self.macs,
            "params": self.params,
            "macs_percent": round(100 * self.macs_share, 4),
            "params_percent": round(100 * self.params_share, 4),
        }


@dataclass(frozen=True)
class CostTable:
    """The per-layer cost of a network with its totals (see the module docstring for the convention)."""

    name: str
    config: ModelConfig
    rows: tuple[LayerRow, ...]
    macs: int = field(init=False)
    params: int = field(init=False)
    bias_params: int = field(init=False)
    bn_params: int = field(init=False)
    activations: int = field(init=False)

    def __post_init__(self) -> None:
        for key in ("macs", "params", "bias_params", "bn_params", "activations"):
            object.__setattr__(self, key, sum(getattr(row, key) for row in self.rows))

    @property
    def trainable_params(self) -> int:
        """Weights, biases and BatchNorm scale/shift: equals ``sum(p.numel() for p in model.parameters())``."""
        return self.params + self.bias_params + self.bn_params

    @property
    def params_with_bias(self) -> int:
        """Conv and FC weights plus the FC bias: the convention of TF-slim's V2 table (3.47M for V2 1.0)."""
        return self.params + self.bias_params

    @property
    def peak_activations(self) -> int:
        """The largest input + output of one layer (elements per image): a lower bound on the activation memory
        an inference runtime needs when it frees each tensor as soon as it is consumed."""
        return max(math.prod(row.in_shape) + row.activations for row in self.rows)

    def by_op(self) -> tuple[OpShare, ...]:
        """The breakdown by layer type in the form of the V1 paper's Table 2 ("Resource per layer type")."""
        totals: dict[str, list[int]] = {}
        for row in self.rows:
            entry = totals.setdefault(row.label, [0, 0])
            entry[0] += row.macs
            entry[1] += row.params
        order = {label: index for index, label in enumerate(TABLE2_ORDER)}
        labels = sorted(totals, key=lambda label: (order.get(label, len(order)), label))
        return tuple(
            OpShare(
                label,
                totals[label][0],
                totals[label][1],
                totals[label][0] / self.macs if self.macs else 0.0,
                totals[label][1] / self.params if self.params else 0.0,
            )
            for label in labels
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config.to_dict(),
            "convention": MAC_CONVENTION,
            "macs": self.macs,
            "flops": 2 * self.macs,
            "params": self.params,
            "params_with_bias": self.params_with_bias,
            "trainable_params": self.trainable_params,
            "activations": self.activations,
            "peak_activations": self.peak_activations,
            "by_op": [share.to_dict() for share in self.by_op()],
            "layers": [row.to_dict() for row in self.rows],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_csv(self) -> str:
        """One line per layer, then a ``total`` line; shapes as ``HxWxC``."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(
            [
                *("name", "op", "type", "in_shape", "out_shape", "kernel", "stride", "groups"),
                *("macs", "params", "bias_params", "bn_params", "trainable_params", "activations"),
            ]
        )
        for row in self.rows:
            writer.writerow(
                [
                    *(row.name, row.op, row.label, format_shape(row.in_shape), format_shape(row.out_shape)),
                    *(row.kernel, row.stride, row.groups, row.macs, row.params, row.bias_params, row.bn_params),
                    *(row.trainable_params, row.activations),
                ]
            )
        writer.writerow(
            [
                *("total", "", "", "", "", "", "", ""),
                *(self.macs, self.params, self.bias_params, self.bn_params, self.trainable_params, self.activations),
            ]
        )
        return buffer.getvalue()

    def to_markdown(self) -> str:
        """The layer table, the totals and the Table 2 breakdown as GitHub markdown."""
        title = self.name or self.config.family
        lines = [
            f"### {title}: alpha {self.config.alpha:g}, resolution {self.config.resolution}",
            "",
            f"_{MAC_CONVENTION}._",
            "",
            "| # | layer | type | input | output | stride | MACs | params | activations |",
            "|--:|---|---|---|---|--:|--:|--:|--:|",
        ]
        for index, row in enumerate(self.rows):
            lines.append(
                f"| {index} | `{row.name}` | {row.label} | {format_shape(row.in_shape)} | "
                f"{format_shape(row.out_shape)} | {row.stride} | {row.macs:,} | {row.params:,} | {row.activations:,} |"
            )
        lines.append(f"| | **total** | | | | | **{self.macs:,}** | **{self.params:,}** | **{self.activations:,}** |")
        lines += [
            "",
            f"- multiply-adds: {self.macs:,} ({self.macs / 1e6:.2f}M MACs = {2 * self.macs / 1e9:.3f} GFLOPs)",
            f"- parameters, papers' convention (conv + FC weights): {self.params:,} ({self.params / 1e6:.3f}M)",
            f"- with the FC bias: {self.params_with_bias:,}",
            f"- trainable (weights, biases, BatchNorm), = sum(p.numel()): {self.trainable_params:,}",
            "",
            "| type (V1 Table 2) | MACs | share | params | share |",
            "|---|--:|--:|--:|--:|",
        ]
        for share in self.by_op():
            lines.append(
                f"| {share.label} | {share.macs:,} | {100 * share.macs_share:.2f}% | {share.params:,} | "
                f"{100 * share.params_share:.2f}% |"
            )
        return "\n".join(lines) + "\n"


def count_costs(network_or_name: Network | ModelConfig | str | Any, **overrides: Any) -> CostTable:
    """The cost table of a network: a registered name (with ``alpha=``, ``resolution=``, ... overrides), a
    :class:`ModelConfig`, a :class:`Network`, or a built ``MobileNet`` (its ``.network``).

    >>> table = count_costs("mobilenet_v1_1.0_224")
    >>> round(table.macs / 1e6), round(table.params / 1e6, 1)   # V1 paper Table 4: 569M, 4.2M
    (569, 4.2)
    """
    if isinstance(network_or_name, str):
        network = network_for(network_or_name, **overrides)
    else:
        if overrides:
            raise MobileNetError("options (alpha=, resolution=, ...) can be given only with a registered model name")
        if isinstance(network_or_name, ModelConfig):
            network = build_network(network_or_name)
        elif isinstance(network_or_name, Network):
            network = network_or_name
        elif isinstance(getattr(network_or_name, "network", None), Network):
            network = network_or_name.network
        else:
            raise MobileNetError(
                f"cannot count the cost of a {type(network_or_name).__name__}; expected a model name, a "
                "ModelConfig, a Network or a MobileNet"
            )
    return CostTable(network.name, network.config, tuple(row_for(layer) for layer in network.layers))


# --------------------------------------------------------------------------------------------------------------
# Does it fit? Weights and activations against the machine's memory
# --------------------------------------------------------------------------------------------------------------

#: Bytes per element: models are built, and inputs made, in float32.
FLOAT32_BYTES = 4


def physical_memory_bytes() -> int | None:
    """The machine's physical memory (``sysconf(SC_PAGE_SIZE) * sysconf(SC_PHYS_PAGES)``), None where unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not POSIX, or the name is unknown
        return None


def _gigabytes(count: int) -> str:
    return f"{count / 1e9:,.1f} GB"


def check_fits_memory(
    network: Network | ModelConfig,
    *,
    batch_size: int | None = None,
    memory: int | None = None,
    name: str = "",
) -> None:
    """Refuse a network that this machine cannot hold, before any memory is allocated.

    The float32 weights (``trainable_params * 4`` bytes) must fit in ``memory`` (default: the physical memory);
    with ``batch_size``, so must the largest layer's input and output at that batch (``peak_activations * batch *
    4`` bytes), which every forward pass holds at once. Raises :class:`MobileNetError` with the figure; ``name``
    names the model in it (default: the network's name).
    """
    limit = physical_memory_bytes() if memory is None else memory
    if limit is None:
        return
    table = count_costs(network)
    config = table.config
    name = name or table.name or f"mobilenet_{config.family}"
    label = f"{name} (alpha {config.alpha:g}, {config.in_channels} input "
    label += f"channels, {config.num_classes} classes)"
    weights = table.trainable_params * FLOAT32_BYTES
    if weights > limit:
        raise MobileNetError(
            f"{label} has {table.trainable_params:,} parameters: {_gigabytes(weights)} of float32 weights, more than "
            f"this machine's {_gigabytes(limit)} of memory; expected a smaller alpha, in_channels or num_classes"
        )
    if batch_size is None:
        return
    activations = table.peak_activations * batch_size * FLOAT32_BYTES
    if activations > limit:
        raise MobileNetError(
            f"{name} at {config.resolution}x{config.resolution} px, batch "
            f"{batch_size}: its largest layer needs {_gigabytes(activations)} of float32 activations, more than this "
            f"machine's {_gigabytes(limit)} of memory; expected a smaller resolution or batch size"
        )


def check_input_fits(config: ModelConfig, input_size: int, batch_size: int, *, name: str = "") -> None:
    """:func:`check_fits_memory` for ``batch_size`` inputs of ``input_size`` px (a checkpoint's preprocessing
    may ask for another size than its config's resolution; the larger of the two is counted)."""
    check_fits_memory(
        replace(config, resolution=max(int(input_size), config.resolution)), batch_size=batch_size, name=name
    )


# --------------------------------------------------------------------------------------------------------------
# One layer: standard vs depthwise separable (V1 paper section 3.1)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCost:
    """A standard convolution against its depthwise separable factorisation (V1 paper section 3.1).

    Standard: ``Dk*Dk*M*N*Df*Df`` multiply-adds (equation 2) and ``Dk*Dk*M*N`` parameters. Separable: a depthwise
    ``Dk*Dk*M*Df*Df`` plus a pointwise ``M*N*Df*Df`` (equation 4); the ratio is ``1/N + 1/Dk^2`` (equation 5).
    ``Df`` is the output side: the input side for stride 1, ``ceil(side / stride)`` with 'same' padding.
    """

    height: int
    width: int
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    out_height: int
    out_width: int
    standard_macs: int
    depthwise_macs: int
    pointwise_macs: int
    standard_params: int
    depthwise_params: int
    pointwise_params: int

    @property
    def separable_macs(self) -> int:
        return self.depthwise_macs + self.pointwise_macs

    @property
    def separable_params(self) -> int:
        return self.depthwise_params + self.pointwise_params

    @property
    def macs_ratio(self) -> float:
        """Separable / standard multiply-adds; equals ``1/N + 1/Dk^2`` (V1 equation 5)."""
        return self.separable_macs / self.standard_macs

    @property
    def params_ratio(self) -> float:
        return self.separable_params / self.standard_params

    @property
    def formula_ratio(self) -> float:
        """V1 equation 5 evaluated directly: ``1/N + 1/Dk^2``."""
        return 1 / self.out_channels + 1 / self.kernel**2

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": [self.height, self.width, self.in_channels],
            "output": [self.out_height, self.out_width, self.out_channels],
            "kernel": self.kernel,
            "stride": self.stride,
            "convention": MAC_CONVENTION,
            "standard": {"macs": self.standard_macs, "params": self.standard_params},
            "depthwise": {"macs": self.depthwise_macs, "params": self.depthwise_params},
            "pointwise": {"macs": self.pointwise_macs, "params": self.pointwise_params},
            "separable": {"macs": self.separable_macs, "params": self.separable_params},
            "macs_ratio": self.macs_ratio,
            "params_ratio": self.params_ratio,
            "formula_ratio": self.formula_ratio,
        }


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MobileNetError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def layer_cost(
    height: int, width: int, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1
) -> LayerCost:
    """One layer's cost as a standard conv and as a depthwise separable conv (V1 paper equations 2, 4, 5).

    >>> c = layer_cost(416, 416, 50, 10, kernel=3)
    >>> round(c.macs_ratio, 3)        # 1/10 + 1/9
    0.211
    >>> layer_cost(3, 3, 3, 3).standard_params, layer_cost(3, 3, 3, 3).separable_params
    (81, 36)
    """
    height, width = _positive_int(height, "height"), _positive_int(width, "width")
    in_channels = _positive_int(in_channels, "input channels (M)")
    out_channels = _positive_int(out_channels, "output channels (N)")
    kernel, stride = _positive_int(kernel, "kernel (Dk)"), _positive_int(stride, "stride")
    # 'same' padding: the paper's Df is the input side at stride 1; a stride s keeps ceil(side / s).
    out_h, out_w = -(-height // stride), -(-width // stride)
    area = out_h * out_w
    return LayerCost(
        height=height,
        width=width,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel=kernel,
        stride=stride,
        out_height=out_h,
        out_width=out_w,
        standard_macs=kernel * kernel * in_channels * out_channels * area,
        depthwise_macs=kernel * kernel * in_channels * area,
        pointwise_macs=in_channels * out_channels * area,
        standard_params=kernel * kernel * in_channels * out_channels,
        depthwise_params=kernel * kernel * in_channels,
        pointwise_params=in_channels * out_channels,
    )


_SHAPE = re.compile(r"^\s*(\d+)\s*[xX×*]\s*(\d+)\s*[xX×*]\s*(\d+)\s*$")


def parse_shape(text: str) -> tuple[int, int, int]:
    """Parse ``"416x416x50"`` (height x width x channels, as the V1 paper writes Df x Df x M)."""
    match = _SHAPE.match(text or "")
    if not match:
        raise MobileNetError(
            f"layer input must be HEIGHTxWIDTHxCHANNELS with positive integers, e.g. 416x416x50; got {text!r}"
        )
    values = tuple(int(group) for group in match.groups())
    if min(values) < 1:
        raise MobileNetError(f"layer input must have positive height, width and channels, got {text!r}")
    return values  # type: ignore[return-value]


def format_shape(shape: Iterable[int]) -> str:
    return "x".join(str(value) for value in shape)


# --------------------------------------------------------------------------------------------------------------
# One fully connected layer: full vs truncated-SVD factorisation
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FactoredFcCost:
    """A fully connected layer ``in -> out`` against its rank-``r`` factorisation ``in -> r -> out`` (a truncated
    SVD of the weight matrix): ``in * out`` weights and multiply-adds per input vector against ``r * (in + out)``.
    Weights only, as the papers count parameters (the bias is the same ``out`` values in both)."""

    in_features: int
    out_features: int
    rank: int

    @property
    def params_full(self) -> int:
        return self.in_features * self.out_features

    @property
    def params_factored(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    @property
    def macs_full(self) -> int:
        return self.params_full

    @property
    def macs_factored(self) -> int:
        return self.params_factored

    @property
    def ratio(self) -> float:
        """Factored / full: ``r * (in + out) / (in * out)``."""
        return self.params_factored / self.params_full

    @property
    def break_even_rank(self) -> float:
        """The rank at which the two cost the same, ``in * out / (in + out)``: above it factoring costs more."""
        return self.params_full / (self.in_features + self.out_features)

    def to_dict(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "convention": MAC_CONVENTION,
            "params_full": self.params_full,
            "params_factored": self.params_factored,
            "macs_full": self.macs_full,
            "macs_factored": self.macs_factored,
            "ratio": self.ratio,
            "break_even_rank": self.break_even_rank,
        }


def factored_fc_cost(in_features: int, out_features: int, rank: int) -> FactoredFcCost:
    """The cost of an ``in -> out`` fully connected layer and of its rank-``rank`` factorisation.

    >>> cost = factored_fc_cost(4096, 4096, 512)
    >>> cost.params_full, cost.params_factored, cost.ratio
    (16777216, 4194304, 0.25)
    """
    in_features = _positive_int(in_features, "FC input features")
    out_features = _positive_int(out_features, "FC output features")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MobileNetError(f"rank must be an integer >= 1, got {rank!r}")
    full = min(in_features, out_features)
    if rank > full:
        raise MobileNetError(
            f"rank {rank} exceeds the full rank of a {in_features}x{out_features} layer, min(in, out) = {full}; "
            f"expected 1 <= rank <= {full}"
        )
    return FactoredFcCost(in_features, out_features, rank)


_FC = re.compile(r"^\s*(\d+)\s*[xX×*]\s*(\d+)\s*$")


def parse_fc(text: str) -> tuple[int, int]:
    """Parse ``"4096x4096"`` (input features x output features of a fully connected layer)."""
    match = _FC.match(text or "")
    if not match or min(int(group) for group in match.groups()) < 1:
        raise MobileNetError(
            f"--fc must be INxOUT, the input and output features of a fully connected layer as positive integers, "
            f"e.g. 4096x4096; got {text!r}"
        )
    return int(match.group(1)), int(match.group(2))


# --------------------------------------------------------------------------------------------------------------
# The independent count over a built nn.Module
# --------------------------------------------------------------------------------------------------------------
