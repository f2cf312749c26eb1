"""PNG plots: training curves, the confusion matrix, the demo's Table-4-in-miniature chart, and the speed
benchmarks (``mobilenet bench``, the scaling and separable-layer benchmarks).

matplotlib runs with the non-interactive Agg backend (no display needed), and every file is written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mobilenet.io import atomic_path

__all__ = [
    "plot_bench",
    "plot_comparison",
    "plot_confusion",
    "plot_latency_pareto",
    "plot_scaling",
    "plot_separable_layers",
    "plot_training_curves",
]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    _escape_surrogates(fig)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return target


def _escape_surrogates(fig: Any) -> None:
    """Escape lone surrogates in every text of ``fig`` (``\\udcff``): a file or folder name that is not valid UTF-8
    reaches Python as such characters (a data folder in eval's title), and matplotlib's font code refuses them with
    a TypeError when the figure is drawn, after the whole evaluation."""
    from matplotlib.text import Text

    for text in fig.findobj(Text):
        content = text.get_text()
        if isinstance(content, str) and any("\ud800" <= char <= "\udfff" for char in content):
            text.set_text(content.encode("utf-8", "backslashreplace").decode("utf-8"))


def _tight_layout(fig: Any) -> None:
    """``fig.tight_layout()``, which draws the texts: their surrogates are escaped first."""
    _escape_surrogates(fig)
    fig.tight_layout()


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Loss (train, validation) and top-1 accuracy (train, validation) per epoch, side by side."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], "s-", label="validation")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * row["train_top1"] for row in history], "o-", label="train top-1")
    ax_acc.plot(epochs, [100 * row["val_top1"] for row in history], "s-", label="validation top-1")
    ax_acc.plot(epochs, [100 * row["val_top5"] for row in history], "^--", label="validation top-5", alpha=0.6)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_ylim(0, 100)
    ax_acc.set_title("accuracy")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(loc="lower right")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    _tight_layout(fig)
    return _save(fig, path)


def plot_confusion(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike[str], *, title: str = ""
) -> Path:
    """Row-normalised confusion matrix (each row: where the images of one true class went), with counts."""
    plt = _pyplot()
    matrix = np.asarray(confusion, dtype=float)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    n = len(classes)
    side = max(4.0, min(16.0, 0.55 * n + 2))
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ticks = range(n)
    ax.set_xticks(ticks, labels=list(classes), rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(ticks, labels=list(classes))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{int(matrix[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if normalised[i, j] > 0.5 else "black",
                    )
    ax.set_title(title or "confusion matrix")
    _tight_layout(fig)
    return _save(fig, path)


def plot_comparison(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, title: str = "") -> Path:
    """The demo's chart: for each model, multiply-adds, parameters, CPU latency and accuracy as bars."""
    plt = _pyplot()
    metrics = [
        ("macs", "multiply-adds (millions)", 1e-6),
        ("params", "parameters (thousands)", 1e-3),
        ("latency_ms", "CPU latency (ms / batch)", 1.0),
        ("accuracy", "validation accuracy (%)", 100.0),
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6))
    names = [row["label"] for row in rows]
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"][: len(rows)]
    for ax, (key, label, scale) in zip(axes, metrics, strict=True):
        values = [row[key] * scale for row in rows]
        bars = ax.bar(range(len(rows)), values, color=colors)
        ax.set_xticks(range(len(rows)), labels=names, fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in values], fontsize=8, padding=2)
        ax.set_ylim(0, max(values) * 1.2 if max(values) > 0 else 1)
        if key == "accuracy":
            ax.set_ylim(0, 110)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    _tight_layout(fig)
    return _save(fig, path)


