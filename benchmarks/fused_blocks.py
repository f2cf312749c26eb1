"""Our fused block kernel (:mod:`mobilenet.fused`) against ONNX Runtime and XNNPACK (ExecuTorch) on every block of
MobileNetV2 1.0-224.

For each of the 17 inverted residual blocks of the V2 paper's Table 2 at batch 1, the block alone (random weights
and BatchNorm statistics, BatchNorm folded) runs in our kernel (NHWC in, NHWC out), in ONNX Runtime (the block
exported alone to ONNX, NCHW, the same thread count) and, when ``executorch`` imports, in ExecuTorch with the whole
block delegated to XNNPACK (the block alone lowered to an in-memory ``.pte`` at batch 1 by
:func:`mobilenet.export.module_pte_runner`, NCHW, ExecuTorch's thread pool sized to the same thread count as the
executorch backend does), all timed in one process. Per block: input shape, stride, expansion, MACs, median ms of
each, ORT / ours and XNNPACK / ours, and the achieved GFLOP/s (2 * MACs / time) of each. Every block's output is
checked against PyTorch first: XNNPACK's must agree to within ``XNNPACK_RTOL`` of the output's largest magnitude.
Without executorch the XNNPACK column is left out, with one line saying why.

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

from mobilenet.backends import set_executorch_threads
from mobilenet.errors import INSTALL_HINTS
from mobilenet.export import fold_batchnorm, module_pte_runner, ort_session
from mobilenet.fused import best_isa, pack_block
from mobilenet.layers import build_block
from mobilenet.parity import check_close
from mobilenet.runtime import describe_machine, set_threads
from mobilenet.spec import network_for
from mobilenet.timing import Candidate, time_interleaved

#: XNNPACK's block output may differ from PyTorch's by this fraction of its largest magnitude (float32 sums in
#: another order; the executorch backend allows the same on logits).
XNNPACK_RTOL = 1e-5


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


def xnnpack_missing() -> str | None:
    """None when ExecuTorch and its XNNPACK delegate import, else why the XNNPACK column is left out."""
    try:
        import executorch.runtime  # noqa: F401
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
    except ImportError as error:
        return f"{error.name} does not import; {INSTALL_HINTS['mobile']}"
    return None


def _xnnpack_block(module: nn.Module, example: torch.Tensor, reference: torch.Tensor, name: str) -> Any:
    """The block as an ExecuTorch program (XNNPACK) and its largest difference from PyTorch's output (checked)."""
    runner = module_pte_runner(module, example, name=f"XNNPACK {name}")
    with torch.inference_mode():
        got = runner(example)
    what = f"XNNPACK (ExecuTorch) on {name}"
    return runner, check_close(got, reference, what=what, rtol=XNNPACK_RTOL)


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
    block: Any,
    size: int,
    *,
    threads: int,
    rounds: int,
    warmup: int,
    tmp: Path,
    settle: float = 0.0,
    xnnpack: bool = False,
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
    if xnnpack:
        runner, xnnpack_diff = _xnnpack_block(module, x, reference, block.name)
        candidates.append(Candidate("xnnpack", "XNNPACK (ExecuTorch), the block alone", lambda _x: runner(x)))
    if settle > 0:
        times = time_settled(candidates, rounds=max(1, rounds // 5), settle=settle)
    else:
        times = time_interleaved(candidates, None, rounds=rounds, warmup=warmup)
    median = {name: statistics.median(values) for name, values in times.items()}
    macs = fused.macs(size, size)
    row = {
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
    if xnnpack:
        row["xnnpack_ms"] = 1e3 * median["xnnpack"]
        row["xnnpack_over_fused"] = median["xnnpack"] / median["fused"]
        row["xnnpack_gflops"] = 2 * macs / median["xnnpack"] / 1e9
        row["xnnpack_rel_diff"] = xnnpack_diff / scale
    return row


def fused_blocks(
    *, threads: int = 2, rounds: int = 30, warmup: int = 5, resolution: int = 224, settle: float = 0.2
) -> dict[str, Any]:
    threads = set_threads(threads)
    missing = xnnpack_missing()
    if missing is None:
        set_executorch_threads(threads)
    options = {"threads": threads, "rounds": rounds, "warmup": warmup, "settle": settle, "xnnpack": missing is None}
    with tempfile.TemporaryDirectory(prefix="fused-blocks-") as tmp:
        rows = [
            measure_block(block, size, tmp=Path(tmp), **options) for block, size in v2_blocks(resolution=resolution)
        ]
    machine = describe_machine(threads)
    return {
        "threads": threads,
        "isa": best_isa(),
        "machine": machine,
        "settle": settle,
        "rows": rows,
        "xnnpack_missing": missing,
    }


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("fused", "fused kernel (ours)"), ("ort", "ONNX Runtime")]
    if "xnnpack_gflops" in rows[0]:
        series.append(("xnnpack", "XNNPACK (ExecuTorch)"))
    figure, axes = plt.subplots(figsize=(11, 4.5))
    index = range(len(rows))
    width = 0.8 / len(series)
    for position, (key, label) in enumerate(series):
        offset = (position - (len(series) - 1) / 2) * width
        axes.bar([i + offset for i in index], [r[f"{key}_gflops"] for r in rows], width=width, label=label)
    axes.set_xticks(list(index), [f"{r['shape']}\ns{r['stride']} t{r['expansion']}" for r in rows], fontsize=6)
    axes.set_ylabel("achieved GFLOP/s (2 x MACs / median time)")
    axes.set_title(f"MobileNetV2 1.0-224 blocks, batch 1: fused kernel vs {' vs '.join(s[1] for s in series[1:])}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'block':<12}{'input':>12}{'s':>3}{'t':>3}{'out':>5}{'MMACs':>8}{'ours ms':>9}{'ORT ms':>9}"
    print(header + f"{'ORT/ours':>9}{'ours GF/s':>10}{'ORT GF/s':>10}{'diff':>9}")
    for r in rows:
        print(
            f"{r['block']:<12}{r['shape']:>12}{r['stride']:>3}{r['expansion']:>3}{r['out_channels']:>5}"
            f"{r['macs'] / 1e6:>8.2f}{r['fused_ms']:>9.3f}{r['ort_ms']:>9.3f}{r['ort_over_fused']:>9.2f}"
            f"{r['fused_gflops']:>10.1f}{r['ort_gflops']:>10.1f}{r['fused_rel_diff']:>9.1e}"
        )
    total_fused = sum(r["fused_ms"] for r in rows)
    total_ort = sum(r["ort_ms"] for r in rows)
    print(f"sum of blocks: ours {total_fused:.2f} ms, ORT {total_ort:.2f} ms, ORT/ours {total_ort / total_fused:.2f}")
    slower = [r["block"] for r in rows if r["ort_over_fused"] < 1]
    print("ours beats ORT on every block" if not slower else f"ORT is faster on: {', '.join(slower)}")


def print_table_with_xnnpack(rows: list[dict[str, Any]]) -> None:
    """The table with XNNPACK's columns; diffs are each runtime's largest difference from PyTorch's output over
    the output's largest magnitude."""
    header = f"{'block':<12}{'input':>12}{'s':>3}{'t':>3}{'out':>5}{'MMACs':>8}{'ours ms':>9}{'ORT ms':>9}{'XNN ms':>9}"
    print(header + f"{'ORT/ours':>9}{'XNN/ours':>9}{'ours GF/s':>10}{'ORT GF/s':>9}{'XNN GF/s':>9}{'diff':>9}")
    for r in rows:
        print(
            f"{r['block']:<12}{r['shape']:>12}{r['stride']:>3}{r['expansion']:>3}{r['out_channels']:>5}"
            f"{r['macs'] / 1e6:>8.2f}"
            f"{r['fused_ms']:>9.3f}{r['ort_ms']:>9.3f}{r['xnnpack_ms']:>9.3f}"
            f"{r['ort_over_fused']:>9.2f}{r['xnnpack_over_fused']:>9.2f}"
            f"{r['fused_gflops']:>10.1f}{r['ort_gflops']:>9.1f}{r['xnnpack_gflops']:>9.1f}{r['fused_rel_diff']:>9.1e}"
        )
    total = {key: sum(r[f"{key}_ms"] for r in rows) for key in ("fused", "ort", "xnnpack")}
    print(
        f"sum of blocks: ours {total['fused']:.2f} ms, ORT {total['ort']:.2f} ms, XNNPACK {total['xnnpack']:.2f} ms; "
        f"ORT/ours {total['ort'] / total['fused']:.2f}, XNNPACK/ours {total['xnnpack'] / total['fused']:.2f}"
    )
    worst = max(r["xnnpack_rel_diff"] for r in rows)
    print(f"XNNPACK's outputs within rtol {XNNPACK_RTOL:g} of PyTorch's on every block (largest: {worst:.1e})")
    for name, key in (("ORT", "ort_over_fused"), ("XNNPACK", "xnnpack_over_fused")):
        slower = [r["block"] for r in rows if r[key] < 1]
        print(f"ours beats {name} on every block" if not slower else f"{name} is faster on: {', '.join(slower)}")


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
    if result["xnnpack_missing"] is None:
        print_table_with_xnnpack(result["rows"])
    else:
        print(f"no XNNPACK (ExecuTorch) column: {result['xnnpack_missing']}")
        print_table(result["rows"])
    if args.plot:
        plot(result["rows"], args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
