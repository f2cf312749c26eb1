"""``mobilenet quantize CHECKPOINT --calibration DIR [--per-channel/--per-tensor] [--backend onnxruntime|executorch]``:
an int8 ONNX model, or an int8 ExecuTorch program (``.pte``, XNNPACK)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mobilenet.cli import shown_path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="int8 post-training static quantization (ONNX Runtime QDQ, or ExecuTorch XNNPACK) calibrated on real "
        "images",
        description=(
            "Export the checkpoint to ONNX, calibrate activation ranges on real images preprocessed exactly as "
            "evaluation does, and write an int8 QDQ ONNX model that `mobilenet predict` and ONNX Runtime run; or, "
            "with --backend executorch, an int8 ExecuTorch program (.pte) for the XNNPACK delegate."
        ),
    )
    parser.add_argument("checkpoint", help="a .safetensors checkpoint")
    parser.add_argument(
        "--calibration", "-c", required=True, help="directory of real images (e.g. the training split), recursive"
    )
    parser.add_argument(
        "--out", "-o", default=None, help="int8 file (default: CHECKPOINT.int8.onnx, or .int8.pte for executorch)"
    )
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
        "--backend",
        choices=("onnxruntime", "executorch"),
        default="onnxruntime",
        help="quantization flow: onnxruntime (int8 QDQ .onnx, default) or executorch (XNNPACKQuantizer PT2E, an int8 "
        ".pte for phones; needs executorch)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="executorch only: largest batch the .pte accepts, 1..1024 (default 32)",
    )
    parser.add_argument(
        "--num-calibration", "-n", type=int, default=512, help="calibration images, a seeded sample (default 512)"
    )
    parser.add_argument(
        "--method",
        choices=("minmax", "entropy", "percentile"),
        default=None,
        help="onnxruntime's calibration (default minmax; executorch's quantizer calibrates with histograms)",
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
    parser.add_argument(
        "--keep-fp32", default=None, metavar="FILE", help="also keep the fp32 export (.onnx, or .pte) here"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mobilenet.errors import MobileNetError

    if args.num_calibration < 1:
        raise MobileNetError(f"--num-calibration must be at least 1, got {args.num_calibration}")
    checkpoint = Path(args.checkpoint)
    if args.backend == "executorch":
        return _run_executorch(args, checkpoint)
    if args.max_batch is not None:
        raise MobileNetError("--max-batch applies to --backend executorch only (an ONNX model takes any batch size)")
    if not checkpoint.is_file():
        raise MobileNetError(f"checkpoint {checkpoint} does not exist; expected a .safetensors checkpoint")
    return _run_onnxruntime(args, checkpoint)


def _run_onnxruntime(args: argparse.Namespace, checkpoint: Path) -> int:
    from mobilenet.quantize import quantize_onnx, resolve_target

    out = Path(args.out) if args.out else checkpoint.with_suffix(".int8.onnx")
    method = args.method or "minmax"
    target, target_activations, target_reduce = resolve_target(args.target)
    activations = target_activations if args.activations == "auto" else args.activations
    reduce_range = target_reduce if args.reduce_range is None else args.reduce_range
    where = "this machine" if args.target == "auto" else "as asked"
    print(f"target: {target} ({where}): {activations} activations, {'7' if reduce_range else '8'}-bit weights")
    with _warnings_to_stderr():
        result = quantize_onnx(
            checkpoint,
            out,
            args.calibration,
            per_channel=args.per_channel,
            reduce_range=reduce_range,
            num_calibration=args.num_calibration,
            calibrate_method=method,
            activation_type=activations,
            keep_fp32=args.keep_fp32,
            seed=args.seed,
            progress=sys.stderr.isatty(),
        )
    _report(result, f"int8 QDQ, {result.settings['weights']}", "fp32", method)
    return 0


def _run_executorch(args: argparse.Namespace, checkpoint: Path) -> int:
    from mobilenet.errors import MobileNetError
    from mobilenet.export import PTE_MAX_BATCH, check_pte_max_batch
    from mobilenet.quantize_pte import PT2E_CALIBRATION, quantize_pte

    max_batch = check_pte_max_batch(PTE_MAX_BATCH if args.max_batch is None else args.max_batch)
    onnx_only = {
        "--target": args.target != "auto",
        "--activations": args.activations != "auto",
        "--full-range": args.reduce_range is not None,
        "--method": args.method is not None,
    }
    given = [name for name, used in onnx_only.items() if used]
    if given:
        raise MobileNetError(
            f"{', '.join(given)} applies to --backend onnxruntime only; XNNPACK's int8 kernels take int8 activations "
            f"and 8-bit weights on every CPU, calibrated with {PT2E_CALIBRATION} observers"
        )
    if not checkpoint.is_file():
        raise MobileNetError(f"checkpoint {checkpoint} does not exist; expected a .safetensors checkpoint")
    out = Path(args.out) if args.out else checkpoint.with_suffix(".int8.pte")
    print(f"target: XNNPACK (ExecuTorch): int8 activations, 8-bit weights, batches of 1 to {max_batch}")
    with _warnings_to_stderr():
        result = quantize_pte(
            checkpoint,
            out,
            args.calibration,
            per_channel=args.per_channel,
            num_calibration=args.num_calibration,
            max_batch=max_batch,
            keep_fp32=args.keep_fp32,
            seed=args.seed,
            progress=sys.stderr.isatty(),
        )
    _report(result, f"int8 XNNPACK, {result.settings['weights']}", "fp32 XNNPACK", PT2E_CALIBRATION)
    print(f"wrote {shown_path(f'{result.path}.json')} (metadata: precision int8)")
    return 0


@contextlib.contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """Print a RandomWeightsWarning (a model name given for a checkpoint) as one line on stderr."""
    from mobilenet.backends import RandomWeightsWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RandomWeightsWarning)
        yield
    for warning in caught:
        print(f"mobilenet quantize: warning: {warning.message}", file=sys.stderr)


def _report(result: Any, what: str, fp32_what: str, method: str) -> None:
    for problem in result.skipped:
        print(f"mobilenet quantize: warning: skipped a calibration file: {problem}", file=sys.stderr)
    print(f"wrote {shown_path(result.path)} ({result.path.stat().st_size / 1e6:.2f} MB, {what})")
    if result.fp32_path is not None:
        print(f"wrote {shown_path(result.fp32_path)} ({result.fp32_path.stat().st_size / 1e6:.2f} MB, {fp32_what})")
    print(f"  calibrated on {result.calibration_images} image(s) ({method})")
    if result.int8_agreement is not None:
        print(f"  int8 top-1 equals fp32 top-1 on {100 * result.int8_agreement:.1f}% of the calibration images")
    for check in result.checks:
        print(f"  ok: {check}")
