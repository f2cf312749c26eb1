"""Latency and throughput of MobileNets across runtimes, against the analytic cost and the CPU's measured peak.

``bench(["mobilenet_v2_1.0_224"], backends=..., batch_sizes=(1, 32))`` is what ``mobilenet bench`` calls. How it
measures (interleaved, so that drift in the machine's speed hits every candidate alike):

1. every candidate (a backend prepared for one model) is built and checked against the eager PyTorch model
   (max abs logit difference, reported as ``max_abs_diff``; int8 differs by design);
2. each runs ``warmup`` untimed forwards per batch size;
3. ``rounds`` rounds follow, each timing one forward of every candidate, in an order rotated every round;
4. per candidate: median, p90 and min latency; throughput = batch / median.

Every figure sits next to the model's analytic multiply-adds (:func:`mobilenet.cost.count_costs`; 1 MAC = 2 FLOPs)
and the achieved GFLOP/s = 2 * MACs * batch / median latency. The reference line is the CPU's float32
matrix-multiply peak measured in the same run (:func:`gemm_peak`: ``torch.mm`` on square matrices with the same
threads): no float32 network can run faster than ``2 * MACs * batch / peak`` (``flop_limit_ms``).

Backends (:data:`BENCH_BACKENDS`): PyTorch eager as built, eager in channels_last, ``torch.jit`` (BatchNorm folded,
traced, frozen, ``optimize_for_inference``), ``torch.compile`` (inductor; slow to compile, so only when asked),
ONNX Runtime and OpenVINO in float32 and int8 (the static QDQ model of :mod:`mobilenet.quantize`, the same file in
both), OpenVINO in bf16 (CPUs with AVX512-BF16 or AMX), and ``auto`` and ``auto-fast``: what
``mobilenet.Predictor(backend="auto")`` runs in float32 and with ``precision="auto-fast"``. Each row says its
precision; ``x_fastest_fp32_runtime`` compares every row with the fastest float32 runtime of its group.

:class:`Candidate`, :func:`time_interleaved` and :func:`summarize_timings` (from :mod:`mobilenet.timing`, re-exported
here) and :func:`gemm_peak` are the timing tools the scripts of ``benchmarks/`` build on too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from mobilenet.backends import BACKENDS, ModelSource, RandomWeightsWarning, load_source, onnxruntime_available
from mobilenet.cost import check_fits_memory, count_costs
from mobilenet.data import resolve_preprocessing
from mobilenet.errors import INSTALL_HINTS, MobileNetError
from mobilenet.export import INPUT_NAME, OUTPUT_NAME, ort_session
from mobilenet.models import model_from_config
from mobilenet.parity import logit_difference, seeded_batch
from mobilenet.predict import Predictor
from mobilenet.quantize import calibration_files, quantize_onnx, resolve_activation_type
from mobilenet.runtime import describe_machine, set_threads
from mobilenet.spec import MODELS, model_config
from mobilenet.timing import DEFAULT_PAUSE_S, Candidate, summarize_timings, time_interleaved

__all__ = [
    "BENCH_BACKENDS",
    "DEFAULT_BACKENDS",
    "DEFAULT_PAUSE_S",
    "MAX_GEMM_SIZE",
    "MAX_PAUSE_S",
    "BenchReport",
    "Candidate",
    "bench",
    "build_candidate",
    "gemm_peak",
    "parse_backends",
    "parse_batch_sizes",
    "summarize_timings",
    "time_interleaved",
]

#: bench's names (the ``--backends`` values) for the backends of :data:`mobilenet.backends.BACKENDS`.
BENCH_NAMES: dict[str, str] = {
    "eager": "torch",
    "channels_last": "torch-channels-last",
    "jit": "torch-jit",
    "compile": "torch-compile",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "openvino-bf16": "openvino-bf16",
    "executorch": "executorch",
    "fused": "fused",
    "fused-int8": "fused-int8",
}
#: Backend name -> what it runs: the backends above, plus the int8 model and the Predictor's default path.
BENCH_BACKENDS: dict[str, str] = {
    **{name: BACKENDS[backend].description for name, backend in BENCH_NAMES.items()},
    "onnxruntime-int8": "ONNX Runtime int8 static QDQ (per-channel weights, 8-bit activations)",
    "openvino-int8": "OpenVINO on the same int8 QDQ model",
    "auto": "mobilenet.Predictor(backend='auto'): the library's default path",
    "auto-fast": "mobilenet.Predictor(precision='auto-fast'): the fastest of float32 and bf16",
}
#: The precision of each backend that is not float32 (a row's ``precision``; only float32 rows set the
#: ``x_fastest_fp32_runtime`` yardstick).
BENCH_PRECISION: dict[str, str] = {
    "openvino-bf16": "bf16",
    "onnxruntime-int8": "int8",
    "openvino-int8": "int8",
    "fused-int8": "int8",
    "auto-fast": "auto-fast",
}
#: The rows of one int8 QDQ model, quantized once per model (calibrated), in each runtime.
QDQ_BACKENDS = ("onnxruntime-int8", "openvino-int8")
#: The int8 rows (``--int8`` adds them): the QDQ model's, and our fused kernel's int8 (quantizes as it runs).
INT8_BACKENDS = (*QDQ_BACKENDS, "fused-int8")
#: What runs when no --backends are given (``--int8`` adds the int8 rows; compile only when named; a backend whose
#: package or CPU feature is missing is left out with a note).
DEFAULT_BACKENDS = (
    "eager",
    "channels_last",
    "jit",
    "onnxruntime",
    "openvino",
    "executorch",
    "fused",
    "openvino-bf16",
    "auto",
)
#: Images the int8 model is calibrated on when no directory is given (uniform noise: measures speed, not accuracy).
RANDOM_CALIBRATION_IMAGES = 16
#: The largest side of the GEMM-peak matrices: three float32 matrices of 8192^2 take 768 MiB, far past any cache.
MAX_GEMM_SIZE = 8192
#: The longest pause before a timed call, in seconds: far longer than any runtime's idle threads spin (a pause of
#: years would hang the run).
MAX_PAUSE_S = 60.0


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def parse_batch_sizes(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,32"`` -> ``(1, 32)``; each an integer >= 1, no duplicates (else :class:`MobileNetError`)."""
    if not isinstance(text, str | Sequence):
        raise MobileNetError(f"batch sizes must be text such as '1,32' or a list of integers, got {text!r}")
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    sizes: list[int] = []
    for item in items:
        try:
            size = int(item)
            if isinstance(item, bool) or str(size) != str(item).strip():
                raise ValueError
        except (TypeError, ValueError):
            raise MobileNetError(
                f"batch sizes must be integers >= 1 separated by commas (e.g. 1,32), got {text!r}"
            ) from None
        if size < 1:
            raise MobileNetError(f"batch sizes must be integers >= 1, got {size} in {text!r}")
        if size in sizes:
            raise MobileNetError(f"batch size {size} is given twice in {text!r}")
        sizes.append(size)
    if not sizes:
        raise MobileNetError("no batch sizes given; expected e.g. 1,32")
    return tuple(sizes)


