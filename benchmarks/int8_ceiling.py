"""How far the fused int8 precision can go on this CPU: the instruction-throughput floors of a forward, against what
the fused kernels reach, in float32 and in int8.

A MobileNet forward is two kinds of work. The dense convs (the stem, every 1x1 conv, the classifier) are GEMMs: in
int8 they run as AVX512-VNNI dot products (64 u8 x s8 multiply-adds per instruction), in float32 as FMAs (16 per
instruction on AVX-512). The depthwise 3x3 convs run as float32 FMAs in both precisions (one vector of channels, nine
taps per output pixel; the int8 precision quantizes their outputs for the projection that follows). So the int8
forward can be at most ``(gemm + depthwise) / (gemm / int8_speedup + depthwise)`` times faster than the float32 one,
whatever its kernels do, and less where the float32 forward is further from its floor than the int8 one.

This script measures, on one thread (so the figures are per core): the multiply-add rates the machine reaches in
practice, with the library's own int8 GEMM (``mobilenet.fused.int8_gemm``, a 3136 x 512 x 512 product, quantization
included) and with ``torch.mm`` on 1024 x 1024 float32 matrices; counts each model's GEMM multiply-adds and
depthwise FMA lanes (each output pixel's channels rounded up to whole vectors); prints the floors these give, the
fused networks' measured times (back to back, medians of interleaved bursts) and how far each is from its floor, and
the ratio float32 / int8 three ways: of the floors, back to back, and after 60 ms of idle time (the protocol of
``mobilenet bench``, two threads).

    python benchmarks/int8_ceiling.py --models mobilenet_v2_1.0_224,mobilenet_v1_1.0_224
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from mobilenet.fused import FusedNetwork, best_isa, has_vnni, int8_gemm, pack_int8
from mobilenet.models import create_model
from mobilenet.runtime import describe_machine, set_threads
from mobilenet.timing import Candidate, summarize_timings, time_interleaved


@dataclass
class Work:
    """One forward's multiply-adds: in GEMMs (stem, 1x1 convs, linear layers) and in depthwise FMA lanes."""

    gemm_macs: int
    depthwise_lanes: int


