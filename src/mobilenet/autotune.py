"""Which backend ``backend="auto"`` runs, in which precision, and why (:func:`choose_backend`).

An exported ``.ts``/``.pt2``/``.pte`` file runs as it is, and a PyTorch model on a GPU in eager torch. Everywhere
else (a PyTorch model or an ONNX file on the CPU) the fastest backend depends on the CPU, the architecture, the
batch size and the thread count, so ``auto`` measures, among the installed backends of the precision tier asked
for (:data:`PRECISION_CANDIDATES`; the tier defaults to the model's own: float32, or int8 for a file
:mod:`mobilenet.quantize` wrote):

1. it builds each candidate (each is checked against the PyTorch model as it is built); one that fails to build
   is skipped;
2. it times them on a seeded batch of the Predictor's batch size with :func:`mobilenet.timing.time_interleaved`
   (:data:`WARMUP` untimed calls each, then interleaved rounds that fit :data:`MEASURE_BUDGET_S`, at least
   :data:`MIN_ROUNDS`; candidates within :data:`CLOSE_CALL` of the fastest are timed again between themselves), and
   keeps the one with the lowest median;
3. it caches the choice in a JSON file under the user's cache directory (:func:`default_cache_path`), so the next
   start with the same key builds only the chosen backend.

The cache key (:func:`auto_cache_key`) is the model's architecture (a digest of its ``ModelConfig`` and input
size), the precision tier, whether it came as a file, the batch size, the thread count and
:func:`mobilenet.runtime.machine_identity` (CPU model, SIMD flags, torch, ONNX Runtime and OpenVINO versions). It
leaves out the weights on purpose: a network's speed depends on its shapes, not on the values of its weights, so
every checkpoint of one architecture shares one measurement (a fine-tuned checkpoint is not measured again), and a
model handed over in memory has no stored weights digest to use without hashing every tensor at each start.

The tiers trade accuracy for speed: ``bf16`` where the CPU computes in bf16 natively, ``int8`` for a quantized
model (or a float model in our fused kernel's int8, which quantizes as it runs, on a CPU with 8-bit dot products),
``auto-fast`` the fastest of float32 and bf16. Their accuracy is measured, not assumed: ``mobilenet eval
--precision`` compares a tier with float32 on a validation set and refuses one that loses more than its bound.

``MOBILENET_AUTO_MEASURE=0`` turns measuring off: ``auto`` is then the first installed candidate of the tier (for
float32: ONNX Runtime, OpenVINO, torch-jit, ExecuTorch, then our fused kernel). Either way a backend that fails to
build gives way to the next one, and for a float32 PyTorch model eager torch is the last resort, so ``auto`` never
fails where eager torch would run.
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
    pick_backend,
    require_native_bf16,
    source_precision,
)
from mobilenet.errors import INSTALL_HINTS, MobileNetError
from mobilenet.parity import seeded_batch
from mobilenet.runtime import (
    describe_machine,
    has_int8_dot,
    has_native_bf16,
    machine_identity,
    plausible_latency_ms,
    read_cache,
    user_cache_path,
    write_cache,
)
from mobilenet.timing import DEFAULT_PAUSE_S, Candidate, summarize_timings, time_interleaved

__all__ = [
    "CPU_CANDIDATES",
    "FLOAT_INT8_BACKENDS",
    "MEASURE_ENV",
    "PRECISIONS",
    "PRECISION_BOUNDS",
    "PRECISION_CANDIDATES",
    "BackendChoice",
    "architecture_digest",
    "auto_cache_key",
    "choose_backend",
    "default_cache_path",
    "measuring_enabled",
    "resolve_precision",
    "tier_candidates",
]

#: Environment variable that turns measuring off ("0", "false", "no", "off"): ``auto`` is then a fixed order.
MEASURE_ENV = "MOBILENET_AUTO_MEASURE"
#: Precision tiers: ``fp32``; ``bf16`` (CPUs with AVX512-BF16 or AMX); ``int8`` (an int8 ONNX file from
#: :mod:`mobilenet.quantize`, or a float model in our fused kernel's int8 on a CPU with 8-bit dot products);
#: ``auto-fast`` (the fastest of float32 and, where the CPU has it, bf16, measured).
PRECISIONS = ("fp32", "bf16", "int8", "auto-fast")
#: The most top-1 accuracy (a fraction: 0.003 is 0.3 points) a tier may lose against float32 on a validation set
#: before ``mobilenet eval --precision`` refuses it.
PRECISION_BOUNDS: dict[str, float] = {"bf16": 0.003, "int8": 0.01}
#: The CPU backends ``auto`` measures for each precision tier (those installed), in the fixed order's preference.
PRECISION_CANDIDATES: dict[str, tuple[str, ...]] = {
    "fp32": ("onnxruntime", "openvino", "torch-jit", "executorch", "fused"),
    "bf16": ("openvino-bf16",),
    "int8": ("onnxruntime", "openvino", "fused-int8"),
}
#: The int8 backends that quantize a float model themselves (no calibration), offered where the CPU has 8-bit dot
#: products (:func:`mobilenet.runtime.has_int8_dot`): elsewhere they would emulate them, slower than float32.
FLOAT_INT8_BACKENDS = ("fused-int8",)
#: The float32 candidates (kept by name: the table of :data:`PRECISION_CANDIDATES` is the one to extend).
CPU_CANDIDATES = PRECISION_CANDIDATES["fp32"]
#: Backends that run a model given as an ONNX file.
FILE_BACKENDS = ("onnxruntime", "openvino", "openvino-bf16")
#: Seconds of timed rounds to aim for (all candidates together, with the pause before each call that lets the
#: previous candidate's threads go quiet), after the warm-up.
MEASURE_BUDGET_S = 2.0
#: Untimed calls per candidate before timing (the first calls at a new batch size allocate and specialise).
WARMUP = 2
#: Timed rounds, at least and at most, whatever the budget allows.
MIN_ROUNDS, MAX_ROUNDS = 3, 25
#: Candidates whose medians are within this factor of the fastest are timed again, as many rounds, before choosing.
CLOSE_CALL = 1.10
#: Version of the cache file (its layout, and how its choices were measured); a file of another version is ignored.
#: 2: each call timed after a pause longer than every backend's idle spin (1's choices could favour our kernel).
CACHE_VERSION = 2
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


def auto_cache_key(
    source: ModelSource, *, batch: int, threads: int, machine: dict[str, Any], precision: str = "fp32"
) -> str:
    """The identity of one choice: the architecture, precision tier, batch size, threads, CPU and library versions
    (an ONNX file is measured as such: a file and a PyTorch model of one architecture have different candidates),
    and the fused kernel's instruction set where one is forced (:func:`mobilenet.runtime.machine_identity`)."""
    fields = {
        "model": architecture_digest(source),
        "precision": precision,
        "file": source.model is None,
        "batch": batch,
        "threads": threads,
        **machine_identity(machine),
    }
    return json.dumps(fields, sort_keys=True)