def parse_backends(names: str | Sequence[str] | None, *, int8: bool = False, compile: bool = False) -> tuple[str, ...]:
    """The backends to run: ``names`` (comma-separated or a list; ``"all"`` = every one) or the defaults, plus
    onnxruntime-int8 with ``int8`` and compile with ``compile``. Unknown names raise :class:`MobileNetError`."""
    if names is None or names == "" or names == []:
        chosen = list(DEFAULT_BACKENDS)
    else:
        items = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n).strip() for n in names]
        chosen = []
        for name in items:
            if name == "all":
                chosen.extend(BENCH_BACKENDS)
                continue
            if name not in BENCH_BACKENDS:
                raise MobileNetError(f"unknown backend {name!r}; expected some of {', '.join(BENCH_BACKENDS)}")
            chosen.append(name)
    if int8:
        chosen.extend(INT8_BACKENDS)
    if compile:
        chosen.append("compile")
    return tuple(dict.fromkeys(chosen))


# ---------------------------------------------------------------------------------------------------------------
# The machine's peak
# ---------------------------------------------------------------------------------------------------------------


def gemm_peak(size: int = 1024, *, repeats: int = 8) -> dict[str, float]:
    """The float32 matrix-multiply peak of this CPU with torch's current threads: ``torch.mm`` of two ``size`` x
    ``size`` matrices (2 * size^3 FLOPs), best of ``repeats`` after one warm-up. Returns ``{"size", "gflops",
    "seconds"}`` (seconds of the best run)."""
    if size < 16:
        raise MobileNetError(f"the GEMM size must be >= 16, got {size}")
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    best = math.inf
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return {"size": size, "gflops": 2 * size**3 / best / 1e9, "seconds": best}


# ---------------------------------------------------------------------------------------------------------------
# Candidates (timed by :func:`mobilenet.timing.time_interleaved`)
# ---------------------------------------------------------------------------------------------------------------


