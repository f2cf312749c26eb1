"""Latency across width multipliers and resolutions against the cost model's multiply-adds.

For every alpha in ``--alphas`` and resolution in ``--resolutions``, MobileNetV2 (or ``--model``) is built with
random weights and timed at batch 1 on each backend (interleaved rounds per configuration, see
:func:`scaling`). The table shows MACs (V1 paper section 4: cost ~ alpha^2 * rho^2), latency,
achieved GFLOP/s and latency per MAC relative to the full model: where that ratio stays flat, MACs predict latency;
where it climbs (small alpha, small resolution) fixed per-layer overheads and memory-bound depthwise layers
dominate. The plot (log-log latency vs MACs, with the FLOP-limit line of the measured GEMM peak) is written to
``--plot``.

    python benchmarks/scaling.py --threads 2 --plot docs/img/scaling.png --json runs/scaling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mobilenet.bench import build_candidate, gemm_peak, time_interleaved
from mobilenet.cost import count_costs
from mobilenet.models import create_model
from mobilenet.plots import plot_scaling
from mobilenet.runtime import describe_machine, set_threads, tune_allocator


def scaling(
    model: str = "mobilenet_v2_1.0_224",
    *,
    alphas: Sequence[float] = (0.35, 0.5, 0.75, 1.0, 1.4),
    resolutions: Sequence[int] = (96, 128, 160, 192, 224),
    backends: Sequence[str] = ("eager", "onnxruntime"),
    batch_size: int = 1,
    threads: int | None = None,
    rounds: int = 10,
    warmup: int = 3,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Median latency of ``model`` at every (alpha, resolution) on each backend, next to its analytic MACs (V1
    paper section 4: cost scales with alpha^2 and rho^2), so one can see where MACs predict latency and where
    they do not. Candidates of one configuration are timed interleaved."""
    say = progress or (lambda _line: None)
    threads = set_threads(threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mobilenet-scaling-") as tmp:
        for alpha in alphas:
            for size in resolutions:
                say(f"alpha {alpha:g}, {size}px")
                built = create_model(model, alpha=alpha, resolution=size).eval()
                shape = (batch_size, 3, size, size)
                candidates = [build_candidate(b, built, shape, threads=threads, workdir=Path(tmp)) for b in backends]
                x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
                times = time_interleaved(candidates, x, rounds=rounds, warmup=warmup)
                macs = count_costs(built.config).macs
                for candidate in candidates:
                    median = statistics.median(times[candidate.name])
                    rows.append(
                        {
                            "alpha": alpha,
                            "resolution": size,
                            "backend": candidate.name,
                            "macs": macs,
                            "latency_ms": 1e3 * median,
                            "gflops": 2 * macs * batch_size / median / 1e9,
                        }
                    )
    peak = gemm_peak(1024)
    return {
        "model": model,
        "batch_size": batch_size,
        "threads": threads,
        "machine": describe_machine(threads),
        "gemm_peak_gflops": peak["gflops"],
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2_1.0_224")
    parser.add_argument("--alphas", default="0.35,0.5,0.75,1.0,1.4")
    parser.add_argument("--resolutions", default="96,128,160,192,224")
    parser.add_argument("--backends", default="eager,jit,onnxruntime")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--plot", default="scaling.png")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()

    tune_allocator()
    result = scaling(
        args.model,
        alphas=[float(a) for a in args.alphas.split(",")],
        resolutions=[int(r) for r in args.resolutions.split(",")],
        backends=args.backends.split(","),
        batch_size=args.batch_size,
        threads=args.threads,
        rounds=args.rounds,
        warmup=args.warmup,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    machine = result["machine"]
    print(
        f"{result['model']}, batch {result['batch_size']}, {result['threads']} threads, {machine['cpu']} "
        f"({' '.join(machine['simd'])}), load average {machine['load_average']}; float32 GEMM peak "
        f"{result['gemm_peak_gflops']:.1f} GFLOP/s; 1 MAC = 2 FLOPs"
    )
    rows = result["rows"]
    print(
        f"{'backend':12} {'alpha':>5} {'res':>4} {'MMACs':>8} {'ms':>8} {'GFLOP/s':>8}"
        f" {'ms per MAC vs alpha 1 at max res':>32}"
    )
    for backend in dict.fromkeys(r["backend"] for r in rows):
        group = [r for r in rows if r["backend"] == backend]
        reference = next(
            (r for r in group if r["alpha"] == 1.0 and r["resolution"] == max(g["resolution"] for g in group)),
            group[-1],
        )
        per_mac = reference["latency_ms"] / reference["macs"]
        for r in group:
            print(
                f"{backend:12} {r['alpha']:5.2f} {r['resolution']:4d} {r['macs'] / 1e6:8.1f} {r['latency_ms']:8.2f} "
                f"{r['gflops']:8.1f} {r['latency_ms'] / r['macs'] / per_mac:32.2f}"
            )
    print(f"plot: {plot_scaling(result, args.plot)}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
