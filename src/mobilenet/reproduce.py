"""The MobileNet papers' controlled comparisons, re-run on CIFAR-10: one resumable experiment with its pictures.

The V1 paper (Howard et al. 2017, arXiv 1704.04861) argues with controlled ImageNet comparisons; the V2 paper
(Sandler et al. 2018, arXiv 1801.04381) adds V2 against V1. This module re-runs them on CIFAR-10 (32x32 images,
``small_input`` networks of total stride 8) with one fixed training recipe per budget:

- ``table4``: V1 Table 4, depthwise separable vs full convolution (MobileNet vs Conv MobileNet);
- ``table5``: V1 Table 5, narrow vs shallow at about equal cost (0.75 MobileNet vs Shallow MobileNet);
- ``table6``: V1 Table 6, the width multiplier alpha = 1, 0.75, 0.5, 0.25;
- ``table7``: V1 Table 7, the resolution multiplier rho: the paper's 224/192/160/128 px become CIFAR images
  resized to 32/28/24/20 px (rho = 1, 0.875, 0.75, 0.625);
- ``v1-vs-v2``: V2 Table 4, MobileNetV2 1.0 and MobileNetV2 at the width whose multiply-adds match V1 1.0's
  (found with the cost model: :func:`matched_v2_alpha`), against V1 1.0.

Every model is its own resumable :func:`mobilenet.train.train` run under ``OUT/<run>/``; a model shared between
experiments (V1 1.0 at 32 px is in four) is trained once, a finished run (``OUT/<run>/result.json``) is never
retrained, and an interrupted one resumes from its checkpoint. After each finished run the report is rewritten
(``results.md``, ``results.json`` and three plots), so partial results are always on disk.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mobilenet.cost import MAC_CONVENTION, CostTable, count_costs
from mobilenet.errors import MobileNetError
from mobilenet.io import atomic_write_text
from mobilenet.paper import V1_TABLE2, V1_TABLE4, V1_TABLE5, V1_TABLE6, V1_TABLE7, V2_TABLE4

__all__ = [
    "BUDGETS",
    "EXPERIMENT_NAMES",
    "Budget",
    "Experiment",
    "PaperRow",
    "ReproduceConfig",
    "ReproduceResult",
    "Row",
    "RunSpec",
    "experiments",
    "matched_v2_alpha",
    "plan_runs",
    "resolve_budget",
    "run_reproduce",
    "select_experiments",
    "write_report",
]

#: CIFAR-10's classes; the cost of the classifier (a few thousand MACs) is counted at this size.
CIFAR_CLASSES = 10
#: The base input side (CIFAR-10's own); every model is built with ``small_input`` (total stride 8, not 32).
BASE_RESOLUTION = 32
#: The resolution multiplier on CIFAR (V1 Table 7's 224, 192, 160, 128 px): multiples of 4, because with stride-2
#: convolutions an odd side rounds up and saves no multiply-adds (27 px costs 139M MACs, 28 px 140M).
CIFAR_RESOLUTIONS = (32, 28, 24, 20)
#: A difference in top-1 smaller than this (percentage points) is called a tie: one seed of a short run moves by
#: about a point (and the 10,000-image test set alone has a standard error of about 0.5 points).
NOISE_POINTS = 1.0
#: The experiments, in the order their runs are trained when all are asked for: the most informative first.
EXPERIMENT_NAMES = ("table4", "v1-vs-v2", "table6", "table5", "table7")
RESULT_FILE = "result.json"
BUDGET_FILE = "budget.json"

#: ImageNet top-1 (%) that the papers publish for each row (V1 Tables 4-7, V2 Table 4); the multiply-adds and
#: parameters of the same rows come from :mod:`mobilenet.paper`.
PAPER_TOP1: dict[str, float] = {
    "Conv MobileNet": 71.7,
    "MobileNet": 70.6,
    "0.75 MobileNet": 68.4,
    "Shallow MobileNet": 65.3,
    "1.0 MobileNet-224": 70.6,
    "0.75 MobileNet-224": 68.4,
    "0.5 MobileNet-224": 63.7,
    "0.25 MobileNet-224": 50.6,
    "1.0 MobileNet-192": 69.1,
    "1.0 MobileNet-160": 67.2,
    "1.0 MobileNet-128": 64.4,
    "MobileNetV1": 70.6,
    "MobileNetV2": 72.0,
    "MobileNetV2 (1.4)": 74.7,
}


# --------------------------------------------------------------------------------------------------------------
# Experiments as data
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One model to train: a registered name with its width multiplier alpha and input side (``small_input``).

    ``key`` names its run directory; equal keys are the same run, whichever experiments list it.
    """

    key: str
    label: str
    model: str
    alpha: float
    resolution: int

    def options(self, num_classes: int = CIFAR_CLASSES) -> dict[str, Any]:
        return {"alpha": self.alpha, "resolution": self.resolution, "small_input": True, "num_classes": num_classes}

    def cost(self, num_classes: int = CIFAR_CLASSES) -> CostTable:
        """The analytic cost (:func:`mobilenet.cost.count_costs`) at this run's input size."""
        return count_costs(self.model, **self.options(num_classes))


