"""``mobilenet quantize CHECKPOINT --calibration DIR [--per-channel/--per-tensor]``: an int8 ONNX model."""

from __future__ import annotations

import argparse
import sys
import warnings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="int8 post-training static quantization (ONNX Runtime QDQ) calibrated on real images",
        description=(
            "Export the checkpoint to ONNX, calibrate activation ranges on real images preprocessed exactly as "
            "evaluation does, and write an int8 QDQ ONNX model that `mobilenet predict` and ONNX Runtime run."
        ),
    )
    parser.add_argument("checkpoint", help="a .safetensors checkpoint")
    parser.add_argument(
        "--calibration", "-c", required=True, help="directory of real images (e.g. the training split), recursive"
    )
    parser.add_argument("--out", "-o", default=None, help="int8 .onnx file (default: CHECKPOINT.int8.onnx)")
    granularity = parser.add_mutually_exclusive_group()
    granularity.add_argument(
        "--per-channel",
        dest="per_channel",
        action="store_true",
        default=True,
        help="one weight scale per output channel (default; depthwise filters need it)",
    )
    granularity.add_argument("--per-tensor", dest="per_channel", action="store_false", help="one scale per tensor")
    parser.add_argument(
        "--backend", choices=("onnxruntime",), default="onnxruntime", help="quantization flow (default: onnxruntime)"
    )
    parser.add_argument(
        "--num-calibration", "-n", type=int, default=512, help="calibration images, a seeded sample (default 512)"
    )
    parser.add_argument(
        "--method", choices=("minmax", "entropy", "percentile"), default="minmax", help="calibration (default minmax)"
    )
    parser.add_argument(
        "--target",
        choices=("auto", "x86-avx2", "x86-vnni", "arm"),
        default="auto",
        help="the CPU that will run the model, which sets the activation type and the weights' range: x86-avx2 "
        "(uint8, 7-bit weights against int16 saturation), x86-vnni (uint8, 8-bit), arm (int8, 8-bit); default "
        "auto: this machine",
    )
    parser.add_argument(
        "--full-range",
        dest="reduce_range",
        action="store_false",
        default=None,
        help="use all 8 bits of the weights whatever the target (default: the target's)",
    )
    parser.add_argument(
        "--activations",
        choices=("auto", "int8", "uint8"),
        default="auto",
        help="activation type (default auto: the target's)",
    )
    parser.add_argument("--keep-fp32", default=None, metavar="FILE", help="also keep the fp32 ONNX export here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mobilenet.backends import RandomWeightsWarning
    from mobilenet.errors import MobileNetError
    from mobilenet.quantize import quantize_onnx, resolve_target

    if args.num_calibration < 1:
        raise MobileNetError(f"--num-calibration must be at least 1, got {args.num_calibration}")
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise MobileNetError(f"checkpoint {checkpoint} does not exist; expected a .safetensors checkpoint")
    out = Path(args.out) if args.out else checkpoint.with_suffix(".int8.onnx")
    target, target_activations, target_reduce = resolve_target(args.target)
    activations = target_activations if args.activations == "auto" else args.activations
    reduce_range = target_reduce if args.reduce_range is None else args.reduce_range
    where = "this machine" if args.target == "auto" else "as asked"
    print(f"target: {target} ({where}): {activations} activations, {'7' if reduce_range else '8'}-bit weights")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RandomWeightsWarning)
        result = quantize_onnx(
            checkpoint,
            out,
            args.calibration,
            per_channel=args.per_channel,
            reduce_range=reduce_range,
            num_calibration=args.num_calibration,
            calibrate_method=args.method,
            activation_type=activations,
            keep_fp32=args.keep_fp32,
            seed=args.seed,
            progress=sys.stderr.isatty(),
        )
    for warning in caught:
        print(f"mobilenet quantize: warning: {warning.message}", file=sys.stderr)
    for problem in result.skipped:
        print(f"mobilenet quantize: warning: skipped a calibration file: {problem}", file=sys.stderr)
    print(f"wrote {result.path} ({result.path.stat().st_size / 1e6:.2f} MB, int8 QDQ, {result.settings['weights']})")
    if result.fp32_path is not None:
        print(f"wrote {result.fp32_path} ({result.fp32_path.stat().st_size / 1e6:.2f} MB, fp32)")
    print(f"  calibrated on {result.calibration_images} image(s) ({args.method})")
    if result.int8_agreement is not None:
        print(f"  int8 top-1 equals fp32 top-1 on {100 * result.int8_agreement:.1f}% of the calibration images")
    return 0