def resolve_precision(precision: str | None, source: ModelSource) -> str:
    """The precision tier to run ``source`` in: ``None`` is the model's own (``"int8"`` for an int8 ONNX file, else
    ``"fp32"``); a tier the model cannot run in raises :class:`MobileNetError` saying what would."""
    own = source_precision(source)
    if precision is None:
        return own
    if precision not in PRECISIONS:
        raise MobileNetError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if own == "int8" and precision in ("fp32", "bf16"):
        where = f" {source.path}" if source.path else ""
        raise MobileNetError(
            f"the model{where} is already int8; precision {precision} needs the float model (its .safetensors "
            "checkpoint or fp32 .onnx)"
        )
    if own == "fp32" and precision == "int8" and not _float_int8_backends(source):
        raise MobileNetError(
            "precision int8 runs an int8 model: write one with `mobilenet quantize CHECKPOINT --calibration DIR` "
            "and give the .onnx it writes (`mobilenet eval --precision int8 --calibration DIR` quantizes for you); "
            f"a float checkpoint runs in int8 as it is only in our fused kernel, on a CPU with VNNI ({_fused_state()})"
        )
    if precision == "auto-fast":
        return "int8" if own == "int8" else "auto-fast"
    return precision


def tier_candidates(tier: str, source: ModelSource) -> list[str]:
    """The installed backends that run ``source`` in precision ``tier`` on the CPU, in the fixed order's preference
    (:data:`PRECISION_CANDIDATES`; ``auto-fast`` is float32's and bf16's together where the CPU has bf16)."""
    if tier == "auto-fast":
        names = [*PRECISION_CANDIDATES["fp32"], *(PRECISION_CANDIDATES["bf16"] if has_native_bf16() else ())]
    else:
        names = list(PRECISION_CANDIDATES[tier])
    if source.model is None:  # a file: only the runtimes that read it
        names = [name for name in names if name in FILE_BACKENDS]
    elif tier == "int8":  # a float model: only the backends that quantize it themselves
        names = [name for name in names if name in _float_int8_backends(source)]
    return [name for name in names if backend_installed(name)]


