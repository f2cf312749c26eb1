"""Choose the width and resolution for a latency budget, measured on this machine.

The V1 paper (Howard et al. 2017, section 3.3 and 3.4; Tables 6 and 7) trades accuracy for speed with the width
multiplier alpha and the input resolution, and leaves the choice to the reader's latency budget. :func:`select_model`
makes that choice concrete: it times every (alpha, resolution) point that has a published ImageNet top-1
(:func:`published_points`: V1 Tables 6, 7 and 9, V2 Table 4) on one backend (for ``auto``, the one
:mod:`mobilenet.autotune` measures fastest on the grid's middle model), and returns the most accurate model whose
median latency is within the budget, with the Pareto front of accuracy against measured latency.

Timing: every model is prepared first, then :func:`mobilenet.timing.time_interleaved` times one forward of every
model per round, in an order rotated each round (drift in the machine's speed reaches every model alike); the
median of the rounds is the model's latency. Measurements are cached in a JSON file (:func:`default_cache_path`),
one entry per :func:`cache_key` (model, resolution, batch, threads, backend, precision, CPU model and SIMD flags,
torch and ONNX Runtime versions), so asking again with another budget measures nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mobilenet.autotune import choose_backend
from mobilenet.backends import BACKENDS, ModelSource, require_native_bf16
from mobilenet.cost import check_fits_memory, count_costs
from mobilenet.data import resolve_preprocessing
from mobilenet.errors import MobileNetError
from mobilenet.io import json_safe
from mobilenet.models import create_model
from mobilenet.paper import V1_TABLE6, V1_TABLE7, V1_TABLE9, V2_TABLE4, PaperRow
from mobilenet.plots import plot_latency_pareto
from mobilenet.runtime import (
    describe_machine,
    machine_identity,
    plausible_latency_ms,
    read_cache,
    set_threads,
    user_cache_path,
    write_cache,
)
from mobilenet.spec import model_config
from mobilenet.timing import Candidate, summarize_timings, time_interleaved

__all__ = [
    "FAMILIES",
    "PRECISIONS",
    "SELECT_BACKENDS",
    "GridPoint",
    "SelectResult",
    "cache_key",
    "default_cache_path",
    "measure_latencies",
    "pareto_front",
    "parse_families",
    "published_points",
    "select_model",
    "write_plot",
]

#: Model families with published ImageNet top-1 for their (alpha, resolution) grid.
FAMILIES = ("v1", "v2")
#: Precisions that can be selected: float32, and bf16 on CPUs with bf16 arithmetic (its accuracy is float32's
#: published figure, which ``mobilenet eval --precision bf16`` checks for a trained model; int8 needs calibration
#: images for every grid point, so it is not offered).
PRECISIONS = ("fp32", "bf16")
#: Backends a selection can time (``auto``: what ``Predictor(backend="auto")`` runs for a PyTorch model on the CPU).
SELECT_BACKENDS = ("auto", "torch", "torch-channels-last", "torch-jit", "onnxruntime", "openvino", "openvino-bf16")
#: The paper tables whose rows carry published top-1 for a plain (alpha, resolution) MobileNet.
PUBLISHED_TABLES: tuple[tuple[str, tuple[PaperRow, ...]], ...] = (
    ("V1 Table 6", V1_TABLE6),
    ("V1 Table 7", V1_TABLE7),
    ("V1 Table 9", V1_TABLE9),
    ("V2 Table 4", V2_TABLE4),
)
#: Version of the cache file's layout; a file of another version is ignored.
CACHE_VERSION = 1
_GRID_NAME = re.compile(r"^mobilenet_(v1|v2)_\d+(\.\d+)?_\d+$")


@dataclass(frozen=True)
class GridPoint:
    """One (alpha, resolution) model with its published ImageNet top-1 (%) and analytic multiply-adds."""

    model: str
    family: str
    alpha: float
    resolution: int
    top1: float
    macs: int
    source: str


def published_points(families: Sequence[str] = FAMILIES) -> list[GridPoint]:
    """Every plain MobileNet of ``families`` whose ImageNet top-1 a paper publishes (:data:`PUBLISHED_TABLES`),
    once each, ordered by family, then alpha and resolution, largest first."""
    points: dict[str, GridPoint] = {}
    for source, rows in PUBLISHED_TABLES:
        for row in rows:
            match = _GRID_NAME.match(row.model)
            if match is None or match[1] not in families or row.model in points:
                continue
            config = model_config(row.model)
            points[row.model] = GridPoint(
                row.model, config.family, config.alpha, config.resolution, row.top1, count_costs(config).macs, source
            )
    return sorted(points.values(), key=lambda p: (p.family, -p.alpha, -p.resolution))


def parse_families(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"v1,v2"`` -> ``("v1", "v2")``; an unknown or empty list raises :class:`MobileNetError`."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else [str(s).strip() for s in text]
    unknown = [item for item in items if item not in FAMILIES]
    if unknown or not items:
        raise MobileNetError(
            f"unknown family {', '.join(unknown) or repr(text)}; expected some of {', '.join(FAMILIES)}"
        )
    return tuple(dict.fromkeys(items))


def pareto_front(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats on both accuracy and latency (``top1`` higher or equal and ``latency_ms``
    lower or equal, one of them strictly), fastest first."""
    front: list[dict[str, Any]] = []
    best = -math.inf
    for point in sorted(points, key=lambda p: (p["latency_ms"], -p["top1"])):
        if point["top1"] > best:
            front.append(point)
            best = point["top1"]
    return front


