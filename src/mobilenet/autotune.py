"""Which backend ``backend="auto"`` runs, and why (:func:`choose_backend`).

Where one backend is the only sensible one, ``auto`` takes it: an exported ``.ts``/``.pt2``/``.pte`` file runs as
it is, an ONNX file on ONNX Runtime, a PyTorch model on a GPU in eager torch. For a PyTorch model on the CPU the
fastest backend depends on the CPU, the architecture, the batch size and the thread count, so ``auto`` measures:

1. it builds each installed backend of :data:`CPU_CANDIDATES` (each is checked against the PyTorch model as it is
   built); one that fails to build is skipped;
2. it times them on a seeded batch of the Predictor's batch size with :func:`mobilenet.timing.time_interleaved`
   (:data:`WARMUP` untimed calls each, then interleaved rounds that fit :data:`MEASURE_BUDGET_S`, at least
   :data:`MIN_ROUNDS`), and keeps the one with the lowest median;
3. it caches the choice in a JSON file under the user's cache directory (:func:`default_cache_path`), so the next
   start with the same key builds only the chosen backend.

The cache key (:func:`auto_cache_key`) is the model's architecture (a digest of its ``ModelConfig`` and input
size), the batch size, the thread count and :func:`mobilenet.runtime.machine_identity` (CPU model, SIMD flags,
torch and ONNX Runtime versions). It leaves out the weights on purpose: a float32 network's speed depends on its
shapes, not on the values of its weights, so every checkpoint of one architecture shares one measurement (a
fine-tuned checkpoint is not measured again), and a model handed over in memory has no stored weights digest to
use without hashing every tensor at each start.

``MOBILENET_AUTO_MEASURE=0`` turns measuring off: ``auto`` is then the fixed order of
:func:`mobilenet.backends.pick_backend`. Either way a backend that fails to build gives way to the next one
(ONNX Runtime, then torch-jit, then eager torch), so ``auto`` never fails where eager torch would run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mobilenet.backends import (
    BACKENDS,
    ModelSource,
    backend_installed,
    onnxruntime_available,  # noqa: F401  (read as autotune.onnxruntime_available)
    pick_backend,
)
from mobilenet.errors import MobileNetError
from mobilenet.parity import seeded_batch
from mobilenet.runtime import (
    describe_machine,
    finite_positive,
    machine_identity,
    read_cache,
    user_cache_path,
    write_cache,
)
from mobilenet.timing import Candidate, summarize_timings, time_interleaved

__all__ = [
    "CPU_CANDIDATES",
    "MEASURE_ENV",
    "BackendChoice",
    "architecture_digest",
    "auto_cache_key",
    "choose_backend",
    "default_cache_path",
    "measuring_enabled",
]

#: Environment variable that turns measuring off ("0", "false", "no", "off"): ``auto`` is then a fixed order.
MEASURE_ENV = "MOBILENET_AUTO_MEASURE"
#: The CPU backends ``auto`` measures for a PyTorch model (those installed), in the fixed order's preference.
CPU_CANDIDATES = ("onnxruntime", "torch-jit", "executorch")
#: Seconds of timed rounds to aim for (all candidates together), after the warm-up.
MEASURE_BUDGET_S = 1.0
#: Untimed calls per candidate before timing (the first calls at a new batch size allocate and specialise).
WARMUP = 2
#: Timed rounds, at least and at most, whatever the budget allows.
MIN_ROUNDS, MAX_ROUNDS = 3, 25
#: Version of the cache file's layout; a file of another version is ignored.
CACHE_VERSION = 1
# Where only one backend runs the input, what auto says about it.
_ONLY_CHOICE = {
    "exported": "fixed: an exported .ts/.pt2/.pte file runs as it is",
    "onnxruntime": "fixed: an ONNX file runs on onnxruntime only",
    "torch": "fixed: eager torch on a GPU",
}


@dataclass
class BackendChoice:
    """The backend a Predictor runs: its name, the built runner and, in words, why it was chosen."""

    name: str
    backend: Any
    reason: str


def measuring_enabled() -> bool:
    """False when ``MOBILENET_AUTO_MEASURE`` is 0/false/no/off (then ``auto`` is a fixed order)."""
    return os.environ.get(MEASURE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/mobilenet/auto-backend.json``, else ``~/.cache/mobilenet/auto-backend.json``."""
    return user_cache_path("auto-backend.json")


