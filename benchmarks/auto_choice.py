"""What measuring buys ``backend="auto"`` on this CPU: the fixed-order pick against the measured pick against every
candidate, timed interleaved in one run (:func:`mobilenet.timing.time_interleaved`, median).

For each model and batch size this builds ``Predictor(model, backend="auto")`` twice, once with
``MOBILENET_AUTO_MEASURE=0`` (the fixed order) and once measuring (a fresh cache, so it measures; then once more
from that cache, to show the next start builds only the chosen backend), plus each candidate of
:data:`mobilenet.autotune.CPU_CANDIDATES` on its own, and times the four side by side. It prints each median, the
ratio measured pick / fixed pick and measured pick / fastest candidate, the pick's reason and how long each
Predictor took to start.

    python benchmarks/auto_choice.py --threads 2 --batch-sizes 1,32 --rounds 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from mobilenet.autotune import CPU_CANDIDATES, MEASURE_ENV
from mobilenet.backends import BACKENDS, load_source, onnxruntime_available
from mobilenet.models import create_model
from mobilenet.predict import Predictor
from mobilenet.runtime import describe_machine, set_threads
from mobilenet.timing import Candidate, summarize_timings, time_interleaved

MODELS = ("mobilenet_v1_1.0_224", "mobilenet_v2_1.0_224")


def _started(make: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    made = make()
    return made, time.perf_counter() - start


def _predictor(model: torch.nn.Module, batch: int, threads: int, *, measure: bool) -> tuple[Predictor, float]:
    os.environ[MEASURE_ENV] = "1" if measure else "0"
    return _started(lambda: Predictor(model, backend="auto", num_threads=threads, batch_size=batch))


def compare(name: str, batch: int, threads: int, *, rounds: int, warmup: int, say: Callable[[str], None]) -> dict:
    """One (model, batch size): the fixed and measured picks and each candidate, timed interleaved."""
    model = create_model(name).eval()
    say(f"{name} batch {batch}: building the fixed pick, the measured pick (cold, then cached) and the candidates")
    fixed, fixed_s = _predictor(model, batch, threads, measure=False)
    measured, measured_s = _predictor(model, batch, threads, measure=True)
    cached, cached_s = _predictor(model, batch, threads, measure=True)
    source = load_source(model)
    installed = [c for c in CPU_CANDIDATES if c != "onnxruntime" or onnxruntime_available()]
    runners = {c: BACKENDS[c](source, num_threads=threads) for c in installed}
    candidates = [
        Candidate("fixed pick", fixed.backend_name, fixed.logits),
        Candidate("measured pick", measured.backend_name, measured.logits),
        *(Candidate(c, c, runner) for c, runner in runners.items()),
    ]
    say(f"{name} batch {batch}: {warmup} warm-up + {rounds} interleaved rounds x {len(candidates)}")
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
    times = time_interleaved(candidates, x, rounds=rounds, warmup=warmup)
    medians = {c.name: summarize_timings(times[c.name])["median"] for c in candidates}
    fastest = min(medians[c] for c in runners)
    return {
        "model": name,
        "batch": batch,
        "threads": threads,
        "fixed_pick": fixed.backend_name,
        "measured_pick": measured.backend_name,
        "measured_reason": measured.backend_reason,
        "cached_reason": cached.backend_reason,
        "median_ms": medians,
        "measured_over_fixed": medians["measured pick"] / medians["fixed pick"],
        "measured_over_fastest_candidate": medians["measured pick"] / fastest,
        "start_s": {"fixed": fixed_s, "measured (cold cache)": measured_s, "cached": cached_s},
    }


def _print(row: dict) -> None:
    ms = row["median_ms"]
    print(
        f"{row['model']} batch {row['batch']}, {row['threads']} threads: fixed pick {row['fixed_pick']} "
        f"{ms['fixed pick']:.2f} ms, measured pick {row['measured_pick']} {ms['measured pick']:.2f} ms; "
        + ", ".join(f"{c} {ms[c]:.2f} ms" for c in ms if c not in ("fixed pick", "measured pick"))
    )
    print(
        f"  measured/fixed {row['measured_over_fixed']:.2f}x, measured/fastest candidate "
        f"{row['measured_over_fastest_candidate']:.2f}x; start: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in row["start_s"].items())
    )
    print(f"  why: {row['measured_reason']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes (default: 1,32)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default: 2)")
    parser.add_argument("--rounds", type=int, default=8, help="timed interleaved rounds (default: 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per candidate (default: 2)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory(prefix="auto-choice-") as cache:
        os.environ["XDG_CACHE_HOME"] = cache  # a fresh cache: the measured pick measures
        for name in args.models.split(","):
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                rows.append(compare(name, batch, threads, rounds=args.rounds, warmup=args.warmup, say=say))
                _print(rows[-1])
    machine = describe_machine(threads)
    print(
        f"machine: {machine['cpu']}, SIMD {' '.join(machine['simd'])}, torch {machine['torch']}, "
        f"onnxruntime {machine['onnxruntime']}, load average {machine['load_average']}"
    )
    if args.json:
        print(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
