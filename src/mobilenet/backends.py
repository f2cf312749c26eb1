"""What to run and how: the model sources (checkpoint, model, ONNX file, registered name) and the inference
backends, one table (:data:`BACKENDS`) that prediction, evaluation and benchmarks all draw from.

A backend runs the network on a float NCHW batch and returns logits. ``"torch"`` runs the PyTorch model as it is
(eager); ``"torch-jit"`` a BatchNorm-folded, traced, frozen and ``optimize_for_inference``-d copy; ``"onnxruntime"``
an ONNX file (an export, or the int8 model of :mod:`mobilenet.quantize`). ``"auto"`` (:func:`pick_backend`, the fixed
order) picks ONNX Runtime for an ONNX file and, on the CPU, for a PyTorch model too (exported in memory with BatchNorm
folded), else ``"torch-jit"``; on a GPU, ``"torch"``. :mod:`mobilenet.autotune` measures instead where there is a
choice (a PyTorch model on the CPU). Every converted backend is checked against the PyTorch model when it
is built (``max_abs_diff``). Torch backends also tune the C allocator (:func:`mobilenet.runtime.tune_allocator`;
opt out with ``MOBILENET_NO_MALLOC_TUNING=1``). A new backend is one class with ``__call__(batch) -> logits``
registered in :data:`BACKENDS`.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobilenet.checkpoint import Checkpoint, check_finite, load_checkpoint, shorten
from mobilenet.data import resolve_preprocessing
from mobilenet.errors import INSTALL_HINTS, MobileNetError
from mobilenet.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    export_executorch,
    export_onnx,
    fold_batchnorm,
    in_chunks,
    load_export,
    ort_session,
    pte_runner,
    read_onnx_metadata,
)
from mobilenet.fused import FusedNetwork, check_threads, fused_available
from mobilenet.models import create_model
from mobilenet.parity import compare_to_reference, relative_error, seeded_batch
from mobilenet.runtime import has_native_bf16, resolve_device, set_threads, tune_allocator
from mobilenet.spec import MODELS, ModelConfig, model_config

__all__ = [
    "BACKENDS",
    "INT8_RELATIVE_ERROR",
    "ChannelsLastBackend",
    "CompiledBackend",
    "ExecuTorchBackend",
    "FusedBackend",
    "FusedInt8Backend",
    "ModelSource",
    "OnnxRuntimeBackend",
    "OpenVinoBackend",
    "OpenVinoBf16Backend",
    "RandomWeightsWarning",
    "TorchBackend",
    "TorchJitBackend",
    "backend_installed",
    "check_parity",
    "jit_optimize",
    "load_source",
    "onnxruntime_available",
    "openvino_available",
    "pick_backend",
    "require_native_bf16",
    "set_executorch_threads",
    "source_precision",
]

#: Files written by ``mobilenet export`` other than ONNX, read back by :func:`mobilenet.export.load_export`.
EXPORTED_SUFFIXES = (".ts", ".pt2", ".pte", ".tflite")
# Suffixes that mark a model argument as a file path (a model name like "mobilenet_v2_1.0_224" has a "suffix" too).
_FILE_SUFFIXES = (".safetensors", ".onnx", ".pth", ".pt", ".bin", ".ckpt", ".pte", ".pt2", ".ts", ".tflite")


class RandomWeightsWarning(UserWarning):
    """A registered model name was given where a checkpoint was expected: its weights are random."""


@dataclass
class ModelSource:
    """A model to run and what travels with it.

    Exactly one of ``model`` (PyTorch), ``onnx_path`` and ``program`` (a ``.ts``/``.pt2``/``.pte``/``.tflite`` export
    read back by :func:`mobilenet.export.load_export`) is set.
    """

    name: str
    config: ModelConfig
    classes: list[str] | None
    preprocessing: dict[str, Any]
    model: torch.nn.Module | None = None
    onnx_path: Path | None = None
    program: Callable[[torch.Tensor], torch.Tensor] | None = None
    path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    random_weights: bool = False


def _check_model_weights(model: nn.Module) -> None:
    """Refuse a model given in memory whose weights no backend runs as they are: meta tensors (no values), another
    float dtype than the float32 every runtime is fed (torch's own error was a dtype mismatch on the first batch),
    NaN, infinity or negative BatchNorm variances (as a checkpoint holding them is refused when loaded)."""
    tensors = model.state_dict()
    meta = [key for key, tensor in tensors.items() if tensor.device.type == "meta"]
    if meta:
        raise MobileNetError(
            f"the model's tensors {shorten(meta)} are on the meta device (no values); expected a model with weights"
        )
    other = [key for key, tensor in tensors.items() if tensor.is_floating_point() and tensor.dtype != torch.float32]
    if other:
        dtype = tensors[other[0]].dtype
        raise MobileNetError(
            f"the model's tensors {shorten(other)} are {dtype}; expected float32 weights (model.float())"
        )
    check_finite(tensors, "the model")


def load_source(source: Any, *, device: str = "cpu") -> ModelSource:
    """Resolve what the user gave: a :class:`~mobilenet.models.MobileNet`, a :class:`mobilenet.checkpoint.Checkpoint`,
    a ``.safetensors`` checkpoint path, an ``.onnx`` file written by ``mobilenet export``/``quantize``, a ``.ts``,
    ``.pt2``, ``.pte`` or ``.tflite`` file written by ``mobilenet export``, or a
    registered model name (random weights: a :class:`RandomWeightsWarning` says so)."""
    if isinstance(source, ModelSource):
        return source
    device = str(resolve_device(device))
    if isinstance(source, Checkpoint):
        return ModelSource(
            name=source.name,
            config=source.config,
            classes=source.classes,
            preprocessing=_preprocessing_or_default(source.preprocessing, source.config),
            model=source.model.to(device).eval(),
            metadata=source.metadata,
        )
    if isinstance(source, nn.Module):
        config = getattr(source, "config", None)
        if not isinstance(config, ModelConfig):
            raise MobileNetError(
                f"expected a mobilenet model (with a ModelConfig in .config), got {type(source).__name__}"
            )
        _check_model_weights(source)
        return ModelSource(
            name=str(getattr(source, "name", "") or ""),
            config=config,
            classes=getattr(source, "classes", None),
            preprocessing=_preprocessing_or_default(getattr(source, "preprocessing", None), config),
            model=source.to(device).eval(),
        )
    if not isinstance(source, str | os.PathLike):
        raise MobileNetError(
            f"cannot predict with a {type(source).__name__}; expected a checkpoint path, an .onnx file, a model "
            "name or a MobileNet"
        )
    path = Path(source)
    if path.exists() and not path.is_dir():  # a FIFO or device too: the readers refuse it in their words
        if path.suffix.lower() == ".onnx":
            return _onnx_source(path)
        if path.suffix.lower() in EXPORTED_SUFFIXES:
            return _exported_source(path)
        checkpoint = load_checkpoint(path, map_location=device)
        return load_source(checkpoint, device=device)
    if path.is_dir():
        raise MobileNetError(
            f"{path} is a directory; expected a .safetensors checkpoint, an .onnx file or a model name"
        )
    if str(source) in MODELS:
        warnings.warn(
            f"{source} is a model name, not a checkpoint: its weights are random, so its predictions mean nothing; "
            "pass a trained .safetensors checkpoint",
            RandomWeightsWarning,
            stacklevel=2,
        )
        model = create_model(str(source)).to(device).eval()
        return ModelSource(
            name=str(source),
            config=model.config,
            classes=None,
            preprocessing=_preprocessing_or_default(None, model.config),
            model=model,
            random_weights=True,
        )
    # "mobilenet_v2_1.0_224" has a "suffix" too: only a file-like suffix or a directory part means a path.
    looks_like_file = path.suffix.lower() in _FILE_SUFFIXES or os.sep in str(source) or "/" in str(source)
    if looks_like_file:
        raise MobileNetError(f"checkpoint {path} does not exist; expected a .safetensors checkpoint or an .onnx file")
    model_config(str(source))  # raises with the closest registered names
    raise AssertionError("unreachable")  # pragma: no cover


def _preprocessing_or_default(preprocessing: Any, config: ModelConfig) -> dict[str, Any]:
    return resolve_preprocessing(preprocessing, config.resolution).to_dict()


def _exported_source(path: Path) -> ModelSource:
    loaded = load_export(path)
    return _file_source(path, loaded.metadata, program=loaded.run)


def _onnx_source(path: Path) -> ModelSource:
    return _file_source(path, read_onnx_metadata(path), onnx_path=path)


def _file_source(path: Path, metadata: dict[str, Any], **runner: Any) -> ModelSource:
    """An exported file's model: its config, classes and preprocessing from the metadata written with it."""
    config_data = metadata.get("config")
    try:
        if not isinstance(config_data, dict):
            raise TypeError("'config' is not an object")
        config = ModelConfig.from_dict(config_data)
    except (TypeError, MobileNetError) as error:
        raise MobileNetError(f"{path} has an invalid model config in its metadata: {error}") from None
    classes = metadata.get("classes")
    if classes is not None and (not isinstance(classes, list) or len(classes) != config.num_classes):
        raise MobileNetError(f"{path} has invalid class names in its metadata; expected {config.num_classes} names")
    preprocessing = metadata.get("preprocessing")
    if preprocessing is not None and not isinstance(preprocessing, dict):
        raise MobileNetError(
            f"{path} has invalid preprocessing in its metadata ({type(preprocessing).__name__}); expected an object"
        )
    return ModelSource(
        name=str(metadata.get("name") or ""),
        config=config,
        classes=classes,
        preprocessing=_preprocessing_or_default(metadata.get("preprocessing"), config),
        metadata=metadata,
        path=path,
        **runner,
    )


# ---------------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------------


class TorchBackend:
    """Runs the PyTorch model as it is (fp32, eval mode, eager, no autograd) on ``device``."""

    name = "torch"
    description = "PyTorch eager, the model as built (NCHW, BatchNorm kept)"

    def __init__(self, source: ModelSource, *, device: str = "cpu", num_threads: int | None = None) -> None:
        if source.model is None:
            raise MobileNetError(
                f"{source.path} is an exported file; run it with backend='auto' (or 'onnxruntime' for .onnx, "
                "'exported' for .ts/.pt2/.pte), or pass the .safetensors checkpoint for the torch backends"
            )
        if num_threads:
            set_threads(num_threads)
        self.device = torch.device(device)
        if self.device.type == "cpu":
            tune_allocator()
        self.model = source.model.to(self.device).eval()
        self.max_abs_diff = 0.0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(batch.to(self.device)).float().cpu()


class TorchJitBackend(TorchBackend):
    """The fastest pure-PyTorch CPU path: BatchNorm folded into the convs (:func:`mobilenet.export.fold_batchnorm`),
    then ``torch.jit.trace`` + ``torch.jit.freeze`` + ``torch.jit.optimize_for_inference`` (which fuses conv + ReLU
    and picks oneDNN kernels), with the allocator tuned. Checked against the eager model when built: max abs
    logit difference <= 1e-4 + 1e-5 * max |logit|, else :class:`MobileNetError`."""

    name = "torch-jit"
    description = "torch.jit trace + freeze + optimize_for_inference, BatchNorm folded"

    def __init__(self, source: ModelSource, *, device: str = "cpu", num_threads: int | None = None) -> None:
        super().__init__(source, device=device, num_threads=num_threads)
        self.reference = self.model
        self.model = jit_optimize(self.model, _input_shape(source, 2), device=self.device)
        self.max_abs_diff = check_parity(self, self.reference, _input_shape(source, 3), what="torch-jit")


class ExportedBackend:
    """Runs a ``.ts``, ``.pt2``, ``.pte`` or ``.tflite`` file as it was exported (TorchScript, ``torch.export``,
    ExecuTorch with XNNPACK, or LiteRT with XNNPACK); checked against PyTorch when it was written."""

    name = "exported"
    description = "the exported file itself (.ts TorchScript, .pt2 torch.export, .pte ExecuTorch, .tflite LiteRT)"

    def __init__(self, source: ModelSource, *, device: str = "cpu", num_threads: int | None = None) -> None:
        if source.program is None:
            raise MobileNetError("the exported backend runs a .ts, .pt2, .pte or .tflite file; give one as the model")
        if str(device) != "cpu":
            raise MobileNetError(f"exported files run on the CPU here; got device={device!r}")
        if num_threads:
            set_threads(num_threads)
        self.program = source.program
        self.max_abs_diff: float | None = None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.program(batch.detach().cpu().float().contiguous()).float()


class ChannelsLastBackend(TorchBackend):
    """PyTorch eager with weights and input in channels_last (NHWC), the layout oneDNN's convolutions prefer."""

    name = "torch-channels-last"
    description = "PyTorch eager, channels_last (NHWC) weights and input"

    def __init__(self, source: ModelSource, *, device: str = "cpu", num_threads: int | None = None) -> None:
        super().__init__(source, device=device, num_threads=num_threads)
        self.reference = self.model
        self.model = copy.deepcopy(self.model).to(memory_format=torch.channels_last)
        self.max_abs_diff = check_parity(self, self.reference, _input_shape(source, 3), what=self.name)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(batch.to(self.device).contiguous(memory_format=torch.channels_last)).float().cpu()


class CompiledBackend(TorchBackend):
    """``torch.compile`` (inductor) of the BatchNorm-folded model; it compiles again for each new batch size, so
    the first call at a size is slow. Not checked when built (that would compile once more)."""

    name = "torch-compile"
    description = "torch.compile (inductor), BatchNorm folded (compiles per batch size: slow to start)"

    def __init__(self, source: ModelSource, *, device: str = "cpu", num_threads: int | None = None) -> None:
        super().__init__(source, device=device, num_threads=num_threads)
        self.model = torch.compile(fold_batchnorm(self.model), dynamic=False)
        self.max_abs_diff = None


def jit_optimize(model: torch.nn.Module, example_shape: tuple[int, ...], *, device: Any = "cpu") -> Any:
    """``model`` with BatchNorm folded, traced on a random input of ``example_shape``, frozen and optimized for
    inference (the batch dimension stays dynamic). The input model is not modified."""
    folded = fold_batchnorm(model).to(device).eval()
    example = torch.randn(*example_shape, device=device)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream (in favour of torch.export/compile)
        traced = torch.jit.trace(folded, example)
        frozen = torch.jit.freeze(traced.eval())
        if torch.device(device).type == "cpu":
            frozen = torch.jit.optimize_for_inference(frozen)
        for _ in range(2):  # the profiling executor specialises on the first runs
            frozen(example)
    return frozen


def _input_shape(source: ModelSource, batch: int) -> tuple[int, int, int, int]:
    size = int(source.preprocessing.get("input_size") or source.config.resolution)
    return (batch, int(source.config.in_channels), size, size)


#: The largest relative error (``||int8 - fp32|| / ||fp32||`` of the logits on a seeded batch) accepted from an int8
#: run of a float model when it is built.
INT8_RELATIVE_ERROR = 0.25


def check_parity(
    run: Callable[[Any], Any], reference: torch.nn.Module, shape: tuple[int, ...], *, what: str, atol: float = 1e-4
) -> float:
    """Max abs difference between ``run``'s logits and the eager ``reference`` model's on a seeded random batch
    of ``shape`` (:func:`mobilenet.parity.compare_to_reference`, allowed ``atol + 1e-5 * max |logit|``)."""
    return compare_to_reference(run, reference, [seeded_batch(shape)], what=what, atol=atol, rtol=1e-5)


def _exported_onnx(source: ModelSource, directory: str) -> tuple[Path, float | None]:
    """The ONNX file to run for ``source``: its own, or the PyTorch model exported (BatchNorm folded, checked against
    PyTorch relative to the logits' scale: large logits differ by more than 1e-4 in any two runtimes) into
    ``directory``; and the export's max abs difference (None for a given file)."""
    if source.onnx_path is not None:
        return source.onnx_path, None
    exported = export_onnx(
        source.model,
        Path(directory) / "model.onnx",
        classes=source.classes,
        preprocessing=source.preprocessing,
        rtol=1e-5,
    )
    return exported.path, exported.max_abs_diff


def source_precision(source: ModelSource) -> str:
    """``"int8"`` for an ONNX file :mod:`mobilenet.quantize` wrote (its metadata says how it was quantized), else
    ``"fp32"``."""
    return "int8" if source.metadata.get("quantization") else "fp32"


class OnnxRuntimeBackend:
    """Runs an ONNX file (fp32 export or int8 QDQ model) in ONNX Runtime on the CPU, graph optimisations on. A
    PyTorch model is exported first (BatchNorm folded, to a temporary file, verified against PyTorch by
    :func:`mobilenet.export.export_onnx`)."""

    name = "onnxruntime"
    description = "ONNX Runtime float32, BatchNorm folded, graph optimisations on"

    def __init__(self, source: ModelSource, *, device: str = "cpu", num_threads: int | None = None) -> None:
        if str(device) != "cpu":
            raise MobileNetError(f"the onnxruntime backend runs on the CPU here; got device={device!r}")
        self.precision = source_precision(source)
        with tempfile.TemporaryDirectory(prefix="mobilenet-ort-") as tmp:
            path, self.max_abs_diff = _exported_onnx(source, tmp)
            self.session = ort_session(path, num_threads, spin=True)  # run back to back: let it spin
        self.input_name, self.output_name = INPUT_NAME, OUTPUT_NAME

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(self.session.run([self.output_name], {self.input_name: array})[0])


def _require_openvino() -> Any:
    try:
        import openvino
    except ImportError as error:
        raise MobileNetError(
            f"the openvino backends need openvino ({error.name} is missing); {INSTALL_HINTS['openvino']}"
        ) from None
    return openvino


class OpenVinoBackend:
    """Runs the ONNX export (or an ONNX file, fp32 or int8 QDQ) in OpenVINO's CPU plugin with the latency hint (one
    stream, ``num_threads`` inference threads). OpenVINO specialises a compiled model to one input shape, so each
    batch size gets its own compiled model (built on first use, in about 0.1 s, and kept). For a PyTorch model the
    first compiled model is checked against it."""

    name = "openvino"
    description = "OpenVINO CPU plugin float32 on the ONNX export (int8 for an int8 .onnx), BatchNorm folded"
    #: OpenVINO's ``INFERENCE_PRECISION_HINT``: the precision its CPU plugin computes in.
    inference_precision = "f32"
    #: Largest logit difference from PyTorch allowed when built, relative to the largest |logit|.
    parity_rtol = 1e-5

    def __init__(self, source: ModelSource, *, device: str = "cpu", num_threads: int | None = None) -> None:
        if str(device) != "cpu":
            raise MobileNetError(f"the {self.name} backend runs on the CPU here; got device={device!r}")
        openvino = _require_openvino()
        self.core = openvino.Core()
        self._check_supported()
        self.precision = source_precision(source) if self.inference_precision == "f32" else "bf16"
        with tempfile.TemporaryDirectory(prefix="mobilenet-ov-") as tmp:
            path, export_diff = _exported_onnx(source, tmp)
            try:
                self.model = self.core.read_model(str(path))
            except RuntimeError as error:
                raise MobileNetError(f"{path} is not a model OpenVINO can read: {_openvino_reason(error)}") from None
        self.config = {
            "INFERENCE_PRECISION_HINT": self.inference_precision,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_NUM_THREADS": int(num_threads or torch.get_num_threads()),
        }
        self.requests: dict[tuple[int, ...], Any] = {}
        self.max_abs_diff: float | None = export_diff
        if source.model is not None:
            shape = _input_shape(source, 3)
            self.max_abs_diff = compare_to_reference(
                self, source.model, [seeded_batch(shape)], what=self.name, atol=1e-4, rtol=self.parity_rtol
            )

    def _check_supported(self) -> None:
        """Nothing to check for float32; :class:`OpenVinoBf16Backend` checks the CPU."""

    def _request(self, shape: tuple[int, ...]) -> Any:
        request = self.requests.get(shape)
        if request is None:
            model = self.model.clone()
            try:
                model.reshape(list(shape))
                request = self.core.compile_model(model, "CPU", self.config).create_infer_request()
            except RuntimeError as error:
                raise MobileNetError(
                    f"OpenVINO cannot run this model on a batch of shape {shape}: {_openvino_reason(error)}"
                ) from None
            self.requests[shape] = request
        return request

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().cpu().float().contiguous().numpy()
        # share_inputs: the request reads the array in place (no copy of the batch into OpenVINO's own tensor).
        outputs = self._request(tuple(array.shape)).infer({0: array}, share_inputs=True)
        return torch.from_numpy(outputs[0].copy())


def _openvino_reason(error: Exception) -> str:
    """The informative line of an OpenVINO error (its message starts with C++ source locations)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception from", "Check ", "src/"))]
    return (useful or lines or [type(error).__name__])[-1][:300]


class OpenVinoBf16Backend(OpenVinoBackend):
    """:class:`OpenVinoBackend` computing in bfloat16 (8 bits of mantissa; float32's range), on CPUs that have bf16
    arithmetic (AVX512-BF16 or AMX): the weights and activations are rounded to bf16, accumulation is float32.
    Checked against PyTorch when built only loosely (within 10% of the largest |logit|): its real check is accuracy,
    which ``mobilenet eval --precision bf16`` measures against float32."""

    name = "openvino-bf16"
    description = "OpenVINO CPU plugin bfloat16 (AVX512-BF16 or AMX) on the ONNX export"
    inference_precision = "bf16"
    parity_rtol = 0.1

    def _check_supported(self) -> None:
        require_native_bf16()


def require_native_bf16() -> None:
    """Raise :class:`MobileNetError` on a CPU without bf16 arithmetic (emulated bf16 is slower than float32)."""
    if not has_native_bf16():
        raise MobileNetError(
            "precision bf16 needs a CPU with AVX512-BF16 or AMX; this one has neither (it would emulate bf16, slower "
            "than float32): use precision fp32, or int8 on a CPU with VNNI"
        )


class FusedBackend:
    """Our fused block kernel (:mod:`mobilenet.fused`): every V1 depthwise separable / V2 inverted residual block in
    one tiled pass in C (AVX-512, AVX2 or portable), NHWC, BatchNorm folded; the stem conv, V2's head conv, the pool
    and the classifier on the same kernel, the whole forward in one call. Needs the C extension (built at install
    with a C compiler) and a V1/V2 MobileNet. Checked against the eager model when built (as ``torch-jit``)."""

    name = "fused"
    precision = "fp32"
    description = "our fused block kernel (C; AVX-512/AVX2/portable), NHWC, BatchNorm folded"

    def __init__(self, source: ModelSource, *, device: str = "cpu", num_threads: int | None = None) -> None:
        if source.model is None:
            raise MobileNetError(
                f"{source.path} is an exported file; the {self.name} backend runs a PyTorch MobileNet (a "
                ".safetensors checkpoint or a model name)"
            )
        if str(device) != "cpu":
            raise MobileNetError(f"the {self.name} backend runs on the CPU; got device={device!r}")
        threads = set_threads(num_threads)
        tune_allocator()
        self.reference = source.model.cpu().eval()
        self.network = FusedNetwork(self.reference, threads=check_threads(min(threads, 64)), precision=self.precision)
        self.max_abs_diff = self._check(_input_shape(source, 3))

    def _check(self, shape: tuple[int, ...]) -> float:
        return check_parity(self, self.reference, shape, what=self.name)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.network(batch)


class FusedInt8Backend(FusedBackend):
    """Our fused kernel with every 1x1 conv (V1's pointwise, V2's expansion, projection and head), the stem and the
    classifier as int8 GEMMs (AVX512-VNNI where the CPU has it): weights quantized per output channel when built,
    activations per call from the values present, so a float checkpoint runs in int8 with no calibration. The
    depthwise convs stay float32. Checked when built: the logits' relative error against the eager model on a seeded
    batch must stay under :data:`INT8_RELATIVE_ERROR` (a packing or scaling fault gives errors near 1)."""

    name = "fused-int8"
    precision = "int8"
    description = "our fused kernel, 1x1 convs in int8 (VNNI), activation scales per call: no calibration"

    def _check(self, shape: tuple[int, ...]) -> float:
        batch = seeded_batch(shape)
        with torch.inference_mode():
            expected = self.reference(batch).float()
            got = self(batch).float()
        error = relative_error(got, expected, what=self.name)
        if not error <= INT8_RELATIVE_ERROR:
            raise MobileNetError(
                f"{self.name}: the int8 logits differ from float32's by {error:.1%} (relative), more than the "
                f"{INT8_RELATIVE_ERROR:.0%} an int8 run of this model should; use precision fp32"
            )
        return float((got - expected).abs().max())


class ExecuTorchBackend:
    """Runs a PyTorch model as an ExecuTorch program on the CPU: exported to a temporary float32 ``.pte`` with the
    whole graph delegated to XNNPACK (:func:`mobilenet.export.export_executorch`: BatchNorm folded, checked against
    PyTorch at batch 1, 2 and its bound when written) and run in ExecuTorch's Python runtime from memory, a batch
    above the program's bound in pieces (:func:`mobilenet.export.in_chunks`)."""

    name = "executorch"
    description = "ExecuTorch float32, XNNPACK delegate, BatchNorm folded"

    def __init__(self, source: ModelSource, *, device: str = "cpu", num_threads: int | None = None) -> None:
        if str(device) != "cpu":
            raise MobileNetError(f"the executorch backend runs on the CPU here; got device={device!r}")
        if source.model is None:
            raise MobileNetError(
                "the executorch backend exports a PyTorch model; give a .safetensors checkpoint (a .pte file runs "
                "on backend='exported')"
            )
        if not backend_installed("executorch"):
            raise MobileNetError(f"the executorch backend needs executorch; {INSTALL_HINTS['mobile']}")
        if num_threads:
            set_threads(num_threads)
            set_executorch_threads(num_threads)
        with tempfile.TemporaryDirectory(prefix="mobilenet-pte-") as tmp:
            # Checked relative to the logits' scale, as the onnxruntime backend is.
            exported = export_executorch(
                source.model,
                Path(tmp) / "model.pte",
                classes=source.classes,
                preprocessing=source.preprocessing,
                rtol=1e-5,
            )
            self.runner = in_chunks(pte_runner(exported.path))  # the runner holds the program's bytes in memory
        self.max_abs_diff: float | None = exported.max_abs_diff

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.runner(batch.detach().cpu().float().contiguous())


def set_executorch_threads(num_threads: int) -> None:
    """Size ExecuTorch's own thread pool (XNNPACK's kernels run there, not in torch's); only when it differs, as a
    reset is logged and must not happen while a program runs."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != num_threads:
        portable_lib._unsafe_reset_threadpool(num_threads)


#: Backend name -> class taking (ModelSource, device=, num_threads=) and mapping a float NCHW batch to logits.
BACKENDS: dict[str, Any] = {
    "torch": TorchBackend,
    "torch-channels-last": ChannelsLastBackend,
    "torch-jit": TorchJitBackend,
    "torch-compile": CompiledBackend,
    "onnxruntime": OnnxRuntimeBackend,
    "openvino": OpenVinoBackend,
    "openvino-bf16": OpenVinoBf16Backend,
    "exported": ExportedBackend,
    "fused": FusedBackend,
    "fused-int8": FusedInt8Backend,
    "executorch": ExecuTorchBackend,
}


def onnxruntime_available() -> bool:
    """Whether the onnx extra (onnx + onnxruntime) is installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


#: The optional packages a backend needs: one whose packages are missing is no candidate for ``auto``.
BACKEND_PACKAGES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnx", "onnxruntime"),
    "openvino": ("openvino", "onnx"),
    "openvino-bf16": ("openvino", "onnx"),
    "executorch": ("executorch",),
}


def openvino_available() -> bool:
    """Whether OpenVINO (the openvino extra) and the onnx export it reads are installed."""
    return backend_installed("openvino")


def backend_installed(name: str) -> bool:
    """Whether the packages of :data:`BACKEND_PACKAGES` that backend ``name`` needs are installed (looked up,
    not imported: cheap, and silent when they are missing); for ``fused``, whether its C extension was built."""
    if name in ("fused", "fused-int8"):
        return fused_available()
    for package in BACKEND_PACKAGES.get(name, ()):
        try:
            if importlib.util.find_spec(package) is None:
                return False
        except (ImportError, ValueError):  # a module set to None in sys.modules, or one without a spec
            return False
    return True


def pick_backend(backend: str, source: ModelSource, device: str = "cpu") -> str:
    """``"auto"``: the fixed order's backend for this input (see the module docstring); else ``backend``."""
    if backend == "auto":
        if source.program is not None:
            return "exported"  # a .ts/.pt2/.pte/.tflite file runs as it is
        if source.model is None:
            return "onnxruntime"  # an ONNX file runs only there
        if str(device).split(":")[0] != "cpu":
            return "torch"
        return "onnxruntime" if onnxruntime_available() else "torch-jit"
    if not isinstance(backend, str) or backend not in BACKENDS:  # a list is unhashable: not looked up
        raise MobileNetError(f"unknown backend {backend!r}; expected one of auto, {', '.join(BACKENDS)}")
    return backend
