"""The fused runtime's int8 precision (``FusedNetwork(..., precision="int8")``: the 1x1 convs as int8 GEMMs with
AVX512-VNNI where the CPU has it) against the same runtime in float32 and ONNX Runtime (float32).

MobileNetV2 1.0-224 and MobileNetV1 1.0-224, random weights with BatchNorm statistics set, at batch 1 and 32, timed
interleaved in one process. Printed per model and batch: median (and minimum) ms of each, the ratio fp32 / int8, and
the int8 logits' relative error ||int8 - fp32|| / ||fp32|| and top-1 agreement against the PyTorch model (eager,
float32) on a batch of seeded inputs. The two fused runs are timed a second time without ONNX Runtime in the rotation:
its intra-op threads spin on after each of its runs (the backend leaves them so, for back-to-back runs) and take
cores from whichever candidate comes next. And once more in bursts (each round times ``--burst`` calls of one network
back to back, after one untimed call): caches and workers warm, as when images come one after another; interleaving
single calls instead makes every call start on caches the other network has just filled. With random weights the
logits hardly depend on the input, so the top-1 agreement here is a weak check; tests/test_fused.py measures it on a
trained model.

    python benchmarks/fused_int8.py --threads 2 --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

from mobilenet.backends import BACKENDS, backend_installed, load_source
from mobilenet.fused import FusedNetwork, best_isa, has_vnni
from mobilenet.models import create_model
from mobilenet.parity import relative_error
from mobilenet.runtime import describe_machine, set_threads
from mobilenet.timing import Candidate, time_interleaved

MODELS = ("mobilenet_v2_1.0_224", "mobilenet_v1_1.0_224")


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)  # the same random weights every run
    model = create_model(name)
    generator = torch.Generator().manual_seed(0)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.copy_((torch.rand(bn.num_features, generator=generator) - 0.5) * 0.2)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
    return model.eval()


def accuracy(model: nn.Module, network: FusedNetwork, *, inputs: int = 8) -> dict[str, float]:
    """The int8 logits against the eager float32 model's on ``inputs`` seeded images."""
    x = torch.randn(inputs, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = model(x)
    got = network(x)
    return {
        "relative_error": relative_error(got, expected),
        "top1_agreement": float((got.argmax(dim=1) == expected.argmax(dim=1)).float().mean()),
    }


def time_bursts(candidates: list[Candidate], x: torch.Tensor, *, rounds: int, burst: int) -> dict[str, list[float]]:
    """Seconds per call of each candidate, each round one untimed call and then ``burst`` timed calls back to back
    per candidate, the candidates' order rotated by one each round."""
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    with torch.inference_mode():
        for round_index in range(rounds):
            shift = round_index % len(candidates)
            for candidate in [*candidates[shift:], *candidates[:shift]]:
                candidate.run(x)
                start = time.perf_counter()
                for _ in range(burst):
                    candidate.run(x)
                times[candidate.name].append((time.perf_counter() - start) / burst)
    return times


def measure(
    name: str, *, batches: tuple[int, ...], threads: int, rounds: int, warmup: int, burst: int
) -> list[dict[str, Any]]:
    """Per batch size: median and minimum ms of fp32 fused, int8 fused and (where installed) ONNX Runtime."""
    model = _model(name)
    runners: dict[str, Any] = {
        "fused-fp32": FusedNetwork(model, threads=threads),
        "fused-int8": FusedNetwork(model, threads=threads, precision="int8"),
    }
    if backend_installed("onnxruntime"):
        runners["onnxruntime"] = BACKENDS["onnxruntime"](load_source(model), num_threads=threads)
    quality = accuracy(model, runners["fused-int8"])
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        candidates = [Candidate(n, n, runner) for n, runner in runners.items()]
        times = time_interleaved(candidates, x, rounds=rounds, warmup=warmup)
        alone = time_interleaved(candidates[:2], x, rounds=rounds, warmup=warmup)
        bursts = time_bursts(candidates[:2], x, rounds=rounds, burst=burst if batch == 1 else 1)
        rows.append(
            {
                "model": name,
                "batch": batch,
                "ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
                "min_ms": {n: 1e3 * min(t) for n, t in times.items()},
                "fused_alone_ms": {n: 1e3 * statistics.median(t) for n, t in alone.items()},
                "fused_burst_ms": {n: 1e3 * statistics.median(t) for n, t in bursts.items()},
                **quality,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--burst", type=int, default=10, help="calls back to back per round (batch 1)")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    machine = describe_machine(threads)
    print(
        f"threads {threads}, kernel {best_isa()} (int8 GEMM: {'AVX512-VNNI' if has_vnni() else 'portable C'}), "
        f"load {machine.get('load_average')}"
    )
    for name in MODELS:
        rows = measure(
            name, batches=tuple(args.batches), threads=threads, rounds=args.rounds, warmup=args.warmup, burst=args.burst
        )
        for row in rows:
            ms, low = row["ms"], row["min_ms"]
            print(f"\n{name} batch {row['batch']}:")
            for runner in ms:
                print(f"  {runner:<12} {ms[runner]:8.2f} ms (min {low[runner]:8.2f})")
            ratio = ms["fused-fp32"] / ms["fused-int8"]
            print(f"  fp32 / int8 (fused): {ratio:.2f}x faster in int8 (target ~2)")
            alone = row["fused_alone_ms"]
            print(
                f"  without onnxruntime in the rotation: fp32 {alone['fused-fp32']:.2f} ms, int8 "
                f"{alone['fused-int8']:.2f} ms: {alone['fused-fp32'] / alone['fused-int8']:.2f}x"
            )
            hot = row["fused_burst_ms"]
            print(
                f"  back to back (bursts): fp32 {hot['fused-fp32']:.2f} ms, int8 {hot['fused-int8']:.2f} ms: "
                f"{hot['fused-fp32'] / hot['fused-int8']:.2f}x"
            )
            if "onnxruntime" in ms:
                print(f"  onnxruntime / int8: {ms['onnxruntime'] / ms['fused-int8']:.2f}x")
            print(
                f"  int8 vs PyTorch fp32: logits relative error {row['relative_error']:.4f}, "
                f"top-1 agreement {row['top1_agreement']:.2f}"
            )


if __name__ == "__main__":
    sys.exit(main())
