"""Classify images with a trained MobileNet: ``Predictor(checkpoint).predict(images)``.

The input side is deliberately forgiving: paths to JPEG, PNG, WebP, GIF, BMP or TIFF files in any colour mode
(grayscale, RGBA, CMYK, palette, 16-bit), PIL images, numpy arrays and uint8 tensors all become uint8 RGB CHW
tensors (:func:`mobilenet.images.decode_image`), which then go through the very transform evaluation uses
(:func:`mobilenet.data.build_eval_transform` with the checkpoint's stored preprocessing), so a prediction sees the
pixels an evaluation would. The output is the papers' softmax over the classifier's logits, top-k.

A file that cannot be decoded does not stop the others: its :class:`Prediction` carries the error instead. The
network runs on one of :data:`mobilenet.backends.BACKENDS` (``"auto"`` by default: on the CPU the fastest installed
backend, measured once per model, batch size and thread count and cached; see :mod:`mobilenet.autotune`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2.functional import rgb_to_grayscale

from mobilenet.autotune import choose_backend
from mobilenet.backends import load_source
from mobilenet.cost import check_input_fits
from mobilenet.data import build_eval_transform
from mobilenet.errors import MobileNetError
from mobilenet.images import BadImageError, decode_image
from mobilenet.progress import progress_bar
from mobilenet.runtime import check_thread_count, resolve_device, torch_threads

__all__ = ["TORCH_BACKENDS", "Prediction", "Predictor"]

#: Backends that run in torch's own thread pool (the Predictor's pre- and post-processing share it with them).
TORCH_BACKENDS = ("torch", "torch-channels-last", "torch-jit", "torch-compile")
#: Backends whose model was exported for one input size (any other size is the runtime's own error).
FIXED_SIZE_BACKENDS = ("onnxruntime", "exported", "executorch")

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
            :class:`~mobilenet.models.MobileNet` or a :class:`mobilenet.checkpoint.Checkpoint`.
        backend: ``"auto"`` (on the CPU, the fastest installed candidate of the precision tier as measured for this
            model, batch size and thread count, then cached (:mod:`mobilenet.autotune`; ``MOBILENET_AUTO_MEASURE=0``:
            the first installed of :data:`mobilenet.autotune.PRECISION_CANDIDATES`); ``"torch"`` on a GPU),
            ``"torch"`` (eager), ``"torch-jit"``, ``"onnxruntime"`` or another of :data:`mobilenet.backends.BACKENDS`.
        device: torch device for the torch backend.
        num_threads: CPU threads for the backend (``torch.set_num_threads`` or ONNX Runtime's intra-op threads).
        batch_size: images per forward pass (``auto`` measures at this size).
        precision: the precision tier (:data:`mobilenet.autotune.PRECISIONS`): ``None`` (the model's own: float32,
            or int8 for an int8 ``.onnx``), ``"fp32"``, ``"bf16"`` (CPUs with AVX512-BF16 or AMX), ``"int8"`` (an
            int8 ``.onnx`` from ``mobilenet quantize``, or a float model in our fused kernel's int8 on a CPU with
            VNNI) or ``"auto-fast"`` (the fastest of float32 and bf16, measured).
            A lower precision's accuracy is checked by ``mobilenet eval --precision``, not here.

    Attributes:
        backend_name: the backend that runs; ``backend_reason``: why, in words (measured, cached, fixed order);
        ``precision``: the precision it computes in.

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
        precision: str | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise MobileNetError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if num_threads is not None:
            check_thread_count(num_threads, "num_threads")
        device = str(resolve_device(device))  # a device that does not exist is refused before anything loads
        self.source = load_source(checkpoint_or_model, device=device)
        input_size = int(self.source.preprocessing["input_size"])
        check_input_fits(self.source.config, input_size, batch_size, name=self.source.name)
        choice = choose_backend(
            backend,
            self.source,
            device=device,
            num_threads=num_threads,
            batch_size=batch_size,
            precision=precision,
        )
        self.backend_name, self.backend, self.backend_reason = choice.name, choice.backend, choice.reason
        self.precision: str = getattr(self.backend, "precision", "fp32")
        # Another runtime owns the cores while it runs: torch's own ops around it stay on one thread.
        self._torch_threads = None if self.backend_name in TORCH_BACKENDS else 1
        self.batch_size = batch_size
        self.transform = build_eval_transform(self.source.preprocessing)
        # The batch the backend takes: the model's channels, and the one input size of an exported runtime (else 0).
        fixed = input_size if self.backend_name in FIXED_SIZE_BACKENDS else 0
        self._batch_layout = (int(self.source.config.in_channels), fixed)

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
            rgb = rgb_to_grayscale(rgb)
        try:
            return self.transform(rgb)
        except BadImageError as error:  # the transform knows the pixels, not where they came from
            label = name or (str(image) if isinstance(image, str | os.PathLike) else type(image).__name__)
            raise BadImageError(f"image {label}: {error}") from None

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """The backend's logits for a preprocessed float NCHW batch (any float dtype: it runs in float32; an empty
        batch gives empty logits). Anything else is refused by :meth:`check_batch`."""
        batch = self.check_batch(batch)
        if batch.shape[0] == 0:
            return torch.empty(0, self.num_classes)
        return self.backend(batch)

    def check_batch(self, batch: Any) -> torch.Tensor:
        """``batch`` as the backend takes it (float32, detached), or :class:`MobileNetError` saying what a
        preprocessed batch is: a float tensor N x C x H x W with the model's channels and, for a runtime exported
        for one input size (:data:`FIXED_SIZE_BACKENDS`), that size. A float32 batch without gradients is passed as
        it is: this runs on every call, before the runtime."""
        if not isinstance(batch, torch.Tensor):
            raise MobileNetError(f"logits take a preprocessed batch, got a {type(batch).__name__}; {self._expected()}")
        shape = batch.shape
        channels, size = self._batch_layout
        if len(shape) != 4 or shape[1] != channels or shape[2] < 1 or shape[3] < 1:
            raise MobileNetError(f"logits take a batch of shape N x C x H x W, got {tuple(shape)}; {self._expected()}")
        if size and (shape[2] != size or shape[3] != size):
            raise MobileNetError(
                f"the {self.backend_name} backend runs {size}x{size} images, got {tuple(shape)}; {self._expected()}"
            )
        if batch.is_meta or not batch.is_floating_point():
            raise MobileNetError(f"logits take a float batch, got {batch.dtype} on {batch.device}; {self._expected()}")
        if batch.dtype != torch.float32:
            batch = batch.to(torch.float32)
        return batch.detach() if batch.requires_grad else batch

    def _expected(self) -> str:
        size = int(self.source.preprocessing["input_size"])
        channels = self._batch_layout[0]
        return f"expected a float tensor N x {channels} x {size} x {size} (Predictor.preprocess makes one image)"

    def predict(self, images: Any, topk: int = 5, *, progress: bool = False) -> list[Prediction]:
        """Top-k predictions for each image (a path, PIL image, array or tensor, or a list of them).

        A path that does not exist raises :class:`MobileNetError` before anything runs (a typo, not a bad image);
        an image that cannot be decoded gets a :class:`Prediction` with ``error`` set, and the others still run.
        ``progress=True`` shows a progress bar (rate, ETA).
        """
        if isinstance(images, str | os.PathLike | bytes | Image.Image) or hasattr(images, "shape"):
            images = [images]
        if not isinstance(images, Iterable):
            raise MobileNetError(
                f"cannot predict {type(images).__name__}; expected an image (a path, bytes, PIL image, array or "
                "tensor) or a list of them"
            )
        items = list(images)
        missing = [str(item) for item in items if isinstance(item, str | os.PathLike) and not os.path.lexists(item)]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise MobileNetError(f"image file(s) {shown} do not exist; expected paths of image files")
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            raise MobileNetError(f"topk must be an integer >= 1, got {topk!r}")
        topk = min(topk, self.num_classes)
        results: list[Prediction] = []
        with progress_bar(len(items), "predicting", enabled=progress) as advance:
            for chunk in _chunks(list(enumerate(items)), self.batch_size):
                results.extend(self._predict_chunk(chunk, topk))
                advance(len(chunk))
        return results

    def _predict_chunk(self, chunk: list[tuple[int, Any]], topk: int) -> list[Prediction]:
        with torch_threads(self._torch_threads):
            predictions, tensors, waiting = self._preprocess_chunk(chunk)
            batch = (tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)) if tensors else None
        if batch is not None:
            top, probabilities = top_classes(self.logits(batch), topk)
            for prediction, indices, values in zip(waiting, top.tolist(), probabilities.tolist(), strict=True):
                prediction.indices = indices
                prediction.probabilities = values
                prediction.labels = [self.classes[i] if self.classes else None for i in prediction.indices]
        return predictions

    def _preprocess_chunk(
        self, chunk: list[tuple[int, Any]]
    ) -> tuple[list[Prediction], list[torch.Tensor], list[Prediction]]:
        """Every image of ``chunk`` preprocessed; one that cannot be decoded gets its error instead. Returns all
        predictions (in order), the tensors, and the predictions waiting for those tensors' results."""
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
        return predictions, tensors, waiting


def top_classes(logits: torch.Tensor, topk: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``topk`` classes of each row of ``logits`` and their softmax probabilities (float64), most likely first
    (ties: the lower index first).

    In numpy, on the calling thread: switching torch to one thread and back around two small ops would rebuild
    torch's thread pools, which costs more than the ops themselves next to a runtime that owns the cores."""
    scores = logits.detach().cpu().numpy().astype(np.float64)
    scores -= scores.max(axis=1, keepdims=True)
    probabilities = np.exp(scores)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    indices = np.argsort(-probabilities, axis=1, kind="stable")[:, :topk]
    return indices, np.take_along_axis(probabilities, indices, axis=1)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
