"""The MobileNet V1 paper's core claim, measured: a depthwise separable conv against the standard 3x3 conv it
replaces, on every depthwise separable layer of the paper's Table 1 (MobileNet V1 1.0 at 224x224).

Equation (5) of the V1 paper: separable / standard cost = 1/N + 1/Dk^2, so with Dk = 3 the theoretical speedup is
1 / (1/N + 1/9) (8-9x for N >= 64). Per layer this prints the MACs of both, the measured median latency of each
(interleaved rounds, batch 1 by default), the measured and theoretical speedups, the depthwise conv's share of the
separable layer's MACs and of its time, and the achieved GFLOP/s of the dense and the depthwise conv: the
depthwise conv does few MACs per byte it moves, so it runs far below the dense conv's rate and the measured
speedup falls short of the MAC ratio.

    python benchmarks/separable_layers.py --threads 2 --plot docs/img/separable_layers.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--channels-last", action="store_true", help="NHWC tensors and weights")
    parser.add_argument("--plot", default="separable_layers.png")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()

    from mobilenet.bench import separable_layers
    from mobilenet.plots import plot_separable_layers
    from mobilenet.runtime import tune_allocator

    tune_allocator()
    result = separable_layers(
        resolution=args.resolution,
        batch_size=args.batch_size,
        threads=args.threads,
        rounds=args.rounds,
        warmup=args.warmup,
        channels_last=args.channels_last,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    machine = result["machine"]
    print(
        f"V1 Table 1 separable layers at {result['resolution']}px, batch {result['batch_size']}, {result['threads']} "
        f"threads, channels_last={result['channels_last']}, {machine['cpu']} ({' '.join(machine['simd'])}), load "
        f"average {machine['load_average']}; float32 GEMM peak {result['gemm_peak_gflops']:.1f} GFLOP/s"
    )
    print(
        f"{'layer (Df x Df x M -> N, stride)':32} {'std MMACs':>9} {'sep MMACs':>9} {'std ms':>7} {'sep ms':>7} "
        f"{'theory':>6} {'measured':>8} {'dw MACs':>7} {'dw time':>7} {'std GF/s':>8} {'dw GF/s':>7}"
    )
    for r in result["rows"]:
        name = f"{r['size']}x{r['size']}x{r['in_channels']} -> {r['out_channels']}, s{r['stride']}"
        print(
            f"{name:32} {r['macs_standard'] / 1e6:9.1f} {r['macs_separable'] / 1e6:9.1f} {r['standard_ms']:7.2f} "
            f"{r['separable_ms']:7.2f} {r['theoretical_speedup']:5.1f}x {r['measured_speedup']:7.1f}x "
            f"{100 * r['depthwise_mac_share']:6.1f}% {100 * r['depthwise_time_share']:6.1f}% "
            f"{r['standard_gflops']:8.1f} {r['depthwise_gflops']:7.1f}"
        )
    rows = result["rows"]
    print(
        f"median over layers: theory {statistics.median(r['theoretical_speedup'] for r in rows):.1f}x, measured "
        f"{statistics.median(r['measured_speedup'] for r in rows):.1f}x; whole Table 1 stack (sum of times): "
        f"{sum(r['standard_ms'] for r in rows) / sum(r['separable_ms'] for r in rows):.1f}x measured vs "
        f"{sum(r['macs_standard'] for r in rows) / sum(r['macs_separable'] for r in rows):.1f}x in MACs "
        "(distinct layer shapes, each once)"
    )
    print(f"plot: {plot_separable_layers(result, args.plot)}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