def architecture_digest(source: ModelSource) -> str:
    """A short digest of what a model's speed depends on: its ``ModelConfig`` and input size (not its weights)."""
    fields = {"config": source.config.to_dict(), "input_size": source.preprocessing.get("input_size")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def auto_cache_key(source: ModelSource, *, batch: int, threads: int, machine: dict[str, Any]) -> str:
    """The identity of one choice: the architecture, batch size, threads, CPU and library versions."""
    fields = {"model": architecture_digest(source), "batch": batch, "threads": threads, **machine_identity(machine)}
    return json.dumps(fields, sort_keys=True)


def choose_backend(
    backend: str,
    source: ModelSource,
    *,
    device: str = "cpu",
    num_threads: int | None = None,
    batch_size: int = 32,
    cache_path: str | os.PathLike[str] | None = None,
) -> BackendChoice:
    """Build ``backend`` for ``source``; for ``"auto"``, the backend chosen as the module docstring says.

    Raises :class:`MobileNetError` for an unknown name, or when a backend asked for by name fails to build.
    """
    name = pick_backend(backend, source, device)
    if backend != "auto":
        return BackendChoice(name, BACKENDS[name](source, device=device, num_threads=num_threads), f"asked for {name}")
    if source.model is None or str(device).split(":")[0] != "cpu":
        return _build_in_order(name, source, device, num_threads, _ONLY_CHOICE[name])
    if not measuring_enabled():
        return _build_in_order(name, source, device, num_threads, f"fixed order: measuring is off ({MEASURE_ENV}=0)")
    installed = [c for c in CPU_CANDIDATES if backend_installed(c)]
    if len(installed) == 1:
        reason = f"fixed: only {installed[0]} is installed of {', '.join(CPU_CANDIDATES)} (nothing to measure)"
        return _build_in_order(installed[0], source, device, num_threads, reason)
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    return _measured_choice(source, installed, num_threads, batch_size, path)


def _build_in_order(first: str, source: ModelSource, device: str, threads: int | None, reason: str) -> BackendChoice:
    """``first``, or when it fails to build for a PyTorch model, the next of onnxruntime -> torch-jit -> torch."""
    order = ["onnxruntime", "torch-jit", "torch"]
    chain = order[order.index(first) :] if first in order and source.model is not None else [first]
    for index, name in enumerate(chain):
        try:
            return BackendChoice(name, BACKENDS[name](source, device=device, num_threads=threads), reason)
        except MobileNetError as error:
            if index == len(chain) - 1:
                raise
            reason = f"{reason}; {name} failed to build ({_short(error)}), next in order"
    raise AssertionError("unreachable")  # pragma: no cover


def _measured_choice(
    source: ModelSource, installed: Sequence[str], num_threads: int | None, batch: int, path: Path
) -> BackendChoice:
    """The cached choice for this key when it still builds; else every installed candidate built, timed, the
    fastest kept and cached."""
    threads = num_threads or torch.get_num_threads()
    key = auto_cache_key(source, batch=batch, threads=threads, machine=describe_machine(threads))
    notes: list[str] = []
    entries = read_cache(path, version=CACHE_VERSION, valid=_valid_entry, notes=notes, what="auto-backend")
    cached = entries.get(key)
    if cached is not None and cached["backend"] in installed:
        try:
            runner = BACKENDS[cached["backend"]](source, device="cpu", num_threads=num_threads)
            said = _describe(cached["latency_ms"], cached["batch"], cached["threads"])
            return BackendChoice(
                cached["backend"], runner, _with_notes(f"cached from {cached['measured_at']}: {said}", notes)
            )
        except MobileNetError as error:
            notes.append(f"the cached choice {cached['backend']} failed to build ({_short(error)}): measured again")
    runners = _build_candidates(source, installed, num_threads, notes)
    if not runners:
        return _build_in_order("torch", source, "cpu", num_threads, _with_notes("fixed: no candidate built", notes))
    if len(runners) == 1:
        ((name, runner),) = runners.items()
        return BackendChoice(name, runner, _with_notes(f"the only candidate that built: {name}", notes))
    medians = _time_candidates(runners, (batch, int(source.config.in_channels), *_input_hw(source)))
    name = min(medians, key=medians.__getitem__)
    entries[key] = {
        "backend": name,
        "latency_ms": medians,
        "batch": batch,
        "threads": threads,
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
    }
    write_cache(path, entries, version=CACHE_VERSION, notes=notes)
    return BackendChoice(name, runners[name], _with_notes(f"measured: {_describe(medians, batch, threads)}", notes))


def _build_candidates(
    source: ModelSource, names: Sequence[str], num_threads: int | None, notes: list[str]
) -> dict[str, Any]:
    """Each of ``names`` built for ``source`` on the CPU; one that fails is left out with a line in ``notes``."""
    runners: dict[str, Any] = {}
    for name in names:
        try:
            runners[name] = BACKENDS[name](source, device="cpu", num_threads=num_threads)
        except MobileNetError as error:
            notes.append(f"{name} skipped: failed to build ({_short(error)})")
    return runners


def _time_candidates(runners: dict[str, Any], shape: tuple[int, ...]) -> dict[str, float]:
    """Median milliseconds per forward of each runner on a seeded batch of ``shape``: a first round after the
    warm-up says how long a round takes, then as many more as fit :data:`MEASURE_BUDGET_S`."""
    x = seeded_batch(shape)
    candidates = [Candidate(name, name, runner) for name, runner in runners.items()]
    samples = time_interleaved(candidates, x, rounds=1, warmup=WARMUP)
    per_round = max(sum(times[0] for times in samples.values()), 1e-6)
    more = max(MIN_ROUNDS, min(MAX_ROUNDS, int(MEASURE_BUDGET_S / per_round))) - 1
    for name, times in time_interleaved(candidates, x, rounds=more, warmup=0).items():
        samples[name].extend(times)
    return {name: summarize_timings(times)["median"] for name, times in samples.items()}


def _input_hw(source: ModelSource) -> tuple[int, int]:
    size = int(source.preprocessing.get("input_size") or source.config.resolution)
    return size, size


def _describe(latency_ms: dict[str, float], batch: int, threads: int) -> str:
    """``"onnxruntime 3.1 ms vs torch-jit 4.0 ms at batch 32, 2 threads"``, fastest first."""
    ranked = " vs ".join(f"{name} {_ms(ms)} ms" for name, ms in sorted(latency_ms.items(), key=lambda item: item[1]))
    return f"{ranked} at batch {batch}, {threads} thread{'s' if threads != 1 else ''}"


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _with_notes(reason: str, notes: Sequence[str]) -> str:
    return "; ".join([reason, *notes])


def _short(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _valid_entry(entry: Any) -> bool:
    """A cached choice: a known backend, its medians (finite, > 0), batch, threads and when it was measured."""
    if not isinstance(entry, dict) or entry.get("backend") not in BACKENDS:
        return False
    latency = entry.get("latency_ms")
    return (
        isinstance(latency, dict)
        and bool(latency)
        and all(isinstance(name, str) and finite_positive(ms) for name, ms in latency.items())
        and all(isinstance(entry.get(k), int) for k in ("batch", "threads"))
        and isinstance(entry.get("measured_at"), str)
    )
