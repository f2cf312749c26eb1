"""``mobilenet predict MODEL_OR_CHECKPOINT IMAGE_OR_DIR... [--topk 5] [--format table|json]``: top-k classes."""

from __future__ import annotations

import argparse
import sys

from mobilenet.cli import shown_path

#: ``auto`` and the names of :data:`mobilenet.backends.BACKENDS` (spelled out: the CLI starts without torch).
PREDICT_BACKENDS = (
    "auto",
    "torch",
    "torch-channels-last",
    "torch-jit",
    "torch-compile",
    "onnxruntime",
    "openvino",
    "openvino-bf16",
    "exported",
    "fused",
    "fused-int8",
    "executorch",
)
#: :data:`mobilenet.autotune.PRECISIONS`, spelled out for the same reason.
PRECISIONS = ("fp32", "bf16", "int8", "auto-fast")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="classify image files or directories with a checkpoint",
        description=(
            "Decode JPEG/PNG/WebP/GIF/BMP/TIFF files in any colour mode (grayscale, RGBA, CMYK, palette, 16-bit), "
            "preprocess them exactly as evaluation does, and print the top-k classes with probabilities. A file "
            "that cannot be decoded is reported and the others still run; the exit code is then 1."
        ),
    )
    parser.add_argument(
        "model",
        metavar="MODEL_OR_CHECKPOINT",
        help="a .safetensors checkpoint, an fp32 or int8 .onnx, a .ts/.pt2/.pte export, or a model name",
    )
    parser.add_argument("images", metavar="IMAGE_OR_DIR", nargs="+", help="image files and/or directories")
    parser.add_argument("--topk", "-k", type=int, default=5, help="classes to show per image (default: 5)")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    parser.add_argument("--batch-size", "-b", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument(
        "--backend",
        choices=PREDICT_BACKENDS,
        default="auto",
        help=(
            "runtime (default auto: on the CPU the fastest installed of onnxruntime, openvino, torch-jit, executorch "
            "and fused (fused-int8 for --precision int8), "
            "measured once for this model, precision, batch size and threads and cached; MOBILENET_AUTO_MEASURE=0: "
            "the first installed of that order)"
        ),
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="precision tier (default: the model's own, fp32 or int8 for an int8 .onnx): bf16 on CPUs with "
        "AVX512-BF16 or AMX; auto-fast: the fastest of fp32 and bf16, measured. Check a tier's accuracy with "
        "`mobilenet eval --precision`",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the backend")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0 (default: cpu)")
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="say on stderr which backend runs and why (measured, cached or fixed order)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from mobilenet.errors import MobileNetError
    from mobilenet.images import find_images
    from mobilenet.predict import Predictor
    from mobilenet.runtime import check_thread_count

    if args.topk < 1:
        raise MobileNetError(f"--topk must be at least 1, got {args.topk}")
    if args.batch_size < 1:
        raise MobileNetError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.threads is not None:
        check_thread_count(args.threads, "--threads")
    files = find_images(args.images)  # a missing path or an empty directory stops here, before loading a model
    predictor = Predictor(  # a model name warns that its weights are random (one line, mobilenet.cli)
        args.model,
        backend=args.backend,
        device=args.device,
        num_threads=args.threads,
        batch_size=args.batch_size,
        precision=args.precision,
    )
    if args.verbose:
        print(
            f"mobilenet predict: backend {predictor.backend_name}, {predictor.precision} ({predictor.backend_reason})",
            file=sys.stderr,
        )
    show_progress = any(Path(entry).is_dir() for entry in args.images) and len(files) > 1
    predictions = predictor.predict(files, topk=args.topk, progress=show_progress)
    failed = [p for p in predictions if not p.ok]
    for prediction in failed:
        print(f"mobilenet predict: error: {prediction.error}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps([p.to_dict() for p in predictions], indent=2))
    else:
        _print_table(predictions)
    if failed:
        print(f"mobilenet predict: {len(failed)} of {len(predictions)} image(s) could not be read", file=sys.stderr)
        return 1
    return 0


def _print_table(predictions) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Paths and class names are shown as Text: as plain strings rich would read "[/b]" in them as markup; a path
    # holding a newline is quoted (shown_path), or its row would be split.
    table = Table(show_lines=False)
    table.add_column("image", overflow="fold")
    table.add_column("rank", justify="right")
    table.add_column("class")
    table.add_column("probability", justify="right")
    for prediction in predictions:
        if not prediction.ok:
            table.add_row(Text(shown_path(prediction.source)), "-", "[red]could not be read[/red]", "-")
            continue
        for rank, (index, label, probability) in enumerate(
            zip(prediction.indices, prediction.labels, prediction.probabilities, strict=True), start=1
        ):
            name = f"{label} ({index})" if label is not None else str(index)
            source = Text(shown_path(prediction.source) if rank == 1 else "")
            table.add_row(source, str(rank), Text(name), f"{probability:.4f}")
    Console(soft_wrap=False).print(table)