@dataclass(frozen=True)
class PaperRow:
    """A row as the paper publishes it: ImageNet top-1 (%), million multiply-adds, million parameters."""

    label: str
    top1: float
    macs_m: float
    params_m: float


@dataclass(frozen=True)
class Row:
    run: RunSpec
    paper: PaperRow


@dataclass(frozen=True)
class Experiment:
    """One of the papers' controlled comparisons. ``rows[0]`` is the reference the other rows are compared with
    (the paper's direction: sign of the top-1 difference, ratio of multiply-adds); ``claim`` is the paper's
    conclusion, ``caveat`` the likely reasons CIFAR-10 may disagree."""

    name: str
    title: str
    source: str
    rows: tuple[Row, ...]
    claim: str
    caveat: str
    #: Draw the rows as one connected series in the accuracy-vs-cost plots (a width or resolution sweep).
    series: bool = False


def alpha_text(alpha: float) -> str:
    """A width multiplier as the papers write it: 1.0, 0.75, 1.45."""
    text = f"{alpha:g}"
    return text if "." in text else f"{text}.0"


def _paper_rows(table: tuple[tuple[str, str, float, float], ...]) -> dict[str, PaperRow]:
    return {label: PaperRow(label, PAPER_TOP1[label], macs, params) for label, _name, macs, params in table}


def matched_v2_alpha(
    target_macs: int, *, resolution: int = BASE_RESOLUTION, num_classes: int = CIFAR_CLASSES, step: float = 0.05
) -> float:
    """The V2 width multiplier (a multiple of ``step`` in [0.35, 2]) whose multiply-adds at ``resolution`` with
    ``small_input`` come closest to ``target_macs``: the V2 paper's "V2 at V1's cost" (its Table 4 pairs V1 1.0,
    575M, with V2 1.4, 585M). Computed with the cost model, never by hand."""
    best: tuple[int, float] | None = None
    for i in range(round(0.35 / step), round(2.0 / step) + 1):
        alpha = round(i * step, 4)
        macs = count_costs(
            "mobilenet_v2_1.0_224", alpha=alpha, resolution=resolution, small_input=True, num_classes=num_classes
        ).macs
        if best is None or abs(macs - target_macs) < best[0]:
            best = (abs(macs - target_macs), alpha)
    assert best is not None
    return best[1]


_EXPERIMENTS: dict[str, Experiment] | None = None


