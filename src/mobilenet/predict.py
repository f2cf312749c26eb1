"""Classify images with a trained MobileNet: ``Predictor(checkpoint).predict(images)``.

The input side is deliberately forgiving: paths to JPEG, PNG, WebP, GIF, BMP or TIFF files in any colour mode
(grayscale, RGBA, CMYK, palette, 16-bit), PIL images, numpy arrays and uint8 tensors all become uint8 RGB CHW
tensors (:func:`decode_image`), which then go through the very transform evaluation uses
(:func:`mobilenet.data.build_eval_transform` with the checkpoint's stored preprocessing), so a prediction sees the
pixels an evaluation would. The output is the papers' softmax over the classifier's logits, top-k.

A file that cannot be decoded does not stop the others: its :class:`Prediction` carries the error instead.

Backends (:data:`BACKENDS`) run the network on a float NCHW batch and return logits; ``"torch"`` runs the PyTorch
model as it is (eager), ``"torch-jit"`` a BatchNorm-folded, traced, frozen and ``optimize_for_inference``-d copy,
``"onnxruntime"`` an ONNX file (an export, or the int8 model of :mod:`mobilenet.quantize`). ``"auto"`` (the
default) picks the fastest one installed for the input: ONNX Runtime for an ONNX file and, on the CPU, for a
PyTorch model too (exported in memory with BatchNorm folded; measured 1.8-3x faster than the fastest torch path
at batch 1 and 32, see docs/speed.md), else ``"torch-jit"``; on a GPU, ``"torch"``. Every converted backend is
checked against the PyTorch model when it is built (``Predictor.max_abs_diff``). Torch backends also tune the
C allocator (:func:`mobilenet.runtime.tune_allocator`; opt out with ``MOBILENET_NO_MALLOC_TUNING=1``).
A new backend is one class with ``__call__(batch) -> logits`` registered in :data:`BACKENDS`.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobilenet.errors import MobileNetError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from mobilenet.spec import ModelConfig

__all__ = [
    "BACKENDS",
    "IMAGE_SUFFIXES",
    "BadImageError",
    "ModelSource",
    "Prediction",
    "Predictor",
    "RandomWeightsWarning",
    "check_parity",
    "decode_image",
    "default_preprocessing",
    "find_images",
    "jit_optimize",
    "load_source",
    "onnxruntime_available",
]

#: File suffixes :func:`find_images` collects from a directory.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


_FILE_SUFFIXES = (".safetensors", ".onnx", ".pth", ".pt", ".bin", ".ckpt", ".pte", ".pt2", ".ts")


class BadImageError(MobileNetError):
    """An input that is not a decodable image (the message names the file and why)."""


class RandomWeightsWarning(UserWarning):
    """A registered model name was given where a checkpoint was expected: its weights are random."""


# ---------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------


def decode_image(image: Any, *, name: str | None = None) -> torch.Tensor:
    """Turn ``image`` into a uint8 RGB tensor of shape (3, H, W).

    Accepts a path (str or Path), encoded bytes, a PIL image, a numpy array (H, W), (H, W, C) uint8/uint16/float
    in 0-1, or a tensor (C, H, W) / (H, W). Files are decoded by torchvision.io as :mod:`mobilenet.data` decodes a
    dataset (JPEG incl. CMYK, PNG incl. palette and 16-bit, WebP, GIF); other formats (BMP, TIFF, ...) fall back to
    PIL. Grayscale is replicated to three channels, alpha is dropped, 16-bit is scaled to 8 bits (v * 255 / 65535,
    not clipped). Raises :class:`BadImageError` naming the input if it cannot be decoded.
    """
    import torch

    label = name or (str(image) if isinstance(image, str | os.PathLike) else type(image).__name__)
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.exists():
            raise BadImageError(f"image {path} does not exist")
        if path.is_dir():
            raise BadImageError(f"{path} is a directory; expected an image file")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise BadImageError(f"cannot read image {path}: {error.strerror or error}") from None
        return _decode_bytes(data, label)
    if isinstance(image, bytes | bytearray | memoryview):
        return _decode_bytes(bytes(image), label)
    if isinstance(image, torch.Tensor):
        return _tensor_to_rgb(image, label)
    if _is_pil(image):
        return _pil_to_rgb(image, label)
    if type(image).__module__ == "numpy":
        return _array_to_rgb(image, label)
    raise BadImageError(
        f"cannot use {label} as an image; expected a file path, bytes, a PIL image, a numpy array or a uint8 tensor"
    )


def _decode_bytes(data: bytes, label: str) -> torch.Tensor:
    import torch
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    if not data:
        raise BadImageError(f"cannot decode image {label}: the file is empty")
    try:
        decoded = tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return _to_uint8(decoded)
    except (RuntimeError, ValueError):
        pass  # not a format torchvision decodes (BMP, TIFF, ...) or a corrupt file: PIL decides which
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - torchvision depends on pillow
        raise BadImageError(f"cannot decode image {label}: not JPEG, PNG, WebP or GIF") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _pil_to_rgb(img, label)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if isinstance(error, UnidentifiedImageError):
            reason = "not an image in a known format (JPEG, PNG, WebP, GIF, BMP, TIFF)"
        raise BadImageError(f"cannot decode image {label}: {reason}") from None


def _to_uint8(tensor: torch.Tensor) -> torch.Tensor:
    import torch

    if tensor.dtype == torch.uint8:
        return tensor
    if tensor.dtype in (torch.uint16, torch.int32, torch.int64) or not tensor.is_floating_point():
        # 16-bit PNG: scale the full 0..65535 range, not clip at 255 (PIL's convert("RGB") would clip).
        return (tensor.to(torch.float64) * (255.0 / 65535.0)).round().clamp(0, 255).to(torch.uint8)
    return (tensor.to(torch.float64) * 255.0).round().clamp(0, 255).to(torch.uint8)


def _is_pil(image: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(image, Image.Image)


def _pil_to_rgb(img: Image.Image, label: str) -> torch.Tensor:
    import numpy as np

    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(img)
        if mode == "F":
            array = np.clip(array, 0.0, 255.0) / 255.0
        elif mode == "I" and array.size and array.max() <= 255:
            array = array.astype(np.uint8)
        else:
            array = np.clip(array, 0, 65535).astype(np.uint16)
        return _array_to_rgb(array, label)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, LA, RGBA (alpha dropped), CMYK, P, YCbCr, 1
    return _array_to_rgb(np.asarray(img), label)


def _array_to_rgb(array: np.ndarray, label: str) -> torch.Tensor:
    import numpy as np
    import torch

    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise BadImageError(f"image {label} has shape {array.shape}; expected (H, W) or (H, W, C) with C = 1, 3 or 4")
    if array.dtype == np.uint16:
        tensor = torch.from_numpy(array.astype(np.int32))
        tensor = (tensor.to(torch.float64) * (255.0 / 65535.0)).round().to(torch.uint8)
    elif array.dtype == np.uint8:
        # PIL's arrays are read-only; torch wants a writable buffer.
        tensor = torch.from_numpy(np.array(array, dtype=np.uint8, copy=True, order="C"))
    elif np.issubdtype(array.dtype, np.floating):
        tensor = torch.from_numpy((np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8))
    else:
        raise BadImageError(f"image {label} has dtype {array.dtype}; expected uint8, uint16 or float in [0, 1]")
    return _channels_to_rgb(tensor.permute(2, 0, 1), label)


def _tensor_to_rgb(tensor: torch.Tensor, label: str) -> torch.Tensor:
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        raise BadImageError(
            f"image {label} has shape {tuple(tensor.shape)}; expected a (C, H, W) tensor with C = 1, 3 or 4"
        )
    return _channels_to_rgb(_to_uint8(tensor.detach().cpu()), label)


def _channels_to_rgb(tensor: torch.Tensor, label: str) -> torch.Tensor:
    if tensor.shape[-1] == 0 or tensor.shape[-2] == 0:
        raise BadImageError(f"image {label} is empty ({tuple(tensor.shape)})")
    if tensor.shape[0] == 1:
        return tensor.expand(3, -1, -1).contiguous()
    return tensor[:3].contiguous()


def find_images(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and directories (recursively, sorted) into image files.

    A missing path or a directory with no image files raises :class:`MobileNetError` before anything runs; a file
    given by name is kept whatever its suffix (it is reported later if it does not decode).
    """
    found: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if not path.exists():
            raise MobileNetError(f"{path} does not exist; expected an image file or a directory of images")
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise MobileNetError(
                    f"directory {path} has no image files; expected files ending in {', '.join(IMAGE_SUFFIXES)}"
                )
            found.extend(images)
        else:
            found.append(path)
    return found