def _float_int8_backends(source: ModelSource) -> list[str]:
    """The installed :data:`FLOAT_INT8_BACKENDS` for ``source`` (a float PyTorch model) on this CPU."""
    if source.model is None or not has_int8_dot():
        return []
    return [name for name in FLOAT_INT8_BACKENDS if backend_installed(name)]


def _fused_state() -> str:
    if not has_int8_dot():
        return "this CPU has no 8-bit dot products"
    return "the fused kernel is built" if backend_installed("fused-int8") else "the fused kernel is not built"


def choose_backend(
    backend: str,
    source: ModelSource,
    *,
    device: str = "cpu",
    num_threads: int | None = None,
    batch_size: int = 32,
    cache_path: str | os.PathLike[str] | None = None,
    precision: str | None = None,
) -> BackendChoice:
    """Build ``backend`` for ``source`` in ``precision`` (:func:`resolve_precision`); for ``"auto"``, the backend
    chosen as the module docstring says.

    Raises :class:`MobileNetError` for an unknown name or precision, a backend of another precision than the one
    asked for, or when a backend asked for by name fails to build.
    """
    tier = resolve_precision(precision, source)
    if backend != "auto":
        name = pick_backend(backend, source, device)
        runner = BACKENDS[name](source, device=device, num_threads=num_threads)
        ran = getattr(runner, "precision", "fp32")
        if precision is not None and tier != "auto-fast" and ran != tier:
            raise MobileNetError(f"backend {name} runs this model in {ran}, not {tier}; use backend auto")
        return BackendChoice(name, runner, f"asked for {name}")
    on_cpu = str(device).split(":")[0] == "cpu"
    if source.program is not None or not on_cpu:
        runs_as_it_is = source.program is not None and tier == source_precision(source)  # e.g. an int8 .pte
        if tier not in ("fp32", "auto-fast") and not runs_as_it_is:
            raise MobileNetError(f"precision {tier} runs on the CPU, on a float or int8 .onnx or a checkpoint")
        name = pick_backend(backend, source, device)
        return _build_in_order(name, source, device, num_threads, _ONLY_CHOICE[name])
    installed = tier_candidates(tier, source)
    if not installed:
        needs = "openvino" if tier == "bf16" else "onnx"
        raise MobileNetError(f"no installed backend runs precision {tier}; {INSTALL_HINTS[needs]}")
    if tier == "bf16":
        require_native_bf16()
    if not measuring_enabled():
        return _build_in_order(
            installed[0], source, device, num_threads, f"fixed order: measuring is off ({MEASURE_ENV}=0)", installed
        )
    if len(installed) == 1:
        reason = f"fixed: {installed[0]} is the only installed backend for {tier} here (nothing to measure)"
        return _build_in_order(installed[0], source, device, num_threads, reason, installed)
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    return _measured_choice(source, installed, num_threads, batch_size, path, tier)


