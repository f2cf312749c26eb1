"""The MobileNet papers' controlled comparisons, re-run on CIFAR-10: one resumable experiment with its pictures.

What is trained (the experiments of V1 Tables 4-7 and V2 Table 4, and the budgets) is data in
:mod:`mobilenet.reproduce_experiments`; the report (``results.md``, ``results.json``, three plots) is written by
:mod:`mobilenet.reproduce_report`. This module runs them: :func:`run_reproduce`.

Every model is its own resumable :func:`mobilenet.train.train` run under ``OUT/<run>/``; a model shared between
experiments (V1 1.0 at 32 px is in four) is trained once, a finished run (``OUT/<run>/result.json``) is never
retrained, and an interrupted one resumes from its checkpoint. After each finished run the report is rewritten, so
partial results are always on disk. The data is decoded once and resized once per input side.

The names of the experiments and report modules listed in ``__all__`` are re-exported here, so that
``mobilenet.reproduce`` stays the one import for the whole feature.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from torchvision.transforms.v2 import functional as F

from mobilenet.checkpoint import STATE_FILE, load
from mobilenet.cost import count_costs
from mobilenet.data import BUILTIN_DATA, PACK_SUFFIX, TensorImageDataset, channel_stats, load_data
from mobilenet.errors import MobileNetError
from mobilenet.io import (
    atomic_write_text,
    check_output_dir,
    check_outside_directory,
    directory_lock,
    finite_json_number,
    loads_json,
    read_regular_file,
)
from mobilenet.progress import new_progress
from mobilenet.reproduce_experiments import (
    BASE_RESOLUTION,
    BUDGETS,
    EXPERIMENT_NAMES,
    Budget,
    Experiment,
    PaperRow,
    Row,
    RunSpec,
    experiments,
    matched_v2_alpha,
    plan_runs,
    resolve_budget,
    select_experiments,
)
from mobilenet.reproduce_report import REPORT_FILES, base_record, write_report
from mobilenet.train import TrainConfig, TrainResult, train

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
    "measure_latency_ms",
    "plan_runs",
    "resolve_budget",
    "run_reproduce",
    "select_experiments",
    "write_report",
]

RESULT_FILE = "result.json"
BUDGET_FILE = "budget.json"


# --------------------------------------------------------------------------------------------------------------
# Data: decoded once, resized once per resolution
# --------------------------------------------------------------------------------------------------------------


def _check_source(source: str) -> None:
    if source in BUILTIN_DATA:
        return
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == PACK_SUFFIX:
        return
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
        self.source = source
        base = load_data(source, seed=seed, in_memory=True)
        self.base = replace(
            base,
            train=_tensor_set(base.train, BASE_RESOLUTION),
            val=_tensor_set(base.val, BASE_RESOLUTION),
            native_size=BASE_RESOLUTION,
        )
        if base.native_size is None:  # a folder: its own statistics (CIFAR-10's published ones come out the same)
            self.base.mean, self.base.std = channel_stats(self.base.train.images)
        self._by_size: dict[int, Any] = {BASE_RESOLUTION: self.base}

    @classmethod
    def lazy(cls, source: str, seed: int) -> Callable[[], _Data]:
        """A function that loads the data on its first call and returns the same object after: a set of runs
        with nothing left to train never decodes it, and several seeds' sets decode it once."""
        loaded: list[_Data] = []

        def get() -> _Data:
            if not loaded:
                loaded.append(cls(source, seed))
            return loaded[0]

        return get

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


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object a run wrote at ``path``; None where there is none, or something else is there (not a regular
    file, over 64 MiB, not JSON, not an object): the run is then treated as not finished."""
    try:
        value = loads_json(read_regular_file(path, "run record", "a JSON file this command wrote", limit=64 << 20))
    except (MobileNetError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _refuse_directories(paths: Sequence[Path]) -> None:
    """Refuse, before any work, a directory where this command writes one of its files: the atomic rename that
    writes each file cannot replace a directory (a symbolic link there is replaced, never what it points to)."""
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            raise MobileNetError(
                f"{path} is a directory where reproduce writes a file; expected a file there (move the directory "
                "away, or choose another --out)"
            )


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


def _progress_display(enabled: bool) -> Progress:
    return new_progress(enabled=enabled, stderr=False)


def _finished_runs(
    out: Path, runs: Sequence[RunSpec], budget: Budget, say: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """The records of the runs already finished under this budget's training settings (a run finished under
    other settings is trained again). A record of these settings that is damaged (:func:`_record_problem`) counts
    as not finished, with a line in ``say``: training it again resumes from its saved state, which holds the
    finished epochs, so only the record is computed again; trusting it would put its numbers in the report."""
    finished: dict[str, dict[str, Any]] = {}
    for spec in runs:
        path = out / spec.key / RESULT_FILE
        stored = _read_json(path)
        recorded = stored.get("budget") if stored is not None else None
        if isinstance(recorded, dict) and recorded.get("training") == budget.training_fields():
            problem = _record_problem(stored, spec)
            if problem is None:
                finished[spec.key] = stored
            else:
                say(f"{path} is damaged ({problem}): the run counts as not finished and its record is written again")
    return finished


#: The numbers of a run's record beyond its cost model's: (field, lowest, highest, whether an integer).
_RECORD_NUMBERS = (
    ("test_top1", 0.0, 1.0, False),
    ("best_top1", 0.0, 1.0, False),
    ("epochs", 1, None, True),
    ("train_images", 1, None, True),
    ("images_seen", 1, None, True),
    ("train_seconds", 0.0, None, False),
    ("images_per_s", 0.0, None, False),
    ("wall_seconds", 0.0, None, False),
    ("latency_ms", 0.0, None, False),
    ("latency_threads", 1, None, True),
)

#: More classes than any data set this command trains on: a larger count in a record is damage, never a data set.
_MAX_RECORD_CLASSES = 100_000


def _record_problem(record: dict[str, Any], spec: RunSpec) -> str | None:
    """What is wrong with a finished run's ``result.json`` (None when nothing): the model's fields must be the
    cost model's for ``spec`` (:func:`base_record`: another run's record copied here, or an edited figure, is
    refused), and each of :data:`_RECORD_NUMBERS` a finite number in its range."""
    num_classes = record.get("num_classes")
    if type(num_classes) is not int or not 2 <= num_classes <= _MAX_RECORD_CLASSES:
        return f"'num_classes' is {num_classes!r}, expected an integer from 2 to {_MAX_RECORD_CLASSES:,}"
    expected = json.loads(json.dumps(base_record(spec, spec.cost(num_classes), num_classes)))
    differing = [key for key, value in expected.items() if record.get(key) != value]
    if differing:
        return (
            f"{', '.join(differing)} not those of {spec.key} ({spec.model}, alpha {spec.alpha:g}, {spec.resolution}px)"
        )
    for key, low, high, integer in _RECORD_NUMBERS:
        value = record.get(key)
        if not _number_in_range(value, low, high, integer=integer):
            kind = "an integer" if integer else "a finite number"
            return f"'{key}' is {value!r}, expected {kind} >= {low:g}" + ("" if high is None else f" and <= {high:g}")
    return None


def _number_in_range(value: Any, low: float, high: float | None, *, integer: bool) -> bool:
    """Whether ``value`` is a JSON number (not a bool; an int when ``integer``), finite, within ``low``..``high``."""
    number = finite_json_number(value, integer=integer)
    return number is not None and number >= low and (high is None or number <= high)


@dataclass
class _Work:
    """The set's training in weighted steps (:func:`_weight`): the overall bar and this session's ETA."""

    total: float
    done: float
    session_start: float = field(default_factory=time.perf_counter)
    session_done: float = 0.0

    def add(self, amount: float) -> None:
        self.done += amount
        self.session_done += amount

    def eta_text(self, finished: int, runs: int) -> str:
        left = (self.total - self.done) * (time.perf_counter() - self.session_start) / self.session_done
        return (
            f"set: {finished}/{runs} models, {self.done / self.total:.0%} of the estimated work done; "
            f"about {left / 60:.0f} min left at this session's speed"
        )


class _Bars:
    """Two progress bars: the whole set (weighted steps) and the run in progress (its training steps)."""

    def __init__(
        self, display: Progress, runs: int, finished: int, work: _Work, steps_per_run: int, epochs: int
    ) -> None:
        self.display = display
        self.runs = runs
        self.steps_per_run = steps_per_run
        self.epochs = epochs
        self.overall = display.add_task(f"all runs: {finished}/{runs} done", total=work.total, completed=work.done)
        self.current = display.add_task("", total=steps_per_run, visible=False)

    def start_run(self, spec: RunSpec, position: int, base: float) -> Callable[[int], None]:
        """Show the run at ``position`` (1-based) and return its ``on_step`` callback for :func:`train`."""
        weight = _weight(spec)
        steps_per_epoch = max(1, self.steps_per_run // self.epochs)
        prefix = f"run {position}/{self.runs} {spec.key}"

        def on_step(step: int) -> None:
            epoch = min(self.epochs, max(0, step - 1) // steps_per_epoch + 1)
            self.display.update(self.current, completed=step, description=f"{prefix}: epoch {epoch}/{self.epochs}")
            self.display.update(self.overall, completed=base + weight * step)

        self.display.reset(self.current, total=self.steps_per_run, visible=True, description=prefix)
        return on_step

    def run_finished(self, finished: int, work: _Work) -> None:
        self.display.update(self.overall, completed=work.done, description=f"all runs: {finished}/{self.runs} done")

    def hide_current(self) -> None:
        self.display.update(self.current, visible=False)


def _train_one(
    spec: RunSpec,
    config: ReproduceConfig,
    budget: Budget,
    data: _Data,
    on_step: Callable[[int], None],
    *,
    progress: bool,
    log: Callable[[str], None] | None,
) -> TrainResult:
    """One run under the budget's recipe, resumed where its saved state exists, on the data at its input side."""
    run_dir = Path(config.out) / spec.key
    return train(
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
            small_input=spec.small_input,
            limit_train_batches=budget.batches_per_epoch,
            hflip=str(config.data) != "digits",  # a mirrored 2 is not a digit
            threads=budget.threads,
            channels_last=budget.channels_last,
            device_data=budget.device_data,
            resume=(run_dir / STATE_FILE).exists(),
        ),
        progress=progress,
        log=log,
        on_step=on_step,
        data=data.at(spec.resolution),
    )


