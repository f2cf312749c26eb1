"""LiteRT ``.tflite`` vs ONNX Runtime ``.onnx`` (both fp32): file sizes, export time and batch-1 latency, interleaved.

Usage::

    PYTHONPATH=src python benchmarks/litert_export.py [--model mobilenet_v2_1.0_224] [--threads 2] [--rounds 40]

Needs the litert and onnx extras. The model is the registered architecture with seeded random weights whose
BatchNorm statistics and classifier are redrawn (BN running stats far from identity, classifier from N(0, 4)), so
that the logits are well above zero and the export's parity check (:func:`mobilenet.export.export_litert`, against
PyTorch on seeded images) means something; file size and speed depend on the shapes, not the values. Both files run
in this one process on the same seeded image, timed in interleaved rounds
(:func:`mobilenet.timing.time_interleaved`), LiteRT's interpreter and ONNX Runtime's intra-op pool both with
``--threads`` threads. Prints sizes, the parity figures, medians and the ratio to LiteRT.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from mobilenet.export import export_litert, export_onnx, ort_session, tflite_runner
from mobilenet.models import create_model
from mobilenet.parity import seeded_batch
from mobilenet.timing import Candidate, summarize_timings, time_interleaved


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2_1.0_224")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    return parser.parse_args(argv)


def model_with_visible_logits(name: str) -> nn.Module:
    """The architecture with seeded weights, BN statistics and a classifier that give logits of order 1-100."""
    torch.manual_seed(0)
    model = create_model(name)
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    model.classifier.weight.data.normal_(0.0, 4.0, generator=generator)
    return model.eval()


def build(args: argparse.Namespace, directory: Path) -> tuple[list[Candidate], dict[str, int]]:
    """The two runners and the sizes of their files; prints export times and parity."""
    model = model_with_visible_logits(args.model)
    start = time.perf_counter()
    litert = export_litert(model, directory / "m.tflite")
    print(f"export_litert: {time.perf_counter() - start:.1f} s; {litert.checks[0]}")
    start = time.perf_counter()
    onnx = export_onnx(model, directory / "m.onnx", rtol=1e-5)
    print(f"export_onnx: {time.perf_counter() - start:.1f} s; max abs diff {onnx.max_abs_diff:.2e}")
    size = model.config.resolution
    with torch.no_grad():
        scale = model(seeded_batch((1, 3, size, size), 1)).abs().max().item()
    print(f"logit scale (max |logit| on a seeded image): {scale:.1f}")
    session = ort_session(onnx.path, args.threads)

    def ort_run(x: torch.Tensor) -> object:
        return session.run(["logits"], {"image": x.numpy()})[0]

    candidates = [
        Candidate("litert", "LiteRT interpreter fp32 (XNNPACK)", tflite_runner(litert.path)),
        Candidate("ort", "ONNX Runtime fp32", ort_run),
    ]
    sizes = {"litert": litert.path.stat().st_size, "ort": onnx.path.stat().st_size}
    return candidates, sizes


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # the LiteRT runner takes torch's thread count
    with tempfile.TemporaryDirectory(prefix="mobilenet-litert-bench-") as tmp:
        candidates, sizes = build(args, Path(tmp))
        size = create_model(args.model).config.resolution
        x = seeded_batch((1, 3, size, size))
        timings = time_interleaved(candidates, x, rounds=args.rounds, warmup=5)
    medians = {name: summarize_timings(times)["median"] for name, times in timings.items()}
    print(f"{args.model}, batch 1, {args.threads} threads, {args.rounds} interleaved rounds")
    print(f"{'runner':8} {'file MB':>8} {'median ms':>10} {'vs litert':>10}")
    for candidate in candidates:
        name = candidate.name
        print(f"{name:8} {sizes[name] / 1e6:8.2f} {medians[name]:10.2f} {medians[name] / medians['litert']:9.2f}x")


if __name__ == "__main__":
    main()
