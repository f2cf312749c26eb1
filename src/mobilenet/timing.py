"""The timing protocol every measurement of this library uses: interleaved rounds, median.

:func:`time_interleaved` times one call of every :class:`Candidate` per round, in an order rotated each round, so
drift in the machine's speed (another process, the clock) reaches every candidate alike; :func:`summarize_timings`
turns the samples into median, p90, min and mean. ``mobilenet bench``, ``mobilenet select``, the ``auto`` backend's
choice (:mod:`mobilenet.autotune`) and the scripts of ``benchmarks/`` all time with it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mobilenet.errors import MobileNetError

__all__ = ["DEFAULT_PAUSE_S", "Candidate", "summarize_timings", "time_interleaved"]

#: Idle seconds before each timed call: longer than any backend's idle workers spin after a call (our fused pool's,
#: :func:`mobilenet.fused.worker_spin_seconds`, is the longest; ONNX Runtime's and torch's OpenMP pool's are
#: shorter), so no candidate is timed against its predecessor's spinning threads.
DEFAULT_PAUSE_S = 0.06


@dataclass
class Candidate:
    """One thing to time: ``run(x)`` on a float32 NCHW batch (conversions a user would do are part of it)."""

    name: str
    description: str
    run: Callable[[Any], Any]
    max_abs_diff: float | None = None
    notes: list[str] = field(default_factory=list)
    precision: str = "fp32"


def time_interleaved(
    candidates: Sequence[Candidate], x: Any, *, rounds: int, warmup: int, pause: float = DEFAULT_PAUSE_S
) -> dict[str, list[float]]:
    """Seconds per forward of each candidate on ``x``: ``warmup`` untimed calls each, then ``rounds`` rounds that
    time one call of every candidate, in an order rotated by one each round (so drift in the machine's speed
    reaches every candidate alike).

    Each timed call starts ``pause`` seconds after the previous one ended: runtimes keep their worker threads
    spinning for a while after a call (OpenMP in torch, ONNX Runtime's pool, our fused kernel's), and on a machine
    with few cores the spinning threads of the previous candidate would otherwise steal the cores of the next one."""
    if rounds < 1:
        raise MobileNetError(f"rounds must be >= 1, got {rounds}")
    if warmup < 0:
        raise MobileNetError(f"warmup must be >= 0, got {warmup}")
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    with torch.inference_mode():
        for candidate in candidates:
            for _ in range(warmup):
                candidate.run(x)
        for round_index in range(rounds):
            shift = round_index % max(1, len(candidates))
            for candidate in [*candidates[shift:], *candidates[:shift]]:
                if pause > 0:
                    time.sleep(pause)
                start = time.perf_counter()
                candidate.run(x)
                times[candidate.name].append(time.perf_counter() - start)
    return times


def summarize_timings(seconds: Sequence[float]) -> dict[str, float]:
    """Median, p90 (nearest rank), min and mean in milliseconds."""
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, max(0, math.ceil(0.9 * len(ordered)) - 1))]
    return {
        "median": 1e3 * statistics.median(ordered),
        "p90": 1e3 * p90,
        "min": 1e3 * ordered[0],
        "mean": 1e3 * statistics.fmean(ordered),
    }