def _max_abs_diff(run: Callable[[Any], Any], reference: nn.Module, shape: tuple[int, ...]) -> float:
    """The largest |logit difference| from the eager model on a seeded batch (reported, not bounded: the int8
    model differs by design)."""
    return logit_difference(run, reference, [seeded_batch(shape)])


def _ort_runner(path: Path, threads: int | None) -> Callable[[Any], Any]:
    session = ort_session(path, threads, spin=True)  # as the Predictor's onnxruntime backend runs it

    def run(x: torch.Tensor) -> Any:
        return session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]

    return run


def build_candidate(
    backend: str,
    model: nn.Module,
    shape: tuple[int, int, int, int],
    *,
    threads: int | None = None,
    calibration: str | os.PathLike[str] | None = None,
    workdir: Path | None = None,
    int8_activations: str = "auto",
) -> Candidate:
    """Prepare ``backend`` (one of :data:`BENCH_BACKENDS`) for ``model`` at input ``shape`` (its batch is only the
    tracing example; every backend takes any batch): the backends of :data:`mobilenet.backends.BACKENDS`, as
    :class:`mobilenet.predict.Predictor` runs them, plus the int8 model (files in ``workdir``, a temporary directory)
    and the Predictor's ``auto``.
    Raises :class:`MobileNetError` when the backend's package is missing."""
    if backend not in BENCH_BACKENDS:
        raise MobileNetError(f"unknown backend {backend!r}; expected some of {', '.join(BENCH_BACKENDS)}")
    description = BENCH_BACKENDS[backend]
    model = model.eval()
    if backend in BENCH_NAMES:
        source = ModelSource(
            name=str(getattr(model, "name", "")),
            config=model.config,
            classes=None,
            preprocessing=resolve_preprocessing(None, shape[-1]).to_dict(),
            model=model,
        )
        runner = BACKENDS[BENCH_NAMES[backend]](source, num_threads=threads)
        notes = ["compiled per batch size during warm-up"] if backend == "compile" else []
        return Candidate(backend, description, runner, runner.max_abs_diff, notes)
    if backend in ("auto", "auto-fast"):
        runner = _AutoRunner(model, threads, "auto-fast" if backend == "auto-fast" else None, shape[0])
        return Candidate(
            backend,
            f"{description} -> {runner.choices[shape[0]].backend_name}",
            runner,
            _max_abs_diff(runner, model, (shape[0], *shape[1:])),
            runner.notes,
        )
    if not onnxruntime_available():
        raise MobileNetError(f"backend {backend} needs onnx and onnxruntime; {INSTALL_HINTS['onnx']}")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mobilenet-bench-"))
    path, notes = _int8_model(model, shape, calibration, workdir, int8_activations)
    if backend == "openvino-int8":
        run = BACKENDS["openvino"](load_source(path), num_threads=threads)
    else:
        run = _ort_runner(path, threads)
    return Candidate(backend, description, run, _max_abs_diff(run, model, (2, *shape[1:])), notes)


class _AutoRunner:
    """What ``Predictor(backend="auto")`` runs at each batch size: one Predictor per batch size (built on the first
    call at that size, during the warm-up), since ``auto`` measures for the batch size it is given."""

    def __init__(self, model: nn.Module, threads: int | None, precision: str | None, first_batch: int) -> None:
        self.model, self.threads, self.precision = model, threads, precision
        self.choices: dict[int, Predictor] = {}
        self.notes: list[str] = []
        self.prepare(first_batch)

    def prepare(self, batch: int) -> Predictor:
        """The Predictor for ``batch`` images, built (and its choice measured) on first use."""
        predictor = self.choices.get(batch)
        if predictor is None:
            predictor = Predictor(self.model, num_threads=self.threads, batch_size=batch, precision=self.precision)
            self.choices[batch] = predictor
            self.notes.append(f"batch {batch}: auto picked {predictor.backend_name} ({predictor.backend_reason})")
        return predictor

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.prepare(int(batch.shape[0])).logits(batch)


