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
import itertools
import json
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mobilenet.bench import Candidate, gemm_peak, time_interleaved
from mobilenet.plots import plot_separable_layers
from mobilenet.runtime import describe_machine, set_threads, tune_allocator
from mobilenet.spec import network_for


def v1_table1_separable_layers(resolution: int = 224, alpha: float = 1.0) -> list[dict[str, int]]:
    """The depthwise + pointwise pairs of the V1 paper's Table 1 (MobileNet V1 1.0 at 224 by default): input side
    Df (of the depthwise input), M input channels, N output channels, stride, from the spec's layer list."""
    network = network_for("mobilenet_v1_1.0_224", alpha=alpha, resolution=resolution)
    layers = list(network.layers)
    pairs: list[dict[str, int]] = []
    for first, second in itertools.pairwise(layers):
        if first.op == "depthwise" and second.op == "pointwise":
            pairs.append(
                {
                    "size": int(first.in_size[0]),
                    "in_channels": int(first.in_channels),
                    "out_channels": int(second.out_channels),
                    "stride": int(first.stride),
                }
            )
    return pairs


def separable_layers(
    *,
    resolution: int = 224,
    batch_size: int = 1,
    threads: int | None = None,
    rounds: int = 10,
    warmup: int = 3,
    channels_last: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The V1 paper's core claim, layer by layer (section 3.1, equations 1-5): on each depthwise separable layer of
    Table 1, time a standard 3x3 conv (Dk*Dk*M*N*Df*Df MACs) against a 3x3 depthwise conv followed by a 1x1
    pointwise conv (Dk*Dk*M*Df*Df + M*N*Df*Df MACs), interleaved, and compare the measured speedup with the
    theoretical 1 / (1/N + 1/Dk^2). Convs only (no BN or ReLU: the equations count neither)."""
    say = progress or (lambda _line: None)
    threads = set_threads(threads)
    rows: list[dict[str, Any]] = []
    seen: set[tuple[int, int, int, int]] = set()
    for layer in v1_table1_separable_layers(resolution):
        key = (layer["size"], layer["in_channels"], layer["out_channels"], layer["stride"])
        if key in seen:
            continue  # Table 1 repeats the 14x14x512 layer five times
        seen.add(key)
        size, m, n, stride = key
        say(f"{size}x{size}x{m} -> {n}, stride {stride}")
        standard = nn.Conv2d(m, n, 3, stride, 1, bias=False).eval()
        depthwise = nn.Conv2d(m, m, 3, stride, 1, groups=m, bias=False).eval()
        pointwise = nn.Conv2d(m, n, 1, bias=False).eval()
        separable = nn.Sequential(depthwise, pointwise).eval()
        if channels_last:
            for module in (standard, separable):
                module.to(memory_format=torch.channels_last)
        memory = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(batch_size, m, size, size).contiguous(memory_format=memory)
        candidates = [
            Candidate("standard", "3x3 conv", standard),
            Candidate("separable", "3x3 depthwise + 1x1 pointwise", separable),
            Candidate("depthwise", "3x3 depthwise alone", depthwise),
        ]
        times = time_interleaved(candidates, x, rounds=rounds, warmup=warmup)
        out = (size + stride - 1) // stride
        macs_standard = 9 * m * n * out * out
        macs_depthwise = 9 * m * out * out
        macs_pointwise = m * n * out * out
        median = {name: statistics.median(values) for name, values in times.items()}
        rows.append(
            {
                "size": size,
                "in_channels": m,
                "out_channels": n,
                "stride": stride,
                "macs_standard": macs_standard,
                "macs_separable": macs_depthwise + macs_pointwise,
                "standard_ms": 1e3 * median["standard"],
                "separable_ms": 1e3 * median["separable"],
                "depthwise_ms": 1e3 * median["depthwise"],
                "theoretical_speedup": 1 / (1 / n + 1 / 9),
                "mac_ratio_speedup": macs_standard / (macs_depthwise + macs_pointwise),
                "measured_speedup": median["standard"] / median["separable"],
                "standard_gflops": 2 * macs_standard * batch_size / median["standard"] / 1e9,
                "depthwise_gflops": 2 * macs_depthwise * batch_size / median["depthwise"] / 1e9,
                "depthwise_time_share": median["depthwise"] / median["separable"],
                "depthwise_mac_share": macs_depthwise / (macs_depthwise + macs_pointwise),
            }
        )
    return {
        "resolution": resolution,
        "batch_size": batch_size,
        "threads": threads,
        "channels_last": channels_last,
        "machine": describe_machine(threads),
        "gemm_peak_gflops": gemm_peak(1024)["gflops"],
        "rows": rows,
    }


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