def _finished_text(position: int, runs: int, spec: RunSpec, record: dict[str, Any]) -> str:
    return (
        f"[{position}/{runs}] {spec.key}: test top-1 {record['test_top1']:.2%}, "
        f"{record['macs'] / 1e6:.1f}M MACs, {record['params'] / 1e6:.2f}M params, "
        f"{record['latency_ms']:.2f} ms batch-1 CPU latency"
    )


def _train_pending(
    config: ReproduceConfig,
    chosen: Sequence[Experiment],
    budget: Budget,
    runs: Sequence[RunSpec],
    finished: dict[str, dict[str, Any]],
    result: ReproduceResult,
    data_source: Callable[[], _Data],
    *,
    progress: bool,
    log: Callable[[str], None] | None,
) -> None:
    """Train the runs not in ``finished`` in order, adding each one's record to ``finished`` and rewriting the
    report after it; stops at an interruption (``result.interrupted``)."""
    say = log if log is not None else (lambda _message: None)
    data = data_source()
    say(f"data: {data.base.name}, {len(data.base.train)} training / {len(data.base.val)} {data.base.val_name} images")
    train_size = len(data.base.train)
    steps_per_run = budget.images_per_run(train_size) // budget.batch_size
    work = _Work(
        total=sum(_weight(spec) * steps_per_run for spec in runs),
        done=sum(_weight(spec) * steps_per_run for spec in runs if spec.key in finished),
    )
    with _progress_display(progress) as display:
        bars = _Bars(display, len(runs), len(finished), work, steps_per_run, budget.epochs)
        for position, spec in enumerate(runs, start=1):
            if spec.key in finished:
                continue
            on_step = bars.start_run(spec, position, work.done)
            say(f"\n[{position}/{len(runs)}] {spec.label} ({spec.model}, alpha {spec.alpha:g}, {spec.resolution}px)")
            started = time.perf_counter()
            outcome = _train_one(spec, config, budget, data, on_step, progress=progress, log=log)
            if outcome.interrupted or outcome.last_checkpoint is None or not outcome.history:
                result.interrupted = True
                say(f"stopped during {spec.key}; its state is saved: run the same command again to continue")
                break
            finished[spec.key] = _finish_run(
                spec, outcome, budget, data.num_classes, train_size, time.perf_counter() - started
            )
            result.trained.append(spec.key)
            work.add(_weight(spec) * steps_per_run)
            bars.run_finished(len(finished), work)
            say(_finished_text(position, len(runs), spec, finished[spec.key]))
            say(work.eta_text(len(finished), len(runs)))
            write_report(result.out, chosen, budget, finished)
        bars.hide_current()


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
    progress saved its state; call again to continue).

    A budget with several seeds trains the whole set once per seed, seed after seed, under ``OUT/seed<N>/`` (each
    with its own report), and writes the report of all seeds, with each model's mean and spread and a verdict per
    claim of the papers, into ``OUT``."""
    chosen = select_experiments(config.experiments)
    budget = resolve_budget(config.budget)
    _check_source(str(config.data))
    check_output_dir(config.out, "--out")
    if str(config.data) not in BUILTIN_DATA:  # a run directory in a data folder is one more class of images
        check_outside_directory(config.out, "--out", config.data, "the --data folder")
    data_source = _Data.lazy(str(config.data), budget.all_seeds[0])
    with directory_lock(config.out, "--out"):  # two reproduce commands into one --out would train the same runs
        if len(budget.all_seeds) == 1:
            return _reproduce_seed(
                config, chosen, budget, data_source, progress=progress, log=log, report_only=report_only
            )
        return _reproduce_seeds(
            config, chosen, budget, data_source, progress=progress, log=log, report_only=report_only
        )


def _reproduce_seeds(
    config: ReproduceConfig,
    chosen: Sequence[Experiment],
    budget: Budget,
    data_source: Callable[[], _Data],
    *,
    progress: bool,
    log: Callable[[str], None] | None,
    report_only: bool,
) -> ReproduceResult:
    """Every seed's set in turn (a later seed starts once the earlier one is complete), then the report of all."""
    out = Path(config.out)
    _refuse_directories([out / name for name in REPORT_FILES])
    combined = ReproduceResult(out=out, results={})
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in budget.all_seeds:
        one = replace(budget, seed=seed, seeds=None)
        seed_config = replace(config, out=str(out / f"seed{seed}"), budget=one)
        seed_result = _reproduce_seed(
            seed_config, chosen, one, data_source, progress=progress, log=log, report_only=report_only
        )
        by_seed[seed] = {key: seed_result.results["models"][key] for key in seed_result.reused + seed_result.trained}
        combined.trained += [f"seed{seed}/{key}" for key in seed_result.trained]
        combined.reused += [f"seed{seed}/{key}" for key in seed_result.reused]
        combined.pending += [f"seed{seed}/{key}" for key in seed_result.pending]
        if seed_result.interrupted:
            combined.interrupted = True
            break
    combined.results, combined.files = write_report(out, chosen, budget, {}, by_seed=by_seed)
    return combined


