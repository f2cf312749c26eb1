"""PNG plots: training curves, the confusion matrix, and the demo's Table-4-in-miniature chart.

matplotlib runs with the non-interactive Agg backend (no display needed), and every file is written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mobilenet.io import atomic_path

__all__ = ["plot_comparison", "plot_confusion", "plot_training_curves"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return target


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
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike[str], *, title: str = ""
) -> Path:
    """Row-normalised confusion matrix (each row: where the images of one true class went), with counts."""
    import numpy as np

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
    fig.tight_layout()
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
    fig.tight_layout()
    return _save(fig, path)