# ---------------------------------------------------------------------------------------------------------------
# What to run
# ---------------------------------------------------------------------------------------------------------------


def default_preprocessing(config: ModelConfig) -> dict[str, Any]:
    """The eval preprocessing of a model with no stored one: :meth:`mobilenet.data.Preprocessing.for_resolution`
    at the config's resolution (ImageNet-style 87.5% center crop above 64 px, plain resize for small inputs),
    ImageNet mean/std."""
    from mobilenet.data import Preprocessing

    return Preprocessing.for_resolution(int(config.resolution)).to_dict()


@dataclass
class ModelSource:
    """A model to run and what travels with it.

    Exactly one of ``model`` (PyTorch) and ``onnx_path`` is set.
    """

    name: str
    config: ModelConfig
    classes: list[str] | None
    preprocessing: dict[str, Any]
    model: torch.nn.Module | None = None
    onnx_path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    random_weights: bool = False


def load_source(source: Any, *, device: str = "cpu") -> ModelSource:
    """Resolve what the user gave: a :class:`~mobilenet.models.MobileNet`, a :class:`mobilenet.weights.Checkpoint`,
    a ``.safetensors`` checkpoint path, an ``.onnx`` file written by ``mobilenet export``/``quantize``, or a
    registered model name (random weights: a :class:`RandomWeightsWarning` says so)."""
    from torch import nn

    from mobilenet.spec import MODELS, ModelConfig

    if isinstance(source, ModelSource):
        return source
    checkpoint_type = _checkpoint_type()
    if checkpoint_type is not None and isinstance(source, checkpoint_type):
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
    if path.is_file():
        if path.suffix.lower() == ".onnx":
            return _onnx_source(path)
        from mobilenet.weights import load_checkpoint

        checkpoint = load_checkpoint(path, map_location=device)
        return load_source(checkpoint, device=device)
    if path.is_dir():
        raise MobileNetError(
            f"{path} is a directory; expected a .safetensors checkpoint, an .onnx file or a model name"
        )
    if str(source) in MODELS:
        from mobilenet.models import create_model

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
            preprocessing=default_preprocessing(model.config),
            model=model,
            random_weights=True,
        )
    # "mobilenet_v2_1.0_224" has a "suffix" too: only a file-like suffix or a directory part means a path.
    looks_like_file = path.suffix.lower() in _FILE_SUFFIXES or os.sep in str(source) or "/" in str(source)
    if looks_like_file:
        raise MobileNetError(f"checkpoint {path} does not exist; expected a .safetensors checkpoint or an .onnx file")
    from mobilenet.spec import model_config

    model_config(str(source))  # raises with the closest registered names
    raise AssertionError("unreachable")  # pragma: no cover


