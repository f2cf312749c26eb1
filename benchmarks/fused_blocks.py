"""Our fused block kernel (:mod:`mobilenet.fused`) against ONNX Runtime on every block of MobileNetV2 1.0-224.

For each of the 17 inverted residual blocks of the V2 paper's Table 2 at batch 1, the block alone (random weights
and BatchNorm statistics, BatchNorm folded) runs in our kernel (NHWC in, NHWC out) and in ONNX Runtime (the block
exported alone to ONNX, NCHW, the same thread count), timed interleaved in one process
(:func:`mobilenet.timing.time_interleaved`). Per block: input shape, stride, expansion, MACs, median ms of each,
ORT / ours, and the achieved GFLOP/s (2 * MACs / time) of each. Every block's output is checked against PyTorch
first.

Both runtimes keep their worker threads spinning after a call, ONNX Runtime's for longer than ours, and on a machine
with few cores the spinning workers of one take a core from the other's next call. By default each runtime is
therefore timed in bursts (``--settle-ms``): it runs untimed until the other's workers have gone quiet, then a few
timed calls back to back, as inside a whole network's forward; ``--settle-ms 0`` times one call of each in turn
(:func:`mobilenet.timing.time_interleaved`), which measures them under each other's spinning.

    python benchmarks/fused_blocks.py --threads 2 --plot docs/img/fused_blocks.png
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobilenet.export import fold_batchnorm, ort_session
from mobilenet.fused import best_isa, pack_block
from mobilenet.layers import build_block
from mobilenet.runtime import describe_machine, set_threads
from mobilenet.spec import network_for
from mobilenet.timing import Candidate, time_interleaved


def randomize_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
    """Eval-mode statistics far from the identity, so folding them is tested, not skipped."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            size = bn.num_features
            bn.running_mean.copy_(torch.rand(size, generator=generator) * 2 - 1)
            bn.running_var.copy_(torch.rand(size, generator=generator) * 1.5 + 0.5)
            bn.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            bn.bias.data.copy_(torch.rand(size, generator=generator) - 0.5)


def v2_blocks(name: str = "mobilenet_v2_1.0_224", resolution: int = 224) -> list[tuple[Any, int]]:
    """Every inverted residual block of the network with its input side."""
    network = network_for(name, resolution=resolution)
    return [(block, int(block.layers[0].in_size[0])) for block in network.blocks if block.kind == "inverted_residual"]


def _ort_block(module: nn.Module, example: torch.Tensor, threads: int, tmp: Path) -> Any:
    path = tmp / "block.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            fold_batchnorm(module), (example,), str(path), dynamo=False, input_names=["x"], output_names=["y"]
        )
    return ort_session(path, threads, spin=True)  # as the Predictor runs ONNX Runtime


def time_settled(candidates: list[Candidate], *, rounds: int, settle: float, calls: int = 5) -> dict[str, list[float]]:
    """Seconds per call of each candidate: ``rounds`` bursts each (order alternating), a burst being ``settle``
    seconds of untimed calls (the other candidate's spinning workers go quiet meanwhile) and the median of ``calls``
    timed calls back to back."""
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    with torch.inference_mode():
        for round_index in range(rounds):
            for candidate in candidates if round_index % 2 == 0 else candidates[::-1]:
                times[candidate.name].append(_burst(candidate.run, settle, calls))
    return times