def experiments() -> dict[str, Experiment]:
    """Every experiment by name, in :data:`EXPERIMENT_NAMES` order (built once: the V2 width needs the cost
    model)."""
    global _EXPERIMENTS
    if _EXPERIMENTS is not None:
        return _EXPERIMENTS

    def v1(alpha: float, resolution: int = BASE_RESOLUTION) -> RunSpec:
        return RunSpec(
            f"v1_{alpha_text(alpha)}_{resolution}px",
            f"MobileNet {alpha_text(alpha)} @{resolution}px",
            "mobilenet_v1_1.0_224",
            alpha,
            resolution,
        )

    v1_base = v1(1.0)
    conv = RunSpec("v1_conv_1.0_32px", "Conv MobileNet 1.0 @32px", "mobilenet_v1_conv_1.0_224", 1.0, 32)
    shallow = RunSpec("v1_shallow_1.0_32px", "Shallow MobileNet 1.0 @32px", "mobilenet_v1_shallow_1.0_224", 1.0, 32)
    v2 = RunSpec("v2_1.0_32px", "MobileNetV2 1.0 @32px", "mobilenet_v2_1.0_224", 1.0, 32)
    alpha = matched_v2_alpha(v1_base.cost().macs)
    v2_matched = RunSpec(
        f"v2_{alpha_text(alpha)}_32px", f"MobileNetV2 {alpha_text(alpha)} @32px", "mobilenet_v2_1.0_224", alpha, 32
    )

    t4, t5, t6, t7, v2t = (_paper_rows(t) for t in (V1_TABLE4, V1_TABLE5, V1_TABLE6, V1_TABLE7, V2_TABLE4))
    found = [
        Experiment(
            "table4",
            "Depthwise separable vs full convolutions",
            "V1 paper Table 4",
            (Row(v1_base, t4["MobileNet"]), Row(conv, t4["Conv MobileNet"])),
            "full convolutions buy about 1 point of top-1 for 8.6x the multiply-adds and 7x the parameters",
            "CIFAR-10 is small, so the 28M-parameter Conv MobileNet may overfit where ImageNet rewards it",
        ),
        Experiment(
            "v1-vs-v2",
            "MobileNetV2 vs MobileNetV1",
            "V2 paper Table 4",
            (
                Row(v1_base, v2t["MobileNetV1"]),
                Row(v2, v2t["MobileNetV2"]),
                Row(v2_matched, v2t["MobileNetV2 (1.4)"]),
            ),
            "V2 1.0 beats V1 with about half the multiply-adds; V2 at V1's cost (1.4) is clearly better",
            "V2 is deeper (53 layers vs 28) with residual bottlenecks, which can need more steps to "
            "converge; and with small_input its feature maps are larger relative to V1's than at 224 px",
        ),
        Experiment(
            "table6",
            "Width multiplier alpha",
            "V1 paper Table 6",
            tuple(
                Row(v1(a), t6[f"{label} MobileNet-224"])
                for a, label in ((1.0, "1.0"), (0.75, "0.75"), (0.5, "0.5"), (0.25, "0.25"))
            ),
            "accuracy drops off smoothly as alpha shrinks, steeply only at 0.25",
            "10 classes need less capacity than 1000, so narrow networks lose less than on ImageNet",
            series=True,
        ),
        Experiment(
            "table5",
            "Narrow vs shallow at equal cost",
            "V1 paper Table 5",
            (Row(v1(0.75), t5["0.75 MobileNet"]), Row(shallow, t5["Shallow MobileNet"])),
            "making MobileNet thinner is 3 points better than making it shallower at about the same cost",
            "a shallower network trains faster per step, and on 32x32 inputs the removed 512-wide blocks "
            "run on 4x4 maps instead of 14x14",
        ),
        Experiment(
            "table7",
            "Resolution multiplier rho",
            "V1 paper Table 7",
            tuple(
                Row(v1(1.0, r), t7[f"1.0 MobileNet-{paper}"])
                for r, paper in zip(CIFAR_RESOLUTIONS, (224, 192, 160, 128), strict=True)
            ),
            "accuracy drops off smoothly with resolution",
            "32x32 CIFAR images carry little detail to lose, and resizing them down blurs a 3x3 filter's "
            "whole receptive field, unlike 224 -> 128 px",
            series=True,
        ),
    ]
    _EXPERIMENTS = {experiment.name: experiment for experiment in found}
    return _EXPERIMENTS


def select_experiments(names: Sequence[str | Experiment] | str | None = None) -> list[Experiment]:
    """Experiments by name (``"table4,table6"`` or a list; None: all, in :data:`EXPERIMENT_NAMES` order);
    :class:`Experiment` objects pass through. An unknown name raises :class:`MobileNetError`."""
    if names is None:
        names = EXPERIMENT_NAMES
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    if not names:
        raise MobileNetError(f"no experiment given; choose from {', '.join(EXPERIMENT_NAMES)}")
    known = experiments() if any(isinstance(name, str) for name in names) else {}
    chosen: list[Experiment] = []
    for name in names:
        if isinstance(name, Experiment):
            experiment = name
        elif name in known:
            experiment = known[name]
        else:
            raise MobileNetError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENT_NAMES)}")
        if experiment not in chosen:
            chosen.append(experiment)
    return chosen


def plan_runs(chosen: Sequence[Experiment]) -> list[RunSpec]:
    """The distinct runs of the experiments in first-appearance order: a model shared by several experiments
    (same ``key``) is trained once. Two different models under one key are a mistake in the experiment data."""
    runs: dict[str, RunSpec] = {}
    for experiment in chosen:
        for row in experiment.rows:
            seen = runs.setdefault(row.run.key, row.run)
            if seen != row.run:
                raise MobileNetError(f"run key {row.run.key!r} names two different models: {seen} and {row.run}")
    return list(runs.values())


# --------------------------------------------------------------------------------------------------------------
# Budgets: one fixed recipe each
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """One training recipe for every model of the set (same epochs, schedule, augmentation, seed): the recipe is
    never tuned per model. ``batches_per_epoch`` caps an epoch (None: the whole training set)."""

    name: str
    epochs: int
    batches_per_epoch: int | None
    batch_size: int = 128
    recipe: str = "modern"
    device: str = "auto"
    threads: int | None = None
    ema_decay: float = 0.0
    seed: int = 0
    #: Forward passes timed for the batch-1 CPU latency (median reported).
    latency_runs: int = 50
    #: What it was sized for, and how.
    sizing: str = ""

    def training_fields(self) -> dict[str, Any]:
        """What changes the trained weights: a finished run trained under other values is not reused."""
        return {
            key: value
            for key, value in asdict(self).items()
            if key not in ("name", "sizing", "latency_runs", "device", "threads")
        }

    def images_per_run(self, train_size: int) -> int:
        steps = train_size // self.batch_size
        if self.batches_per_epoch is not None:
            steps = min(steps, self.batches_per_epoch)
        return self.epochs * steps * self.batch_size


