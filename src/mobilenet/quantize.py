"""int8 post-training static quantization with ONNX Runtime (QDQ), calibrated on real images.

The flow (``quantize_onnx``):

1. export the fp32 model to ONNX (:func:`mobilenet.export.export_onnx`: BatchNorm folded, checked against PyTorch);
2. ONNX Runtime's pre-processing (``quant_pre_process``: symbolic shape inference and graph optimisation, which the
   quantizer needs to know every tensor's shape);
3. calibration: real images, decoded and preprocessed exactly as evaluation does
   (:func:`mobilenet.data.build_eval_transform` with the checkpoint's preprocessing), run through the fp32 graph
   while the calibrator records each activation's range (min/max by default, or entropy / percentile);
4. ``quantize_static`` in QDQ format: weights int8 (per output channel by default: depthwise convs have one
   3x3 filter per channel whose ranges differ by orders of magnitude, so one scale per tensor wastes most of the
   int8 range on them; this is the failure mode Krishnamoorthi 2018, "Quantizing deep convolutional networks for
   efficient inference", section 3.1, reports for MobileNets), activations 8-bit. Weights use 7 of the 8 bits by
   default (``reduce_range``): x86 CPUs without VNNI (AVX2 only, like the machines this was measured on) multiply
   int8 with VPMADDUBSW, which sums pairs of products into int16 and saturates when both weights of a pair use the
   full int8 range. Per-channel scales make every channel use the full range, so saturation is common: on a trained
   MobileNetV2 (tests/test_quantize.py) full-range per-channel weights agreed with fp32 on 64% of images, 7-bit
   ones on 96%. ONNX Runtime documents the same remedy. Pass ``reduce_range=False`` for VNNI or ARM targets.

   Activations are unsigned (uint8) on x86 and signed (int8) elsewhere (``activation_type="auto"``): x86's 8-bit
   multiply instructions (VPMADDUBSW, and VNNI's VPDPBUSD) take one unsigned and one signed operand, so ONNX
   Runtime's x86 kernels for uint8 activations x int8 weights run natively, while int8 x int8 has to be converted
   first. Measured on MobileNetV2 1.0 at 224x224, batch 1, 2 threads (AMD EPYC, AVX2; docs/speed.md): int8
   activations 1.54x *slower* than fp32, uint8 activations 0.79-0.85x fp32's time; the accuracy was the same
   (CIFAR-10 MobileNetV2 0.35: fp32 74.36%, int8 74.48%, uint8 74.42%). ARM's dot-product instructions (SDOT)
   are signed x signed, hence int8 there.

ReLU6 helps here by design: the V2 paper (section 3.1) picks ReLU6 "because of its robustness when used with
low-precision computation"; its output range [0, 6] is known before calibration.

The result is an ordinary ONNX file that :class:`mobilenet.predict.Predictor` runs (``backend="onnxruntime"`` or
``"auto"``); its ``metadata_props`` keep the name, config, classes and preprocessing of the fp32 export plus a
``quantization`` entry describing how it was made, and the digest of its int8 weights (``weights_sha256``), which
every reader checks.
"""

from __future__ import annotations

import json
import os
import platform
import random
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2.functional import rgb_to_grayscale

from mobilenet.backends import load_source
from mobilenet.data import build_eval_transform
from mobilenet.errors import INSTALL_HINTS, MobileNetError
from mobilenet.export import (
    INPUT_NAME,
    ONNX_WEIGHTS_KEY,
    OUTPUT_NAME,
    check_suffix,
    check_text_path,
    export_onnx,
    onnx_weights_digest,
    ort_session,
)
from mobilenet.images import BadImageError, decode_image, find_images
from mobilenet.io import atomic_path, check_output_file
from mobilenet.progress import progress_bar
from mobilenet.runtime import cpu_flags

__all__ = [
    "ACTIVATION_TYPES",
    "CALIBRATION_METHODS",
    "TARGETS",
    "QuantizeResult",
    "calibration_batches",
    "calibration_list",
    "default_activation_type",
    "quantize_onnx",
    "resolve_activation_type",
    "resolve_target",
    "this_machine_target",
]

