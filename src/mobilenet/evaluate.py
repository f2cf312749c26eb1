"""Evaluation: top-1, top-5, per-class accuracy and the confusion matrix of a checkpoint on a data source.

``evaluate_checkpoint("runs/c10/best.safetensors", "cifar10")`` is what ``mobilenet eval`` calls. The checkpoint
is read with :func:`mobilenet.checkpoint.load_checkpoint` (safetensors + JSON header; nothing is unpickled) and the
images are transformed with the preprocessing stored in it, so evaluation sees exactly what training validated on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from mobilenet.autotune import PRECISION_BOUNDS
from mobilenet.backends import load_source
from mobilenet.cost import check_input_fits
from mobilenet.data import TransformedDataset, build_eval_transform, iterate_loader, load_data, resolve_preprocessing
from mobilenet.errors import MobileNetError
from mobilenet.predict import Predictor
from mobilenet.progress import progress_bar
from mobilenet.runtime import check_worker_count, resolve_device

__all__ = ["AccuracyBoundError", "EvalCounts", "accumulate", "evaluate_checkpoint", "summarize"]


@dataclass
class EvalCounts:
    """Sufficient statistics of an evaluation: the confusion matrix (rows: true class, columns: predicted), the
    number of top-5 hits and the summed cross-entropy; they add up across batches and processes."""

    confusion: torch.Tensor  # int64 [C, C]
    top5_correct: int
    loss_sum: float

    @property
    def total(self) -> int:
        return int(self.confusion.sum())

    def all_reduce(self, dist_ctx: Any) -> EvalCounts:
        if not getattr(dist_ctx, "enabled", False):
            return self
        packed = torch.cat([self.confusion.flatten().double(), torch.tensor([float(self.top5_correct), self.loss_sum])])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        n = self.confusion.numel()
        return EvalCounts(
            packed[:n].round().long().reshape(self.confusion.shape), round(float(packed[n])), float(packed[n + 1])
        )


@torch.no_grad()
def accumulate(
    model: nn.Module,
    loader: DataLoader,
    *,
    num_classes: int,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: Any = None,
) -> EvalCounts:
    """Run ``model`` (in eval mode) over ``loader`` of ``(images, labels)`` and count."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    top5 = 0
    loss_sum = 0.0
    k = min(5, num_classes)
    try:
        for images, labels in iterate_loader(loader):
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device)
            context = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
            with context:
                logits = model(images)
            logits = logits.float()
            loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            predicted = logits.argmax(1)
            index = (labels * num_classes + predicted).cpu()
            confusion += torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
            top5 += int((logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum())
            if progress is not None:
                progress(labels.shape[0])
    finally:
        model.train(was_training)
    return EvalCounts(confusion, top5, loss_sum)


def summarize(counts: EvalCounts, classes: list[str]) -> dict[str, Any]:
    """Top-1, top-5, mean loss, per-class accuracy (recall) and the confusion matrix as plain Python values."""
    total = counts.total
    if total == 0:
        raise MobileNetError("the evaluation set is empty; expected at least one image")
    confusion = counts.confusion
    per_class_total = confusion.sum(1)
    diagonal = confusion.diagonal()
    per_class = {
        name: (float(diagonal[i]) / float(per_class_total[i]) if per_class_total[i] > 0 else None)
        for i, name in enumerate(classes)
    }
    return {
        "images": total,
        "top1": float(diagonal.sum()) / total,
        "top5": counts.top5_correct / total,
        "loss": counts.loss_sum / total,
        "per_class": per_class,
        "per_class_count": {name: int(per_class_total[i]) for i, name in enumerate(classes)},
        "confusion": confusion.tolist(),
        "classes": list(classes),
    }


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str] | Any,
    data: str | os.PathLike[str],
    *,
    split: str = "val",
    batch_size: int = 256,
    device: str = "auto",
    num_workers: int = 0,
    on_bad_image: str = "error",
    val_fraction: float | None = None,
    seed: int = 0,
    progress: bool = True,
    backend: str = "torch",
    reference: str | os.PathLike[str] | Any | None = None,
    precision: str | None = None,
    max_drop: float | None = None,
) -> dict[str, Any]:
    """Evaluate a model on a data source's validation (or ``split="train"``) images.

    ``checkpoint``: any file this library writes (a ``.safetensors`` checkpoint, an fp32 or int8 ``.onnx``, a
    ``.ts``, ``.pt2`` or ``.pte`` export; see :func:`mobilenet.backends.load_source`), or a model object.
    ``backend`` runs the network: ``"torch"`` (default: the eager model, the numbers training's validation
    reported; an exported file runs in its own runtime instead) or any backend of
    :class:`mobilenet.predict.Predictor`. ``reference``: a second model (e.g. the fp32 checkpoint of an int8
    ``.onnx``) evaluated on the same images; the result then holds its top-1 and ``top1_difference`` (this model's
    top-1 minus the reference's).

    ``precision``: a tier of :data:`mobilenet.autotune.PRECISIONS` (run by the ``auto`` backend unless another is
    named). A tier below float32 is compared with float32 on the same images (the model itself in eager torch, or
    ``reference`` for an int8 ``.onnx``), and refused with :class:`AccuracyBoundError` when its top-1 is more than
    ``max_drop`` below float32's (default: :data:`mobilenet.autotune.PRECISION_BOUNDS`, 0.3 points for bf16, 1 point
    for int8).

    The data's classes must be the model's (same names, same order), otherwise the labels would mean different
    things; the error lists the difference.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MobileNetError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    if split not in ("val", "train"):
        raise MobileNetError(f"split must be 'val' or 'train', got {split!r}")
    check_worker_count(num_workers, "--num-workers")
    torch_device = resolve_device(device)
    if isinstance(reference, str | os.PathLike) and not Path(reference).is_file():
        raise MobileNetError(f"--reference {reference} does not exist; expected a model file to compare with")
    _check_max_drop(max_drop)
    source = load_source(checkpoint, device=str(torch_device))
    preprocessing = resolve_preprocessing(source.preprocessing, source.config.resolution)
    check_input_fits(source.config, preprocessing.input_size, batch_size, name=source.name)
    # in_memory=False: only the evaluated split is decoded, once, as the loader reads it.
    bundle = load_data(data, val_fraction=val_fraction, seed=seed, on_bad_image=on_bad_image, in_memory=False)  # type: ignore[arg-type]
    classes = _matching_classes(source, bundle.classes, checkpoint, data)
    dataset = TransformedDataset(bundle.val if split == "val" else bundle.train, build_eval_transform(preprocessing))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    lower_precision = precision not in (None, "fp32")
    backend_used = backend if (source.model is not None and not lower_precision) or backend != "torch" else "auto"
    network = _network(source, backend_used, torch_device, precision)
    with progress_bar(len(dataset), "evaluating", enabled=progress, transient=True) as advance:
        counts = accumulate(network, loader, num_classes=len(classes), device=torch_device, progress=advance)
    result = summarize(counts, list(classes))
    result.update(
        {
            "checkpoint": str(checkpoint) if isinstance(checkpoint, str | os.PathLike) else source.name,
            "model": source.name,
            "data": str(data),
            "split": bundle.val_name if split == "val" else "train",
            "preprocessing": preprocessing.to_dict(),
            "backend": backend,
            "backend_used": _backend_name(network),
            "precision": _precision(network),
        }
    )
    reference_label = str(reference) if isinstance(reference, str | os.PathLike) else "the reference model"
    if reference is None and result["precision"] != "fp32" and source.model is not None:
        reference, reference_label = source.model, "the same model in float32 (eager torch)"
    if reference is not None:
        other = evaluate_checkpoint(
            reference,
            data,
            split=split,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            on_bad_image=on_bad_image,
            val_fraction=val_fraction,
            seed=seed,
            progress=progress,
            backend="torch",
        )
        result["reference"] = {"checkpoint": reference_label, "top1": other["top1"], "top5": other["top5"]}
        result["top1_difference"] = result["top1"] - other["top1"]
    _check_accuracy_bound(result, max_drop)
    return result


class AccuracyBoundError(MobileNetError):
    """A lower precision lost more top-1 accuracy against float32 than its bound allows; ``result`` holds the
    evaluation that showed it."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def _check_max_drop(max_drop: float | None) -> None:
    if max_drop is None:
        return
    if isinstance(max_drop, bool) or not isinstance(max_drop, int | float) or not 0 <= max_drop <= 1:
        raise MobileNetError(f"max_drop must be a fraction of top-1 from 0 to 1 (0.003 = 0.3 points), got {max_drop!r}")