BUDGETS: dict[str, Budget] = {
    "quick": Budget(
        "quick",
        epochs=2,
        batches_per_epoch=70,
        device="cpu",
        threads=2,
        sizing=(
            "about 70 minutes for the 11 models on 2 idle CPU cores (65.5 of them training and evaluation, priced "
            "from each model's images/s measured with benchmarks/reproduce_speed.py; docs/reproduce.md)"
        ),
    ),
    "full": Budget(
        "full",
        epochs=60,
        batches_per_epoch=None,
        device="auto",
        sizing="for one GPU: 60 whole epochs of CIFAR-10 per model (not yet measured)",
    ),
}


def resolve_budget(budget: str | Budget) -> Budget:
    if isinstance(budget, Budget):
        return budget
    if budget not in BUDGETS:
        raise MobileNetError(f"unknown budget {budget!r}; choose from {', '.join(BUDGETS)}")
    return BUDGETS[budget]


# --------------------------------------------------------------------------------------------------------------
# Data: decoded once, resized once per resolution
# --------------------------------------------------------------------------------------------------------------


def _check_source(source: str) -> None:
    if source in ("digits", "cifar10", "cifar100"):
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise MobileNetError(
            f"data directory {source} does not exist; expected CIFAR-10 as an ImageFolder tree (train/ and test/) "
            "or 'cifar10'"
        )
    if not path.is_dir():
        raise MobileNetError(f"data path {source} is not a directory; expected an ImageFolder tree or 'cifar10'")


def _tensor_set(dataset: Any, size: int) -> Any:
    """Any dataset of (uint8 CHW image, label) as one in-memory uint8 tensor set at ``size`` x ``size`` (images of
    another size are resized, short side first, then center-cropped)."""
    import torch
    from torchvision.transforms.v2 import functional as F

    from mobilenet.data import TensorImageDataset

    if isinstance(dataset, TensorImageDataset) and tuple(dataset.images.shape[-2:]) == (size, size):
        return dataset
    images, labels = [], []
    for index in range(len(dataset)):
        image, label = dataset[index]
        if tuple(image.shape[-2:]) != (size, size):
            image = F.center_crop(F.resize(image, [size], antialias=True), [size, size])
        images.append(image)
        labels.append(label)
    return TensorImageDataset(torch.stack(images), torch.tensor(labels), dataset.classes)


def _resized(dataset: Any, size: int) -> Any:
    """The same images resized (bilinear, antialiased, as :func:`mobilenet.data.build_eval_transform` does) to
    ``size``: the resolution multiplier applied once to the whole set instead of per image and epoch."""
    import torch

    from mobilenet.data import TensorImageDataset

    x = dataset.images.float()
    chunks = [
        torch.nn.functional.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        for part in x.split(4096)
    ]
    images = torch.cat(chunks).round().clamp(0, 255).to(torch.uint8)
    return TensorImageDataset(images, dataset.labels, dataset.classes)


class _Data:
    """The data source loaded once; a bundle per input side, made on first use."""

    def __init__(self, source: str, seed: int) -> None:
        from mobilenet.data import load_data

        self.source = source
        base = load_data(source, seed=seed, in_memory=True)
        self.base = replace(
            base,
            train=_tensor_set(base.train, BASE_RESOLUTION),
            val=_tensor_set(base.val, BASE_RESOLUTION),
            native_size=BASE_RESOLUTION,
        )
        if base.native_size is None:  # a folder: its own statistics (CIFAR-10's published ones come out the same)
            from mobilenet.data import channel_stats

            self.base.mean, self.base.std = channel_stats(self.base.train.images)
        self._by_size: dict[int, Any] = {BASE_RESOLUTION: self.base}

    @property
    def num_classes(self) -> int:
        return len(self.base.classes)

    def at(self, size: int) -> Any:
        if size not in self._by_size:
            self._by_size[size] = replace(
                self.base,
                name=f"{self.base.name} resized to {size}px",
                train=_resized(self.base.train, size),
                val=_resized(self.base.val, size),
                native_size=size,
            )
        return self._by_size[size]


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ReproduceConfig:
    """``data``: ``cifar10`` (or an ImageFolder directory with train/ and test/; ``digits`` for tests); ``out``: the
    directory of the runs and the report; ``experiments``: names or :class:`Experiment` objects (None: all);
    ``budget``: ``"quick"``, ``"full"`` or a :class:`Budget`."""

    data: str
    out: str
    experiments: Sequence[str | Experiment] | str | None = None
    budget: str | Budget = "quick"


