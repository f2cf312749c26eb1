"""The papers' published figures as data, and their reproduction by the analytic cost model.

Every published number below is copied from its source (cited beside it); :func:`reproduce` puts our count beside
each one with the difference and, where they differ, a note that says why. Nothing in the model is tuned to
match: where a source is inconsistent (with itself, or with the other source), the table shows it.

Sources:
- V1: Howard et al. 2017, "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications",
  arXiv 1704.04861, Tables 1-7.
- V2: Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks", arXiv 1801.04381, Table 4.
- TF-slim: tensorflow/models, ``research/slim/nets/mobilenet_v1.md`` and ``research/slim/nets/mobilenet/README.md``
  (the released ImageNet checkpoints: "Million MACs", "Million Parameters"; 1001 classes, with a background class).
- torchvision: ``torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["num_params"]`` = 3,504,872.

The model rows of V1 Tables 4-7 and V2 Table 4 (:class:`PaperRow`) carry the published ImageNet top-1 too: the
cost comparison here does not use it; :mod:`mobilenet.reproduce_experiments` puts those rows beside CIFAR-10 runs.

Import cost: :mod:`mobilenet.spec` and :mod:`mobilenet.cost` only (no torch), so ``mobilenet cost --paper`` is
instant.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from mobilenet.cost import MAC_CONVENTION, CostTable, count_costs, layer_cost
from mobilenet.spec import network_for

__all__ = [
    "V1_TABLE4",
    "V1_TABLE5",
    "V1_TABLE6",
    "V1_TABLE7",
    "V2_TABLE4",
    "Comparison",
    "PaperRow",
    "PaperTable",
    "reproduce",
    "tables_to_dict",
    "tables_to_markdown",
]

# --------------------------------------------------------------------------------------------------------------
# Published figures
# --------------------------------------------------------------------------------------------------------------

#: V1 paper Table 1 ("MobileNet Body Architecture") as printed: (type / stride, filter shape, input size), with the
#: "5x" row written out five times. This is not :data:`mobilenet.spec.V1_TABLE1` (the architecture we build, one
#: row per block): it is the text the paper prints, sizes and misprint included, which :func:`reproduce` checks the
#: built network against; derived from spec, the check would compare spec with itself. The paper prints the
#: second-last depthwise conv as "Conv dw / s2" on a 7x7 input (spec uses stride 1 there).
V1_TABLE1_PRINTED: tuple[tuple[str, str, str], ...] = (
    ("Conv / s2", "3x3x3x32", "224x224x3"),
    ("Conv dw / s1", "3x3x32 dw", "112x112x32"),
    ("Conv / s1", "1x1x32x64", "112x112x32"),
    ("Conv dw / s2", "3x3x64 dw", "112x112x64"),
    ("Conv / s1", "1x1x64x128", "56x56x64"),
    ("Conv dw / s1", "3x3x128 dw", "56x56x128"),
    ("Conv / s1", "1x1x128x128", "56x56x128"),
    ("Conv dw / s2", "3x3x128 dw", "56x56x128"),
    ("Conv / s1", "1x1x128x256", "28x28x128"),
    ("Conv dw / s1", "3x3x256 dw", "28x28x256"),
    ("Conv / s1", "1x1x256x256", "28x28x256"),
    ("Conv dw / s2", "3x3x256 dw", "28x28x256"),
    ("Conv / s1", "1x1x256x512", "14x14x256"),
    *(
        row
        for _ in range(5)
        for row in (("Conv dw / s1", "3x3x512 dw", "14x14x512"), ("Conv / s1", "1x1x512x512", "14x14x512"))
    ),
    ("Conv dw / s2", "3x3x512 dw", "14x14x512"),
    ("Conv / s1", "1x1x512x1024", "7x7x512"),
    ("Conv dw / s2", "3x3x1024 dw", "7x7x1024"),
    ("Conv / s1", "1x1x1024x1024", "7x7x1024"),
    ("Avg Pool / s1", "Pool 7x7", "7x7x1024"),
    ("FC / s1", "1024x1000", "1x1x1024"),
    ("Softmax / s1", "Classifier", "1x1x1000"),
)

#: V1 paper Table 2 ("Resource Per Layer Type"): type -> (Mult-Adds %, Parameters %).
V1_TABLE2: dict[str, tuple[float, float]] = {
    "Conv 1x1": (94.86, 74.59),
    "Conv DW 3x3": (3.06, 1.06),
    "Conv 3x3": (1.19, 0.02),
    "Fully Connected": (0.18, 24.33),
}

#: V1 paper Table 3 ("Resource usage for modifications to standard convolution"): one layer with a 14x14x512
#: input, 512 outputs, Dk = 3. (row, million Mult-Adds, million parameters).
V1_TABLE3: tuple[tuple[str, float, float], ...] = (
    ("Convolution", 462, 2.36),
    ("Depthwise Separable Conv", 52.3, 0.27),
    ("alpha = 0.75", 29.6, 0.15),
    ("rho = 0.714", 15.1, 0.15),
)


@dataclass(frozen=True)
class PaperRow:
    """A model row as a paper publishes it: ImageNet top-1 (%), million multiply-adds, million parameters.

    ``model`` is the registered name whose analytic cost :func:`reproduce` puts beside the published figures (empty
    for a row that is not one of the papers')."""

    label: str
    top1: float
    macs_m: float
    params_m: float
    model: str = ""


#: V1 paper Table 4 ("Depthwise Separable vs Full Convolution MobileNet").
V1_TABLE4: tuple[PaperRow, ...] = (
    PaperRow("Conv MobileNet", 71.7, 4866, 29.3, "mobilenet_v1_conv_1.0_224"),
    PaperRow("MobileNet", 70.6, 569, 4.2, "mobilenet_v1_1.0_224"),
)

#: V1 paper Table 5 ("Narrow vs Shallow MobileNet").
V1_TABLE5: tuple[PaperRow, ...] = (
    PaperRow("0.75 MobileNet", 68.4, 325, 2.6, "mobilenet_v1_0.75_224"),
    PaperRow("Shallow MobileNet", 65.3, 307, 2.9, "mobilenet_v1_shallow_1.0_224"),
)

#: V1 paper Table 8 ("MobileNet Comparison to Popular Models"); GoogleNet is not built here.
V1_TABLE8: tuple[PaperRow, ...] = (
    PaperRow("1.0 MobileNet-224", 70.6, 569, 4.2, "mobilenet_v1_1.0_224"),
    PaperRow("GoogleNet", 69.8, 1550, 6.8),
    PaperRow("VGG 16", 71.5, 15300, 138, "vgg16_224"),
)

#: V1 paper Table 9 ("Smaller MobileNet Comparison to Popular Models"); SqueezeNet and AlexNet are not built here.
V1_TABLE9: tuple[PaperRow, ...] = (
    PaperRow("0.50 MobileNet-160", 60.2, 76, 1.32, "mobilenet_v1_0.5_160"),
    PaperRow("Squeezenet", 57.5, 1700, 1.25),
    PaperRow("AlexNet", 57.2, 720, 60),
)

#: V1 paper Table 6 ("MobileNet Width Multiplier"), all at 224.
V1_TABLE6: tuple[PaperRow, ...] = (
    PaperRow("1.0 MobileNet-224", 70.6, 569, 4.2, "mobilenet_v1_1.0_224"),
    PaperRow("0.75 MobileNet-224", 68.4, 325, 2.6, "mobilenet_v1_0.75_224"),
    PaperRow("0.5 MobileNet-224", 63.7, 149, 1.3, "mobilenet_v1_0.5_224"),
    PaperRow("0.25 MobileNet-224", 50.6, 41, 0.5, "mobilenet_v1_0.25_224"),
)

#: V1 paper Table 7 ("MobileNet Resolution"), all at alpha 1.0.
V1_TABLE7: tuple[PaperRow, ...] = (
    PaperRow("1.0 MobileNet-224", 70.6, 569, 4.2, "mobilenet_v1_1.0_224"),
    PaperRow("1.0 MobileNet-192", 69.1, 418, 4.2, "mobilenet_v1_1.0_192"),
    PaperRow("1.0 MobileNet-160", 67.2, 290, 4.2, "mobilenet_v1_1.0_160"),
    PaperRow("1.0 MobileNet-128", 64.4, 186, 4.2, "mobilenet_v1_1.0_128"),
)

#: V2 paper Table 4 ("Performance on ImageNet, comparison for different networks"): the MobileNet rows.
V2_TABLE4: tuple[PaperRow, ...] = (
    PaperRow("MobileNetV1", 70.6, 575, 4.2, "mobilenet_v1_1.0_224"),
    PaperRow("MobileNetV2", 72.0, 300, 3.4, "mobilenet_v2_1.0_224"),
    PaperRow("MobileNetV2 (1.4)", 74.7, 585, 6.9, "mobilenet_v2_1.4_224"),
)

#: V2 paper Table 2 as printed: (input, operator, t, c, n, s) per row, "-" where the paper leaves a cell empty. The
#: classifier row ("conv2d 1x1", k outputs) is the FC layer here. Not :data:`mobilenet.spec.V2_TABLE2` (the bottleneck
#: rows we build from): the printed text with its input sizes and its stem, head and pool rows, which
#: :func:`reproduce` checks the built network against.
V2_TABLE2_PRINTED: tuple[tuple[str, str, str, str, str, str], ...] = (
    ("224x224x3", "conv2d", "-", "32", "1", "2"),
    ("112x112x32", "bottleneck", "1", "16", "1", "1"),
    ("112x112x16", "bottleneck", "6", "24", "2", "2"),
    ("56x56x24", "bottleneck", "6", "32", "3", "2"),
    ("28x28x32", "bottleneck", "6", "64", "4", "2"),
    ("14x14x64", "bottleneck", "6", "96", "3", "1"),
    ("14x14x96", "bottleneck", "6", "160", "3", "2"),
    ("7x7x160", "bottleneck", "6", "320", "1", "1"),
    ("7x7x320", "conv2d 1x1", "-", "1280", "1", "1"),
    ("7x7x1280", "avgpool 7x7", "-", "-", "1", "-"),
    ("1x1x1280", "conv2d 1x1", "-", "k", "-", "-"),
)

#: V2 paper section 4 ("Model Architecture"): "followed by 19 residual bottleneck layers described in Table 2".
V2_TEXT_BOTTLENECKS = 19

#: torchvision's documented trainable parameter count of ``mobilenet_v2`` (IMAGENET1K_V1 weights' meta).
TORCHVISION_V2_PARAMS = 3_504_872

#: TF-slim ``mobilenet_v1.md``: checkpoint -> (Million MACs, Million Parameters).
TF_SLIM_V1: dict[str, tuple[float, float]] = {
    "mobilenet_v1_1.0_224": (569, 4.24),
    "mobilenet_v1_1.0_192": (418, 4.24),
    "mobilenet_v1_1.0_160": (291, 4.24),
    "mobilenet_v1_1.0_128": (186, 4.24),
    "mobilenet_v1_0.75_224": (317, 2.59),
    "mobilenet_v1_0.75_192": (233, 2.59),
    "mobilenet_v1_0.75_160": (162, 2.59),
    "mobilenet_v1_0.75_128": (104, 2.59),
    "mobilenet_v1_0.5_224": (150, 1.34),
    "mobilenet_v1_0.5_192": (110, 1.34),
    "mobilenet_v1_0.5_160": (77, 1.34),
    "mobilenet_v1_0.5_128": (49, 1.34),
    "mobilenet_v1_0.25_224": (41, 0.47),
    "mobilenet_v1_0.25_192": (34, 0.47),
    "mobilenet_v1_0.25_160": (21, 0.47),
    "mobilenet_v1_0.25_128": (14, 0.47),
}

#: TF-slim ``mobilenet/README.md``: checkpoint -> (MACs (M), Parameters (M)).
TF_SLIM_V2: dict[str, tuple[float, float]] = {
    "mobilenet_v2_1.4_224": (582, 6.06),
    "mobilenet_v2_1.3_224": (509, 5.34),
    "mobilenet_v2_1.0_224": (300, 3.47),
    "mobilenet_v2_1.0_192": (221, 3.47),
    "mobilenet_v2_1.0_160": (154, 3.47),
    "mobilenet_v2_1.0_128": (99, 3.47),
    "mobilenet_v2_1.0_96": (56, 3.47),
    "mobilenet_v2_0.75_224": (209, 2.61),
    "mobilenet_v2_0.75_192": (153, 2.61),
    "mobilenet_v2_0.75_160": (107, 2.61),
    "mobilenet_v2_0.75_128": (69, 2.61),
    "mobilenet_v2_0.75_96": (39, 2.61),
    "mobilenet_v2_0.5_224": (97, 1.95),
    "mobilenet_v2_0.5_192": (71, 1.95),
    "mobilenet_v2_0.5_160": (50, 1.95),
    "mobilenet_v2_0.5_128": (32, 1.95),
    "mobilenet_v2_0.5_96": (18, 1.95),
    "mobilenet_v2_0.35_224": (59, 1.66),
    "mobilenet_v2_0.35_192": (43, 1.66),
    "mobilenet_v2_0.35_160": (30, 1.66),
    "mobilenet_v2_0.35_128": (20, 1.66),
    "mobilenet_v2_0.35_96": (11, 1.66),
}

#: TF-slim's checkpoints classify 1001 classes (index 0 is "background").
TF_SLIM_CLASSES = 1001

# --------------------------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------------------------


def _decimals(value: float) -> int:
    """How many decimals a published figure is printed with (569 -> 0, 4.2 -> 1, 94.86 -> 2)."""
    if isinstance(value, int) or float(value).is_integer():
        return 0
    return len(repr(float(value)).split(".")[1])


@dataclass(frozen=True)
class Comparison:
    """One published figure beside ours.

    ``status`` is ``"match"`` when ours rounds to the published figure at the precision it is printed with,
    ``"match (truncated)"`` when it does only if the source cut digits off instead of rounding, and
    ``"differs"`` otherwise (the note then says why). Text figures (Table 1's shapes) match when equal.
    """

    item: str
    quantity: str
    published: float | str
    ours: float | str
    note: str = ""

    @property
    def numeric(self) -> bool:
        return not isinstance(self.published, str)

    @property
    def decimals(self) -> int:
        return _decimals(self.published) if self.numeric else 0  # type: ignore[arg-type]

    @property
    def difference(self) -> float | None:
        """Ours minus published (None for text)."""
        return float(self.ours) - float(self.published) if self.numeric else None  # type: ignore[arg-type]

    @property
    def relative_difference(self) -> float | None:
        if not self.numeric or not self.published:
            return None
        return self.difference / float(self.published)  # type: ignore[operator, arg-type]

    @property
    def status(self) -> str:
        if not self.numeric:
            return "match" if self.published == self.ours else "differs"
        scale = 10**self.decimals
        published, ours = float(self.published), float(self.ours)  # type: ignore[arg-type]
        # A small tolerance so that binary floating point does not turn an exact tie into a miss.
        if abs(ours - published) * scale <= 0.5 + 1e-9:
            return "match"
        if math.floor(ours * scale + 1e-9) == round(published * scale):
            return "match (truncated)"
        return "differs"

    def format_ours(self) -> str:
        if not self.numeric:
            return str(self.ours)
        if isinstance(self.ours, int) and isinstance(self.published, int):
            return f"{self.ours:,}"
        return f"{float(self.ours):.{self.decimals + 2}f}"  # type: ignore[arg-type]

    def format_published(self) -> str:
        if not self.numeric:
            return str(self.published)
        if isinstance(self.published, int) and abs(self.published) >= 10_000:
            return f"{self.published:,}"
        return f"{float(self.published):.{self.decimals}f}"  # type: ignore[arg-type]

    def format_difference(self) -> str:
        if not self.numeric:
            return "=" if self.status == "match" else "≠"
        relative = self.relative_difference
        if isinstance(self.ours, int) and isinstance(self.published, int):
            text = f"{self.ours - self.published:+,}"
        else:
            text = f"{self.difference:+.{self.decimals + 2}f}"
        return text + (f" ({100 * relative:+.1f}%)" if relative is not None else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "item": self.item,
            "quantity": self.quantity,
            "published": self.published,
            "ours": self.ours,
            "difference": self.difference,
            "status": self.status,
            "note": self.note,
        }


@dataclass(frozen=True)
class PaperTable:
    """One of the papers' tables reproduced: a title, where the figures come from, and the comparisons."""

    key: str
    title: str
    source: str
    rows: tuple[Comparison, ...]
    note: str = ""

    @property
    def matches(self) -> int:
        return sum(row.status != "differs" for row in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "source": self.source,
            "note": self.note,
            "rows": [row.to_dict() for row in self.rows],
        }


def _millions(value: int) -> float:
    return value / 1e6


# --------------------------------------------------------------------------------------------------------------
# Our side of each table
# --------------------------------------------------------------------------------------------------------------


def _v1_table1_ours() -> list[tuple[str, str, str]]:
    """V1 1.0-224's layer list written in the paper's Table 1 notation."""
    network = network_for("mobilenet_v1_1.0_224")
    rows: list[tuple[str, str, str]] = []
    for layer in network.layers[:-1]:
        h, w = layer.in_size
        size = f"{h}x{w}x{layer.in_channels}"
        k = f"{layer.kernel}x{layer.kernel}"
        if layer.op == "depthwise":
            rows.append((f"Conv dw / s{layer.stride}", f"{k}x{layer.in_channels} dw", size))
        else:
            rows.append((f"Conv / s{layer.stride}", f"{k}x{layer.in_channels}x{layer.out_channels}", size))
    ph, pw = network.pool_size
    fc = network.classifier
    rows.append(("Avg Pool / s1", f"Pool {ph}x{pw}", f"{ph}x{pw}x{network.features_out}"))
    rows.append(("FC / s1", f"{fc.in_channels}x{fc.out_channels}", f"1x1x{fc.in_channels}"))
    rows.append(("Softmax / s1", "Classifier", f"1x1x{fc.out_channels}"))
    return rows


def _table1() -> PaperTable:
    ours = _v1_table1_ours()
    rows = []
    for index, (published, mine) in enumerate(zip(V1_TABLE1_PRINTED, ours, strict=True)):
        note = ""
        if published != mine and published[0] == "Conv dw / s2" and published[2].startswith("7x7"):
            note = (
                "paper misprint: a stride-2 3x3 conv on 7x7 gives 4x4, yet the next row's input is 7x7x1024 and the "
                "pool is 7x7; TF-slim, Keras and timm use stride 1 here"
            )
        rows.append(Comparison(f"{index + 1}", "layer", " · ".join(published), " · ".join(mine), note))
    return PaperTable(
        "v1-table1",
        "V1 Table 1: MobileNet body architecture (alpha 1.0, 224)",
        "Howard et al. 2017, Table 1",
        tuple(rows),
        "Each row: type / stride · filter shape · input size. Every shape comes from mobilenet.spec.build_network, "
        "which the model builder and the cost model share.",
    )


def _table2(table: CostTable) -> PaperTable:
    shares = {share.label: share for share in table.by_op()}
    rows = []
    for label, (macs_percent, params_percent) in V1_TABLE2.items():
        share = shares[label]
        note = ""
        if label == "Conv 3x3":
            total = sum(published[0] for published in V1_TABLE2.values())
            ours = round(100 * share.macs_share, 2)
            fixed = total - macs_percent + ours
            note = (
                f"the paper's {macs_percent:.2f}% looks like a digit swap of {ours:.2f}%: its Mult-Adds column sums "
                f"to {total:.2f}%, with {ours:.2f}% to {fixed:.2f}%"
            )
        rows.append(Comparison(label, "Mult-Adds (%)", macs_percent, 100 * share.macs_share, note))
        rows.append(Comparison(label, "Parameters (%)", params_percent, 100 * share.params_share))
    return PaperTable(
        "v1-table2",
        "V1 Table 2: resource per layer type (MobileNet 1.0-224)",
        "Howard et al. 2017, Table 2",
        tuple(rows),
        "Shares of multiply-adds and of parameters (conv + FC weights) per layer type.",
    )


def _table3() -> PaperTable:
    # Table 3's layer: the 14x14x512 -> 512 layer of Table 1, Dk = 3 (V1 section 4.1); alpha narrows both M and N,
    # rho = 0.714 (160/224) shrinks the 14x14 map to 10x10.
    side = 14
    alpha_channels = int(512 * 0.75)
    rho_side = round(side * 160 / 224)
    standard = layer_cost(side, side, 512, 512, 3)
    separable = standard
    narrow = layer_cost(side, side, alpha_channels, alpha_channels, 3)
    small = layer_cost(rho_side, rho_side, alpha_channels, alpha_channels, 3)
    ours = (
        (standard.standard_macs, standard.standard_params),
        (separable.separable_macs, separable.separable_params),
        (narrow.separable_macs, narrow.separable_params),
        (small.separable_macs, small.separable_params),
    )
    rows = []
    for (label, macs, params), (our_macs, our_params) in zip(V1_TABLE3, ours, strict=True):
        rows.append(Comparison(label, "Mult-Adds (M)", macs, _millions(our_macs)))
        rows.append(Comparison(label, "Parameters (M)", params, _millions(our_params)))
    return PaperTable(
        "v1-table3",
        "V1 Table 3: one 14x14x512 -> 512 layer, Dk = 3 (standard vs separable; alpha 0.75; rho 0.714 -> 10x10)",
        "Howard et al. 2017, Table 3",
        tuple(rows),
        "Computed with mobilenet.cost.layer_cost (V1 equations 2 and 4).",
    )


def _v2_table2_ours() -> tuple[list[tuple[str, str, str, str, str, str]], int]:
    """V2 1.0-224's blocks regrouped into Table 2's rows (consecutive bottlenecks with the same output channels),
    and the number of bottleneck blocks."""
    network = network_for("mobilenet_v2_1.0_224")
    stem, *bottlenecks, head = network.blocks
    rows = []
    h, w = stem.in_size
    rows.append((f"{h}x{w}x{stem.in_channels}", "conv2d", "-", str(stem.out_channels), "1", str(stem.stride)))
    groups: list[list[Any]] = []
    for block in bottlenecks:
        if groups and groups[-1][-1].out_channels == block.out_channels:
            groups[-1].append(block)
        else:
            groups.append([block])
    for group in groups:
        first = group[0]
        hidden = first.layers[0].out_channels
        h, w = first.in_size
        rows.append(
            (
                f"{h}x{w}x{first.in_channels}",
                "bottleneck",
                str(hidden // first.in_channels),
                str(first.out_channels),
                str(len(group)),
                str(first.stride),
            )
        )
    h, w = head.in_size
    rows.append((f"{h}x{w}x{head.in_channels}", "conv2d 1x1", "-", str(head.out_channels), "1", str(head.stride)))
    ph, pw = network.pool_size
    rows.append((f"{ph}x{pw}x{network.features_out}", f"avgpool {ph}x{pw}", "-", "-", "1", "-"))
    rows.append((f"1x1x{network.classifier.in_channels}", "conv2d 1x1", "-", "k", "-", "-"))
    return rows, len(bottlenecks)


def _v2_table2() -> PaperTable:
    ours, bottlenecks = _v2_table2_ours()
    rows = []
    for index, (published, mine) in enumerate(zip(V2_TABLE2_PRINTED, ours, strict=True)):
        text = [f"{published[0]} {published[1]} t={published[2]} c={published[3]} n={published[4]} s={published[5]}"]
        text.append(f"{mine[0]} {mine[1]} t={mine[2]} c={mine[3]} n={mine[4]} s={mine[5]}")
        rows.append(Comparison(f"{index + 1}", "row", text[0], text[1]))
    rows.append(
        Comparison(
            "bottleneck blocks",
            "count",
            V2_TEXT_BOTTLENECKS,
            bottlenecks,
            "the paper's text says 19 bottleneck layers; its own Table 2 sums to 1+2+3+4+3+3+1 = 17, as do "
            "TF-slim, torchvision and timm",
        )
    )
    return PaperTable(
        "v2-table2",
        "V2 Table 2: MobileNetV2 body (alpha 1.0, 224)",
        "Sandler et al. 2018, Table 2 and section 4",
        tuple(rows),
        "Each row: input, operator, t, c, n, s. Our rows are regrouped from the built blocks (consecutive "
        "bottlenecks with equal output channels); t = expanded / input channels.",
    )


def _model_rows(
    entries: tuple[PaperRow, ...], notes: dict[tuple[str, str], str] | None = None
) -> tuple[Comparison, ...]:
    notes = notes or {}
    rows = []
    for entry in entries:
        if not entry.model:
            continue  # a model the paper compares with that is not built here: printed with the table's caption
        table = count_costs(entry.model)
        label = entry.label
        rows.append(
            Comparison(label, "Mult-Adds (M)", entry.macs_m, _millions(table.macs), notes.get((label, "macs"), ""))
        )
        rows.append(
            Comparison(
                label, "Parameters (M)", entry.params_m, _millions(table.params), notes.get((label, "params"), "")
            )
        )
    return tuple(rows)


def _table4() -> PaperTable:
    conv = count_costs("mobilenet_v1_conv_1.0_224")
    separable = count_costs("mobilenet_v1_1.0_224")
    fc = conv.rows[-1].macs
    note = (
        f"ours without the FC layer is {_millions(conv.macs - fc):.2f}M, which the paper's 4866 matches; the "
        f"MobileNet row keeps the FC ({_millions(separable.macs):.2f}M with it, "
        f"{_millions(separable.macs - fc):.2f}M without), so the two rows are counted differently"
    )
    return PaperTable(
        "v1-table4",
        "V1 Table 4: depthwise separable vs full convolution MobileNet (alpha 1.0, 224)",
        "Howard et al. 2017, Table 4",
        _model_rows(V1_TABLE4, {("Conv MobileNet", "macs"): note}),
        "Conv MobileNet: every separable block replaced by a full 3x3 conv with the same output channels and stride.",
    )


def _table5() -> PaperTable:
    return PaperTable(
        "v1-table5",
        "V1 Table 5: narrow vs shallow MobileNet (224)",
        "Howard et al. 2017, Table 5",
        _model_rows(V1_TABLE5),
        "Shallow MobileNet: Table 1 without the five separable blocks at 14x14x512.",
    )


def _table6() -> PaperTable:
    return PaperTable(
        "v1-table6",
        "V1 Table 6: width multiplier (224)",
        "Howard et al. 2017, Table 6",
        _model_rows(V1_TABLE6),
        "Channels int(alpha * c), at least 8, as TF-slim's mobilenet_v1.py.",
    )


def _table8() -> PaperTable:
    vgg = count_costs("vgg16_224")
    convolutions = sum(row.macs for row in vgg.rows if row.op == "conv")
    note = (
        f"the 13 convolutions alone are {_millions(convolutions):,.1f}M (15.3 billion at the paper's three "
        f"significant figures) and the three FC layers add {_millions(vgg.macs - convolutions):.1f}M: the paper's "
        "15,300M counts the convolutions only, as its Table 4 leaves Conv MobileNet's FC out"
    )
    return PaperTable(
        "v1-table8",
        "V1 Table 8: MobileNet beside popular models (224)",
        "Howard et al. 2017, Table 8",
        _model_rows(V1_TABLE8, {("VGG 16", "macs"): note}),
        "VGG-16 (Simonyan and Zisserman 2014, configuration D) is built from the same spec -> layer list path; "
        "GoogleNet (69.8% top-1, 1550M, 6.8M) is not built here.",
    )


def _table9() -> PaperTable:
    return PaperTable(
        "v1-table9",
        "V1 Table 9: a smaller MobileNet beside popular models",
        "Howard et al. 2017, Table 9",
        _model_rows(V1_TABLE9),
        "SqueezeNet (57.5% top-1, 1700M, 1.25M) and AlexNet (57.2%, 720M, 60M) are not built here.",
    )


def _table7() -> PaperTable:
    note = (
        "the paper truncates this one (290.68 -> 290) while it rounds 568.74 -> 569; TF-slim's table prints 291 "
        "for the same model"
    )
    return PaperTable(
        "v1-table7",
        "V1 Table 7: resolution (alpha 1.0)",
        "Howard et al. 2017, Table 7",
        _model_rows(V1_TABLE7, {("1.0 MobileNet-160", "macs"): note}),
        "Parameters do not depend on the resolution.",
    )


def _v2_headline() -> PaperTable:
    v1 = count_costs("mobilenet_v1_1.0_224")
    v2 = count_costs("mobilenet_v2_1.0_224")
    v2_slim = count_costs("mobilenet_v2_1.0_224", num_classes=TF_SLIM_CLASSES)
    wide = count_costs("mobilenet_v2_1.4_224")
    notes = {
        ("MobileNetV1", "macs"): (
            f"the V1 paper (Tables 4, 6, 7) and TF-slim give 569M for the same network; ours {_millions(v1.macs):.2f}M"
        ),
        ("MobileNetV2", "macs"): (
            f"truncated: TF-slim's 300 is floor({_millions(v2_slim.macs):.2f}) at 1001 classes; every one of TF-slim's "
            "22 V2 checkpoints equals the floor of our count (table below)"
        ),
        ("MobileNetV2", "params"): (
            f"the paper truncates; TF-slim prints 3.47M = weights + FC bias at 1001 classes "
            f"(ours {_millions(v2_slim.params_with_bias):.4f}M)"
        ),
        ("MobileNetV2 (1.4)", "macs"): (
            f"TF-slim's released 1.4 checkpoint lists 582M, which ours ({_millions(wide.macs):.2f}M) matches; "
            "the paper's 585M does not"
        ),
        ("MobileNetV2 (1.4)", "params"): (
            f"TF-slim's released 1.4 checkpoint lists 6.06M (ours {_millions(wide.params):.3f}M, "
            f"{_millions(wide.params_with_bias):.3f}M with the FC bias); no count of this architecture gives 6.9M"
        ),
    }
    rows = list(_model_rows(V2_TABLE4, notes))
    rows.append(
        Comparison(
            "torchvision mobilenet_v2",
            "trainable parameters",
            TORCHVISION_V2_PARAMS,
            v2.trainable_params,
            "weights + biases + BatchNorm scale and shift: sum(p.numel()) of the model",
        )
    )
    return PaperTable(
        "v2-table4",
        "V2 headline figures (Table 4: MobileNetV1, MobileNetV2, MobileNetV2 1.4, all at 224)",
        "Sandler et al. 2018, Table 4; torchvision MobileNet_V2_Weights meta",
        tuple(rows),
    )


def _tf_slim_v1() -> PaperTable:
    rows = []
    for name, (macs, params) in TF_SLIM_V1.items():
        table = count_costs(name, num_classes=TF_SLIM_CLASSES)
        macs_note = ""
        if name.startswith("mobilenet_v1_0.75_"):
            macs_note = (
                "TF-slim's 0.75 rows are 2.6% below our count at every resolution; the V1 paper's Tables 5 and 6 "
                "give 325M at 224, as ours does; parameters of the same rows agree"
            )
        elif name == "mobilenet_v1_0.5_224":
            macs_note = (
                f"ours {_millions(table.macs):.4f}M is a hair under the rounding point; the V1 paper's Table 6 prints "
                "149M for the same network"
            )
        elif name == "mobilenet_v1_0.25_192":
            macs_note = "out of line with TF-slim's own 0.25 row: 41M x (192/224)^2 = 30.1M"
        # TF-slim's figure fits every variable of the checkpoint except a BN scale: weights, FC bias and per BN
        # channel beta, moving mean and moving variance (3 per channel; bn_params counts 2 per channel).
        checkpoint = table.params_with_bias + 3 * table.bn_params // 2
        params_note = (
            f"TF-slim counts BN variables too: adding beta, moving mean and moving variance per channel gives "
            f"{_millions(checkpoint):.4f}M"
        )
        rows.append(Comparison(name, "MACs (M)", macs, _millions(table.macs), macs_note))
        rows.append(Comparison(name, "Parameters (M)", params, _millions(table.params_with_bias), params_note))
    return PaperTable(
        "tf-slim-v1",
        "TF-slim V1 checkpoints (1001 classes)",
        "tensorflow/models research/slim/nets/mobilenet_v1.md",
        tuple(rows),
        "Ours: multiply-adds and weights + FC bias at 1001 classes (TF-slim's checkpoints have a background class).",
    )


def _tf_slim_v2() -> PaperTable:
    rows = []
    for name, (macs, params) in TF_SLIM_V2.items():
        table = count_costs(name, num_classes=TF_SLIM_CLASSES)
        rows.append(Comparison(name, "MACs (M)", macs, _millions(table.macs)))
        rows.append(Comparison(name, "Parameters (M)", params, _millions(table.params_with_bias)))
    return PaperTable(
        "tf-slim-v2",
        "TF-slim V2 checkpoints (1001 classes)",
        "tensorflow/models research/slim/nets/mobilenet/README.md",
        tuple(rows),
        "TF-slim prints MACs truncated to whole millions ('match (truncated)'); parameters are weights + FC bias.",
    )


def reproduce() -> tuple[PaperTable, ...]:
    """Every published table beside our count: V1 Tables 1-9, V2 Table 2 and its headline figures (Table 4),
    TF-slim's checkpoint tables."""
    v1 = count_costs("mobilenet_v1_1.0_224")
    return (
        _table1(),
        _table2(v1),
        _table3(),
        _table4(),
        _table5(),
        _table6(),
        _table7(),
        _table8(),
        _table9(),
        _v2_table2(),
        _v2_headline(),
        _tf_slim_v1(),
        _tf_slim_v2(),
    )


def tables_to_dict(tables: tuple[PaperTable, ...]) -> dict[str, Any]:
    return {"convention": MAC_CONVENTION, "tables": [table.to_dict() for table in tables]}


def tables_to_json(tables: tuple[PaperTable, ...]) -> str:
    return json.dumps(tables_to_dict(tables), indent=2, ensure_ascii=False)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def tables_to_markdown(tables: tuple[PaperTable, ...]) -> str:
    """The reproduction as GitHub markdown: one section per table."""
    lines = [f"_{MAC_CONVENTION}._", ""]
    for table in tables:
        lines += [f"### {table.title}", "", f"Source: {table.source}. {table.note}".rstrip(), ""]
        lines += [
            "| item | quantity | published | ours | difference | status | note |",
            "|---|---|--:|--:|--:|---|---|",
        ]
        for row in table.rows:
            lines.append(
                f"| {_cell(row.item)} | {row.quantity} | {_cell(row.format_published())} | "
                f"{_cell(row.format_ours())} | {row.format_difference()} | {row.status} | {_cell(row.note)} |"
            )
        lines += ["", f"{table.matches} of {len(table.rows)} figures match.", ""]
    return "\n".join(lines)
