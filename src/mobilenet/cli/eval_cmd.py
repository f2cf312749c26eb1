"""``mobilenet eval CHECKPOINT --data SRC``: top-1, top-5, per-class accuracy and a confusion-matrix plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mobilenet.cli import shown_path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint: top-1/top-5, per-class, confusion matrix")
    parser.add_argument(
        "checkpoint",
        help="the model: a .safetensors checkpoint, an fp32 or int8 .onnx, or a .ts/.pt2/.pte export of mobilenet",
    )
    parser.add_argument("--data", required=True, help="digits | cifar10 | cifar100 | DIR (its val/ or test/ split)")
    parser.add_argument("--split", choices=("val", "train"), default="val", help="which images to evaluate")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading processes (0: in this process)")
    parser.add_argument(
        "--on-bad-image", choices=("skip", "error"), default="error", help="an undecodable image stops, or is left out"
    )
    parser.add_argument("--val-fraction", type=float, help="held-out fraction for a single-tree DIR (as in training)")
    parser.add_argument("--seed", type=int, default=0, help="the split seed used in training")
    parser.add_argument(
        "--backend",
        choices=(
            "torch",
            "auto",
            "torch-jit",
            "onnxruntime",
            "openvino",
            "openvino-bf16",
            "exported",
            "executorch",
            "fused",
            "fused-int8",
        ),
        default="torch",
        help="runtime (default torch: the eager model, as training validated, or an exported file's own runtime; "
        "auto: the fastest installed, logits within 1e-4 of PyTorch's)",
    )
    parser.add_argument(
        "--reference",
        metavar="MODEL",
        help="a second model evaluated on the same images, e.g. the fp32 checkpoint of an int8 .onnx: prints both "
        "top-1s and the difference",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "int8", "auto-fast"),
        help="run in this precision tier (default: the model's own) and compare it with float32 on the same images; "
        "refused when it loses more top-1 than --max-drop. int8 of a .safetensors checkpoint: with --calibration, "
        "quantized first (ONNX Runtime/OpenVINO); without, our fused kernel's int8 (CPUs with VNNI)",
    )
    parser.add_argument(
        "--max-drop",
        type=float,
        metavar="POINTS",
        help="top-1 percentage points a lower precision may lose against float32 (default: bf16 0.3, int8 1.0)",
    )
    parser.add_argument(
        "--calibration",
        metavar="DIR",
        help="with --precision int8 and a float checkpoint: images to quantize with first (not the evaluated ones: "
        "e.g. the training split), as `mobilenet quantize --calibration` takes; without it the fused kernel "
        "quantizes as it runs, where it can",
    )
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    parser.add_argument("--plot", help="confusion-matrix PNG path (default: beside the checkpoint)")
    parser.add_argument("--no-plot", action="store_true", help="no confusion-matrix PNG")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import tempfile

    from mobilenet.errors import MobileNetError

    if args.calibration is not None and args.precision != "int8":
        raise MobileNetError("--calibration quantizes the model for --precision int8; give --precision int8 too")
    if args.max_drop is not None and not 0 <= args.max_drop <= 100:
        raise MobileNetError(f"--max-drop is in percentage points from 0 to 100, got {args.max_drop}")
    # Without --calibration a float checkpoint runs in int8 where a backend quantizes it as it runs (our fused
    # kernel on a CPU with VNNI); where none does, the error names --calibration and `mobilenet quantize`.
    needs_quantizing = args.precision == "int8" and args.calibration is not None
    if needs_quantizing and str(args.checkpoint).lower().endswith(".onnx"):
        raise MobileNetError(
            f"--calibration quantizes a float checkpoint; {args.checkpoint} is an .onnx file already (give the "
            ".safetensors checkpoint to quantize, or evaluate the int8 .onnx that `mobilenet quantize` wrote)"
        )
    plot_path = _checked_plot(args)  # before quantizing too: a plot it could not write is found before any work
    with tempfile.TemporaryDirectory(prefix="mobilenet-eval-") as tmp:
        model = _quantized(args, Path(tmp)) if needs_quantizing else args.checkpoint
        return _evaluate(args, model, plot_path)


def _quantized(args: argparse.Namespace, directory: Path) -> str:
    """The float checkpoint quantized to int8 for this machine (as `mobilenet quantize` does), into ``directory``;
    the checkpoint then becomes the float32 reference."""
    from mobilenet.quantize import quantize_onnx

    result = quantize_onnx(args.checkpoint, directory / "model.int8.onnx", args.calibration, progress=True)
    if args.reference is None:
        args.reference = args.checkpoint
    return str(result.path)


def _checked_plot(args: argparse.Namespace) -> Path | None:
    """The confusion plot's path, checked now: an unwritable plot must not be found only after the whole
    evaluation."""
    from mobilenet.data import BUILTIN_DATA
    from mobilenet.io import check_output_file, check_outside_directory

    if args.no_plot:
        return None
    plot_path = Path(args.plot) if args.plot else Path(args.checkpoint).with_suffix(".confusion.png")
    what = "--plot" if args.plot else "the confusion plot beside the checkpoint (choose --plot FILE or --no-plot)"
    check_output_file(plot_path, what, inputs=[args.checkpoint, args.reference, args.calibration])
    if args.data not in BUILTIN_DATA:  # a plot in a class folder would be one more image of that class
        check_outside_directory(plot_path, what, args.data, "the --data folder")
    check_outside_directory(plot_path, what, args.calibration, "the --calibration folder")
    return plot_path


def _evaluate(args: argparse.Namespace, model: str, plot_path: Path | None) -> int:
    from mobilenet.evaluate import evaluate_checkpoint
    from mobilenet.plots import plot_confusion

    result = evaluate_checkpoint(
        model,
        args.data,
        split=args.split,
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.num_workers,
        on_bad_image=args.on_bad_image,
        val_fraction=args.val_fraction,
        seed=args.seed,
        progress=args.format == "table",
        backend=args.backend,
        reference=args.reference,
        precision=args.precision,
        max_drop=None if args.max_drop is None else args.max_drop / 100,
    )
    if plot_path is not None:
        plot_confusion(
            result["confusion"],
            result["classes"],
            plot_path,
            title=f"{result['model']} on {result['data']} ({result['split']}): top-1 {result['top1']:.2%}",
        )
        result["confusion_plot"] = str(plot_path)
    if args.format == "json":
        print(json.dumps(result, indent=2))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    # Names and paths are the user's text: escaped, so a folder named "[/b]" prints as itself instead of as markup.
    console = Console()
    console.print(
        f"[bold]{escape(result['model'])}[/bold] on {escape(str(result['data']))} ({result['split']}, "
        f"{result['images']} images): "
        f"top-1 [bold]{result['top1']:.2%}[/bold]  "
        + (f"top-5 {result['top5']:.2%}  " if len(result["classes"]) > 5 else "")
        + f"loss {result['loss']:.4f}"
    )
    if "reference" in result:
        console.print(
            f"reference {escape(str(result['reference']['checkpoint']))}: top-1 {result['reference']['top1']:.2%}; "
            f"difference {100 * result['top1_difference']:+.2f} points"
        )
    if "precision_check" in result:
        console.print(
            f"precision {result['precision']} ({result['backend_used']}): {result['precision_check']} "
            f"(bound {100 * result['precision_bound']:.2f} points)"
        )
    table = Table("class", "images", "accuracy")
    for name, accuracy in result["per_class"].items():
        table.add_row(Text(name), str(result["per_class_count"][name]), "-" if accuracy is None else f"{accuracy:.2%}")
    console.print(table)
    if "confusion_plot" in result:
        console.print(Text(f"confusion matrix: {shown_path(result['confusion_plot'])}"))
    return 0
