"""int8 ExecuTorch programs (``.pte``): post-training static quantization with ExecuTorch's XNNPACK quantizer (the
PT2E flow of torchao), calibrated on real images, lowered to the XNNPACK delegate.

The flow (:func:`quantize_pte`):

1. the fp32 model with BatchNorm folded (:func:`mobilenet.export.fold_batchnorm`), captured by ``torch.export``
   with the dynamic batch bound the ``.pte`` will have (:func:`mobilenet.export.pte_program`);
2. ``prepare_pt2e`` with ``XNNPACKQuantizer`` and ``get_symmetric_quantization_config(is_per_channel=True)``:
   int8 weights, symmetric, one scale per output channel (depthwise convs have one 3x3 filter per channel whose
   ranges differ by orders of magnitude: Krishnamoorthi 2018, "Quantizing deep convolutional networks for
   efficient inference", section 3.1), int8 activations with one scale and zero point per tensor; the quantizer
   annotates a conv and the ReLU/ReLU6 after it as one int8 op, so ReLU6's known range [0, 6] (V2 paper section
   3.1, "robustness when used with low-precision computation") is what that op's output is quantized to;
3. calibration: real images, decoded and preprocessed exactly as evaluation does
   (:func:`mobilenet.quantize.calibration_batches` with the model's preprocessing), run through the prepared
   graph while its observers (a histogram per activation, min/max per weight channel) record ranges;
4. ``convert_pt2e`` (quantize/dequantize pairs around every int8 op), captured again and lowered to XNNPACK
   (:func:`mobilenet.export.lower_to_pte`), which runs each q/dq-wrapped op as an int8 kernel;
5. the written file runs in ExecuTorch's runtime on the calibration images: its top-1 is compared with the fp32
   PyTorch model's (``int8_agreement``, as :func:`mobilenet.quantize.quantize_onnx` reports) and with the int8
   model's in PyTorch (the lowering's own check). The ``<file>.pte.json`` beside it says ``precision: int8`` and
   how the model was quantized.

XNNPACK's int8 kernels take signed int8 activations and all 8 bits of the weights on x86 and ARM alike, so
the ONNX Runtime flow's ``--target`` choices do not apply here.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from mobilenet.backends import load_source
from mobilenet.errors import INSTALL_HINTS, MobileNetError
from mobilenet.export import (
    PTE_MAX_BATCH,
    PteRunner,
    check_pte_max_batch,
    export_executorch,
    fold_batchnorm,
    lower_to_pte,
    metadata_for,
    pte_metadata,
    pte_output_paths,
    pte_program,
    write_pte,
)
from mobilenet.progress import progress_bar
from mobilenet.quantize import QuantizeResult, calibration_batches, calibration_list

__all__ = ["PT2E_CALIBRATION", "quantize_pte"]

#: How the XNNPACK quantizer's static config calibrates activations (its only method; named in the metadata).
PT2E_CALIBRATION = "histogram"


def _require_pt2e() -> tuple[Any, Any, Any, Any]:
    """XNNPACKQuantizer, get_symmetric_quantization_config, prepare_pt2e and convert_pt2e, or the install hint."""
    try:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as error:
        raise MobileNetError(
            f"an int8 .pte needs executorch and torchao ({error.name} is missing); {INSTALL_HINTS['mobile']}"
        ) from None
    return XNNPACKQuantizer, get_symmetric_quantization_config, prepare_pt2e, convert_pt2e


def quantize_pte(
    model_or_checkpoint: Any,
    out: str | os.PathLike[str],
    calibration: str | os.PathLike[str] | Sequence[Any],
    *,
    per_channel: bool = True,
    num_calibration: int | None = 512,
    batch_size: int = 32,
    max_batch: int = PTE_MAX_BATCH,
    keep_fp32: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> QuantizeResult:
    """Quantize a checkpoint (or model) to an int8 ExecuTorch program for the XNNPACK delegate (module docstring).

    Args:
        model_or_checkpoint: a ``.safetensors`` checkpoint path, a MobileNet or a Checkpoint.
        out: the int8 ``.pte`` to write (atomically; its metadata goes to ``<out>.json``).
        calibration: a directory of real images (searched recursively) or a list of image files.
        per_channel: one weight scale per output channel (default) or one per tensor.
        num_calibration: images to calibrate on (a seeded random sample; None = all).
        batch_size: calibration batch size (at most ``max_batch``: the captured graph takes no larger batch).
        max_batch: the largest batch the program accepts (:func:`mobilenet.export.check_pte_max_batch`).
        keep_fp32: where to also write the fp32 ``.pte`` of the same model (for comparison), or None.
        seed: seed of the calibration sample.
        progress: show a progress bar over the calibration images.
    """
    _check_options(max_batch, num_calibration, batch_size)
    quantizer_parts = _require_pt2e()
    target, sidecar = pte_output_paths(out, inputs=[model_or_checkpoint])
    if keep_fp32 is not None:
        pte_output_paths(keep_fp32, inputs=[model_or_checkpoint, out])
    files = calibration_list(calibration, num_calibration, seed)
    source = load_source(model_or_checkpoint)
    if source.model is None:
        raise MobileNetError(
            f"{source.path} is an exported file; quantize takes the .safetensors checkpoint (fp32 weights)"
        )
    metadata = pte_metadata(
        metadata_for(source.model, classes=source.classes, preprocessing=source.preprocessing), max_batch, "int8"
    )
    folded = fold_batchnorm(source.model).float().cpu()
    step = min(batch_size, max_batch)

    def batches(skipped: list[str] | None = None) -> Iterator[torch.Tensor]:
        arrays = calibration_batches(
            files, source.preprocessing, batch_size=step, in_channels=source.config.in_channels, skipped=skipped
        )
        return (torch.from_numpy(array) for array in arrays)

    skipped: list[str] = []
    int8_model, images = _calibrated(
        folded, metadata, batches(skipped), quantizer_parts, per_channel, (len(files), progress)
    )
    if images == 0:
        first = skipped[0] if skipped else "no image was read"
        raise MobileNetError(
            f"none of the {len(files)} calibration file(s) could be decoded; expected real images (first error: "
            f"{first})"
        )
    settings = _settings(per_channel, images)
    metadata["quantization"] = settings
    buffer = lower_to_pte(pte_program(int8_model, metadata, max_batch))
    agreements: dict[str, float] = {}

    def verify(runner: PteRunner) -> list[str]:
        agreements.update(_agreements(runner, folded, int8_model, batches()))
        return [
            f"ExecuTorch int8 top-1 equals the int8 model's in PyTorch on {100 * agreements['int8']:.1f}% and the "
            f"fp32 model's on {100 * agreements['fp32']:.1f}% of the {images} calibration image(s)"
        ]

    checks = write_pte(buffer, target, sidecar, metadata, verify)
    fp32_kept = None
    if keep_fp32 is not None:
        fp32_kept = export_executorch(
            source.model,
            keep_fp32,
            classes=source.classes,
            preprocessing=source.preprocessing,
            max_batch=max_batch,
            rtol=1e-5,
        ).path
    return QuantizeResult(target, fp32_kept, images, skipped, settings, agreements["fp32"], checks)


def _check_options(max_batch: Any, num_calibration: Any, batch_size: Any) -> None:
    """Refuse bad numbers before executorch is imported or any image read."""
    check_pte_max_batch(max_batch)
    if num_calibration is not None and (isinstance(num_calibration, bool) or num_calibration < 1):
        raise MobileNetError(f"the number of calibration images must be at least 1, got {num_calibration}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MobileNetError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _settings(per_channel: bool, images: int) -> dict[str, Any]:
    """How the program was quantized, as the metadata records it."""
    return {
        "method": "ExecuTorch XNNPACKQuantizer, PT2E static (post-training), lowered to XNNPACK",
        "executorch": _version("executorch"),
        "torchao": _version("torchao"),
        "weights": "int8 symmetric, " + ("per channel" if per_channel else "per tensor"),
        "activations": "int8",
        "calibrate_method": PT2E_CALIBRATION,
        "calibration_images": images,
    }


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _calibrated(
    folded: nn.Module,
    metadata: dict[str, Any],
    batches: Iterator[torch.Tensor],
    quantizer_parts: tuple[Any, Any, Any, Any],
    per_channel: bool,
    progress: tuple[int, bool],
) -> tuple[nn.Module, int]:
    """The int8 model in PyTorch (``convert_pt2e`` of the calibrated, prepared graph) and the images it saw."""
    quantizer_class, config, prepare_pt2e, convert_pt2e = quantizer_parts
    program = pte_program(folded, metadata, metadata["input"]["max_batch"])
    quantizer = quantizer_class().set_global(config(is_per_channel=per_channel))
    prepared = prepare_pt2e(program.module(), quantizer)
    images = 0
    with torch.no_grad(), progress_bar(progress[0], "calibrating", enabled=progress[1]) as advance:
        for batch in batches:
            prepared(batch)
            images += len(batch)
            advance(len(batch))
    if images == 0:
        return prepared, 0
    return convert_pt2e(prepared), images


def _agreements(
    runner: PteRunner, fp32: nn.Module, int8: nn.Module, batches: Iterator[torch.Tensor]
) -> dict[str, float]:
    """The fraction of images whose top-1 in the ``.pte`` equals the fp32 model's and the int8 PyTorch model's; a
    logit that is not finite, or a wrong output shape, fails the export."""
    same_fp32 = same_int8 = total = 0
    with torch.no_grad():
        for batch in batches:
            logits = runner(batch)
            if logits.shape != (len(batch), int(fp32.config.num_classes)) or not torch.isfinite(logits).all():
                raise MobileNetError(
                    f"the int8 .pte gave logits of shape {tuple(logits.shape)} with non-finite values or the wrong "
                    "shape; the file was not written"
                )
            top1 = logits.argmax(1)
            same_fp32 += int((top1 == fp32(batch).argmax(1)).sum())
            same_int8 += int((top1 == int8(batch).argmax(1)).sum())
            total += len(batch)
    return {"fp32": same_fp32 / total, "int8": same_int8 / total}