# ---------------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------------


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/mobilenet/select.json``, else ``~/.cache/mobilenet/select.json``."""
    return user_cache_path("select.json")


def cache_key(
    model: str, *, resolution: int, batch: int, threads: int, backend: str, precision: str, machine: dict[str, Any]
) -> str:
    """The identity of one measurement: what ran, how (the fused kernel's forced instruction set too), and on which
    CPU and library versions."""
    fields = {
        "model": model,
        "resolution": resolution,
        "batch": batch,
        "threads": threads,
        "backend": backend,
        "precision": precision,
        **machine_identity(machine),
    }
    return json.dumps(fields, sort_keys=True)


def _read_cache(path: Path, notes: list[str]) -> dict[str, Any]:
    """The cached entries, or none (with a note) when the file is missing, unreadable or not this version's."""
    return read_cache(path, version=CACHE_VERSION, valid=_valid_entry, notes=notes, what="select")


def _valid_entry(entry: Any) -> bool:
    """A cached measurement: its median (a plausible latency) and, as this module writes them, its p90 (one too,
    not below the median) and when it was measured (text on one line); both pass into the report and the JSON as
    they are."""
    if not isinstance(entry, dict) or not plausible_latency_ms(entry.get("latency_ms")):
        return False
    p90, measured_at = entry.get("p90_ms"), entry.get("measured_at")
    return (p90 is None or (plausible_latency_ms(p90) and p90 >= entry["latency_ms"])) and (
        measured_at is None or (isinstance(measured_at, str) and measured_at.isprintable())
    )


def _write_cache(path: Path, entries: dict[str, Any], notes: list[str]) -> None:
    write_cache(path, entries, version=CACHE_VERSION, notes=notes)


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------


def _source(model: str) -> ModelSource:
    built = create_model(model).eval()
    return ModelSource(
        name=model,
        config=built.config,
        classes=None,
        preprocessing=resolve_preprocessing(None, built.config.resolution).to_dict(),
        model=built,
    )


def _candidate(model: str, backend: str, batch: int, threads: int) -> Candidate:
    """``model`` prepared on ``backend``, running its own seeded input of ``batch`` images (the input handed to
    ``run`` is ignored: the grid's models take different resolutions)."""
    source = _source(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = BACKENDS[backend](source, num_threads=threads)
    size = source.config.resolution
    x = torch.randn(batch, source.config.in_channels, size, size, generator=torch.Generator().manual_seed(size))
    return Candidate(model, backend, lambda _ignored: runner(x), runner.max_abs_diff)


def measure_latencies(
    models: Sequence[str],
    *,
    backend: str,
    batch: int,
    threads: int,
    rounds: int,
    warmup: int,
    progress: Callable[[str], None],
) -> dict[str, list[float]]:
    """Seconds per forward of each of ``models`` on ``backend``: all prepared first, then ``rounds`` interleaved
    rounds after ``warmup`` untimed forwards each (:func:`mobilenet.timing.time_interleaved`)."""
    candidates = []
    for model in models:
        progress(f"preparing {model} on {backend}")
        candidates.append(_candidate(model, backend, batch, threads))
    progress(f"timing {len(candidates)} models: {warmup} warm-up + {rounds} interleaved rounds")
    return time_interleaved(candidates, None, rounds=rounds, warmup=warmup)


# ---------------------------------------------------------------------------------------------------------------
# Selecting
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SelectResult:
    """What :func:`select_model` found. ``points``: one dict per model (``model``, ``family``, ``alpha``,
    ``resolution``, ``top1`` (%), ``source``, ``macs``, ``latency_ms`` (median), ``cached``, ``pareto``);
    ``pick``: the most accurate point within ``budget_ms`` (None when none is)."""

    budget_ms: float
    points: list[dict[str, Any]]
    pick: dict[str, Any] | None
    backend: str
    batch: int
    threads: int
    precision: str
    machine: dict[str, Any]
    cache_path: Path | None
    measure_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def measured(self) -> list[str]:
        return [p["model"] for p in self.points if not p["cached"]]

    @property
    def cached(self) -> list[str]:
        return [p["model"] for p in self.points if p["cached"]]

    @property
    def pareto(self) -> list[dict[str, Any]]:
        return [p for p in sorted(self.points, key=lambda p: p["latency_ms"]) if p["pareto"]]

    @property
    def fastest(self) -> dict[str, Any]:
        return min(self.points, key=lambda p: p["latency_ms"])

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "budget_ms": self.budget_ms,
                "pick": self.pick,
                "points": self.points,
                "backend": self.backend,
                "batch": self.batch,
                "threads": self.threads,
                "precision": self.precision,
                "machine": self.machine,
                "cache": str(self.cache_path) if self.cache_path else None,
                "measured": self.measured,
                "cached": self.cached,
                "measure_seconds": self.measure_seconds,
                "notes": self.notes,
            }
        )


