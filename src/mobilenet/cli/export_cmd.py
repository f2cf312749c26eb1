"""``mobilenet export CHECKPOINT --format onnx|torchscript|pt2|pte|litert [--out FILE]``: a verified deployment file."""

from __future__ import annotations

import argparse
import math

from mobilenet.cli import shown_path

FORMATS = ("onnx", "torchscript", "pt2", "pte", "litert")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX, TorchScript, torch.export (.pt2), ExecuTorch (.pte) or LiteRT (.tflite), "
        "verified",
        description=(
            "Export with BatchNorm folded into the convs, a dynamic batch dimension (LiteRT: batch 1; readers run "
            "a larger batch image by image), input 'image' and output 'logits', the preprocessing and class names "
            "in the file's metadata (.pte, .tflite: in FILE.json beside it). Every file is checked after "
            "writing (ONNX: onnx.checker and ONNX Runtime; others: their own loader/runtime) against PyTorch's "
            "logits before it replaces OUT."
        ),
    )
    parser.add_argument("checkpoint", help="a .safetensors checkpoint (or a registered model name: random weights)")
    parser.add_argument("--format", "-f", choices=FORMATS, default="onnx", help="output format (default: onnx)")
    parser.add_argument("--out", "-o", default=None, help="output file (default: CHECKPOINT with the format's suffix)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    parser.add_argument(
        "--onnx-exporter",
        choices=("torchscript", "dynamo"),
        default="torchscript",
        help="torch.onnx exporter: the tracer (fast, default) or dynamo (torch.export + onnxscript)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="pte only: largest batch the program accepts, 1..1024 (default 32); the runtime's memory grows with it "
        "whatever batch runs, so a phone app running batch 1 wants 1",
    )
    parser.add_argument(
        "--atol", type=float, default=1e-4, help="largest allowed |logit difference| against PyTorch (default 1e-4)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mobilenet.backends import load_source
    from mobilenet.errors import MobileNetError
    from mobilenet.export import EXPORT_FORMATS, check_opset, check_pte_max_batch, export_model
    from mobilenet.io import check_output_file

    if args.format == "onnx":
        check_opset(args.opset)
    if args.max_batch is not None and args.format != "pte":
        raise MobileNetError(
            "--max-batch applies to --format pte only (onnx, torchscript and pt2 take any batch size; litert is "
            "written for batch 1, and its readers run a larger batch image by image)"
        )
    if args.max_batch is not None:
        check_pte_max_batch(args.max_batch)
    if not (args.atol > 0 and math.isfinite(args.atol)):
        raise MobileNetError(f"--atol must be a positive number, got {args.atol}")
    if args.out:  # before the checkpoint is read; the default path is known only once it is
        check_output_file(args.out, "--out", inputs=[args.checkpoint])
        _check_out_suffix(args.out, args.format)
    source = load_source(args.checkpoint)  # a model name warns that its weights are random (mobilenet.cli)
    if source.model is None:
        kind = "an ONNX file" if str(args.checkpoint).lower().endswith(".onnx") else "an exported model"
        raise MobileNetError(f"{args.checkpoint} is already {kind}; export takes a .safetensors checkpoint")
    out = Path(args.out) if args.out else _default_out(args.checkpoint, source.name, EXPORT_FORMATS[args.format])
    check_output_file(out, "--out", inputs=[args.checkpoint])
    options: dict[str, object] = {"atol": args.atol}
    if args.format == "onnx":
        options.update(opset=args.opset, exporter=args.onnx_exporter)
    if args.max_batch is not None:
        options["max_batch"] = args.max_batch
    result = export_model(
        source.model,
        out,
        format=args.format,
        classes=source.classes,
        preprocessing=source.preprocessing,
        **options,
    )
    print(f"wrote {shown_path(result.path)} ({result.path.stat().st_size / 1e6:.2f} MB, {result.format})")
    for extra in result.extra_files:
        print(f"wrote {shown_path(extra)} (metadata)")
    for check in result.checks:
        print(f"  ok: {check}")
    return 0


def _check_out_suffix(out: str, fmt: str) -> None:
    """Refuse an --out not named with the format's suffix (predict, eval and bench tell formats by the suffix, so
    an ONNX model named .pt2 would be read as a torch.export archive, one named .bin as a checkpoint)."""
    from mobilenet.export import EXPORT_FORMATS, check_suffix

    check_suffix(out, EXPORT_FORMATS[fmt], "--out", given_as=f"--format is {fmt}")


def _default_out(checkpoint: str, name: str, suffix: str):
    from pathlib import Path

    path = Path(checkpoint)
    if path.is_file():
        return path.with_suffix(suffix)
    return Path((name or "mobilenet") + suffix)
