"""Latency across width multipliers and resolutions against the cost model's multiply-adds (issue 5).

For every alpha in ``--alphas`` and resolution in ``--resolutions``, MobileNetV2 (or ``--model``) is built with
random weights and timed at batch 1 on each backend (interleaved rounds per configuration, see
:func:`mobilenet.bench.scaling`). The table shows MACs (V1 paper section 4: cost ~ alpha^2 * rho^2), latency,
achieved GFLOP/s and latency per MAC relative to the full model: where that ratio stays flat, MACs predict latency;
where it climbs (small alpha, small resolution) fixed per-layer overheads and memory-bound depthwise layers
dominate. The plot (log-log latency vs MACs, with the FLOP-limit line of the measured GEMM peak) is written to
``--plot``.

    python benchmarks/scaling.py --threads 2 --plot docs/img/scaling.png --json runs/scaling.json
"""

from __future__ import annotations

import argparse
import json
import sys


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

    from mobilenet.bench import scaling
    from mobilenet.plots import plot_scaling
    from mobilenet.runtime import tune_allocator

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
