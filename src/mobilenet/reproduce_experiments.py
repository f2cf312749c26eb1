"""What ``mobilenet reproduce`` trains: the papers' controlled comparisons as data, and the training budgets.

The V1 paper (Howard et al. 2017, arXiv 1704.04861) argues with controlled ImageNet comparisons; the V2 paper
(Sandler et al. 2018, arXiv 1801.04381) adds V2 against V1. Each experiment re-runs one of them on CIFAR-10
(32x32 images, ``small_input`` networks of total stride 8), one fixed training recipe per :class:`Budget`:

- ``table4``: V1 Table 4, depthwise separable vs full convolution (MobileNet vs Conv MobileNet);
- ``table5``: V1 Table 5, narrow vs shallow at about equal cost (0.75 MobileNet vs Shallow MobileNet);
- ``table6``: V1 Table 6, the width multiplier alpha = 1, 0.75, 0.5, 0.25;
- ``table7``: V1 Table 7, the resolution multiplier rho: the paper's 224/192/160/128 px become CIFAR images
  resized to 32/28/24/20 px (rho = 1, 0.875, 0.75, 0.625);
- ``table8``: V1 Table 8, MobileNet against VGG-16 (the full network, 13 convolutions and 4096-4096 FC layers;
  VGG has no ``small_input``: its five max pools take a 32x32 image to 1x1 before the FC layers);
- ``v1-vs-v2``: V2 Table 4, MobileNetV2 1.0 and MobileNetV2 at the width whose multiply-adds match V1 1.0's
  (found with the cost model: :func:`matched_v2_alpha`), against V1 1.0.

Every row pairs a model to train (:class:`RunSpec`) with the published row it stands for (a
:class:`mobilenet.paper.PaperRow`, taken from :mod:`mobilenet.paper`'s tables). Torch-free: the cost model only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mobilenet.cost import CostTable, count_costs
from mobilenet.errors import MobileNetError
from mobilenet.paper import V1_TABLE4, V1_TABLE5, V1_TABLE6, V1_TABLE7, V1_TABLE8, V2_TABLE4, PaperRow
from mobilenet.spec import model_config

__all__ = [
    "BASE_RESOLUTION",
    "BUDGETS",
    "CIFAR_CLASSES",
    "CIFAR_RESOLUTIONS",
    "DEFAULT_EXPERIMENTS",
    "EXPERIMENT_NAMES",
    "Budget",
    "Experiment",
    "PaperRow",
    "Row",
    "RunSpec",
    "alpha_text",
    "experiments",
    "matched_v2_alpha",
    "plan_runs",
    "resolve_budget",
    "select_experiments",
]

#: CIFAR-10's classes; the cost of the classifier (a few thousand MACs) is counted at this size.
CIFAR_CLASSES = 10
#: The base input side (CIFAR-10's own); every model is built with ``small_input`` (total stride 8, not 32).
BASE_RESOLUTION = 32
#: The resolution multiplier on CIFAR (V1 Table 7's 224, 192, 160, 128 px): multiples of 4, because with stride-2
#: convolutions an odd side rounds up and saves no multiply-adds (docs/reproduce.md gives the counts).
CIFAR_RESOLUTIONS = (32, 28, 24, 20)
#: The experiments, in the order their runs are trained when all are asked for: the most informative first.
EXPERIMENT_NAMES = ("table4", "v1-vs-v2", "table6", "table5", "table7", "table8")
#: What runs when no experiment is named: all but ``table8``, whose VGG 16 alone costs more than the other ten
#: models together (name it, or ``all``, to include it).
DEFAULT_EXPERIMENTS = EXPERIMENT_NAMES[:5]

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
    small_input: bool = True

    def options(self, num_classes: int = CIFAR_CLASSES) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "resolution": self.resolution,
            "small_input": self.small_input,
            "num_classes": num_classes,
        }

    def cost(self, num_classes: int = CIFAR_CLASSES) -> CostTable:
        """The analytic cost (:func:`mobilenet.cost.count_costs`) at this run's input size."""
        return count_costs(self.model, **self.options(num_classes))


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


def _v1(alpha: float, resolution: int = BASE_RESOLUTION) -> RunSpec:
    return RunSpec(
        f"v1_{alpha_text(alpha)}_{resolution}px",
        f"MobileNet {alpha_text(alpha)} @{resolution}px",
        "mobilenet_v1_1.0_224",
        alpha,
        resolution,
    )


def _v2(alpha: float) -> RunSpec:
    return RunSpec(
        f"v2_{alpha_text(alpha)}_{BASE_RESOLUTION}px",
        f"MobileNetV2 {alpha_text(alpha)} @{BASE_RESOLUTION}px",
        "mobilenet_v2_1.0_224",
        alpha,
        BASE_RESOLUTION,
    )


def _table4() -> Experiment:
    conv_row, mobilenet_row = V1_TABLE4
    conv = RunSpec("v1_conv_1.0_32px", "Conv MobileNet 1.0 @32px", "mobilenet_v1_conv_1.0_224", 1.0, 32)
    return Experiment(
        "table4",
        "Depthwise separable vs full convolutions",
        "V1 paper Table 4",
        (Row(_v1(1.0), mobilenet_row), Row(conv, conv_row)),
        "full convolutions buy about 1 point of top-1 for 8.6x the multiply-adds and 7x the parameters",
        "CIFAR-10 is small, so the 28M-parameter Conv MobileNet may overfit where ImageNet rewards it",
    )