def _check_accuracy_bound(result: dict[str, Any], max_drop: float | None) -> None:
    """Record the tier's bound in ``result`` and raise :class:`AccuracyBoundError` when the top-1 lost against the
    float32 reference exceeds it. A tier with no float32 reference (an int8 file given alone) is reported unchecked."""
    tier = result["precision"]
    if tier not in PRECISION_BOUNDS:
        return
    bound = PRECISION_BOUNDS[tier] if max_drop is None else float(max_drop)
    result["precision_bound"] = bound
    if "top1_difference" not in result:
        result["precision_check"] = "unchecked: no float32 reference (give the float model as the reference)"
        return
    drop = -result["top1_difference"]
    result["precision_check"] = "within bound" if drop <= bound else "exceeds bound"
    if drop > bound:
        raise AccuracyBoundError(
            f"{tier} top-1 {result['top1']:.2%} is {100 * drop:.2f} points below float32's "
            f"{result['reference']['top1']:.2%} on {result['images']} images of {result['data']}, more than the {tier} "
            f"bound of {100 * bound:.2f} points; use float32 (or raise the bound with --max-drop)",
            result,
        )


def _matching_classes(source: Any, data_classes: list[str], checkpoint: Any, data: Any) -> list[str]:
    """The model's class names, checked against the data's (or the data's, when the model stores none)."""
    classes = source.classes
    if classes is None:
        if len(data_classes) != source.config.num_classes:
            raise MobileNetError(
                f"{checkpoint} has {source.config.num_classes} outputs but {data} has {len(data_classes)} classes"
            )
        return list(data_classes)
    if list(classes) != list(data_classes):
        missing = sorted(set(classes) - set(data_classes))
        extra = sorted(set(data_classes) - set(classes))
        parts = [f"missing {_some(missing)}" if missing else "", f"extra {_some(extra)}" if extra else ""]
        detail = "; ".join(part for part in parts if part) or "same names in a different order"
        expected = _some(classes)
        raise MobileNetError(f"the classes of {data} differ from the checkpoint's ({detail}); expected: {expected}")
    return list(classes)


def _some(names: Sequence[str], shown: int = 20) -> str:
    """The first ``shown`` names and how many more: a model of thousands of classes still gets a readable line."""
    listed = ", ".join(names[:shown])
    return listed if len(names) <= shown else f"{listed} and {len(names) - shown:,} more"


class _Runner(nn.Module):
    """A Predictor backend (a callable from a float NCHW batch to logits) seen as a module by :func:`accumulate`."""

    def __init__(self, predictor: Predictor) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predictor.logits(images)


def _network(source: Any, backend: str, device: torch.device, precision: str | None = None) -> nn.Module:
    """The eager model for ``backend="torch"``, else the :class:`mobilenet.predict.Predictor` backend wrapped as a
    module."""
    if backend == "torch" and precision in (None, "fp32"):
        return source.model
    return _Runner(Predictor(source, backend=backend, device=str(device), precision=precision))


def _backend_name(network: nn.Module) -> str:
    return network.predictor.backend_name if isinstance(network, _Runner) else "torch"


def _precision(network: nn.Module) -> str:
    return network.predictor.precision if isinstance(network, _Runner) else "fp32"