def _burst(run: Callable[[Any], Any], settle: float, calls: int) -> float:
    end = time.perf_counter() + settle
    while time.perf_counter() < end:
        run(None)
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        run(None)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure_block(
    block: Any, size: int, *, threads: int, rounds: int, warmup: int, tmp: Path, settle: float = 0.0
) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    module = build_block(block).eval()
    randomize_batchnorm(module, generator)
    fused = pack_block(module)
    x = torch.randn(1, fused.in_channels, size, size, generator=generator)
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    x_numpy = x.numpy()
    out_h, out_w = fused.output_size(size, size)
    out = torch.empty(1, out_h, out_w, fused.out_channels)
    session = _ort_block(module, x, threads, tmp)
    with torch.inference_mode():
        reference = module(x)
    got = fused(x_nhwc, out=out, threads=threads).permute(0, 3, 1, 2)
    ort_out = torch.from_numpy(session.run(["y"], {"x": x_numpy})[0])
    scale = float(reference.abs().max())
    candidates = [
        Candidate("fused", "our fused kernel, NHWC", lambda _x: fused(x_nhwc, out=out, threads=threads)),
        Candidate("ort", "ONNX Runtime, the block alone", lambda _x: session.run(["y"], {"x": x_numpy})),
    ]
    if settle > 0:
        times = time_settled(candidates, rounds=max(1, rounds // 5), settle=settle)
    else:
        times = time_interleaved(candidates, None, rounds=rounds, warmup=warmup)
    median = {name: statistics.median(values) for name, values in times.items()}
    macs = fused.macs(size, size)
    return {
        "block": block.name,
        "shape": f"{size}x{size}x{fused.in_channels}",
        "stride": fused.stride,
        "expansion": fused.expanded // fused.in_channels,
        "out_channels": fused.out_channels,
        "macs": macs,
        "fused_ms": 1e3 * median["fused"],
        "ort_ms": 1e3 * median["ort"],
        "ort_over_fused": median["ort"] / median["fused"],
        "fused_gflops": 2 * macs / median["fused"] / 1e9,
        "ort_gflops": 2 * macs / median["ort"] / 1e9,
        "fused_rel_diff": float((got - reference).abs().max()) / scale,
        "ort_rel_diff": float((ort_out - reference).abs().max()) / scale,
    }


def fused_blocks(
    *, threads: int = 2, rounds: int = 30, warmup: int = 5, resolution: int = 224, settle: float = 0.2
) -> dict[str, Any]:
    threads = set_threads(threads)
    with tempfile.TemporaryDirectory(prefix="fused-blocks-") as tmp:
        rows = [
            measure_block(block, size, threads=threads, rounds=rounds, warmup=warmup, tmp=Path(tmp), settle=settle)
            for block, size in v2_blocks(resolution=resolution)
        ]
    machine = describe_machine(threads)
    return {"threads": threads, "isa": best_isa(), "machine": machine, "settle": settle, "rows": rows}


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(11, 4.5))
    index = range(len(rows))
    axes.bar([i - 0.2 for i in index], [r["fused_gflops"] for r in rows], width=0.4, label="fused kernel (ours)")
    axes.bar([i + 0.2 for i in index], [r["ort_gflops"] for r in rows], width=0.4, label="ONNX Runtime")
    axes.set_xticks(list(index), [f"{r['shape']}\ns{r['stride']} t{r['expansion']}" for r in rows], fontsize=6)
    axes.set_ylabel("achieved GFLOP/s (2 x MACs / median time)")
    axes.set_title("MobileNetV2 1.0-224 blocks, batch 1: fused kernel vs ONNX Runtime")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--settle-ms",
        type=float,
        default=200.0,
        help="time each runtime in bursts after this long alone (rounds / 5 bursts of 5 calls); 0: calls in turn",
    )
    parser.add_argument("--plot", help="save a per-block GFLOP/s plot (PNG) here")
    args = parser.parse_args()
    result = fused_blocks(threads=args.threads, rounds=args.rounds, warmup=args.warmup, settle=args.settle_ms / 1e3)
    mode = f"bursts after {args.settle_ms:g} ms alone" if args.settle_ms > 0 else "one call each in turn"
    print(f"threads {result['threads']}, kernel {result['isa']}, load {result['machine'].get('load_average')}, {mode}")
    header = f"{'block':<12}{'input':>12}{'s':>3}{'t':>3}{'out':>5}{'MMACs':>8}{'ours ms':>9}{'ORT ms':>9}"
    print(header + f"{'ORT/ours':>9}{'ours GF/s':>10}{'ORT GF/s':>10}{'diff':>9}")
    for r in result["rows"]:
        print(
            f"{r['block']:<12}{r['shape']:>12}{r['stride']:>3}{r['expansion']:>3}{r['out_channels']:>5}"
            f"{r['macs'] / 1e6:>8.2f}{r['fused_ms']:>9.3f}{r['ort_ms']:>9.3f}{r['ort_over_fused']:>9.2f}"
            f"{r['fused_gflops']:>10.1f}{r['ort_gflops']:>10.1f}{r['fused_rel_diff']:>9.1e}"
        )
    total_fused = sum(r["fused_ms"] for r in result["rows"])
    total_ort = sum(r["ort_ms"] for r in result["rows"])
    print(f"sum of blocks: ours {total_fused:.2f} ms, ORT {total_ort:.2f} ms, ORT/ours {total_ort / total_fused:.2f}")
    slower = [r["block"] for r in result["rows"] if r["ort_over_fused"] < 1]
    print("ours beats ORT on every block" if not slower else f"ORT is faster on: {', '.join(slower)}")
    if args.plot:
        plot(result["rows"], args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