#: Calibration methods of ONNX Runtime's static quantizer, by the name the CLI takes.
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
#: Backends :func:`quantize_onnx` can target (the CLI's ``--backend``).
QUANTIZE_BACKENDS = ("onnxruntime",)
#: Activation types :func:`quantize_onnx` takes; "auto" is :func:`default_activation_type` of this machine.
ACTIVATION_TYPES = ("auto", "int8", "uint8")


def default_activation_type(machine: str | None = None) -> str:
    """The activation type whose int8 kernels are native on ``machine`` (default: this one's ``platform.machine()``):
    ``"uint8"`` on x86 (u8 x s8 multiply instructions), ``"int8"`` elsewhere (ARM's s8 x s8 dot products)."""
    name = (machine if machine is not None else platform.machine()).lower()
    return "uint8" if name in ("x86_64", "amd64", "i386", "i686", "x86") else "int8"


#: The int8 settings native to the CPU that will run the model: (activation type, 7-bit weights).
#: - x86-avx2: AVX2's int8 multiply (vpmaddubsw) multiplies u8 activations by s8 weights and adds pairs into int16,
#:   which saturates with full 8-bit weights: 7-bit weights (ONNX Runtime's reduce_range) avoid it.
#: - x86-vnni: VNNI (vpdpbusd, AVX512-VNNI or AVX-VNNI) accumulates u8 x s8 straight into int32: all 8 bits.
#: - arm: the dot-product instructions (sdot) multiply s8 by s8 into int32: int8 activations, all 8 bits.
TARGETS: dict[str, tuple[str, bool]] = {
    "x86-avx2": ("uint8", True),
    "x86-vnni": ("uint8", False),
    "arm": ("int8", False),
}


def this_machine_target(machine: str | None = None, flags: set[str] | None = None) -> str:
    """The :data:`TARGETS` entry of this CPU (from ``platform.machine()`` and ``/proc/cpuinfo``'s flags)."""
    name = (machine if machine is not None else platform.machine()).lower()
    if name not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "arm"
    flags = flags if flags is not None else cpu_flags()
    return "x86-vnni" if flags & {"avx512_vnni", "avx_vnni"} else "x86-avx2"


def resolve_target(target: str) -> tuple[str, str, bool]:
    """``(target, activation type, 7-bit weights)`` for a :data:`TARGETS` name or ``"auto"`` (this machine)."""
    chosen = this_machine_target() if target == "auto" else target
    if chosen not in TARGETS:
        raise MobileNetError(f"--target must be auto or one of {', '.join(TARGETS)}, got {target!r}")
    activations, reduce_range = TARGETS[chosen]
    return chosen, activations, reduce_range


def resolve_activation_type(activation_type: str) -> str:
    """``"int8"`` or ``"uint8"`` for one of :data:`ACTIVATION_TYPES` (``"auto"``: this machine's native type)."""
    if activation_type not in ACTIVATION_TYPES:
        raise MobileNetError(f"activation type must be one of {', '.join(ACTIVATION_TYPES)}, got {activation_type!r}")
    return default_activation_type() if activation_type == "auto" else activation_type


@dataclass
class QuantizeResult:
    """What :func:`quantize_onnx` wrote.

    Attributes:
        path: the int8 ONNX file.
        fp32_path: the fp32 ONNX export it was quantized from, if kept (``keep_fp32``), else None.
        calibration_images: how many images the calibration ran on.
        skipped: calibration files that could not be decoded (path: reason).
        settings: the quantization settings, as stored in the file's ``quantization`` metadata.
        int8_agreement: fraction of calibration images whose top-1 class is the same in the int8 and fp32 graphs
            (a quick sanity check; accuracy needs labelled data, see ``benchmarks/quantize_cifar10.py``).
        checks: what else was verified after writing, in words (the int8 ``.pte``'s agreement with the int8 model
            in PyTorch).
    """

    path: Path
    fp32_path: Path | None
    calibration_images: int
    skipped: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    int8_agreement: float | None = None
    checks: list[str] = field(default_factory=list)


