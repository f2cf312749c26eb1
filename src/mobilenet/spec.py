"""The papers' architecture tables as data, and the one step that turns them into a list of layers.

Everything downstream (the nn.Module builder in :mod:`mobilenet.models`, the analytic cost model in
:mod:`mobilenet.cost`, the backbone's stage outputs) reads the :class:`Network` built here; nothing else works
out a channel count, a stride or a feature-map size. This module imports nothing from torch so that
``mobilenet cost`` answers instantly.

Sources:
- V1: Howard et al. 2017, "MobileNets", arXiv 1704.04861, Table 1 (body), Table 5 (shallow), Table 4 (Conv
  MobileNet); channel rounding as TF-slim's ``mobilenet_v1.py`` (``max(int(d * depth_multiplier), min_depth)``).
- V2: Sandler et al. 2018, "MobileNetV2", arXiv 1801.04381, Table 2 (rows of t, c, n, s) and Table 1 (the
  bottleneck block); channel rounding as TF-slim's ``_make_divisible`` / torchvision's ``mobilenetv2.py``.
- VGG-16, the V1 paper's Table 8 baseline: Simonyan & Zisserman 2015, "Very Deep Convolutional Networks",
  arXiv 1409.1556, Table 1 column D (13 3x3 convs in 5 stages, each closed by a 2x2 max pool, then FC-4096,
  FC-4096, FC-1000); the 7x7 pool before the first FC layer as torchvision's ``vgg.py`` (any input size).
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from mobilenet.errors import MobileNetError

Family = Literal["v1", "v2", "vgg"]
FAMILIES: tuple[str, ...] = ("v1", "v2", "vgg")
Variant = Literal["separable", "conv", "shallow"]
Op = Literal["conv", "depthwise", "pointwise", "fc", "maxpool"]
Activation = Literal["relu", "relu6"] | None
BlockKind = Literal["conv", "separable", "inverted_residual", "maxpool"]

VARIANTS: tuple[str, ...] = ("separable", "conv", "shallow")
#: Dropout before the classifier by family: V1 0.001 (TF-slim's keep_prob 0.999), V2 0.2 (torchvision, TF-slim),
#: VGG 0.5 (VGG paper section 3.1: the first two FC layers).
DEFAULT_DROPOUT: dict[str, float] = {"v1": 0.001, "v2": 0.2, "vgg": 0.5}
#: The smallest input side: the total stride of the ImageNet network (32), so the last feature map is at least
#: 1x1; with ``small_input`` (total stride 8) the smallest is 8, which the CIFAR resolution multiplier needs
#: (32x32 images resized to 28, 24 or 20 px: V1 paper section 4.3, Table 7).
MIN_RESOLUTION = 32
MIN_RESOLUTION_SMALL_INPUT = 8
#: The largest width multiplier: far beyond any network that fits a machine (whether one does is checked where
#: models are built, :func:`mobilenet.cost.check_fits_memory`), and small enough that every ``channels * alpha``
#: stays a finite float whose int the cost model can take (1e308 would be infinite).
MAX_ALPHA = 1e6

# --------------------------------------------------------------------------------------------------------------
# The papers' tables
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class V1Row:
    """One row of the V1 paper's Table 1: a standard 3x3 conv or a depthwise separable block.

    ``channels`` is the output channel count at alpha = 1 and ``stride`` the stride of the 3x3 filter (for a
    separable block, the depthwise conv carries the stride and the pointwise conv is always stride 1).
    """

    kind: Literal["conv", "separable"]
    channels: int
    stride: int


#: V1 paper, Table 1. The paper prints the last depthwise conv as "Conv dw / s2" on a 7x7 input, which would
#: make a 4x4 map that the following 7x7 average pool cannot cover; every implementation (TF-slim, timm,
#: Keras) uses stride 1 there, as the feature-map column of the same table implies.
V1_TABLE1: tuple[V1Row, ...] = (
    V1Row("conv", 32, 2),
    V1Row("separable", 64, 1),
    V1Row("separable", 128, 2),
    V1Row("separable", 128, 1),
    V1Row("separable", 256, 2),
    V1Row("separable", 256, 1),
    V1Row("separable", 512, 2),
    *(V1Row("separable", 512, 1) for _ in range(5)),
    V1Row("separable", 1024, 2),
    V1Row("separable", 1024, 1),
)

#: Rows of Table 1 that the V1 paper's "Shallow MobileNet" (Table 5) removes: the five separable blocks at
#: 14x14x512 (indices into :data:`V1_TABLE1`).
V1_SHALLOW_REMOVED: tuple[int, ...] = (7, 8, 9, 10, 11)


@dataclass(frozen=True)
class V2Row:
    """One row of the V2 paper's Table 2: ``n`` bottleneck blocks with expansion ``t`` and ``c`` output channels;
    the first block of the row has stride ``s``, the others stride 1."""

    t: int
    c: int
    n: int
    s: int


#: V2 paper, Table 2: the stem conv2d 3x3 with 32 channels at stride 2.
V2_STEM_CHANNELS = 32
#: V2 paper, Table 2: the bottleneck rows (t, c, n, s).
V2_TABLE2: tuple[V2Row, ...] = (
    V2Row(1, 16, 1, 1),
    V2Row(6, 24, 2, 2),
    V2Row(6, 32, 3, 2),
    V2Row(6, 64, 4, 2),
    V2Row(6, 96, 3, 1),
    V2Row(6, 160, 3, 2),
    V2Row(6, 320, 1, 1),
)
#: V2 paper, Table 2: the conv2d 1x1 to 1280 channels before the pool.
V2_HEAD_CHANNELS = 1280

#: VGG paper, Table 1, column D (VGG-16): the output channels of each 3x3 conv (stride 1, padding 1, ReLU, with
#: bias, no BatchNorm); ``"M"`` is a 2x2 max pool of stride 2.
VGG16_FEATURES: tuple[int | str, ...] = (
    *(64, 64, "M"),
    *(128, 128, "M"),
    *(256, 256, 256, "M"),
    *(512, 512, 512, "M"),
    *(512, 512, 512, "M"),
)
#: VGG paper, Table 1: the two hidden fully connected layers (FC-4096, ReLU, dropout 0.5) before the classifier.
VGG16_HIDDEN: tuple[int, ...] = (4096, 4096)
#: The map the first FC layer reads: 7x7x512 at 224 px (VGG paper section 2.1). torchvision's ``vgg16`` pools any
#: other input to 7x7 (adaptive average pool), so the FC weights fit every resolution.
VGG_POOL_OUTPUT = 7

# --------------------------------------------------------------------------------------------------------------
# Channel rounding rules
# --------------------------------------------------------------------------------------------------------------

V1_MIN_DEPTH = 8


def v1_channels(channels: int, alpha: float) -> int:
    """V1 width multiplier (paper section 4.2): ``alpha * channels``, truncated, at least 8.

    This is TF-slim's ``depth = lambda d: max(int(d * depth_multiplier), min_depth)`` with ``min_depth = 8``,
    the rule behind the published V1 checkpoints and the paper's Table 6.
    """
    return max(int(channels * alpha), V1_MIN_DEPTH)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never losing more than 10% of it.

    The rule of TF-slim's V2 (``_make_divisible``), torchvision and timm. Multiples of 8 keep vectorised kernels
    busy on every target; rounding to the nearest multiple could lose up to half a divisor, which for small layers
    is a large fraction of the channels (e.g. 11.2 -> 8 loses 29%), so when the rounded value is below 90% of the
    request one more divisor is added back (11.2 -> 16).
    """
    floor_value = divisor if min_value is None else min_value
    rounded = max(floor_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def v2_channels(channels: int, alpha: float) -> int:
    """V2 width multiplier: :func:`make_divisible` of ``alpha * channels`` to a multiple of 8."""
    return make_divisible(channels * alpha, 8)


def v2_head_channels(alpha: float) -> int:
    """The last 1x1 conv of V2 (1280 channels) is not narrowed for alpha < 1 (V2 paper section 6.1: "we apply
    width multiplier to all layers except the very last convolutional layer"), and is widened for alpha > 1."""
    return make_divisible(V2_HEAD_CHANNELS * max(1.0, alpha), 8)


def v2_expanded_channels(in_channels: int, t: int) -> int:
    """The hidden width of an inverted residual block: input channels times the expansion factor t."""
    return in_channels * t


# --------------------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines a network: the family's table plus the options applied to it.

    Attributes:
        family: ``"v1"`` (Howard et al. 2017) or ``"v2"`` (Sandler et al. 2018).
        alpha: width multiplier (V1 section 4.2); any finite float in (0, :data:`MAX_ALPHA`].
        resolution: input side in pixels (the resolution multiplier rho of V1 section 4.3 is
            ``resolution / 224``); any int >= 32 (>= 8 with ``small_input``). The network runs at any size; this
            one sizes the cost table.
        num_classes: classifier outputs; 0 builds no classifier (headless: the model returns the pooled features,
            as timm's ``num_classes=0``).
        dropout: dropout before the classifier. Defaults: V1 0.001 (TF-slim's keep_prob 0.999), V2 0.2
            (torchvision, TF-slim).
        variant: V1 only: ``"separable"`` (the paper's MobileNet), ``"conv"`` (Table 4's "Conv MobileNet": every
            separable block replaced by a full 3x3 conv with the same output channels and stride) or
            ``"shallow"`` (Table 5: without the five separable blocks at 14x14x512).
        small_input: for 32x32 images (CIFAR): the stem conv and the first stride-2 block run at stride 1, so the
            network's total stride is 8 instead of 32 and a 32x32 input ends on a 4x4 map instead of 1x1.
        in_channels: image channels.
        activation: the activation after every conv but V2's linear projections: ``None`` for the paper's (V1
            section 3, Figure 3: ReLU; V2 Table 1: ReLU6), or ``"relu6"`` / ``"relu"`` explicitly. V1 weights
            trained with ReLU6 (TF-slim's ``mobilenet_v1.py``, Keras, timm's ``mobilenetv1_*``) need ``"relu6"``:
            their activations rely on the clipping.
        classifier_rank: ``None`` for the usual one-layer classifier; an int r builds it as two linear layers,
            features -> r -> classes (a truncated-SVD factorisation of the classifier's weight matrix: r * (in +
            out) weights instead of in * out). 1 <= r <= min(in, out), checked by :func:`build_network`.

    The family ``"vgg"`` is VGG-16 (the V1 paper's Table 8 baseline): alpha 1, variant ``"separable"`` (unused)
    and no ``small_input``; its dropout defaults to 0.5 (VGG paper section 3.1).
    """

    family: Family
    alpha: float = 1.0
    resolution: int = 224
    num_classes: int = 1000
    dropout: float | None = None
    variant: Variant = "separable"
    small_input: bool = False
    in_channels: int = 3
    activation: Activation = None
    classifier_rank: int | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise MobileNetError(f"family must be one of {', '.join(map(repr, FAMILIES))}, got {self.family!r}")
        alpha = self.alpha
        # Comparisons, not math.isfinite: NaN fails them, and isfinite overflows on a huge int.
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha <= MAX_ALPHA:
            raise MobileNetError(
                f"alpha (width multiplier) must be a finite number > 0 and at most {MAX_ALPHA:g}, got {alpha!r}"
            )
        if not isinstance(self.small_input, bool | int) or self.small_input not in (0, 1):  # "no" would be true
            raise MobileNetError(f"small_input must be True or False, got {self.small_input!r}")
        minimum = MIN_RESOLUTION_SMALL_INPUT if self.small_input else MIN_RESOLUTION
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int):
            raise MobileNetError(f"resolution must be an integer >= {minimum}, got {self.resolution!r}")
        if self.resolution < minimum:
            raise MobileNetError(
                f"resolution must be an integer >= {minimum}"
                + ("" if self.small_input else f" (>= {MIN_RESOLUTION_SMALL_INPUT} with small_input)")
                + f", got {self.resolution}"
            )
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise MobileNetError(
                f"num_classes must be an integer >= 1 (or 0 for a headless model returning pooled features), got "
                f"{self.num_classes!r}"
            )
        if self.dropout is None:
            object.__setattr__(self, "dropout", DEFAULT_DROPOUT[self.family])
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
            raise MobileNetError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if self.variant not in VARIANTS:
            raise MobileNetError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.family != "v1" and self.variant != "separable":
            raise MobileNetError(f"variant {self.variant!r} exists only for V1 (the V1 paper's baselines)")
        if isinstance(self.in_channels, bool) or not isinstance(self.in_channels, int) or self.in_channels < 1:
            raise MobileNetError(f"in_channels must be an integer >= 1, got {self.in_channels!r}")
        if self.activation not in (None, "relu", "relu6"):
            raise MobileNetError(f"activation must be 'relu', 'relu6' or None (the paper's), got {self.activation!r}")
        rank = self.classifier_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise MobileNetError(
                f"classifier_rank must be an integer >= 1 (or None for an unfactored classifier), got {rank!r}"
            )
        if self.family == "vgg":
            self._check_vgg_options()
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "dropout", float(dropout))
        object.__setattr__(self, "small_input", bool(self.small_input))

    def _check_vgg_options(self) -> None:
        if self.alpha != 1.0:
            raise MobileNetError(f"VGG-16 has no width multiplier: alpha must be 1, got {self.alpha!r}")
        if self.small_input:
            raise MobileNetError("small_input is a MobileNet option; VGG-16 has none (its total stride is 32)")

    def to_dict(self) -> dict[str, Any]:
        """The options as a dict; ``activation`` and ``classifier_rank`` only when set, so the config of a model with
        the paper's activation and an unfactored classifier reads as it did before those options existed (and older
        readers of a checkpoint's header still accept it)."""
        data = asdict(self)
        for optional in ("activation", "classifier_rank"):
            if data[optional] is None:
                del data[optional]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MobileNetError(f"unknown model option(s) {', '.join(unknown)}; expected some of {sorted(known)}")
        return cls(**data)


# --------------------------------------------------------------------------------------------------------------
# The layer list
# --------------------------------------------------------------------------------------------------------------


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output side of a convolution: floor((size + 2 * padding - kernel) / stride) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class Layer:
    """One convolution, fully connected or pooling layer, with every shape worked out.

    ``name`` is the dotted path of the conv/linear/pool module in the built network (``features.3.depthwise.conv``),
    so a count over the module can be matched to this row. ``op`` classifies it as the V1 paper's Table 2 does:
    a standard conv (kernel > 1, groups 1), a depthwise conv (one filter per channel), a pointwise 1x1 conv or a
    fully connected layer; or ``"maxpool"``, a ``kernel`` x ``kernel`` max pool (no padding, no weights: VGG's).
    """

    name: str
    op: Op
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    groups: int
    in_size: tuple[int, int]
    out_size: tuple[int, int]
    batchnorm: bool
    activation: Activation
    bias: bool

    @property
    def padding(self) -> int:
        """'Same' padding for a conv (``kernel // 2``); none for a max pool (VGG's 2x2 pools halve the side)."""
        return 0 if self.op == "maxpool" else self.kernel // 2


@dataclass(frozen=True)
class Block:
    """A unit of the network's ``features``: a conv-BN-activation, a V1 depthwise separable block, a V2 inverted
    residual block (with a shortcut only where stride is 1 and input channels equal output channels), or a max
    pool (VGG)."""

    name: str
    kind: BlockKind
    layers: tuple[Layer, ...]
    residual: bool = False
    label: str = ""

    @property
    def in_channels(self) -> int:
        return self.layers[0].in_channels

    @property
    def out_channels(self) -> int:
        return self.layers[-1].out_channels

    @property
    def stride(self) -> int:
        return math.prod(layer.stride for layer in self.layers)

    @property
    def in_size(self) -> tuple[int, int]:
        return self.layers[0].in_size

    @property
    def out_size(self) -> tuple[int, int]:
        return self.layers[-1].out_size


@dataclass(frozen=True)
class FeatureInfo:
    """One stage output of the backbone: the last block before the stride doubles (as timm's ``feature_info``)."""

    name: str
    block_index: int
    channels: int
    reduction: int


@dataclass(frozen=True)
class Network:
    """A network as a list of blocks plus the pool and the fully connected head: the single source of every shape.

    ``head`` holds the fully connected layers after the pool, in order: any hidden layers (VGG's two FC-4096,
    named ``hidden.{i}.linear``), then the classifier: one layer named ``classifier``, or, with a
    ``classifier_rank``, two named ``classifier.0`` (features -> rank, no bias) and ``classifier.1`` (rank ->
    classes). ``pool_output`` is the side of the average pool's output (1, a global pool, for the MobileNets; 7
    for VGG).
    """

    config: ModelConfig
    blocks: tuple[Block, ...]
    head: tuple[Layer, ...]
    name: str = ""
    pool_output: int = 1
    features_out: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features_out", self.blocks[-1].out_channels)

    @property
    def classifier(self) -> Layer:
        """The layer that gives the logits (the last of the classifier layers)."""
        if not self.classifier_layers:
            raise MobileNetError(f"{self.name or 'this model'} is headless (num_classes 0): it has no classifier")
        return self.classifier_layers[-1]

    @property
    def classifier_layers(self) -> tuple[Layer, ...]:
        """The classifier: one layer, or two for a factored one (``classifier_rank``)."""
        return tuple(layer for layer in self.head if layer.name.split(".")[0] == "classifier")

    @property
    def hidden(self) -> tuple[Layer, ...]:
        """The fully connected layers between the pool and the classifier (none in the MobileNets)."""
        return tuple(layer for layer in self.head if layer.name.split(".")[0] != "classifier")

    @property
    def layers(self) -> tuple[Layer, ...]:
        """Every conv, pooling and fully connected layer, in execution order."""
        return (*(layer for block in self.blocks for layer in block.layers), *self.head)

    @property
    def pool_size(self) -> tuple[int, int]:
        """The feature map that the global average pool covers (7x7 at 224 for the papers' networks)."""
        return self.blocks[-1].out_size

    @property
    def total_stride(self) -> int:
        return math.prod(block.stride for block in self.blocks)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The backbone's stage outputs: the last block at each total stride (reductions 2, 4, 8, 16, 32, or
        fewer with ``small_input``), named ``stage{k}`` by increasing reduction."""
        return self.stages()

    def stages(self, *, without_head_conv: bool = False) -> tuple[FeatureInfo, ...]:
        """:attr:`feature_info`; ``without_head_conv`` leaves out V2's final 1x1 conv (Table 2's "conv2d 1x1" to
        1280), which timm counts as part of the head (``conv_head``), so the last stage is the last bottleneck."""
        blocks = self.blocks
        if without_head_conv and self.config.family == "v2":
            blocks = blocks[:-1]
        infos: list[FeatureInfo] = []
        reduction = 1
        for index, block in enumerate(blocks):
            reduction *= block.stride
            following = blocks[index + 1] if index + 1 < len(blocks) else None
            if following is None or following.stride > 1:
                infos.append(FeatureInfo(f"stage{len(infos) + 1}", index, block.out_channels, reduction))
        return tuple(infos)


def _conv_layer(
    name: str,
    op: Op,
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int,
    size: tuple[int, int],
    activation: Activation,
) -> Layer:
    groups = in_channels if op == "depthwise" else 1
    if op == "depthwise" and out_channels != in_channels:
        raise AssertionError("a depthwise conv keeps the channel count")
    padding = kernel // 2
    out_size = (
        conv_output_size(size[0], kernel, stride, padding),
        conv_output_size(size[1], kernel, stride, padding),
    )
    return Layer(
        name=f"{name}.conv",
        op=op,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel=kernel,
        stride=stride,
        groups=groups,
        in_size=size,
        out_size=out_size,
        batchnorm=True,
        activation=activation,
        bias=False,
    )


def _strides_with_small_input(strides: list[int], small_input: bool) -> list[int]:
    """Drop the first two stride-2 steps (the stem's and the first body block's) for 32x32 inputs, as the common
    CIFAR adaptations of MobileNet do, so the total stride goes from 32 to 8."""
    if not small_input:
        return strides
    strides = list(strides)
    removed = 0
    for index, stride in enumerate(strides):
        if stride > 1 and removed < 2:
            strides[index] = 1
            removed += 1
    return strides


def _build_v1(config: ModelConfig) -> tuple[Block, ...]:
    rows = [
        row for index, row in enumerate(V1_TABLE1) if not (config.variant == "shallow" and index in V1_SHALLOW_REMOVED)
    ]
    strides = _strides_with_small_input([row.stride for row in rows], config.small_input)
    act = config.activation or "relu"
    blocks: list[Block] = []
    channels = config.in_channels
    size = (config.resolution, config.resolution)
    for index, (row, stride) in enumerate(zip(rows, strides, strict=True)):
        name = f"features.{index}"
        out_channels = v1_channels(row.channels, config.alpha)
        if row.kind == "conv" or config.variant == "conv":
            layer = _conv_layer(name, "conv", channels, out_channels, 3, stride, size, act)
            label = f"Conv / s{stride}" if row.kind == "conv" else f"Conv (for dw+pw) / s{stride}"
            blocks.append(Block(name, "conv", (layer,), label=label))
        else:
            depthwise = _conv_layer(f"{name}.depthwise", "depthwise", channels, channels, 3, stride, size, act)
            pointwise = _conv_layer(
                f"{name}.pointwise", "pointwise", channels, out_channels, 1, 1, depthwise.out_size, act
            )
            blocks.append(Block(name, "separable", (depthwise, pointwise), label=f"Conv dw / s{stride} + Conv 1x1"))
        channels = out_channels
        size = blocks[-1].out_size
    return tuple(blocks)


def _build_v2(config: ModelConfig) -> tuple[Block, ...]:
    # One stride per unit of Table 2 (the stem, each bottleneck, the 1x1 head) so small_input can edit them.
    strides = [2]
    for row in V2_TABLE2:
        strides += [row.s] + [1] * (row.n - 1)
    strides.append(1)
    strides = _strides_with_small_input(strides, config.small_input)

    act = config.activation or "relu6"
    size = (config.resolution, config.resolution)
    stem_channels = v2_channels(V2_STEM_CHANNELS, config.alpha)
    stem = _conv_layer("features.0", "conv", config.in_channels, stem_channels, 3, strides[0], size, act)
    blocks: list[Block] = [Block("features.0", "conv", (stem,), label=f"conv2d 3x3 / s{strides[0]}")]
    channels, size = stem_channels, stem.out_size
    unit = 1
    for row in V2_TABLE2:
        out_channels = v2_channels(row.c, config.alpha)
        for _ in range(row.n):
            stride = strides[unit]
            name = f"features.{unit}"
            hidden = v2_expanded_channels(channels, row.t)
            layers: list[Layer] = []
            if row.t != 1:
                layers.append(_conv_layer(f"{name}.expand", "pointwise", channels, hidden, 1, 1, size, act))
            layers.append(_conv_layer(f"{name}.depthwise", "depthwise", hidden, hidden, 3, stride, size, act))
            layers.append(
                _conv_layer(f"{name}.project", "pointwise", hidden, out_channels, 1, 1, layers[-1].out_size, None)
            )
            residual = stride == 1 and channels == out_channels
            label = f"bottleneck t={row.t} / s{stride}" + (" + shortcut" if residual else "")
            blocks.append(Block(name, "inverted_residual", tuple(layers), residual=residual, label=label))
            channels, size = out_channels, layers[-1].out_size
            unit += 1
    head_channels = v2_head_channels(config.alpha)
    name = f"features.{unit}"
    head = _conv_layer(name, "pointwise", channels, head_channels, 1, strides[unit], size, act)
    blocks.append(Block(name, "conv", (head,), label="conv2d 1x1"))
    return tuple(blocks)


def _build_vgg(config: ModelConfig) -> tuple[Block, ...]:
    """VGG paper Table 1, column D: 3x3 convs (stride 1, bias, ReLU, no BatchNorm) and 2x2 max pools."""
    blocks: list[Block] = []
    channels = config.in_channels
    size = (config.resolution, config.resolution)
    for index, entry in enumerate(VGG16_FEATURES):
        name = f"features.{index}"
        if entry == "M":
            blocks.append(Block(name, "maxpool", (_maxpool_layer(name, channels, size),), label="maxpool 2x2 / s2"))
        else:
            conv = _conv_layer(name, "conv", channels, int(entry), 3, 1, size, "relu")
            blocks.append(Block(name, "conv", (replace(conv, batchnorm=False, bias=True),), label=f"conv3-{entry}"))
            channels = int(entry)
        size = blocks[-1].out_size
    return tuple(blocks)


def _maxpool_layer(name: str, channels: int, size: tuple[int, int], kernel: int = 2) -> Layer:
    out_size = (conv_output_size(size[0], kernel, kernel, 0), conv_output_size(size[1], kernel, kernel, 0))
    return Layer(name, "maxpool", channels, channels, kernel, kernel, 1, size, out_size, False, None, False)


def _fc_layer(name: str, in_features: int, out_features: int, activation: Activation, bias: bool = True) -> Layer:
    return Layer(name, "fc", in_features, out_features, 1, 1, 1, (1, 1), (1, 1), False, activation, bias)


def _classifier_layers(config: ModelConfig, in_features: int) -> tuple[Layer, ...]:
    """The classifier: one FC layer, or with ``classifier_rank`` r its truncated-SVD factorisation, features -> r
    (no bias) -> classes (the bias stays on the last layer, so at full rank the two compute the same map)."""
    rank, classes = config.classifier_rank, config.num_classes
    if classes == 0:
        if rank is not None:
            raise MobileNetError("a headless model (num_classes 0) has no classifier to factor; drop classifier_rank")
        return ()
    if rank is None:
        return (_fc_layer("classifier", in_features, classes, None),)
    full = min(in_features, classes)
    if rank > full:
        raise MobileNetError(
            f"classifier_rank {rank} exceeds the classifier's full rank min(in features, classes) = "
            f"min({in_features}, {classes}) = {full}; expected 1 <= classifier_rank <= {full}"
        )
    return (
        _fc_layer("classifier.0", in_features, rank, None, bias=False),
        _fc_layer("classifier.1", rank, classes, None),
    )


def _head(config: ModelConfig, features: int, pool_output: int) -> tuple[Layer, ...]:
    """The fully connected layers after the pool: VGG's hidden FC-4096 layers (none in a MobileNet), then the
    classifier."""
    width = features * pool_output * pool_output
    hidden: list[Layer] = []
    for index, out_features in enumerate(VGG16_HIDDEN if config.family == "vgg" else ()):
        hidden.append(_fc_layer(f"hidden.{index}.linear", width, out_features, "relu"))
        width = out_features
    return (*hidden, *_classifier_layers(config, width))


def build_network(config: ModelConfig, name: str = "") -> Network:
    """Turn a :class:`ModelConfig` into the full list of layers (V1 Table 1, V2 Table 2 or VGG-16 with its
    options)."""
    builders = {"v1": _build_v1, "v2": _build_v2, "vgg": _build_vgg}
    blocks = builders[config.family](config)
    pool_output = VGG_POOL_OUTPUT if config.family == "vgg" else 1
    head = _head(config, blocks[-1].out_channels, pool_output)
    return Network(config=config, blocks=blocks, head=head, name=name, pool_output=pool_output)


# --------------------------------------------------------------------------------------------------------------
# The registry of named models
# --------------------------------------------------------------------------------------------------------------

V1_ALPHAS = (1.0, 0.75, 0.5, 0.25)
V1_RESOLUTIONS = (224, 192, 160, 128)
V2_ALPHAS = (1.4, 1.3, 1.0, 0.75, 0.5, 0.35)
V2_RESOLUTIONS = (224, 192, 160, 128, 96)


def _registry() -> dict[str, ModelConfig]:
    """The MobileNets of the papers' tables (V1 Tables 4-7, V2 Table 3 and Figure 5)."""
    models: dict[str, ModelConfig] = {}
    for alpha in V1_ALPHAS:
        for resolution in V1_RESOLUTIONS:
            models[f"mobilenet_v1_{alpha}_{resolution}"] = ModelConfig("v1", alpha, resolution)
        for variant in ("conv", "shallow"):
            models[f"mobilenet_v1_{variant}_{alpha}_224"] = ModelConfig("v1", alpha, 224, variant=variant)
    for alpha in V2_ALPHAS:
        for resolution in V2_RESOLUTIONS:
            models[f"mobilenet_v2_{alpha}_{resolution}"] = ModelConfig("v2", alpha, resolution)
    return models


#: The networks the V1 paper compares MobileNet with (Table 8), registered beside the MobileNets.
BASELINES: dict[str, ModelConfig] = {"vgg16_224": ModelConfig("vgg", resolution=224)}

MODELS: dict[str, ModelConfig] = {**_registry(), **BASELINES}


def list_models(pattern: str = "", *, baselines: bool = False) -> list[str]:
    """The registered MobileNet names (with ``baselines=True`` also the V1 paper's comparison networks, VGG-16),
    optionally those containing ``pattern`` or matching it as a glob."""
    if not isinstance(pattern, str):
        raise MobileNetError(f"a model pattern is text (a part of a name or a glob), got {type(pattern).__name__}")
    names = [name for name in MODELS if baselines or name not in BASELINES]
    if not pattern:
        return names
    if any(char in pattern for char in "*?["):
        # fnmatch reads an unclosed "[" as itself, where a hand-made regex would not compile.
        return [name for name in names if fnmatch.fnmatchcase(name, pattern)]
    return [name for name in names if pattern in name]


OVERRIDABLE = (
    "alpha",
    "resolution",
    "num_classes",
    "dropout",
    "small_input",
    "in_channels",
    "activation",
    "classifier_rank",
)


#: The names torchvision and timm give these models, and the short family names, for our registered names.
ALIASES: dict[str, str] = {
    "mobilenet_v1": "mobilenet_v1_1.0_224",
    "mobilenet_v2": "mobilenet_v2_1.0_224",  # torchvision.models.mobilenet_v2
    "mobilenetv1_100": "mobilenet_v1_1.0_224",  # timm
    "mobilenetv2_035": "mobilenet_v2_0.35_224",
    "mobilenetv2_050": "mobilenet_v2_0.5_224",
    "mobilenetv2_075": "mobilenet_v2_0.75_224",
    "mobilenetv2_100": "mobilenet_v2_1.0_224",
    "mobilenetv2_140": "mobilenet_v2_1.4_224",
    "vgg16": "vgg16_224",  # torchvision.models.vgg16
}


def resolve_name(name: Any) -> str:
    """The registered name for ``name`` (itself, or the registered model a torchvision/timm name stands for).
    An unknown name raises :class:`MobileNetError` that suggests the closest names (the 1.0-224 model first
    where ``name`` is the start of several)."""
    if not isinstance(name, str):
        raise MobileNetError(
            f"model name must be a string such as 'mobilenet_v2_1.0_224', got {type(name).__name__} {name!r}"
        )
    if name in MODELS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    starting = sorted((n for n in MODELS if n.startswith(name)), key=lambda n: (not n.endswith("_1.0_224"), n))
    close = starting[:3] or difflib.get_close_matches(name, MODELS, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `mobilenet models` lists them"
    raise MobileNetError(f"unknown model {name!r}{hint}")


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a registered name (or an alias, :data:`ALIASES`), with options replaced (any
    alpha or resolution, a new num_classes, ...). An unknown name raises :class:`MobileNetError` that suggests the
    closest names."""
    name = resolve_name(name)
    bad = sorted(set(overrides) - set(OVERRIDABLE))
    if bad:
        raise MobileNetError(f"cannot override {', '.join(bad)}; options that can be set: {', '.join(OVERRIDABLE)}")
    given = {key: value for key, value in overrides.items() if value is not None}
    return replace(MODELS[name], **given)


def network_for(name: str, **overrides: Any) -> Network:
    """The layer list of a registered model with options replaced."""
    return build_network(model_config(name, **overrides), name=name)


# --------------------------------------------------------------------------------------------------------------
# Published weights
# --------------------------------------------------------------------------------------------------------------

#: Where foreign weights come from.
SOURCES: tuple[str, ...] = ("torchvision", "timm")

#: Who publishes ImageNet weights for which (family, alpha): torchvision's ``MobileNet_V2_Weights`` and timm's
#: pretrained tags (``timm.list_pretrained("mobilenetv*")``; a test checks this table against both libraries).
PUBLISHED: dict[str, frozenset[tuple[str, float]]] = {
    "torchvision": frozenset({("v2", 1.0)}),
    "timm": frozenset({("v1", 1.0), ("v1", 1.25), ("v2", 0.5), ("v2", 1.0), ("v2", 1.4)}),
}


def published_sources(config: ModelConfig) -> list[str]:
    """The sources that publish ImageNet weights for ``config``'s family and width (separable variant only)."""
    if config.variant != "separable":
        return []
    return [source for source in SOURCES if (config.family, config.alpha) in PUBLISHED[source]]


def default_source(config: ModelConfig) -> str:
    """Where ``pretrained=True`` takes weights from: torchvision where it publishes them, else timm."""
    sources = published_sources(config)
    if not sources:
        raise MobileNetError(
            f"no ImageNet weights are published for MobileNet {config.family} alpha {config.alpha:g} "
            f"({config.variant}); published: {published_text()}"
        )
    return sources[0]


def _alpha1(alpha: float) -> str:
    """alpha as the papers print it: 1.0, 0.5, 1.25."""
    return f"{alpha:.1f}" if float(alpha).is_integer() else f"{alpha:g}"


def published_text() -> str:
    """Who publishes what, for messages: ``torchvision: v2 1.0; timm: v1 1.0, ...``."""
    return "; ".join(
        f"{source}: " + ", ".join(f"{family} {_alpha1(alpha)}" for family, alpha in sorted(PUBLISHED[source]))
        for source in SOURCES
    )