@dataclass
class ReproduceResult:
    out: Path
    results: dict[str, Any]
    trained: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    interrupted: bool = False
    files: dict[str, Path] = field(default_factory=dict)


def measure_latency_ms(model: Any, resolution: int, runs: int = 50, warmup: int = 5) -> float:
    """Median wall time (ms) of one forward pass of a single ``resolution`` x ``resolution`` image on the CPU."""
    import torch

    model = model.to("cpu").eval()
    x = torch.randn(1, 3, resolution, resolution)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(max(1, runs)):
            start = time.perf_counter()
            model(x)
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def hardware() -> dict[str, Any]:
    """The machine the runs were trained and timed on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_budget_file(out: Path, budget: Budget) -> None:
    """A directory's runs all use one budget: refuse to mix (resuming a quick run with full's epochs would give a
    run trained under two schedules)."""
    stored = _read_json(out / BUDGET_FILE)
    if stored is not None and stored.get("training") != budget.training_fields():
        raise MobileNetError(
            f"{out} holds runs of budget {stored.get('name')!r} with other training settings; use another --out for "
            f"budget {budget.name!r}"
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out / BUDGET_FILE, json.dumps({"name": budget.name, "training": budget.training_fields()}, indent=2) + "\n"
    )


def _weight(spec: RunSpec) -> float:
    """Relative time of one training step, for the overall ETA: multiply-adds plus a per-image overhead (memory-bound
    depthwise layers, BatchNorm, the optimizer) worth about 20M MACs."""
    return (spec.cost().macs + 20e6) / 1e6


def _progress_display(enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def run_reproduce(
    config: ReproduceConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    report_only: bool = False,
) -> ReproduceResult:
    """Train every model of the chosen experiments that has not finished (resuming interrupted ones), measure each
    one's batch-1 CPU latency, and write the report (``results.md``, ``results.json``, the plots) into
    ``config.out``; the report is rewritten after each finished run. ``report_only``: write the report from the
    finished runs and train nothing. Returns early, with ``interrupted`` set, after a SIGINT/SIGTERM (the run in
    progress saved its state; call again to continue)."""
    from mobilenet.train import STATE_FILE, TrainConfig, train

    say = log if log is not None else (lambda _message: None)
    chosen = select_experiments(config.experiments)
    budget = resolve_budget(config.budget)
    _check_source(str(config.data))
    out = Path(config.out)
    runs = plan_runs(chosen)
    finished: dict[str, dict[str, Any]] = {}
    for spec in runs:
        stored = _read_json(out / spec.key / RESULT_FILE)
        if stored is not None and stored.get("budget", {}).get("training") == budget.training_fields():
            finished[spec.key] = stored
    todo = [spec for spec in runs if spec.key not in finished]
    result = ReproduceResult(out=out, results={}, reused=[spec.key for spec in runs if spec.key in finished])
    if report_only or not todo:
        result.pending = [spec.key for spec in todo]
        result.results, result.files = write_report(out, chosen, budget, finished)
        return result

    _check_budget_file(out, budget)
    say(
        f"reproduce: {len(runs)} models for {', '.join(e.name for e in chosen)}; {len(finished)} finished before, "
        f"{len(todo)} to train (budget {budget.name}: {budget.epochs} epochs"
        + (f" x {budget.batches_per_epoch} batches" if budget.batches_per_epoch else "")
        + f" of {budget.batch_size})"
    )
    data = _Data(str(config.data), budget.seed)
    say(f"data: {data.base.name}, {len(data.base.train)} training / {len(data.base.val)} {data.base.val_name} images")
    train_size = len(data.base.train)
    steps_per_run = budget.images_per_run(train_size) // budget.batch_size
    steps_per_epoch = steps_per_run // budget.epochs
    total_work = sum(_weight(spec) * steps_per_run for spec in runs)
    done_work = sum(_weight(spec) * steps_per_run for spec in runs if spec.key in finished)

    session_start, session_work = time.perf_counter(), 0.0
    with _progress_display(progress) as display:
        overall = display.add_task(f"all runs: {len(finished)}/{len(runs)} done", total=total_work, completed=done_work)
        current = display.add_task("", total=steps_per_run, visible=False)
        for spec in runs:
            if spec.key in finished:
                continue
            position = runs.index(spec) + 1
            run_dir = out / spec.key
            weight = _weight(spec)
            base_work = done_work

            def on_step(
                step: int,
                spec: RunSpec = spec,
                position: int = position,
                weight: float = weight,
                base: float = base_work,
            ) -> None:
                epoch = min(budget.epochs, max(0, step - 1) // max(1, steps_per_epoch) + 1)
                display.update(
                    current,
                    completed=step,
                    description=f"run {position}/{len(runs)} {spec.key}: epoch {epoch}/{budget.epochs}",
                )
                display.update(overall, completed=base + weight * step)

            display.reset(
                current, total=steps_per_run, visible=True, description=f"run {position}/{len(runs)} {spec.key}"
            )
            say(f"\n[{position}/{len(runs)}] {spec.label} ({spec.model}, alpha {spec.alpha:g}, {spec.resolution}px)")
            started = time.perf_counter()
            outcome = train(
                TrainConfig(
                    model=spec.model,
                    data=str(config.data),
                    out=str(run_dir),
                    epochs=budget.epochs,
                    batch_size=budget.batch_size,
                    recipe=budget.recipe,
                    ema_decay=budget.ema_decay,
                    device=budget.device,
                    seed=budget.seed,
                    num_workers=0,
                    alpha=spec.alpha,
                    resolution=spec.resolution,
                    small_input=True,
                    limit_train_batches=budget.batches_per_epoch,
                    hflip=str(config.data) != "digits",  # a mirrored 2 is not a digit
                    threads=budget.threads,
                    resume=(run_dir / STATE_FILE).exists(),
                ),
                progress=progress,
                log=log,
                on_step=on_step,
                data=data.at(spec.resolution),
            )
            if outcome.interrupted or outcome.last_checkpoint is None or not outcome.history:
                result.interrupted = True
                say(f"stopped during {spec.key}; its state is saved: run the same command again to continue")
                break
            finished[spec.key] = _finish_run(
                spec, outcome, budget, data.num_classes, train_size, time.perf_counter() - started
            )
            result.trained.append(spec.key)
            done_work += weight * steps_per_run
            display.update(overall, completed=done_work, description=f"all runs: {len(finished)}/{len(runs)} done")
            record = finished[spec.key]
            say(
                f"[{position}/{len(runs)}] {spec.key}: test top-1 {record['test_top1']:.2%}, "
                f"{record['macs'] / 1e6:.1f}M MACs, {record['params'] / 1e6:.2f}M params, "
                f"{record['latency_ms']:.2f} ms batch-1 CPU latency"
            )
            session_work += weight * steps_per_run
            left = (total_work - done_work) * (time.perf_counter() - session_start) / session_work
            say(
                f"set: {len(finished)}/{len(runs)} models, {done_work / total_work:.0%} of the estimated work done; "
                f"about {left / 60:.0f} min left at this session's speed"
            )
            write_report(out, chosen, budget, finished)
        display.update(current, visible=False)
    result.pending = [spec.key for spec in runs if spec.key not in finished]
    result.results, result.files = write_report(out, chosen, budget, finished)
    say(f"\nreport: {result.files['markdown']}")
    return result


def _finish_run(
    spec: RunSpec, outcome: Any, budget: Budget, num_classes: int, train_size: int, wall_seconds: float
) -> dict[str, Any]:
    """Measure the finished run's latency and write its ``result.json`` (the mark that it is finished)."""
    import torch

    from mobilenet.weights import load

    model = load(outcome.last_checkpoint)
    cost = count_costs(model.network)
    latency = measure_latency_ms(model, spec.resolution, budget.latency_runs)
    history = outcome.history
    record = {
        **_identity_and_cost(spec, cost, num_classes),
        # The last epoch's test top-1: picking the best epoch would select on the test set.
        "test_top1": history[-1]["val_top1"],
        "best_top1": outcome.best_top1,
        "epochs": len(history),
        "train_images": train_size,
        "images_seen": budget.images_per_run(train_size),
        "train_seconds": sum(row["epoch_seconds"] for row in history),
        "images_per_s": statistics.mean(row["images_per_s"] for row in history),
        "wall_seconds": wall_seconds,
        "latency_ms": latency,
        "latency_threads": torch.get_num_threads(),
        "budget": {"name": budget.name, "training": budget.training_fields()},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_text(Path(outcome.run_dir) / RESULT_FILE, json.dumps(record, indent=2) + "\n")
    return record


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------


def _direction(experiment: Experiment, row: Row, finished: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The paper's direction for ``row`` against ``experiment.rows[0]`` and what this run shows."""
    ref = experiment.rows[0]
    paper_delta = row.paper.top1 - ref.paper.top1
    paper_ratio = row.paper.macs_m / ref.paper.macs_m
    ours_ratio = row.run.cost().macs / ref.run.cost().macs
    comparison: dict[str, Any] = {
        "model": row.run.key,
        "reference": ref.run.key,
        "paper_delta_points": round(paper_delta, 2),
        "paper_macs_ratio": round(paper_ratio, 3),
        "macs_ratio": round(ours_ratio, 3),
        "delta_points": None,
        "verdict": "pending",
    }
    text_paper = f"paper: {paper_delta:+.1f} points for {paper_ratio:.2f}x MACs"
    if row.run.key in finished and ref.run.key in finished:
        delta = 100 * (finished[row.run.key]["test_top1"] - finished[ref.run.key]["test_top1"])
        comparison["delta_points"] = round(delta, 2)
        if abs(delta) < NOISE_POINTS:
            verdict = "tie"
        elif (delta > 0) == (paper_delta > 0):
            verdict = "agrees"
        else:
            verdict = "disagrees"
        comparison["verdict"] = verdict
        text_here = f"here: {delta:+.1f} points for {ours_ratio:.2f}x MACs"
        words = {
            "agrees": "same direction as the paper",
            "tie": f"a tie (within {NOISE_POINTS:g} point, one seed's noise)",
            "disagrees": "the opposite of the paper",
        }[verdict]
        comparison["text"] = f"{row.run.label} vs {ref.run.label}: {text_paper}; {text_here}: {words}"
    else:
        comparison["text"] = f"{row.run.label} vs {ref.run.label}: {text_paper}; here: not trained yet"
    return comparison


def _identity_and_cost(spec: RunSpec, cost: Any, num_classes: int) -> dict[str, Any]:
    """The fields a run's record has whether it is finished or pending: which model, and the cost model's figures."""
    return {
        "key": spec.key,
        "label": spec.label,
        "model": spec.model,
        "alpha": spec.alpha,
        "resolution": spec.resolution,
        "small_input": True,
        "num_classes": num_classes,
        "macs": cost.macs,
        "params": cost.params,
        "trainable_params": cost.trainable_params,
        "by_op": [share.to_dict() for share in cost.by_op()],
    }


def _model_record(spec: RunSpec, finished: dict[str, dict[str, Any]], num_classes: int) -> dict[str, Any]:
    if spec.key in finished:
        return {**finished[spec.key], "status": "finished"}
    cost = spec.cost(num_classes)
    return {
        **_identity_and_cost(spec, cost, num_classes),
        "test_top1": None,
        "latency_ms": None,
        "status": "pending",
    }


def write_report(
    out: str | os.PathLike[str],
    chosen: Sequence[Experiment],
    budget: Budget,
    finished: dict[str, dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Write ``results.json``, ``results.md`` and the plots for the finished runs (pending ones are listed with
    their analytic cost only). Returns the JSON document and the files written."""
    from mobilenet.plots import plot_accuracy_vs_cost, plot_macs_by_operator

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(chosen)
    num_classes = next((record["num_classes"] for record in finished.values()), CIFAR_CLASSES)
    models = {spec.key: _model_record(spec, finished, num_classes) for spec in runs}
    done = [record for record in models.values() if record["status"] == "finished"]
    document: dict[str, Any] = {
        "title": "The MobileNet papers' trade-offs on CIFAR-10",
        "budget": {
            **asdict(budget),
            "images_per_run": next((record["images_seen"] for record in done), None),
            "train_images": next((record["train_images"] for record in done), None),
            "train_seconds_total": sum(record["train_seconds"] for record in done),
            "wall_seconds_total": sum(record["wall_seconds"] for record in done),
        },
        "hardware": hardware(),
        "convention": MAC_CONVENTION,
        "noise_points": NOISE_POINTS,
        "finished": len(done),
        "total": len(models),
        "models": models,
        "experiments": [
            {
                "name": experiment.name,
                "title": experiment.title,
                "source": experiment.source,
                "claim": experiment.claim,
                "caveat": experiment.caveat,
                "rows": [{"model": row.run.key, "paper": asdict(row.paper)} for row in experiment.rows],
                "comparisons": [_direction(experiment, row, finished) for row in experiment.rows[1:]],
            }
            for experiment in chosen
        ],
    }
    files = {"json": out / "results.json", "markdown": out / "results.md"}
    atomic_write_text(files["json"], json.dumps(document, indent=2) + "\n")

    series = [
        (f"{e.source}: {e.title.lower()}", [row.run.key for row in e.rows]) for e in chosen if e.series and e.rows
    ]
    points = [
        {
            "key": r["key"],
            "label": r["label"].replace(" @32px", ""),
            "macs": r["macs"],
            "params": r["params"],
            "top1": r["test_top1"],
        }
        for r in done
    ]
    subtitle = f"CIFAR-10 test top-1, budget {budget.name} ({len(done)}/{len(models)} models trained)"
    files["accuracy_vs_macs"] = plot_accuracy_vs_cost(
        points, series, out / "accuracy_vs_macs.png", x="macs", title=f"Accuracy vs multiply-adds: {subtitle}"
    )
    files["accuracy_vs_params"] = plot_accuracy_vs_cost(
        points, series, out / "accuracy_vs_params.png", x="params", title=f"Accuracy vs parameters: {subtitle}"
    )
    paper_total = count_costs("mobilenet_v1_1.0_224").macs  # V1 Table 2 is MobileNet 1.0 at 224 px
    paper_row = {
        "label": "V1 paper Table 2 (1.0 @224px, ImageNet)",
        "macs": paper_total,
        "by_op": [{"type": kind, "macs": share / 100 * paper_total} for kind, (share, _) in V1_TABLE2.items()],
    }
    files["macs_by_operator"] = plot_macs_by_operator(
        [
            paper_row,
            *(
                {"label": r["label"], "by_op": r["by_op"], "macs": r["macs"]}
                for r in sorted(models.values(), key=lambda r: r["macs"])
            ),
        ],
        out / "macs_by_operator.png",
        title="Where the multiply-adds go, by operator type (V1 paper Table 2), CIFAR-10 inputs",
    )
    atomic_write_text(files["markdown"], _markdown(document, chosen, files))
    return document, files


def _fmt_top1(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _markdown(document: dict[str, Any], chosen: Sequence[Experiment], files: dict[str, Path]) -> str:
    budget = document["budget"]
    hw = document["hardware"]
    models = document["models"]
    per_epoch = f"{budget['batches_per_epoch']} batches" if budget["batches_per_epoch"] else "the whole training set"
    seen = (
        f" ({budget['images_per_run']:,} training images per model, "
        f"{budget['images_per_run'] / budget['train_images']:.2f} passes over the {budget['train_images']:,})"
        if budget["images_per_run"]
        else ""
    )
    lines = [
        f"# {document['title']}",
        "",
        f"Budget **{budget['name']}**: {budget['epochs']} epochs of {per_epoch} of {budget['batch_size']} images"
        f"{seen}, recipe `{budget['recipe']}`, seed {budget['seed']}, EMA {budget['ema_decay']:g}: the same for "
        f"every model. Sizing: {budget['sizing']}.",
        "",
        f"Hardware: {hw['cpu']} ({hw['cpu_cores']} cores), torch {hw['torch']}, {hw['torch_threads']} threads"
        + (f", GPU {hw['gpu']}" if hw["gpu"] else "")
        + f". Training time of the {document['finished']} finished models: "
        f"{budget['train_seconds_total'] / 60:.1f} min ({budget['wall_seconds_total'] / 60:.1f} min wall with "
        "evaluation and timing).",
        "",
        f"**{document['finished']} of {document['total']} models finished.**"
        + (
            " Pending: " + ", ".join(f"`{key}`" for key, r in models.items() if r["status"] != "finished") + "."
            if document["finished"] < document["total"]
            else ""
        ),
        "",
        f"Inputs are CIFAR-10 images at 32x32 (or resized for the resolution rows), networks with `small_input` (total "
        f"stride 8). MACs and parameters are the cost model's at that input size ({document['convention']}); latency "
        "is the median of one 1-image forward pass on the CPU, measured right after training. Top-1 is the last "
        "epoch's, on the 10,000 test images. The paper's numbers are ImageNet top-1 at 224 px.",
        "",
        f"![accuracy vs MACs]({files['accuracy_vs_macs'].name}) ![accuracy vs parameters]"
        f"({files['accuracy_vs_params'].name})",
        "",
        f"![MACs by operator type]({files['macs_by_operator'].name})",
        "",
    ]
    experiments_by_name = {e.name: e for e in chosen}
    for entry in document["experiments"]:
        experiment = experiments_by_name[entry["name"]]
        lines += [
            f"## {entry['source']}: {entry['title']} (`{entry['name']}`)",
            "",
            f"Paper: {entry['claim']}.",
            "",
            "| model | input | MACs | params | CPU latency, batch 1 | CIFAR-10 top-1 | paper row | paper top-1 | "
            "paper MACs | paper params |",
            "|---|--:|--:|--:|--:|--:|---|--:|--:|--:|",
        ]
        for row in experiment.rows:
            r = models[row.run.key]
            latency = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.2f} ms"
            lines.append(
                f"| {r['label']} | {r['resolution']} px | {r['macs'] / 1e6:.1f}M | {r['params'] / 1e6:.2f}M | "
                f"{latency} | {_fmt_top1(r['test_top1'])} | {row.paper.label} | {row.paper.top1:.1f}% | "
                f"{row.paper.macs_m:g}M | {row.paper.params_m:g}M |"
            )
        lines.append("")
        for comparison in entry["comparisons"]:
            lines.append(f"- {comparison['text']}.")
        if any(c["verdict"] == "disagrees" for c in entry["comparisons"]):
            short = (
                f"only {budget['images_per_run'] / budget['train_images']:.2f} passes over the training set, where "
                "how fast a model learns per step matters more than its final capacity; "
                if budget["images_per_run"] and budget["images_per_run"] < 5 * budget["train_images"]
                else ""
            )
            lines.append(f"- Where CIFAR-10 disagrees, the likely reasons: {short}{entry['caveat']}.")
        lines.append("")
    return "\n".join(lines)