def plot_bench(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """``mobilenet bench``: one panel per (model, batch size), a horizontal bar of median latency per backend
    (p90 as the error bar) and a dashed line at the FLOP limit set by the measured float32 GEMM peak."""
    plt = _pyplot()
    groups = list(dict.fromkeys((r["model"], r["batch_size"]) for r in report["results"]))
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 0.5 + 0.45 * 8 * len(groups) / 2), squeeze=False)
    for ax, (model, batch) in zip(axes[:, 0], groups, strict=True):
        rows = sorted(
            (r for r in report["results"] if r["model"] == model and r["batch_size"] == batch),
            key=lambda r: -r["latency_ms"]["median"],
        )
        medians = [r["latency_ms"]["median"] for r in rows]
        errors = [r["latency_ms"]["p90"] - r["latency_ms"]["median"] for r in rows]
        bars = ax.barh(range(len(rows)), medians, xerr=[[0] * len(rows), errors], color="#1f77b4", alpha=0.85)
        ax.set_yticks(range(len(rows)), labels=[r["backend"] for r in rows], fontsize=8)
        ax.bar_label(
            bars,
            labels=[f"{m:.2f} ms, {r['gflops']:.0f} GFLOP/s" for m, r in zip(medians, rows, strict=True)],
            fontsize=7,
            padding=3,
        )
        limit = rows[0]["flop_limit_ms"]
        ax.axvline(limit, color="#d62728", linestyle="--", label=f"FLOP limit {limit:.2f} ms")
        ax.set_xlim(0, max(medians) * 1.45)
        ax.set_xlabel("median latency per batch (ms)", fontsize=8)
        ax.set_title(
            f"{model}, batch {batch} ({rows[0]['macs_per_image'] / 1e6:.0f}M MACs/image, "
            f"GEMM peak {report['gemm_peak']['gflops']:.0f} GFLOP/s, {report['machine']['threads']} threads)",
            fontsize=9,
        )
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(axis="x", alpha=0.3)
    _tight_layout(fig)
    return _save(fig, path)