def _check_inputs(latency_ms: Any, precision: Any, batch: Any, backend: Any, rounds: Any) -> None:
    """Refuse, before anything is measured, a budget that is not a finite number > 0 and settings out of range."""
    if isinstance(latency_ms, bool) or not isinstance(latency_ms, int | float) or not math.isfinite(latency_ms):
        raise MobileNetError(f"the latency budget must be a finite number of milliseconds > 0, got {latency_ms!r}")
    if latency_ms <= 0:
        raise MobileNetError(f"the latency budget must be > 0 ms, got {latency_ms!r}")
    if precision not in PRECISIONS:
        raise MobileNetError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise MobileNetError(f"the batch size must be an integer >= 1, got {batch!r}")
    if backend not in SELECT_BACKENDS:
        raise MobileNetError(f"unknown backend {backend!r}; expected one of {', '.join(SELECT_BACKENDS)}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise MobileNetError(f"rounds must be an integer >= 1, got {rounds!r}")


def _resolve_backend(
    backend: str, grid: Sequence[GridPoint], precision: str, batch: int, threads: int, notes: list[str]
) -> str:
    """The one backend every grid point is timed on: ``backend`` as named, or for ``auto`` what
    :func:`mobilenet.autotune.choose_backend` measures fastest (and caches) for the grid's middle model (by
    multiply-adds) at this batch size, thread count and precision; said in ``notes``."""
    if precision == "bf16":
        require_native_bf16()
        if backend not in ("auto", "openvino-bf16"):
            raise MobileNetError(f"precision bf16 is timed on openvino-bf16 (or auto), not {backend}")
        return "openvino-bf16"
    if backend == "openvino-bf16":
        raise MobileNetError("backend openvino-bf16 computes in bf16; give --precision bf16 too")
    if backend != "auto":
        return backend
    middle = sorted(grid, key=lambda p: p.macs)[len(grid) // 2].model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        choice = choose_backend("auto", _source(middle), num_threads=threads, batch_size=batch)
    notes.append(f"auto: {choice.name} for every model, as measured on {middle} ({choice.reason})")
    return choice.name


def select_model(
    latency_ms: float,
    *,
    precision: str = "fp32",
    families: str | Sequence[str] = FAMILIES,
    threads: int | None = None,
    batch: int = 1,
    backend: str = "auto",
    use_cache: bool = True,
    cache_path: str | os.PathLike[str] | None = None,
    rounds: int = 15,
    warmup: int = 3,
    progress: Callable[[str], None] | None = None,
) -> SelectResult:
    """The most accurate published MobileNet whose median latency on this machine is within ``latency_ms``.

    Args:
        precision: ``"fp32"``, or ``"bf16"`` on a CPU with bf16 arithmetic (timed on ``openvino-bf16``; the accuracy
            shown is float32's published figure: check a trained model's with ``mobilenet eval --precision bf16``).
        families: ``"v1"``, ``"v2"`` or both (a comma-separated string or a list).
        threads: intra-op threads (default: torch's current count); part of the cache key.
        batch: images per forward; the latency is per batch.
        backend: one of :data:`SELECT_BACKENDS`.
        use_cache: read measurements from ``cache_path`` (default :func:`default_cache_path`); new ones are written
            there either way. A cache that cannot be read or written is ignored with a line in ``notes``.
        rounds, warmup: interleaved timed rounds and untimed forwards per model.

    Raises :class:`MobileNetError` for a budget that is not a finite number > 0, an unknown family, precision or
    backend. A budget no model meets is not an error here: ``pick`` is None and ``fastest`` says what comes
    closest.
    """
    _check_inputs(latency_ms, precision, batch, backend, rounds)
    grid = published_points(parse_families(families))
    for point in grid:  # a batch none of them could hold is refused before anything is built or measured
        check_fits_memory(model_config(point.model), batch_size=batch, name=point.model)
    say = progress or (lambda _line: None)
    threads = set_threads(threads)
    notes: list[str] = []
    backend = _resolve_backend(backend, grid, precision, batch, threads, notes)
    machine = describe_machine(threads)
    if cache_path is not None and not isinstance(cache_path, str | os.PathLike):
        raise MobileNetError(f"cache_path must be a file path, got {type(cache_path).__name__}")
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    entries = _read_cache(path, notes)
    keys = {
        p.model: cache_key(
            p.model,
            resolution=p.resolution,
            batch=batch,
            threads=threads,
            backend=backend,
            precision=precision,
            machine=machine,
        )
        for p in grid
    }
    todo = [p.model for p in grid if not (use_cache and keys[p.model] in entries)]
    start = time.perf_counter()
    if todo:
        times = measure_latencies(
            todo, backend=backend, batch=batch, threads=threads, rounds=rounds, warmup=warmup, progress=say
        )
        for model in todo:
            stats = summarize_timings(times[model])
            entries[keys[model]] = {
                "latency_ms": stats["median"],
                "p90_ms": stats["p90"],
                "rounds": len(times[model]),
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        _write_cache(path, entries, notes)
    points = [_point_row(p, entries[keys[p.model]], cached=p.model not in todo) for p in grid]
    return _result(
        latency_ms, points, backend, batch, threads, precision, machine, path, time.perf_counter() - start, notes
    )


def _point_row(point: GridPoint, entry: dict[str, Any], *, cached: bool) -> dict[str, Any]:
    return {
        "model": point.model,
        "family": point.family,
        "alpha": point.alpha,
        "resolution": point.resolution,
        "top1": point.top1,
        "source": point.source,
        "macs": point.macs,
        "latency_ms": float(entry["latency_ms"]),
        "p90_ms": entry.get("p90_ms"),
        "measured_at": entry.get("measured_at"),
        "cached": cached,
    }


def _result(budget: float, points: list[dict[str, Any]], *settings: Any) -> SelectResult:
    """Mark the Pareto front and pick the most accurate point within ``budget`` (ties: the faster)."""
    front = {p["model"] for p in pareto_front(points)}
    for point in points:
        point["pareto"] = point["model"] in front
    within = [p for p in points if p["latency_ms"] <= budget]
    pick = max(within, key=lambda p: (p["top1"], -p["latency_ms"])) if within else None
    return SelectResult(budget, points, pick, *settings)


def write_plot(result: SelectResult, path: str | os.PathLike[str]) -> Path:
    """The Pareto plot of ``result`` as a PNG (:func:`mobilenet.plots.plot_latency_pareto`)."""
    machine = result.machine
    title = (
        f"{machine.get('cpu')}, {result.threads} threads, {result.backend} {result.precision}, batch {result.batch}; "
        f"budget {result.budget_ms:g} ms"
    )
    return plot_latency_pareto(
        result.points, path, budget_ms=result.budget_ms, pick=result.pick["model"] if result.pick else None, title=title
    )