def _require_ort() -> Any:
    try:
        import onnx  # noqa: F401
        import onnxruntime.quantization as quantization
    except ImportError as error:
        raise MobileNetError(
            f"quantization needs onnx and onnxruntime ({error.name} is missing); {INSTALL_HINTS['onnx']}"
        ) from None
    return quantization


def check_outputs(out: Any, keep_fp32: Any, model_or_checkpoint: Any) -> None:
    """Refuse, before calibrating, outputs that could not be written in the end: a directory, a path below a
    file, an unwritable place, the input checkpoint itself, ``keep_fp32`` naming the same file as ``out``, or a
    name without the .onnx suffix (the readers tell an ONNX file by it)."""
    check_output_file(out, "--out", inputs=[model_or_checkpoint])
    check_suffix(out, ".onnx", "--out")
    check_text_path(out, "--out", "ONNX")
    if keep_fp32 is not None:
        check_output_file(keep_fp32, "--keep-fp32", inputs=[model_or_checkpoint, out])
        check_suffix(keep_fp32, ".onnx", "--keep-fp32")
        check_text_path(keep_fp32, "--keep-fp32", "ONNX")


def calibration_files(directory: str | os.PathLike[str], limit: int | None, seed: int = 0) -> list[Path]:
    """Up to ``limit`` image files under ``directory`` (recursively), a seeded random sample so that every class
    of an ImageFolder tree is represented, in sorted order for reproducibility."""
    root = Path(directory)
    if not root.exists():
        raise MobileNetError(f"calibration directory {root} does not exist; expected a directory of real images")
    if not root.is_dir():
        raise MobileNetError(f"--calibration must be a directory of images, got the file {root}")
    files = find_images([root])
    if limit is not None and len(files) > limit:
        files = sorted(random.Random(seed).sample(files, limit))
    return files


def calibration_batches(
    files: Sequence[Path],
    preprocessing: dict[str, Any],
    *,
    batch_size: int = 32,
    in_channels: int = 3,
    skipped: list[str] | None = None,
) -> Iterator[np.ndarray]:
    """Float32 NCHW batches of ``files`` preprocessed with the eval transform (undecodable files are skipped and
    recorded in ``skipped``)."""
    transform = build_eval_transform(preprocessing)
    batch: list[torch.Tensor] = []
    for path in files:
        try:
            rgb = decode_image(path)
        except BadImageError as error:
            if skipped is not None:
                skipped.append(str(error))
            continue
        if in_channels == 1:
            rgb = rgb_to_grayscale(rgb)
        batch.append(transform(rgb))
        if len(batch) == batch_size:
            yield torch.stack(batch).numpy()
            batch = []
    if batch:
        yield torch.stack(batch).numpy()


