"""The whole-network fused runtime (``backend="fused"``, :mod:`mobilenet.fused`) against ONNX Runtime, torch-jit and
OpenVINO (where installed).

MobileNetV2 1.0-224 and MobileNetV1 1.0-224 at batch 1, random weights with BatchNorm statistics set, each backend
built through :data:`mobilenet.backends.BACKENDS` (so each is checked against the eager model) and timed
interleaved in one process. Printed per model: median (and minimum) ms of each, the ratios, fused against the fastest
other runtime of the run, the FLOP floor (2 * MACs over the
fp32 GEMM peak measured in the same run with the same threads, :func:`mobilenet.bench.gemm_peak`), and activation
memory: the fused runtime's peak (ping-pong buffers plus the torch stages' tensors, and separately the kernel's
ring/tile scratch) against the layer-by-layer peak (for each conv/linear/pool layer, its input plus output bytes;
the largest over the layers, from forward hooks).

    python benchmarks/fused_network.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import torch
from torch import nn

from mobilenet.backends import BACKENDS, backend_installed, load_source
from mobilenet.bench import gemm_peak
from mobilenet.fused import _kernels
from mobilenet.models import create_model
from mobilenet.runtime import describe_machine, set_threads
from mobilenet.timing import Candidate, time_interleaved

MODELS = ("mobilenet_v2_1.0_224", "mobilenet_v1_1.0_224")
COMPARED = tuple(name for name in ("fused", "onnxruntime", "torch-jit", "openvino") if backend_installed(name))


def layer_by_layer(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """MACs and the layer-by-layer activation peak (max over conv/linear/pool layers of input + output bytes)."""
    stats = {"macs": 0, "peak_bytes": 0}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        stats["peak_bytes"] = max(stats["peak_bytes"], 4 * (inputs[0].numel() + output.numel()))
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            stats["macs"] += output.numel() * per_output
        elif isinstance(module, nn.Linear):
            stats["macs"] += module.in_features * module.out_features * x.shape[0]

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear | nn.AdaptiveAvgPool2d)
    ]
    with torch.inference_mode():
        model(x)
    for handle in handles:
        handle.remove()
    return stats


def _model(name: str) -> nn.Module:
    model = create_model(name)
    generator = torch.Generator().manual_seed(0)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.copy_((torch.rand(bn.num_features, generator=generator) - 0.5) * 0.2)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
    return model.eval()


def measure(name: str, *, threads: int, rounds: int, warmup: int, peak_gflops: float) -> dict[str, Any]:
    model = _model(name)
    source = load_source(model)
    backends = {backend: BACKENDS[backend](source, num_threads=threads) for backend in COMPARED}
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    candidates = [Candidate(n, b.description, b) for n, b in backends.items()]
    times = time_interleaved(candidates, x, rounds=rounds, warmup=warmup)
    median = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    minimum = {n: 1e3 * min(t) for n, t in times.items()}
    reference = layer_by_layer(model, x)
    plan = backends["fused"].network.memory_plan(1, 224, 224)
    return {
        "model": name,
        "ms": median,
        "min_ms": minimum,
        "max_abs_diff": {n: b.max_abs_diff for n, b in backends.items()},
        "macs": reference["macs"],
        "floor_ms": 2e3 * reference["macs"] / (peak_gflops * 1e9),
        "fused_peak_bytes": plan.peak_bytes,
        "fused_buffer_bytes": plan.buffer_bytes,
        "scratch_bytes": int(_kernels.scratch_bytes()),
        "layer_by_layer_peak_bytes": reference["peak_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    peak = gemm_peak(1024)["gflops"]
    machine = describe_machine(threads)
    print(f"threads {threads}, fp32 GEMM peak {peak:.1f} GFLOP/s (torch.mm 1024), load {machine.get('load_average')}")
    for name in MODELS:
        r = measure(name, threads=threads, rounds=args.rounds, warmup=args.warmup, peak_gflops=peak)
        ms = r["ms"]
        print(f"\n{name}: {r['macs'] / 1e6:.0f} MMACs, FLOP floor {r['floor_ms']:.2f} ms")
        for backend in COMPARED:
            print(
                f"  {backend:<12} {ms[backend]:7.2f} ms (min {r['min_ms'][backend]:6.2f})  "
                f"x{ms[backend] / ms['fused']:.2f} of fused  "
                f"{r['floor_ms'] / ms[backend]:.0%} of the floor  max|diff| {r['max_abs_diff'][backend]:.1e}"
            )
        others = [backend for backend in COMPARED if backend != "fused"]
        if others:
            fastest = min(others, key=ms.__getitem__)
            print(f"  fused / fastest other ({fastest}): {ms['fused'] / ms[fastest]:.2f} (target <= 1.00)")
        ours = r["fused_peak_bytes"]
        print(
            f"  activation peak: fused {ours / 1e6:.2f} MB (ping-pong buffers {r['fused_buffer_bytes'] / 1e6:.2f} MB; "
            f"kernel scratch {r['scratch_bytes'] / 1e6:.2f} MB besides) vs layer-by-layer "
            f"{r['layer_by_layer_peak_bytes'] / 1e6:.2f} MB: {ours / r['layer_by_layer_peak_bytes']:.2f} "
            "(target <= 0.33)"
        )


if __name__ == "__main__":
    sys.exit(main())