def _int8_model(
    model: nn.Module,
    shape: tuple[int, int, int, int],
    calibration: str | os.PathLike[str] | None,
    workdir: Path,
    activations: str,
) -> tuple[Path, list[str]]:
    """``model`` quantized to an int8 ONNX file in ``workdir`` (once: every int8 row of one model runs the same
    file), and notes saying how."""
    calibration_note = f"calibrated on the images in {calibration}"
    if calibration is None:
        calibration = _random_images(workdir / "calibration", shape[-1], RANDOM_CALIBRATION_IMAGES)
        calibration_note = (
            f"calibrated on {RANDOM_CALIBRATION_IMAGES} random-noise images: a speed figure only (accuracy needs "
            "real calibration images, see docs/deploy.md)"
        )
    path = workdir / f"{id(model)}-{shape[-1]}-int8.onnx"
    settings_path = path.with_suffix(".settings")
    if not path.is_file() or not settings_path.is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = quantize_onnx(model, path, calibration, num_calibration=None, activation_type=activations)
        settings_path.write_text(f"weights {result.settings['weights']}, activations {result.settings['activations']}")
    return path, [calibration_note, settings_path.read_text()]


def _random_images(directory: Path, size: int, count: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(directory / f"{index}.png")
    return directory


# ---------------------------------------------------------------------------------------------------------------
# mobilenet bench
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class BenchReport:
    """Everything a bench run measured (``to_dict`` is the CLI's JSON)."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    gemm: list[dict[str, float]]
    results: list[dict[str, Any]]
    models: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gflops(self) -> float:
        """The float32 GEMM peak: the best of the measurements at the start and the end of the run."""
        return max(entry["gflops"] for entry in self.gemm)

    def to_dict(self) -> dict[str, Any]:
        return {
            "convention": "1 MAC = 1 multiply-add = 2 FLOPs; GFLOP/s = 2 * MACs * batch / median latency",
            "machine": self.machine,
            "settings": self.settings,
            "gemm_peak": {"gflops": self.peak_gflops, "measurements": self.gemm},
            "models": self.models,
            "results": self.results,
            "notes": self.notes,
        }


def _load_model(model: Any, resolution: int | None, batch_size: int) -> tuple[str, Any, Any]:
    """(name, eval-mode model, config at the benchmark resolution) for a name, checkpoint path or MobileNet,
    refused when ``batch_size`` images at that resolution cannot fit in memory. An exported file (``.onnx`` fp32 or
    int8, ``.ts``, ``.pt2``, ``.pte``, ``.tflite``) comes back as its :class:`~mobilenet.backends.ModelSource`: it
    runs as it is, at its own input size."""
    if isinstance(model, str) and model in MODELS:
        overrides = {"resolution": resolution} if resolution else {}
        config = model_config(model, **overrides)
        check_fits_memory(config, batch_size=batch_size, name=model)  # before the weights are allocated
        built = model_from_config(config, name=model).eval()
        return model, built, built.config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        source = load_source(model)
    if source.model is None:
        # The file's graph takes its preprocessing's input size, which a checkpoint may set apart from the config's
        # nominal resolution: batches (and the MACs counted) are at that size.
        size = int(source.preprocessing["input_size"])
        if resolution and resolution != size:
            raise MobileNetError(
                f"{model} is an exported file: it runs at its own input size ({size} px); drop --resolution"
            )
        config = dataclasses.replace(source.config, resolution=size)
        check_fits_memory(config, batch_size=batch_size, name=str(model))
        return source.name or str(model), source, config
    config = source.config
    if resolution:
        config = dataclasses.replace(config, resolution=resolution)
    name = source.name or str(model)
    check_fits_memory(config, batch_size=batch_size, name=name)
    return name, source.model.float().cpu().eval(), config


def bench(
    models: Sequence[Any],
    *,
    backends: str | Sequence[str] | None = None,
    batch_sizes: str | Sequence[int] = (1, 32),
    threads: int | None = None,
    int8: bool = False,
    resolution: int | None = None,
    rounds: int = 30,
    warmup: int = 5,
    gemm_size: int = 1024,
    calibration: str | os.PathLike[str] | None = None,
    pause: float = DEFAULT_PAUSE_S,
    int8_activations: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Benchmark ``models`` (registered names, random weights, or checkpoints) on ``backends`` (default
    :data:`DEFAULT_BACKENDS`) at each batch size; see the module docstring for the protocol.

    Args:
        threads: intra-op threads for torch and ONNX Runtime (default: torch's current count).
        int8: add the :data:`INT8_BACKENDS` rows (calibrated on ``calibration``, a directory of images, or noise).
        resolution: input side (default: each model's resolution).
        rounds, warmup: timed rounds and untimed forwards per candidate and batch size.
        gemm_size: side of the square matrices of the GEMM peak (measured at the start and the end).
        pause: seconds between timed calls (see :func:`time_interleaved`).
        int8_activations: ``"auto"`` (what ``mobilenet quantize`` writes by default: uint8 on x86, int8
            elsewhere), ``"int8"`` or ``"uint8"``.
        progress: called with a line of text as each stage starts (the CLI prints it on stderr).

    A backend that cannot be built (a missing package, a failing compile) is left out with a note; asking only
    for unavailable backends raises :class:`MobileNetError`.
    """
    say = progress or (lambda _line: None)
    names = parse_backends(backends, int8=int8)
    sizes = parse_batch_sizes(batch_sizes)
    _check_settings(models, rounds=rounds, warmup=warmup, gemm_size=gemm_size, resolution=resolution, pause=pause)
    _check_calibration(calibration, names)
    threads = set_threads(threads)
    # Every model name, and whether its largest batch fits in memory, is checked before anything runs.
    loaded = [_load_model(m, resolution, max(sizes)) for m in models]
    machine = describe_machine(threads)
    say(f"GEMM peak ({gemm_size}x{gemm_size} float32, {threads} threads)")
    gemm = [gemm_peak(gemm_size)]
    results: list[dict[str, Any]] = []
    model_rows: list[dict[str, Any]] = []
    notes: list[str] = []
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="mobilenet-bench-") as tmp:
        for index, (name, model, config) in enumerate(loaded):
            macs = count_costs(config).macs
            size = int(config.resolution)
            shape = (1, int(config.in_channels), size, size)
            model_rows.append({"model": name, "resolution": size, "macs_per_image": macs, "config": config.to_dict()})
            options = {"threads": threads, "calibration": calibration, "int8_activations": int8_activations}
            if isinstance(model, ModelSource):
                candidates = [_file_candidate(name, model, threads, notes)]
            else:
                candidates = _prepare_candidates(
                    name, model, shape, names, notes, say, workdir=Path(tmp) / str(index), **options
                )
            for batch in sizes:
                say(f"{name}: batch {batch}, {warmup} warm-up + {rounds} interleaved rounds x {len(candidates)}")
                x = torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(batch))
                for candidate in candidates:
                    if isinstance(candidate.run, _AutoRunner):
                        candidate.run.prepare(batch)  # auto measures for this batch size, outside the timed rounds
                times = time_interleaved(candidates, x, rounds=rounds, warmup=warmup, pause=pause)
                results.extend(_result_row(name, c, batch, macs, times[c.name]) for c in candidates)
            for candidate in candidates:
                if isinstance(candidate.run, _AutoRunner):  # the choices made at the later batch sizes
                    notes.extend(f"{name}: {candidate.name}: {note}" for note in candidate.run.notes[1:])
    say("GEMM peak again (end of run)")
    gemm.append(gemm_peak(gemm_size))
    report = BenchReport(
        machine=machine,
        settings={
            "backends": list(names),
            "batch_sizes": list(sizes),
            "threads": threads,
            "rounds": rounds,
            "warmup": warmup,
            "resolution": resolution,
            "gemm_size": gemm_size,
            "pause_s": pause,
            "int8_calibration": str(calibration) if calibration else ("random noise" if int8 else None),
            "int8_activations": resolve_activation_type(int8_activations) if set(QDQ_BACKENDS) & set(names) else None,
        },
        gemm=gemm,
        results=results,
        models=model_rows,
        notes=notes,
    )
    _add_ratios(report)
    return report