def quantize_onnx(
    model_or_checkpoint: Any,
    out: str | os.PathLike[str],
    calibration: str | os.PathLike[str] | Sequence[Any],
    *,
    per_channel: bool = True,
    num_calibration: int | None = 512,
    calibrate_method: str = "minmax",
    activation_type: str = "auto",
    batch_size: int = 32,
    keep_fp32: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = False,
    reduce_range: bool = True,
) -> QuantizeResult:
    """Quantize a checkpoint (or model) to an int8 ONNX file with ONNX Runtime static QDQ quantization.

    Args:
        model_or_checkpoint: a ``.safetensors`` checkpoint path, a MobileNet, a Checkpoint (see
            :func:`mobilenet.predict.load_source`).
        out: the int8 ``.onnx`` file to write (atomically).
        calibration: a directory of real images (searched recursively; an ImageFolder train split is ideal) or a
            list of image files.
        per_channel: one weight scale per output channel (default) or one per tensor.
        num_calibration: images to calibrate on (a seeded random sample; None = all).
        calibrate_method: ``"minmax"``, ``"entropy"`` or ``"percentile"`` (ONNX Runtime's calibrators).
        activation_type: ``"auto"`` (default: :func:`default_activation_type`, uint8 on x86, int8 elsewhere),
            ``"int8"`` or ``"uint8"``; see the module docstring for why it matters for speed.
        batch_size: calibration batch size.
        keep_fp32: where to also keep the fp32 ONNX export (for comparison), or None.
        seed: seed of the calibration sample.
        progress: show a progress bar over the calibration images.
        reduce_range: 7-bit weights (default), which no x86 int8 kernel can saturate (see the module docstring);
            False uses all 8 bits, for targets with VNNI or ARM dot-product instructions.
    """
    quantization = _require_ort()
    activation_type = _check_options(calibrate_method, activation_type, num_calibration)
    check_outputs(out, keep_fp32, model_or_checkpoint)
    files = calibration_list(calibration, num_calibration, seed)
    source = load_source(model_or_checkpoint)
    if source.model is None:
        raise MobileNetError(
            f"{source.path} is an exported file; quantize takes the .safetensors checkpoint (fp32 weights)"
        )
    settings = {
        "method": "onnxruntime static QDQ (post-training)",
        "onnxruntime": __import__("onnxruntime").__version__,
        "weights": ("int8 (7-bit range)" if reduce_range else "int8")
        + " symmetric, "
        + ("per channel" if per_channel else "per tensor"),
        "activations": activation_type,
        "calibrate_method": calibrate_method,
    }
    with tempfile.TemporaryDirectory(prefix="mobilenet-quantize-") as tmpdir:
        fp32 = Path(tmpdir) / "fp32.onnx"
        # The fp32 graph is checked against PyTorch relative to the logits' scale: what matters here is the int8
        # error, orders of magnitude larger than float32 summation-order differences.
        export_onnx(source.model, fp32, classes=source.classes, preprocessing=source.preprocessing, rtol=1e-5)
        prepared = Path(tmpdir) / "fp32-prepared.onnx"
        quantization.quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=False)

        def make_batches(skipped: list[str] | None = None) -> Iterator[np.ndarray]:
            # Decoded lazily on each pass, so calibrating on many large images does not hold them all in memory.
            return calibration_batches(
                files,
                source.preprocessing,
                batch_size=batch_size,
                in_channels=source.config.in_channels,
                skipped=skipped,
            )

        counter = _Counter()
        reader = _Reader(lambda: counter.count(_with_progress(make_batches(counter.reset()), len(files), progress)))
        target = Path(out)
        with atomic_path(target) as tmp, _no_data_is_a_user_error(counter, len(files)):
            _quantize_static(
                quantization, prepared, tmp, reader, per_channel, reduce_range, activation_type, calibrate_method
            )
            if counter.images == 0:
                raise MobileNetError(
                    f"none of the {len(files)} calibration file(s) could be decoded; expected real images "
                    f"(first error: {counter.skipped[0] if counter.skipped else 'unknown'})"
                )
            settings["calibration_images"] = counter.images
            _store_metadata(fp32, tmp, settings)
            agreement = _agreement(ort_session(fp32), ort_session(tmp), make_batches())
        fp32_kept = None
        if keep_fp32 is not None:
            fp32_kept = Path(keep_fp32)
            with atomic_path(fp32_kept) as tmp_fp32:
                tmp_fp32.write_bytes(fp32.read_bytes())
    return QuantizeResult(target, fp32_kept, counter.images, counter.skipped, settings, agreement)


def _check_options(calibrate_method: str, activation_type: str, num_calibration: int | None) -> str:
    """Validate the options; the resolved activation type."""
    if calibrate_method not in CALIBRATION_METHODS:
        raise MobileNetError(
            f"unknown calibration method {calibrate_method!r}; expected one of {', '.join(CALIBRATION_METHODS)}"
        )
    if num_calibration is not None and num_calibration < 1:
        raise MobileNetError(f"the number of calibration images must be at least 1, got {num_calibration}")
    return resolve_activation_type(activation_type)


def calibration_list(
    calibration: str | os.PathLike[str] | Sequence[Any], num_calibration: int | None, seed: int
) -> list[Path]:
    """The calibration files: a directory's (:func:`calibration_files`) or the first ``num_calibration`` of a
    list."""
    if isinstance(calibration, str | os.PathLike):
        return calibration_files(calibration, num_calibration, seed)
    files = [Path(f) for f in calibration][:num_calibration]
    if not files:
        raise MobileNetError("no calibration images given; expected a directory or a list of image files")
    return files


