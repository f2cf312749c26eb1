"""``mobilenet demo``: the V1 paper's Table 4 in miniature, on real handwritten digits, in about a minute on a CPU.

Table 4 of the V1 paper compares MobileNet with "Conv MobileNet", the same network with every depthwise separable
block replaced by a full 3x3 convolution of the same output width and stride: 71.7% vs 70.6% ImageNet top-1 for
4866M vs 569M multiply-adds and 29.3M vs 4.2M parameters, i.e. about 8.5x less computation for 1% accuracy.

The demo trains both twins briefly on scikit-learn's bundled digits (1,797 real 8x8 scans, upsampled to 32x32; no
download) with the library's own training loop, then prints multiply-adds and parameters (from the analytic cost
model, :mod:`mobilenet.cost`), measured CPU latency and validation accuracy side by side, and saves a plot.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from mobilenet.checkpoint import load
from mobilenet.cost import count_costs
from mobilenet.errors import INSTALL_HINTS, MobileNetError
from mobilenet.io import check_output_dir
from mobilenet.plots import plot_comparison
from mobilenet.train import TrainConfig, train

__all__ = ["DemoConfig", "run_demo"]

SEPARABLE = "mobilenet_v1_0.25_224"
CONV_TWIN = "mobilenet_v1_conv_0.25_224"


@dataclass
class DemoConfig:
    #: ./runs/demo: beside the user's other runs, never inside the package.
    out: str = "runs/demo"
    #: 12 epochs of 22 steps: the separable model is still catching up at 8 (about 92%), and both together take
    #: about a minute and a half on 2 cores.
    epochs: int = 12
    batch_size: int = 64
    #: alpha 0.25 at 32x32 with the ImageNet strides: the twins differ 7.5x in multiply-adds (Table 4: 8.6x) and
    #: each trains in well under a minute on a CPU.
    alpha: float = 0.25
    resolution: int = 32
    seed: int = 0
    #: Forward passes timed per model (interleaved, median reported).
    latency_runs: int = 20
    latency_batch: int = 32
    #: One torch thread: the small models gain little from two, and one is immune to other jobs on the same cores.
    threads: int = 1


def _latency_ms(models: dict[str, Any], batch: int, resolution: int, runs: int) -> dict[str, float]:
    """Median forward time of each model, measured interleaved so that load from other processes hits both."""
    x = torch.randn(batch, 3, resolution, resolution)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model.eval()
            for _ in range(3):  # warm-up: allocator, kernel selection
                model(x)
        for _ in range(runs):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def run_demo(config: DemoConfig | None = None, *, progress: bool = True, log: Any = print) -> list[dict[str, Any]]:
    """Train the separable MobileNet and its standard-conv twin on digits; return one result row per model."""
    config = config or DemoConfig()
    check_output_dir(config.out, "--out")
    say = log if log is not None else (lambda _message: None)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise MobileNetError(
            f"the demo uses scikit-learn's bundled digits dataset; install it with: {INSTALL_HINTS['demo']}"
        ) from None
    out = Path(config.out)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    models: dict[str, Any] = {}
    for label, name in (("separable", SEPARABLE), ("standard conv", CONV_TWIN)):
        run_dir = out / label.replace(" ", "_")
        if (run_dir / "train_state.safetensors").exists():
            shutil.rmtree(run_dir)  # the demo's own previous run: start fresh so timings and accuracy are comparable
        say(f"\n[{label}] training {name} (alpha {config.alpha}, {config.resolution}x{config.resolution}) on digits")
        result = train(
            TrainConfig(
                model=name,
                data="digits",
                out=str(run_dir),
                epochs=config.epochs,
                batch_size=config.batch_size,
                alpha=config.alpha,
                resolution=config.resolution,
                small_input=False,
                num_workers=0,
                seed=config.seed,
                device="cpu",
                hflip=False,  # a mirrored 2, 3 or 7 is not a digit
                threads=config.threads,
            ),
            progress=progress,
            log=None,
        )
        model = load(result.last_checkpoint)
        models[label] = model
        cost = count_costs(model.network)
        results[label] = {
            "label": label,
            "model": name,
            "macs": cost.macs,
            "params": cost.params,
            "accuracy": result.history[-1]["val_top1"],
            "train_seconds": sum(row["epoch_seconds"] for row in result.history),
            "checkpoint": str(result.last_checkpoint),
        }
        say(f"[{label}] validation top-1 {results[label]['accuracy']:.2%} after {config.epochs} epochs")
    latency = _latency_ms(models, config.latency_batch, config.resolution, config.latency_runs)
    rows = []
    for label, row in results.items():
        row["latency_ms"] = latency[label]
        rows.append(row)
    if log is not None:
        _print_table(rows, config)
    plot = plot_comparison(
        rows,
        out / "table4_digits.png",
        title=(
            f"V1 Table 4 in miniature: separable vs standard conv (alpha {config.alpha}, {config.resolution}px digits)"
        ),
    )
    say(f"\nplot: {plot}")
    say(f"demo took {time.perf_counter() - started:.0f} s")
    say(
        "\nnext:\n"
        "  mobilenet cost mobilenet_v1_1.0_224            # the layer-by-layer cost table (V1 paper Table 2)\n"
        "  mobilenet cost --paper                         # every cost figure of both papers, reproduced\n"
        "  mobilenet train --model mobilenet_v2_1.0_224 --data DIR --out runs/mine   # your own folder DIR/<class>/\n"
        f"  mobilenet eval {rows[0]['checkpoint']} --data digits   # per-class accuracy, confusion matrix"
    )
    return rows


def _print_table(rows: list[dict[str, Any]], config: DemoConfig) -> None:
    separable, conv = rows
    table = Table(title="V1 paper Table 4 in miniature (digits, CPU)")
    table.add_column("model")
    table.add_column("mult-adds", justify="right")
    table.add_column("parameters", justify="right")
    table.add_column(f"CPU latency (batch {config.latency_batch})", justify="right")
    table.add_column("val accuracy", justify="right")
    for row in rows:
        table.add_row(
            row["label"],
            f"{row['macs'] / 1e6:.2f}M",
            f"{row['params'] / 1e6:.3f}M",
            f"{row['latency_ms']:.1f} ms",
            f"{row['accuracy']:.2%}",
        )
    table.add_row(
        "ratio conv / separable",
        f"{conv['macs'] / separable['macs']:.1f}x",
        f"{conv['params'] / separable['params']:.1f}x",
        f"{conv['latency_ms'] / separable['latency_ms']:.1f}x",
        f"{100 * (conv['accuracy'] - separable['accuracy']):+.1f} pts",
        style="bold",
    )
    table.caption = (
        f"{separable['model']} vs {conv['model']} at {config.resolution} px; paper (ImageNet, alpha 1, 224 px): "
        "4866M vs 569M mult-adds (8.6x), 29.3M vs 4.2M params, 71.7% vs 70.6%"
    )
    Console().print(table)