def _check_settings(
    models: Sequence[Any], *, rounds: Any, warmup: Any, gemm_size: Any, resolution: Any, pause: Any
) -> None:
    """Refuse, before anything runs, what :func:`bench` cannot measure: no model, or a count out of range."""
    if not models:
        raise MobileNetError("no model given; expected a registered name (see `mobilenet models`) or a checkpoint")
    for value, what in ((rounds, "rounds"), (gemm_size, "gemm size")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MobileNetError(f"{what} must be an integer >= 1, got {value!r}")
    if gemm_size > MAX_GEMM_SIZE:  # torch.mm's matrices would not fit in memory: an allocator traceback
        raise MobileNetError(f"gemm size must be at most {MAX_GEMM_SIZE}, got {gemm_size}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise MobileNetError(f"warmup must be an integer >= 0, got {warmup!r}")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 32):
        raise MobileNetError(f"resolution must be an integer >= 32, got {resolution!r}")
    if isinstance(pause, bool) or not isinstance(pause, int | float) or not (math.isfinite(pause) and pause >= 0):
        raise MobileNetError(f"the pause between timed calls must be a number of seconds >= 0, got {pause!r}")
    if pause > MAX_PAUSE_S:
        raise MobileNetError(f"the pause between timed calls must be at most {MAX_PAUSE_S:g} s, got {pause!r}")


def _check_calibration(calibration: str | os.PathLike[str] | None, backends: Sequence[str]) -> None:
    """Calibration images apply to the int8 backend only, and must be there (an int8 run that cannot read them
    would otherwise be left out with a note and the run would still succeed)."""
    if calibration is None:
        return
    if not isinstance(calibration, str | os.PathLike):
        raise MobileNetError(f"calibration must be a directory path, got {type(calibration).__name__}")
    if "onnxruntime-int8" not in backends:
        raise MobileNetError("--calibration applies to the int8 backend only; add --int8")
    calibration_files(calibration, None)


def _prepare_candidates(
    name: str,
    model: nn.Module,
    shape: tuple[int, int, int, int],
    backends: Sequence[str],
    notes: list[str],
    say: Callable[[str], None],
    **options: Any,
) -> list[Candidate]:
    """Every backend that builds for ``model`` (``options`` go to :func:`build_candidate`). One that does not is
    left out with a line in ``notes``, unless it is the only one asked for; none at all raises."""
    candidates: list[Candidate] = []
    for backend in backends:
        say(f"{name}: preparing {backend}")
        try:
            candidate = build_candidate(backend, model, shape, **options)
        except MobileNetError as error:
            if len(backends) == 1:
                raise
            notes.append(f"{name}: {backend} left out: {error}")
            continue
        except Exception as error:  # a compiler or runtime failing on this machine is a finding, not a crash
            if backend not in ("compile", "onnxruntime-int8") or len(backends) == 1:
                raise
            notes.append(f"{name}: {backend} left out: {type(error).__name__}: {str(error)[:200]}")
            continue
        candidates.append(candidate)
        notes.extend(f"{name}: {backend}: {note}" for note in candidate.notes)
    if not candidates:
        raise MobileNetError(f"none of the backends {', '.join(backends)} could run {name}")
    return candidates


def _file_candidate(name: str, source: ModelSource, threads: int | None, notes: list[str]) -> Candidate:
    """An exported file timed as it is, in the runtime it was written for (the other backends need the PyTorch
    model, which the file does not hold)."""
    predictor = Predictor(source, num_threads=threads)
    runtime = {
        "onnxruntime": "ONNX Runtime",
        "exported": "its own runtime (TorchScript, torch.export, ExecuTorch or LiteRT)",
    }
    notes.append(f"{name}: the exported file runs in {runtime.get(predictor.backend_name, predictor.backend_name)}")
    return Candidate("file", f"{source.path} as exported", predictor.logits, None, precision=predictor.precision)


def _result_row(name: str, candidate: Candidate, batch: int, macs: int, times: Sequence[float]) -> dict[str, Any]:
    """One (model, backend, batch size) of the report: latency statistics, throughput and achieved GFLOP/s."""
    latency = summarize_timings(times)
    seconds = latency["median"] / 1e3
    return {
        "model": name,
        "backend": candidate.name,
        "description": candidate.description,
        "batch_size": batch,
        "latency_ms": latency,
        "throughput_ips": batch / seconds,
        "macs_per_image": macs,
        "gflops": 2 * macs * batch / seconds / 1e9,
        "max_abs_diff": candidate.max_abs_diff,
        "precision": BENCH_PRECISION.get(candidate.name, candidate.precision),
        "samples_ms": [1e3 * t for t in times],
    }


def _add_ratios(report: BenchReport) -> None:
    """Per result: the FLOP-limit latency at the run's GEMM peak, latency / that limit, latency / the fastest
    float32 backend in the same (model, batch) group, and its fraction of the peak."""
    peak = report.peak_gflops
    for row in report.results:
        limit_ms = 2 * row["macs_per_image"] * row["batch_size"] / (peak * 1e9) * 1e3
        row["flop_limit_ms"] = limit_ms
        row["x_flop_limit"] = row["latency_ms"]["median"] / limit_ms
        row["fraction_of_peak"] = row["gflops"] / peak
        group = [
            r
            for r in report.results
            if r["model"] == row["model"]
            and r["batch_size"] == row["batch_size"]
            and r["backend"] != "auto"
            and r.get("precision", "fp32") == "fp32"
        ]
        fastest = min((r["latency_ms"]["median"] for r in group), default=math.nan)
        row["x_fastest_fp32_runtime"] = row["latency_ms"]["median"] / fastest if group else None