def _checkpoint_type() -> type | None:
    try:
        from mobilenet.weights import Checkpoint
    except ImportError:  # pragma: no cover - weights.py is part of the package
        return None
    return Checkpoint


def _preprocessing_or_default(preprocessing: Any, config: ModelConfig) -> dict[str, Any]:
    from mobilenet.data import Preprocessing

    if preprocessing is None:
        return default_preprocessing(config)
    if hasattr(preprocessing, "to_dict"):
        return preprocessing.to_dict()
    return Preprocessing.from_dict(dict(preprocessing)).to_dict()  # validates a stored dict


def _onnx_source(path: Path) -> ModelSource:
    from mobilenet.export import read_onnx_metadata
    from mobilenet.spec import ModelConfig

    metadata = read_onnx_metadata(path)
    config = ModelConfig.from_dict(metadata["config"])
    return ModelSource(
        name=str(metadata.get("name") or ""),
        config=config,
        classes=metadata.get("classes"),
        preprocessing=_preprocessing_or_default(metadata.get("preprocessing"), config),
        onnx_path=path,
        metadata=metadata,
    )


# ---------------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------------


class TorchBackend:
    """Runs the PyTorch model as it is (fp32, eval mode, eager, no autograd) on ``device``."""

    name = "torch"

    def __init__(self, source: ModelSource, *, device: str = "cpu", num_threads: int | None = None) -> None:
        import torch

        from mobilenet.runtime import set_threads, tune_allocator

        if source.model is None:
            raise MobileNetError(
                f"{source.onnx_path} is an ONNX file; run it with backend='onnxruntime' (or 'auto'), or pass the "
                ".safetensors checkpoint for the torch backend"
            )
        if num_threads:
            set_threads(num_threads)
        self.device = torch.device(device)
        if self.device.type == "cpu":
            tune_allocator()
        self.model = source.model.to(self.device).eval()
        self.max_abs_diff = 0.0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            return self.model(batch.to(self.device)).float().cpu()