def _quantize_static(
    quantization: Any,
    prepared: Path,
    out: Path,
    reader: Any,
    per_channel: bool,
    reduce_range: bool,
    activation_type: str,
    calibrate_method: str,
) -> None:
    quantization.quantize_static(
        str(prepared),
        str(out),
        reader,
        quant_format=quantization.QuantFormat.QDQ,
        per_channel=per_channel,
        reduce_range=reduce_range,
        activation_type=quantization.QuantType.QInt8 if activation_type == "int8" else quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
        calibrate_method={
            "minmax": quantization.CalibrationMethod.MinMax,
            "entropy": quantization.CalibrationMethod.Entropy,
            "percentile": quantization.CalibrationMethod.Percentile,
        }[calibrate_method],
        # Symmetric activations in int8 keep zero points at 0 (what int8 GEMM kernels are fastest with).
        extra_options={"ActivationSymmetric": activation_type == "int8", "WeightSymmetric": True},
    )


def _store_metadata(fp32: Path, quantized_path: Path, settings: dict[str, Any]) -> None:
    """Carry the fp32 export's metadata (name, config, classes, preprocessing) into the int8 file, with the
    quantization settings added and the digest of the int8 file's own weights in place of the fp32 one's
    (:func:`mobilenet.export.onnx_weights_digest`, checked by every reader), then check the result."""
    import onnx

    quantized = onnx.load(str(quantized_path))
    original = {p.key: p.value for p in onnx.load(str(fp32), load_external_data=False).metadata_props}
    metadata = json.loads(original["mobilenet"])
    metadata["quantization"] = settings
    original["mobilenet"] = json.dumps(metadata)
    original["quantization"] = json.dumps(settings)
    original[ONNX_WEIGHTS_KEY] = onnx_weights_digest(quantized)
    del quantized.metadata_props[:]
    for key, value in original.items():
        entry = quantized.metadata_props.add()
        entry.key, entry.value = key, value
    quantized.producer_name = "mobilenet"
    onnx.save(quantized, str(quantized_path))
    onnx.checker.check_model(str(quantized_path))


class _no_data_is_a_user_error:
    """ONNX Runtime raises ValueError("No data is collected.") when no calibration image decoded; say which."""

    def __init__(self, counter: _Counter, total: int) -> None:
        self.counter, self.total = counter, total

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: object) -> None:
        if isinstance(error, ValueError) and self.counter.images == 0:
            first = self.counter.skipped[0] if self.counter.skipped else "no image was read"
            raise MobileNetError(
                f"none of the {self.total} calibration file(s) could be decoded; expected real images (first "
                f"error: {first})"
            ) from None


class _Counter:
    """Counts the images (and records the undecodable files) of the calibration pass."""

    def __init__(self) -> None:
        self.images = 0
        self.skipped: list[str] = []

    def reset(self) -> list[str]:
        """Start a new pass; returns the list the pass records undecodable files in."""
        self.images = 0
        self.skipped = []
        return self.skipped

    def count(self, batches: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        for batch in batches:
            self.images += len(batch)
            yield batch


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over lazily decoded, preprocessed batches."""

    def __init__(self, make_batches: Callable[[], Iterator[np.ndarray]]) -> None:
        self._make = make_batches
        self._iter = make_batches()
        self._input = INPUT_NAME

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {self._input: batch}

    def rewind(self) -> None:
        self._iter = self._make()


def _with_progress(batches: Iterator[np.ndarray], total: int, enabled: bool) -> Iterator[np.ndarray]:
    with progress_bar(total, "calibrating", enabled=enabled) as advance:
        for batch in batches:
            advance(len(batch))
            yield batch


def _agreement(fp32_session: Any, int8_session: Any, batches: list[np.ndarray]) -> float:
    same = total = 0
    for batch in batches:
        a = fp32_session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0].argmax(1)
        b = int8_session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0].argmax(1)
        same += int((a == b).sum())
        total += len(batch)
    return same / total if total else float("nan")
