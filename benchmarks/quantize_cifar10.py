"""int8 vs fp32 on real CIFAR-10: top-1 accuracy on the test split and batch-1 latency at 2 threads.

Usage (a checkpoint trained on CIFAR-10, e.g. by ``mobilenet train --data cifar10 ...``)::

    python benchmarks/quantize_cifar10.py RUN/best.safetensors [--data ../shared/data/cifar10] [--threads 2]

Steps: quantize the checkpoint with ONNX Runtime static QDQ (:func:`mobilenet.quantize.quantize_onnx`, per-channel
weights unless ``--per-tensor``) calibrated on ``--num-calibration`` images of the *train* split; preprocess the
whole *test* split once with the checkpoint's eval transform (the one ``mobilenet predict`` and evaluation use);
then measure top-1 of PyTorch fp32, ONNX Runtime fp32 and ONNX Runtime int8 on it, and the median batch-1 latency
of each at ``--threads`` threads. Prints the figures and the int8/fp32 ratios; ``--json`` also writes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mobilenet.images import find_images
from mobilenet.predict import Predictor
from mobilenet.quantize import quantize_onnx

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def load_split(root: Path, classes: list[str] | None, predictor: Predictor, limit: int | None):
    """Every image of an ImageFolder split, preprocessed once, and its label (class folder -> checkpoint index)."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    names = classes or folders
    if sorted(names) != folders:
        sys.exit(f"the checkpoint's classes {names} are not the class folders of {root}: {folders}")
    files = find_images([root])
    if limit:
        files = files[:: max(1, len(files) // limit)][:limit]
    labels = torch.tensor([names.index(f.parent.name) for f in files])
    images = torch.stack([predictor.preprocess(f) for f in files])
    return images, labels


def top1(run, images: torch.Tensor, labels: torch.Tensor, batch: int = 250) -> float:
    correct = 0
    for start in range(0, len(images), batch):
        logits = run(images[start : start + batch])
        correct += int((logits.argmax(1) == labels[start : start + batch]).sum())
    return correct / len(images)


def latency_ms(run, image: torch.Tensor, runs: int, warmup: int = 20) -> tuple[float, float]:
    """Median and 90th percentile of single-image latency, in milliseconds."""
    for _ in range(warmup):
        run(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(image)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 ImageFolder root (train/, test/)")
    parser.add_argument("--num-calibration", type=int, default=512)
    parser.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor (default: per channel)")
    parser.add_argument("--method", default="minmax", choices=("minmax", "entropy", "percentile"))
    parser.add_argument(
        "--activations",
        default="auto",
        choices=("auto", "int8", "uint8"),
        help="activation type (auto: see quantize.py)",
    )
    parser.add_argument("--full-range", action="store_true", help="8-bit weights (default: 7-bit, see quantize.py)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latency-runs", type=int, default=300)
    parser.add_argument("--limit", type=int, default=None, help="evaluate on this many test images (default: all)")
    parser.add_argument("--out-dir", type=Path, default=None, help="keep the fp32 and int8 ONNX files here")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="quantize-cifar10-"))
    int8_path, fp32_path = out_dir / "model.int8.onnx", out_dir / "model.fp32.onnx"
    start = time.perf_counter()
    result = quantize_onnx(
        args.checkpoint,
        int8_path,
        args.data / "train",
        per_channel=not args.per_tensor,
        num_calibration=args.num_calibration,
        calibrate_method=args.method,
        activation_type=args.activations,
        reduce_range=not args.full_range,
        keep_fp32=fp32_path,
        progress=True,
    )
    print(f"quantized in {time.perf_counter() - start:.1f} s on {result.calibration_images} train images")

    runners = {
        "torch fp32": Predictor(args.checkpoint, backend="torch", num_threads=args.threads),
        "onnxruntime fp32": Predictor(fp32_path, backend="onnxruntime", num_threads=args.threads),
        "onnxruntime int8": Predictor(int8_path, backend="onnxruntime", num_threads=args.threads),
    }
    reference = runners["torch fp32"]
    images, labels = load_split(args.data / "test", reference.classes, reference, args.limit)
    print(f"test split: {len(images)} images, input {tuple(images.shape[1:])}")

    figures: dict[str, dict[str, float]] = {}
    for name, predictor in runners.items():
        accuracy = top1(predictor.logits, images, labels)
        median, p90 = latency_ms(predictor.logits, images[:1], args.latency_runs)
        figures[name] = {"top1": accuracy, "latency_ms_median": median, "latency_ms_p90": p90}
        print(f"{name:18s} top-1 {100 * accuracy:6.2f}%   batch-1 latency {median:7.3f} ms (p90 {p90:.3f})")

    fp32, int8 = figures["onnxruntime fp32"], figures["onnxruntime int8"]
    delta = 100 * (int8["top1"] - fp32["top1"])
    speedup = fp32["latency_ms_median"] / int8["latency_ms_median"]
    size_ratio = fp32_path.stat().st_size / int8_path.stat().st_size
    print(
        f"int8 - fp32 top-1: {delta:+.2f} points (onnxruntime); vs torch fp32: "
        f"{100 * (int8['top1'] - figures['torch fp32']['top1']):+.2f} points"
    )
    print(f"int8 latency speedup over fp32 (onnxruntime, batch 1, {args.threads} threads): {speedup:.2f}x")
    print(
        f"file size: fp32 {fp32_path.stat().st_size / 1e6:.2f} MB, int8 {int8_path.stat().st_size / 1e6:.2f} MB "
        f"({size_ratio:.2f}x smaller)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "checkpoint": str(args.checkpoint),
                    "settings": result.settings,
                    "threads": args.threads,
                    "test_images": len(images),
                    "figures": figures,
                    "int8_minus_fp32_points": delta,
                    "int8_speedup": speedup,
                    "size_ratio": size_ratio,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