class TorchJitBackend(TorchBackend):
    """The fastest pure-PyTorch CPU path: BatchNorm folded into the convs (:func:`mobilenet.export.fold_batchnorm`),
    then ``torch.jit.trace`` + ``torch.jit.freeze`` + ``torch.jit.optimize_for_inference`` (which fuses conv + ReLU
    and picks oneDNN kernels), with the allocator tuned. Checked against the eager model when built: max abs
    logit difference <= 1e-4 + 1e-5 * max |logit|, else :class:`MobileNetError`."""

    name = "torch-jit"

    def __init__(self, source: ModelSource, *, device: str = "cpu", num_threads: int | None = None) -> None:
        super().__init__(source, device=device, num_threads=num_threads)
        self.reference = self.model
        self.model = jit_optimize(self.model, _input_shape(source, 2), device=self.device)
        self.max_abs_diff = check_parity(self, self.reference, _input_shape(source, 3), what="torch-jit")


def jit_optimize(model: torch.nn.Module, example_shape: tuple[int, ...], *, device: Any = "cpu") -> Any:
    """``model`` with BatchNorm folded, traced on a random input of ``example_shape``, frozen and optimized for
    inference (the batch dimension stays dynamic). The input model is not modified."""
    import torch

    from mobilenet.export import fold_batchnorm

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


def check_parity(
    run: Callable[[Any], Any], reference: torch.nn.Module, shape: tuple[int, ...], *, what: str, atol: float = 1e-4
) -> float:
    """Max abs difference between ``run``'s logits and the eager ``reference`` model's on a seeded random batch
    of ``shape``; raises :class:`MobileNetError` above ``atol + 1e-5 * max |logit|`` (float32 sums in another
    order differ by a few ulps of the largest logit)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    device = next(reference.parameters()).device
    with torch.inference_mode():
        expected = reference(x.to(device)).float().cpu()
    got = run(x)
    diff = float((got.double() - expected.double()).abs().max())
    allowed = atol + 1e-5 * float(expected.abs().max())
    if not diff <= allowed:
        raise MobileNetError(f"{what}: logits differ from PyTorch's by up to {diff:.3g} (allowed {allowed:.3g})")
    return diff


class OnnxRuntimeBackend:
    """Runs an ONNX file (fp32 export or int8 QDQ model) in ONNX Runtime on the CPU, graph optimisations on. A
    PyTorch model is exported first (BatchNorm folded, to a temporary file, verified against PyTorch by
    :func:`mobilenet.export.export_onnx`)."""

    name = "onnxruntime"

    def __init__(self, source: ModelSource, *, device: str = "cpu", num_threads: int | None = None) -> None:
        from mobilenet.export import INPUT_NAME, OUTPUT_NAME, _ort_session, export_onnx

        if str(device) != "cpu":
            raise MobileNetError(f"the onnxruntime backend runs on the CPU here; got device={device!r}")
        path = source.onnx_path
        self.max_abs_diff: float | None = None
        if path is None:
            with tempfile.TemporaryDirectory(prefix="mobilenet-ort-") as tmp:
                # Checked relative to the logits' scale (large logits differ by more than 1e-4 in any two runtimes).
                exported = export_onnx(
                    source.model,
                    Path(tmp) / "model.onnx",
                    classes=source.classes,
                    preprocessing=source.preprocessing,
                    rtol=1e-5,
                )
                self.session = _ort_session(exported.path, num_threads)
                self.max_abs_diff = exported.max_abs_diff
        else:
            self.session = _ort_session(path, num_threads)
        self.input_name, self.output_name = INPUT_NAME, OUTPUT_NAME

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        array = batch.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(self.session.run([self.output_name], {self.input_name: array})[0])


#: Backend name -> class taking (ModelSource, device=, num_threads=) and mapping a float NCHW batch to logits.
BACKENDS: dict[str, Callable[..., Callable[[Any], Any]]] = {
    "torch": TorchBackend,
    "torch-jit": TorchJitBackend,
    "onnxruntime": OnnxRuntimeBackend,
}


def onnxruntime_available() -> bool:
    """Whether the onnx extra (onnx + onnxruntime) is installed."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def _pick_backend(backend: str, source: ModelSource, device: str = "cpu") -> str:
    """``"auto"``: the fastest backend installed for this input (see the module docstring); else ``backend``."""
    if backend == "auto":
        if source.model is None:
            return "onnxruntime"  # an ONNX file runs only there
        if str(device).split(":")[0] != "cpu":
            return "torch"
        return "onnxruntime" if onnxruntime_available() else "torch-jit"
    if backend not in BACKENDS:
        raise MobileNetError(f"unknown backend {backend!r}; expected one of auto, {', '.join(BACKENDS)}")
    return backend