def count_work(model: nn.Module, resolution: int, vector_width: int) -> Work:
    """GEMM multiply-adds and depthwise FMA lanes (channels rounded up to ``vector_width``) of one image."""
    work = Work(0, 0)

    def conv_hook(module: nn.Conv2d, _inputs: object, output: torch.Tensor) -> None:
        _, channels, height, width = output.shape
        taps = module.kernel_size[0] * module.kernel_size[1]
        if module.groups > 1:
            work.depthwise_lanes += height * width * taps * -(-channels // vector_width) * vector_width
        else:
            work.gemm_macs += height * width * channels * taps * module.in_channels

    def linear_hook(module: nn.Linear, _inputs: object, _output: torch.Tensor) -> None:
        work.gemm_macs += module.in_features * module.out_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.inference_mode():
        model(torch.zeros(1, 3, resolution, resolution))
    for hook in hooks:
        hook.remove()
    return work


def best_of(function: object, repeats: int) -> float:
    """The shortest of ``repeats`` timed calls (seconds): the rate the core reaches when nothing interrupts it."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def int8_rate(repeats: int) -> float:
    """Multiply-adds per second of the library's int8 GEMM on one thread (quantization of A included)."""
    torch.manual_seed(0)
    pixels, depth, columns = 3136, 512, 512
    a, weights = torch.rand(pixels, depth), pack_int8(torch.randn(depth, columns))
    int8_gemm(a, weights)
    return pixels * depth * columns / best_of(lambda: int8_gemm(a, weights), repeats)


def fp32_rate(repeats: int) -> float:
    """Multiply-adds per second of ``torch.mm`` on 1024 x 1024 float32 matrices, on one thread."""
    torch.manual_seed(0)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    return 1024**3 / best_of(lambda: torch.mm(a, b), repeats)


def back_to_back(networks: dict[str, FusedNetwork], x: torch.Tensor, rounds: int, burst: int) -> dict[str, float]:
    """Median ms per call of each network in bursts of ``burst`` calls back to back (after one untimed call), the
    networks taking turns burst by burst."""
    medians: dict[str, list[float]] = {name: [] for name in networks}
    for _ in range(rounds):
        for name, network in networks.items():
            network(x)
            start = time.perf_counter()
            for _ in range(burst):
                network(x)
            medians[name].append(1e3 * (time.perf_counter() - start) / burst)
    return {name: statistics.median(values) for name, values in medians.items()}


def after_idle(networks: dict[str, FusedNetwork], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median ms per call, each call after 60 ms of idle time (``mobilenet.timing.time_interleaved``)."""
    candidates = [Candidate(name, name, network) for name, network in networks.items()]
    times = time_interleaved(candidates, x, rounds=rounds, warmup=3)
    return {name: summarize_timings(values)["median"] for name, values in times.items()}


def report(name: str, rates: dict[str, float], args: argparse.Namespace, vector_width: int) -> None:
    """Floors, measured times and ratios of one model."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    resolution = model.config.resolution
    work = count_work(model, resolution, vector_width)
    floor = {
        "fp32": (work.gemm_macs + work.depthwise_lanes) / rates["fp32"],
        "int8": work.gemm_macs / rates["int8"] + work.depthwise_lanes / rates["fp32"],
    }
    x = torch.randn(1, 3, resolution, resolution)
    gemm, lanes = work.gemm_macs / 1e6, work.depthwise_lanes / 1e6
    print(f"\n{name}: {gemm:.1f}M GEMM multiply-adds, {lanes:.1f}M depthwise lanes")
    print("  precision | floor, 1 thread | measured, 1 thread | x floor | floor's depthwise share")
    one = {p: FusedNetwork(model, threads=1, precision=p) for p in ("fp32", "int8")}
    measured = back_to_back(one, x, args.rounds, args.burst)
    for precision in ("fp32", "int8"):
        share = work.depthwise_lanes / rates["fp32"] / floor[precision]
        print(
            f"  {precision:9s} | {1e3 * floor[precision]:12.2f} ms | {measured[precision]:15.2f} ms |"
            f" {measured[precision] / (1e3 * floor[precision]):6.2f}x | {100 * share:5.1f}%"
        )
    two = {p: FusedNetwork(model, threads=2, precision=p) for p in ("fp32", "int8")}
    hot, cold = back_to_back(two, x, args.rounds, args.burst), after_idle(two, x, args.idle_rounds)
    print(
        f"  two threads: fp32 {hot['fp32']:.2f} / int8 {hot['int8']:.2f} ms back to back, "
        f"{cold['fp32']:.2f} / {cold['int8']:.2f} ms after 60 ms idle"
    )
    print(f"  fp32 / int8: floors {floor['fp32'] / floor['int8']:.2f}x, one thread back to back "
          f"{measured['fp32'] / measured['int8']:.2f}x, two threads back to back {hot['fp32'] / hot['int8']:.2f}x, "
          f"after idle {cold['fp32'] / cold['int8']:.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mobilenet_v2_1.0_224,mobilenet_v1_1.0_224")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved bursts per network")
    parser.add_argument("--burst", type=int, default=20, help="calls per burst")
    parser.add_argument("--idle-rounds", type=int, default=30, help="rounds of single calls after idle time")
    parser.add_argument("--repeats", type=int, default=20, help="timed GEMMs per rate (the fastest counts)")
    args = parser.parse_args()
    if not has_vnni():
        sys.exit("int8_ceiling: this CPU has no AVX512-VNNI: the int8 GEMM runs portable C, there is no ceiling to see")
    vector_width = 16 if best_isa() == "avx512" else 8
    print(describe_machine())
    set_threads(1)
    rates = {"int8": int8_rate(args.repeats), "fp32": fp32_rate(args.repeats)}
    print(
        f"one thread: int8 GEMM {rates['int8'] / 1e9:.0f} GMAC/s (mobilenet.fused.int8_gemm), float32 GEMM "
        f"{rates['fp32'] / 1e9:.0f} GMAC/s (torch.mm): {rates['int8'] / rates['fp32']:.2f}x"
    )
    set_threads(2)
    for name in args.models.split(","):
        report(name, rates, args, vector_width)


if __name__ == "__main__":
    main()