def _build_in_order(
    first: str,
    source: ModelSource,
    device: str,
    threads: int | None,
    reason: str,
    order: Sequence[str] = ("onnxruntime", "torch-jit", "torch"),
) -> BackendChoice:
    """``first``, or when it fails to build, the next of ``order`` after it (for a PyTorch model in float32, eager
    torch is always the last resort)."""
    order = list(order)
    if source.model is not None and "torch" not in order and source_precision(source) == "fp32":
        order.append("torch")
    chain = order[order.index(first) :] if first in order else [first]
    for index, name in enumerate(chain):
        try:
            return BackendChoice(name, BACKENDS[name](source, device=device, num_threads=threads), reason)
        except MobileNetError as error:
            if index == len(chain) - 1:
                raise
            reason = f"{reason}; {name} failed to build ({_short(error)}), next in order"
    raise AssertionError("unreachable")  # pragma: no cover


def _measured_choice(
    source: ModelSource, installed: Sequence[str], num_threads: int | None, batch: int, path: Path, tier: str
) -> BackendChoice:
    """The cached choice for this key when it still builds; else every installed candidate built, timed, the
    fastest kept and cached."""
    threads = num_threads or torch.get_num_threads()
    key = auto_cache_key(source, batch=batch, threads=threads, machine=describe_machine(threads), precision=tier)
    notes: list[str] = []
    entries = read_cache(path, version=CACHE_VERSION, valid=_valid_entry, notes=notes, what="auto-backend")
    cached = entries.get(key)
    if cached is not None and (cached["batch"], cached["threads"]) != (batch, threads):
        cached = None  # measured under other settings than its key's: edited, or copied from another entry
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
        if source.model is None:  # a file no runtime could load: say why each refused it
            raise MobileNetError(f"no installed runtime can run {source.path}: " + "; ".join(notes))
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
    warm-up says how long a round takes, then as many more as fit :data:`MEASURE_BUDGET_S`; candidates within
    :data:`CLOSE_CALL` of the fastest get as many rounds again (between them only) before the medians are final."""
    x = seeded_batch(shape)
    candidates = [Candidate(name, name, runner) for name, runner in runners.items()]
    samples = time_interleaved(candidates, x, rounds=1, warmup=WARMUP)
    per_round = max(sum(times[0] for times in samples.values()) + len(candidates) * DEFAULT_PAUSE_S, 1e-6)
    more = max(MIN_ROUNDS, min(MAX_ROUNDS, int(MEASURE_BUDGET_S / per_round))) - 1
    for name, times in time_interleaved(candidates, x, rounds=more, warmup=0).items():
        samples[name].extend(times)
    medians = {name: summarize_timings(times)["median"] for name, times in samples.items()}
    first, second = sorted(medians.values())[:2]
    if second < CLOSE_CALL * first:  # too close to call on a noisy machine: as many rounds again, between the two
        close = [c for c in candidates if medians[c.name] < CLOSE_CALL * first]
        for name, times in time_interleaved(close, x, rounds=more + 1, warmup=0).items():
            samples[name].extend(times)
        medians.update({c.name: summarize_timings(samples[c.name])["median"] for c in close})
    return medians


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
    """A cached choice: a known backend that is the fastest of its medians (each finite, > 0, at most an hour),
    batch and threads (integers >= 1) and when it was measured (text on one line: it goes into a status line)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("backend"), str) or entry["backend"] not in BACKENDS:
        return False
    latency, measured_at = entry.get("latency_ms"), entry.get("measured_at")
    return (
        isinstance(latency, dict)
        and bool(latency)
        and all(isinstance(name, str) and plausible_latency_ms(ms) for name, ms in latency.items())
        and latency.get(entry["backend"]) == min(latency.values())
        and all(type(entry.get(k)) is int and entry[k] >= 1 for k in ("batch", "threads"))
        and isinstance(measured_at, str)
        and measured_at.isprintable()
    )
