"""ExecuTorch (XNNPACK) fp32 vs int8 ``.pte`` vs ONNX Runtime fp32: file sizes and batch-1 latency, interleaved.

Usage::

    PYTHONPATH=src python benchmarks/executorch_int8.py [--model mobilenet_v2_1.0_224] [--threads 2] \\
        [--calibration ../shared/data/cifar10/train] [--num-calibration 32] [--rounds 40] [--max-batch 32]

The model is the registered architecture with its seeded random weights: file size and speed depend on the
shapes, not on the weights' values (accuracy is benchmarks/quantize_cifar10.py's job). The int8 program is made
by :func:`mobilenet.quantize_pte.quantize_pte`, calibrated on ``--num-calibration`` real images of the directory
(preprocessed with the model's eval transform), the fp32 one by :func:`mobilenet.export.export_executorch`, the ONNX
file by :func:`mobilenet.export.export_onnx`. All three run in this one process on the same seeded batch, timed in
interleaved rounds (:func:`mobilenet.timing.time_interleaved`), ExecuTorch's thread pool and ONNX Runtime's
intra-op threads both set to ``--threads``. Prints sizes, medians and ratios to the fp32 ``.pte``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from mobilenet.export import export_executorch, export_onnx, in_chunks, ort_session, pte_runner
from mobilenet.models import create_model
from mobilenet.parity import seeded_batch
from mobilenet.quantize_pte import quantize_pte
from mobilenet.timing import Candidate, summarize_timings, time_interleaved

DEFAULT_CALIBRATION = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "train"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2_1.0_224")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION)
    parser.add_argument("--num-calibration", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--max-batch", type=int, default=32)
    return parser.parse_args(argv)


def build(args: argparse.Namespace, directory: Path) -> tuple[list[Candidate], dict[str, int]]:
    """The three runners and the sizes of their files."""
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    fp32 = export_executorch(model, directory / "fp32.pte", max_batch=args.max_batch, rtol=1e-5)
    int8 = quantize_pte(
        model, directory / "int8.pte", args.calibration, num_calibration=args.num_calibration, max_batch=args.max_batch
    )
    onnx = export_onnx(model, directory / "fp32.onnx", rtol=1e-5)
    session = ort_session(onnx.path, args.threads)

    def ort_run(x: torch.Tensor) -> object:
        return session.run(["logits"], {"image": x.numpy()})[0]

    print(f"int8 .pte: {int8.checks[0]} (random weights: the agreement means nothing here)")
    candidates = [
        Candidate("pte-fp32", "ExecuTorch fp32 (XNNPACK)", in_chunks(pte_runner(fp32.path))),
        Candidate("pte-int8", "ExecuTorch int8 (XNNPACK)", in_chunks(pte_runner(int8.path))),
        Candidate("ort-fp32", "ONNX Runtime fp32", ort_run),
    ]
    sizes = {"pte-fp32": fp32.path.stat().st_size, "pte-int8": int8.path.stat().st_size}
    sizes["ort-fp32"] = onnx.path.stat().st_size
    return candidates, sizes


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from executorch.extension.pybindings import portable_lib

    torch.set_num_threads(args.threads)
    portable_lib._unsafe_reset_threadpool(args.threads)
    with tempfile.TemporaryDirectory(prefix="mobilenet-et-bench-") as tmp:
        candidates, sizes = build(args, Path(tmp))
        size = create_model(args.model).config.resolution
        x = seeded_batch((1, 3, size, size))
        timings = time_interleaved(candidates, x, rounds=args.rounds, warmup=5)
    medians = {name: summarize_timings(times)["median"] for name, times in timings.items()}
    print(f"{args.model}, batch 1, {args.threads} threads, {args.rounds} interleaved rounds")
    print(f"{'runner':10} {'file MB':>8} {'median ms':>10} {'vs pte-fp32':>12}")
    for candidate in candidates:
        name = candidate.name
        ratio = medians[name] / medians["pte-fp32"]
        print(f"{name:10} {sizes[name] / 1e6:8.2f} {medians[name]:10.2f} {ratio:11.2f}x")


if __name__ == "__main__":
    main()