def _v1_vs_v2() -> Experiment:
    v1_row, v2_row, v2_wide_row = V2_TABLE4
    v1 = _v1(1.0)
    return Experiment(
        "v1-vs-v2",
        "MobileNetV2 vs MobileNetV1",
        "V2 paper Table 4",
        (Row(v1, v1_row), Row(_v2(1.0), v2_row), Row(_v2(matched_v2_alpha(v1.cost().macs)), v2_wide_row)),
        "V2 1.0 beats V1 with about half the multiply-adds; V2 at V1's cost (1.4) is clearly better",
        "V2 is deeper (53 layers vs 28) with residual bottlenecks, which can need more steps to "
        "converge; and with small_input its feature maps are larger relative to V1's than at 224 px",
    )


def _table6() -> Experiment:
    return Experiment(
        "table6",
        "Width multiplier alpha",
        "V1 paper Table 6",
        tuple(Row(_v1(model_config(row.model).alpha), row) for row in V1_TABLE6),
        "accuracy drops off smoothly as alpha shrinks, steeply only at 0.25",
        "10 classes need less capacity than 1000, so narrow networks lose less than on ImageNet",
        series=True,
    )


def _table5() -> Experiment:
    narrow_row, shallow_row = V1_TABLE5
    shallow = RunSpec("v1_shallow_1.0_32px", "Shallow MobileNet 1.0 @32px", "mobilenet_v1_shallow_1.0_224", 1.0, 32)
    return Experiment(
        "table5",
        "Narrow vs shallow at equal cost",
        "V1 paper Table 5",
        (Row(_v1(0.75), narrow_row), Row(shallow, shallow_row)),
        "making MobileNet thinner is 3 points better than making it shallower at about the same cost",
        "a shallower network trains faster per step, and on 32x32 inputs the removed 512-wide blocks "
        "run on 4x4 maps instead of 14x14",
    )


def _table8() -> Experiment:
    mobilenet_row, _googlenet, vgg_row = V1_TABLE8
    vgg = RunSpec("vgg16_32px", "VGG 16 @32px", "vgg16_224", 1.0, BASE_RESOLUTION, small_input=False)
    return Experiment(
        "table8",
        "MobileNet vs VGG 16",
        "V1 paper Table 8",
        (Row(_v1(1.0), mobilenet_row), Row(vgg, vgg_row)),
        "MobileNet is nearly as accurate as VGG 16 (0.9 points less) while being 32x smaller and 27x less compute",
        "VGG's 138M parameters (most in its FC layers) overfit 50,000 CIFAR images far more easily than ImageNet's "
        "1.2M, and at 32 px its five max pools leave a 1x1 map",
    )


def _table7() -> Experiment:
    return Experiment(
        "table7",
        "Resolution multiplier rho",
        "V1 paper Table 7",
        tuple(Row(_v1(1.0, side), row) for side, row in zip(CIFAR_RESOLUTIONS, V1_TABLE7, strict=True)),
        "accuracy drops off smoothly with resolution",
        "32x32 CIFAR images carry little detail to lose, and resizing them down blurs a 3x3 filter's "
        "whole receptive field, unlike 224 -> 128 px",
        series=True,
    )


_EXPERIMENTS: dict[str, Experiment] | None = None


def experiments() -> dict[str, Experiment]:
    """Every experiment by name, in :data:`EXPERIMENT_NAMES` order (built once: the V2 width needs the cost
    model)."""
    global _EXPERIMENTS
    if _EXPERIMENTS is None:
        found = (_table4(), _v1_vs_v2(), _table6(), _table5(), _table7(), _table8())
        _EXPERIMENTS = {experiment.name: experiment for experiment in found}
    return _EXPERIMENTS


def select_experiments(names: Sequence[str | Experiment] | str | None = None) -> list[Experiment]:
    """Experiments by name (``"table4,table6"`` or a list; ``"all"``: every one, in :data:`EXPERIMENT_NAMES`
    order; None: :data:`DEFAULT_EXPERIMENTS`); :class:`Experiment` objects pass through. An unknown name raises
    :class:`MobileNetError`."""
    if names is None:
        names = DEFAULT_EXPERIMENTS
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    if list(names) == ["all"]:
        names = EXPERIMENT_NAMES
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
    never tuned per model. ``batches_per_epoch`` caps an epoch (None: the whole training set). ``seeds``: train
    every model once per seed (None: once, with ``seed``), so the report can state the spread between seeds."""

    name: str
    epochs: int
    batches_per_epoch: int | None
    batch_size: int = 128
    recipe: str = "modern"
    device: str = "auto"
    threads: int | None = None
    ema_decay: float = 0.0
    seed: int = 0
    seeds: tuple[int, ...] | None = None
    #: NHWC layout and images held on the device (:class:`mobilenet.train.TrainConfig`; None: its defaults).
    channels_last: bool | None = None
    device_data: bool | None = None
    #: Forward passes timed for the batch-1 CPU latency (median reported).
    latency_runs: int = 50
    #: What it was sized for, and how (written into the report).
    sizing: str = ""

    def training_fields(self) -> dict[str, Any]:
        """What changes the trained weights: a finished run trained under other values is not reused."""
        return {
            key: value
            for key, value in asdict(self).items()
            if key
            not in ("name", "sizing", "latency_runs", "device", "threads", "seeds", "channels_last", "device_data")
        }

    @property
    def all_seeds(self) -> tuple[int, ...]:
        return self.seeds if self.seeds else (self.seed,)

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
    "gpu": Budget(
        "gpu",
        epochs=15,
        batches_per_epoch=None,
        batch_size=512,
        device="auto",
        seeds=(0, 1),
        channels_last=True,
        device_data=True,
        latency_runs=20,
        sizing=(
            "one GPU for about 10 minutes: whole epochs of batch 512 (the learning rate scaled linearly), 2 seeds per "
            "model, the images held on the GPU; benchmarks/gpu_reproduce.py measures each model's images/s in its "
            "first seconds and fits the number of epochs to the time left (docs/reproduce.md)"
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