def _reproduce_seed(
    config: ReproduceConfig,
    chosen: Sequence[Experiment],
    budget: Budget,
    data_source: Callable[[], _Data],
    *,
    progress: bool,
    log: Callable[[str], None] | None,
    report_only: bool,
) -> ReproduceResult:
    """The set under one seed: train what has not finished, then write its report."""
    say = log if log is not None else (lambda _message: None)
    out = Path(config.out)
    runs = plan_runs(chosen)
    finished = _finished_runs(out, runs, budget, say)
    todo = [spec for spec in runs if spec.key not in finished]
    result = ReproduceResult(out=out, results={}, reused=[spec.key for spec in runs if spec.key in finished])
    train_now = bool(todo) and not report_only
    writes = [out / name for name in REPORT_FILES]
    if train_now:
        writes += [out / BUDGET_FILE, *(out / spec.key / RESULT_FILE for spec in todo)]
    _refuse_directories(writes)
    if train_now:
        _check_budget_file(out, budget)
        say(
            f"reproduce: {len(runs)} models for {', '.join(e.name for e in chosen)}; {len(finished)} finished "
            f"before, {len(todo)} to train (budget {budget.name}: {budget.epochs} epochs"
            + (f" x {budget.batches_per_epoch} batches" if budget.batches_per_epoch else "")
            + f" of {budget.batch_size}, seed {budget.seed})"
        )
        _train_pending(config, chosen, budget, runs, finished, result, data_source, progress=progress, log=log)
    result.pending = [spec.key for spec in runs if spec.key not in finished]
    result.results, result.files = write_report(out, chosen, budget, finished)
    if train_now:
        say(f"\nreport: {result.files['markdown']}")
    return result


def _finish_run(
    spec: RunSpec, outcome: TrainResult, budget: Budget, num_classes: int, train_size: int, wall_seconds: float
) -> dict[str, Any]:
    """Measure the finished run's latency and write its ``result.json`` (the mark that it is finished)."""
    model = load(outcome.last_checkpoint)
    cost = count_costs(model.network)
    latency = measure_latency_ms(model, spec.resolution, budget.latency_runs)
    history = outcome.history
    record = {
        **base_record(spec, cost, num_classes),
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