# ---------------------------------------------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """Top-k classes of one image.

    Attributes:
        source: the file path, or ``"<image N>"`` for an in-memory image.
        indices: class indices, most probable first.
        labels: class names (``None`` entries where the checkpoint has no class names).
        probabilities: softmax probabilities, same order.
        error: why the image could not be classified (then the lists are empty).
    """

    source: str
    indices: list[int] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def index(self) -> int | None:
        return self.indices[0] if self.indices else None

    @property
    def label(self) -> str | None:
        return self.labels[0] if self.labels else None

    @property
    def probability(self) -> float | None:
        return self.probabilities[0] if self.probabilities else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "error": self.error,
            "topk": [
                {"index": i, "label": label, "probability": p}
                for i, label, p in zip(self.indices, self.labels, self.probabilities, strict=True)
            ],
        }


class Predictor:
    """Classify images with a checkpoint, preprocessing them exactly as evaluation does.

    Args:
        checkpoint_or_model: a ``.safetensors`` checkpoint path, an ``.onnx`` file (fp32 or int8, from
            ``mobilenet export``/``quantize``), a registered model name (random weights, with a warning), a
            :class:`~mobilenet.models.MobileNet` or a :class:`mobilenet.weights.Checkpoint`.
        backend: ``"auto"`` (the fastest installed: ONNX Runtime on the CPU when the onnx extra is installed, else
            ``"torch-jit"``; ``"torch"`` on a GPU), ``"torch"`` (eager), ``"torch-jit"`` or ``"onnxruntime"``.
        device: torch device for the torch backend.
        num_threads: CPU threads for the backend (``torch.set_num_threads`` or ONNX Runtime's intra-op threads).
        batch_size: images per forward pass.

    Example::

        predictor = Predictor("cifar10.safetensors")
        for p in predictor.predict(["cat.jpg", "dog.png"], topk=3):
            print(p.source, p.label, p.probability)
    """

    def __init__(
        self,
        checkpoint_or_model: Any,
        *,
        backend: str = "auto",
        device: str = "cpu",
        num_threads: int | None = None,
        batch_size: int = 32,
    ) -> None:
        from mobilenet.data import build_eval_transform

        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise MobileNetError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise MobileNetError(f"num_threads must be an integer >= 1, got {num_threads!r}")
        self.source = load_source(checkpoint_or_model, device=device)
        self.backend_name = _pick_backend(backend, self.source, device)
        try:
            self.backend = BACKENDS[self.backend_name](self.source, device=device, num_threads=num_threads)
        except MobileNetError:
            if backend != "auto" or self.backend_name == "torch" or self.source.model is None:
                raise
            # "auto" never fails where plain torch would run: fall back to the next fastest path.
            self.backend_name = "torch-jit" if self.backend_name == "onnxruntime" else "torch"
            self.backend = BACKENDS[self.backend_name](self.source, device=device, num_threads=num_threads)
        self.batch_size = batch_size
        self.transform = build_eval_transform(self.source.preprocessing)

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def max_abs_diff(self) -> float | None:
        """Largest |logit difference| between the backend and the eager PyTorch model, measured when the backend
        was built (0 for eager torch; None for an ONNX file given as such: there is no PyTorch model to compare)."""
        return getattr(self.backend, "max_abs_diff", None)

    @property
    def classes(self) -> list[str] | None:
        return self.source.classes

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.source.preprocessing

    @property
    def num_classes(self) -> int:
        return int(self.source.config.num_classes)

    def preprocess(self, image: Any, *, name: str | None = None) -> torch.Tensor:
        """One image -> the float CHW tensor the network takes (decode, then the eval transform)."""
        rgb = decode_image(image, name=name)
        if self.source.config.in_channels == 1:
            from torchvision.transforms.v2.functional import rgb_to_grayscale

            rgb = rgb_to_grayscale(rgb)
        return self.transform(rgb)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """The backend's logits for a preprocessed float NCHW batch."""
        return self.backend(batch)

    def predict(self, images: Any, topk: int = 5, *, progress: bool = False) -> list[Prediction]:
        """Top-k predictions for each image (a path, PIL image, array or tensor, or a list of them).

        An image that cannot be decoded gets a :class:`Prediction` with ``error`` set; the others still run.
        ``progress=True`` shows a progress bar (rate, ETA).
        """
        if isinstance(images, str | os.PathLike | bytes) or _is_pil(images) or hasattr(images, "shape"):
            images = [images]
        items = list(images)
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            raise MobileNetError(f"topk must be an integer >= 1, got {topk!r}")
        topk = min(topk, self.num_classes)
        results: list[Prediction] = []
        with _progress(len(items), progress, "predicting") as advance:
            for chunk in _chunks(list(enumerate(items)), self.batch_size):
                results.extend(self._predict_chunk(chunk, topk))
                advance(len(chunk))
        return results

    def _predict_chunk(self, chunk: list[tuple[int, Any]], topk: int) -> list[Prediction]:
        import torch

        predictions: list[Prediction] = []
        tensors: list[torch.Tensor] = []
        waiting: list[Prediction] = []
        for index, image in chunk:
            source = str(image) if isinstance(image, str | os.PathLike) else f"<image {index}>"
            prediction = Prediction(source)
            try:
                tensors.append(self.preprocess(image, name=source))
                waiting.append(prediction)
            except BadImageError as error:
                prediction.error = str(error)
            predictions.append(prediction)
        if tensors:
            probabilities = torch.softmax(self.logits(torch.stack(tensors)).double(), dim=1)
            top = probabilities.topk(topk, dim=1)
            for prediction, values, indices in zip(waiting, top.values, top.indices, strict=True):
                prediction.indices = [int(i) for i in indices]
                prediction.probabilities = [float(v) for v in values]
                prediction.labels = [self.classes[i] if self.classes else None for i in prediction.indices]
        return predictions


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _progress:
    """A rich progress bar (rate, ETA) when ``enabled``; a no-op otherwise."""

    def __init__(self, total: int, enabled: bool, description: str) -> None:
        self.total, self.enabled, self.description = total, enabled, description

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),  # stdout stays clean for --format json
            transient=False,
        )
        self._bar.__enter__()
        self._task = self._bar.add_task(self.description, total=self.total, rate="")
        self._started = time.perf_counter()

        def advance(n: int) -> None:
            elapsed = max(time.perf_counter() - self._started, 1e-9)
            done = self._bar.tasks[0].completed + n
            self._bar.update(self._task, advance=n, rate=f"{done / elapsed:.1f} img/s")

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bar.__exit__(*exc)


def topk_accuracy(predictions: Sequence[Prediction], labels: Sequence[int], k: int = 1) -> float:
    """Fraction of predictions whose top-k indices contain the label (failed images count as wrong)."""
    if not predictions:
        return math.nan
    hits = sum(1 for p, y in zip(predictions, labels, strict=True) if p.ok and y in p.indices[:k])
    return hits / len(predictions)