def plot_scaling(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """The scaling benchmark: latency against analytic multiply-adds (log-log), one marker per (alpha,
    resolution), one series per backend, with the FLOP-limit line of the measured GEMM peak."""
    plt = _pyplot()
    fig, (ax, ax_rate) = plt.subplots(1, 2, figsize=(11, 4.2))
    backends = list(dict.fromkeys(r["backend"] for r in result["rows"]))
    for backend in backends:
        rows = [r for r in result["rows"] if r["backend"] == backend]
        macs = [r["macs"] / 1e6 for r in rows]
        ax.scatter(macs, [r["latency_ms"] for r in rows], label=backend, s=18)
        ax_rate.scatter(macs, [r["gflops"] for r in rows], label=backend, s=18)
    all_macs = sorted({r["macs"] for r in result["rows"]})
    peak = result["gemm_peak_gflops"]
    batch = result["batch_size"]
    ax.plot(
        [m / 1e6 for m in all_macs],
        [2 * m * batch / (peak * 1e9) * 1e3 for m in all_macs],
        "k--",
        lw=1,
        label=f"FLOP limit ({peak:.0f} GFLOP/s)",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("multiply-adds per image (millions, cost model)")
    ax.set_ylabel(f"median latency, batch {batch} (ms)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax_rate.axhline(peak, color="k", linestyle="--", lw=1, label="float32 GEMM peak")
    ax_rate.set_xscale("log")
    ax_rate.set_xlabel("multiply-adds per image (millions)")
    ax_rate.set_ylabel("achieved GFLOP/s (2 * MACs / latency)")
    ax_rate.legend(fontsize=8)
    ax_rate.grid(alpha=0.3, which="both")
    fig.suptitle(f"{result['model']}: alpha x resolution, {result['threads']} threads", fontsize=10)
    _tight_layout(fig)
    return _save(fig, path)


def plot_separable_layers(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """The V1 paper's claim per Table 1 layer: measured speedup of depthwise separable over standard 3x3 conv
    against the theoretical 1 / (1/N + 1/9)."""
    plt = _pyplot()
    rows = result["rows"]
    labels = [f"{r['size']}x{r['size']}x{r['in_channels']}->{r['out_channels']}/s{r['stride']}" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["theoretical_speedup"] for r in rows], 0.4, label="theory 1/(1/N + 1/9)")
    ax.bar([x + 0.2 for x in xs], [r["measured_speedup"] for r in rows], 0.4, label="measured")
    ax.set_xticks(list(xs), labels=labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("speedup of separable over standard 3x3 conv")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"V1 Table 1 layers, batch {result['batch_size']}, {result['threads']} threads", fontsize=10)
    _tight_layout(fig)
    return _save(fig, path)


def plot_accuracy_vs_cost(
    points: Sequence[dict[str, Any]],
    series: Sequence[tuple[str, Sequence[str]]],
    path: str | os.PathLike[str],
    *,
    x: str = "macs",
    title: str = "",
) -> Path:
    """Top-1 accuracy against multiply-adds (``x="macs"``) or parameters (``x="params"``), log x axis, one
    labelled point per model, like the V1 paper's Figure 4 (ImageNet accuracy vs Mult-Adds) and Figure 5 (vs
    parameters). ``points``: dicts with ``key``, ``label``, ``macs``, ``params`` and ``top1`` (0-1); ``series``:
    (name, keys in order) drawn as connected lines (a width or resolution sweep). With no points the axes are
    drawn empty with a note, so a report of a set that has not finished a run yet still has its figure."""
    plt = _pyplot()
    if x not in ("macs", "params"):
        raise ValueError(f"x must be 'macs' or 'params', got {x!r}")
    fig, ax = plt.subplots(figsize=(8, 5.5))
    by_key = {point["key"]: point for point in points}
    for index, (name, keys) in enumerate(series):
        chosen = [by_key[key] for key in keys if key in by_key]
        if len(chosen) > 1:
            ax.plot(
                [p[x] / 1e6 for p in chosen],
                [100 * p["top1"] for p in chosen],
                "-",
                color=f"C{index + 1}",
                alpha=0.6,
                label=name,
            )
    for point in points:
        ax.plot(point[x] / 1e6, 100 * point["top1"], "o", color="C0", markersize=7)
    ax.set_xscale("log")
    ax.set_xlabel("multiply-adds (millions, log scale)" if x == "macs" else "parameters (millions, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    if points:
        values = [100 * p["top1"] for p in points]
        low, high = min(values), max(values)
        pad = max(2.0, 0.15 * (high - low))
        ax.set_ylim(max(0.0, low - pad), min(100.0, high + pad))
        xs = [p[x] / 1e6 for p in points]
        ax.set_xlim(min(xs) / 1.6, max(xs) * 2.2)
    else:
        ax.text(0.5, 0.5, "no model has finished training yet", ha="center", va="center", transform=ax.transAxes)
    if any(len([k for k in keys if k in by_key]) > 1 for _, keys in series):
        ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    _tight_layout(fig)
    label_points(ax, [(p[x] / 1e6, 100 * p["top1"], p["label"]) for p in points])
    return _save(fig, path)


#: Where a point's label may go, in points from the point: right above, right below, left above, left below, then
#: further out; the first place that overlaps no label placed before it is taken.
_LABEL_OFFSETS = ((6, 4), (6, -12), (-6, 4), (-6, -12), (6, 14), (6, -22), (-6, 14), (-6, -22))


def label_points(ax: Any, labelled: Sequence[tuple[float, float, str]]) -> None:
    """Annotate each (x, y, text) where its label overlaps no other (greedy, in order of x): points of a sweep
    often sit close together, and labels printed on top of each other cannot be read."""
    renderer = ax.figure.canvas.get_renderer()
    placed: list[Any] = []
    for x_value, y_value, text in sorted(labelled):
        annotation = None
        for dx, dy in _LABEL_OFFSETS:
            if annotation is not None:
                annotation.remove()
            annotation = ax.annotate(
                text,
                (x_value, y_value),
                textcoords="offset points",
                xytext=(dx, dy),
                ha="left" if dx > 0 else "right",
                fontsize=8,
            )
            box = annotation.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
        placed.append(annotation.get_window_extent(renderer))


def plot_macs_by_operator(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Where each model's multiply-adds go by operator type (the V1 paper's Table 2: Conv 1x1, Conv DW 3x3,
    Conv 3x3, Fully Connected): per model, the shares as a 100% stacked bar (left) and the total (right, log
    scale). ``rows``: dicts with ``label``, ``macs`` and ``by_op`` (:meth:`mobilenet.cost.CostTable.by_op` as
    dicts: ``type``, ``macs``)."""
    plt = _pyplot()
    types: list[str] = []
    for row in rows:
        for share in row["by_op"]:
            if share["type"] not in types:
                types.append(share["type"])
    order = ["Conv 1x1", "Conv DW 3x3", "Conv 3x3", "Fully Connected"]
    types.sort(key=lambda t: (order.index(t) if t in order else len(order), t))
    height = max(3.0, 0.45 * len(rows) + 1.5)
    fig, (ax_share, ax_total) = plt.subplots(
        1, 2, figsize=(12, height), gridspec_kw={"width_ratios": [3, 1.4]}, sharey=True
    )
    labels = [row["label"] for row in rows]
    positions = range(len(rows))
    left = [0.0] * len(rows)
    for index, kind in enumerate(types):
        shares = []
        for row in rows:
            macs = next((s["macs"] for s in row["by_op"] if s["type"] == kind), 0)
            shares.append(100 * macs / row["macs"] if row["macs"] else 0.0)
        bars = ax_share.barh(positions, shares, left=left, color=f"C{index}", label=kind)
        ax_share.bar_label(
            bars, labels=[f"{v:.0f}%" if v >= 6 else "" for v in shares], label_type="center", fontsize=7
        )
        left = [a + b for a, b in zip(left, shares, strict=True)]
    ax_share.set_yticks(list(positions), labels=labels, fontsize=8)
    ax_share.set_xlim(0, 100)
    ax_share.set_xlabel("share of multiply-adds (%)")
    ax_share.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(types), fontsize=8, frameon=False)
    totals = [row["macs"] / 1e6 for row in rows]
    bars = ax_total.barh(positions, totals, color="0.55")
    ax_total.bar_label(bars, labels=[f"{v:,.1f}M" for v in totals], fontsize=7, padding=2)
    ax_total.set_xscale("log")
    ax_total.set_xlim(min(totals) / 1.5 if totals else 1, max(totals) * 6 if totals else 10)
    ax_total.set_xlabel("multiply-adds (millions, log)")
    ax_share.invert_yaxis()
    if title:
        fig.suptitle(title, fontsize=10)
    _tight_layout(fig)
    return _save(fig, path)


def plot_rank_sweep(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Top-1 against the whole model's parameters for classifiers factored at several ranks (``rows``: the
    ``to_dict()`` of :class:`mobilenet.compress.CompressionReport` with a ``rank``), right after the truncated SVD
    and after the short fine-tune, with the unfactored model as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ordered = sorted(rows, key=lambda row: row["params_after"])
    params = [row["params_after"] / 1e6 for row in ordered]
    for key, label, style in (("factored", "truncated SVD", "o-"), ("fine_tuned", "after the short fine-tune", "s--")):
        values = [100 * row["top1"][key] for row in ordered if key in row["top1"]]
        if len(values) == len(ordered):
            ax.plot(params, values, style, label=label)
    if ordered and "original" in ordered[0]["top1"]:
        ax.axhline(100 * ordered[0]["top1"]["original"], color="grey", linestyle=":", label="unfactored classifier")
    for row, x in zip(ordered, params, strict=True):
        ax.annotate(
            f"r={row['rank']}",
            (x, 100 * row["top1"].get("factored", 0.0)),
            textcoords="offset points",
            xytext=(4, -12),
            fontsize=8,
        )
    ax.set_xlabel("parameters (M, conv + FC weights)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title or "factored classifier: accuracy vs parameters")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_latency_pareto(
    points: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    budget_ms: float | None = None,
    pick: str | None = None,
    title: str = "",
) -> Path:
    """``mobilenet select``: published top-1 (%) against measured median latency (ms, log axis), one point per
    model labelled with its name and multiply-adds, the Pareto front as a step line, the budget as a dashed line and
    the pick circled. ``points``: dicts with ``model``, ``top1`` (%), ``latency_ms``, ``macs`` and ``pareto``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for family, color in (("v1", "C0"), ("v2", "C1")):
        chosen = [p for p in points if p["model"].startswith(f"mobilenet_{family}_")]
        if chosen:
            ax.plot(
                [p["latency_ms"] for p in chosen],
                [p["top1"] for p in chosen],
                "o",
                color=color,
                label=f"MobileNet {family.upper()}",
            )
    front = sorted((p for p in points if p.get("pareto")), key=lambda p: p["latency_ms"])
    if len(front) > 1:
        ax.step(
            [p["latency_ms"] for p in front],
            [p["top1"] for p in front],
            where="post",
            color="0.4",
            alpha=0.7,
            label="Pareto front",
        )
    if budget_ms is not None:
        ax.axvline(budget_ms, color="#d62728", linestyle="--", label=f"budget {budget_ms:g} ms")
    for p in points:
        if p["model"] == pick:
            ax.plot(
                p["latency_ms"],
                p["top1"],
                "o",
                markersize=14,
                markerfacecolor="none",
                color="#2ca02c",
                label=f"pick: {pick}",
            )
    ax.set_xscale("log")
    from matplotlib.ticker import ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())  # "10", not "10^1": latencies read as milliseconds
    ax.set_xlabel("median latency per batch, measured here (ms, log scale)")
    ax.set_ylabel("published ImageNet top-1 (%)")
    ax.grid(alpha=0.3, which="both")
    if points:
        latencies = [p["latency_ms"] for p in points] + ([budget_ms] if budget_ms else [])
        ax.set_xlim(min(latencies) / 1.5, max(latencies) * 2.5)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    _tight_layout(fig)
    label = [
        (p["latency_ms"], p["top1"], f"{p['model'].removeprefix('mobilenet_')} {p['macs'] / 1e6:.0f}M MACs")
        for p in points
    ]
    label_points(ax, label)
    return _save(fig, path)
