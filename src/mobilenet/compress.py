"""Low-rank classifier compression: a trained model's classifier factored by truncated SVD, optionally fine-tuned,
written as a checkpoint that every command reads.

The classic way to shrink fully connected layers besides quantization (Xue et al. 2013, "Restructuring of Deep
Neural Network Acoustic Models with Singular Value Decomposition"; Denton et al. 2014, "Exploiting Linear
Structure Within Convolutional Networks", section 3.2): the weight matrix ``W`` (out x in) is replaced by its best
rank-``r`` approximation ``U_r S_r V_r^T`` (Eckart-Young), computed as two linear layers in -> r -> out with
``r * (in + out)`` weights instead of ``in * out``. The singular values are split evenly between the two factors
(``sqrt(S_r)`` to each), so neither layer carries the whole scale of ``W`` and their gradients stay balanced when
fine-tuning. The bias stays on the second layer, so at full rank the pair computes exactly the original map.

The architecture is the model's config with ``classifier_rank = r`` (:class:`mobilenet.spec.ModelConfig`), so the
cost model counts the factored head and :func:`mobilenet.checkpoint.load` rebuilds it from the checkpoint.

The optional fine-tune is a short loop here rather than :func:`mobilenet.train.train`: ``train`` builds its model
from a registered name (it has no ``classifier_rank`` to pass), and its ``init`` keeps a classifier only when the
shapes match an unfactored one, so the factored head would start from scratch. The loop reuses train's recipe,
optimizer and schedule (:func:`~mobilenet.train.resolve_recipe`, :func:`~mobilenet.train.build_optimizer`,
:func:`~mobilenet.train.lr_at`) and evaluate's counting.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from mobilenet.checkpoint import Checkpoint, check_checkpoint_path, load_checkpoint, save
from mobilenet.cost import count_costs, factored_fc_cost
from mobilenet.data import DataBundle, Preprocessing, check_seed, iterate_loader, load_data
from mobilenet.errors import MobileNetError
from mobilenet.evaluate import accumulate, summarize
from mobilenet.models import MobileNet, model_from_config
from mobilenet.optim import build_optimizer, lr_at, resolve_recipe
from mobilenet.runtime import resolve_device
from mobilenet.train_config import FLOAT32_MAX

__all__ = [
    "CompressionReport",
    "Factorisation",
    "classifier_matrix",
    "compress_checkpoint",
    "factor_classifier",
    "fine_tune",
    "truncated_svd",
]

#: Fine-tuning starts from trained weights: a tenth of the from-scratch SGD rate (0.1 per 128 images), the usual
#: transfer-learning choice.
FINE_TUNE_LR_PER_128 = 0.01


@dataclass(frozen=True)
class Factorisation:
    """What the truncation kept: ``energy_kept`` is the share of the squared singular values (of ``||W||_F^2``) in
    the top ``rank``; ``relative_error`` is ``||W - W_r||_F / ||W||_F = sqrt(1 - energy_kept)``."""

    in_features: int
    out_features: int
    rank: int
    full_rank: int
    energy_kept: float
    relative_error: float

    @property
    def params_full(self) -> int:
        return factored_fc_cost(self.in_features, self.out_features, self.rank).params_full

    @property
    def params_factored(self) -> int:
        return factored_fc_cost(self.in_features, self.out_features, self.rank).params_factored

    def to_dict(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "full_rank": self.full_rank,
            "energy_kept": self.energy_kept,
            "relative_error": self.relative_error,
            "params_full": self.params_full,
            "params_factored": self.params_factored,
        }


def classifier_matrix(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The classifier's weight matrix (out x in) and bias: of its one linear layer, or the product of the two
    layers of an already factored classifier (which can then be factored again at another rank)."""
    classifier = getattr(model, "classifier", None)
    if not isinstance(model, MobileNet) or classifier is None:
        raise MobileNetError(
            f"a {type(model).__name__} has no classifier to factor; expected a mobilenet classifier model "
            "(mobilenet.create_model or mobilenet.load), not a backbone or another library's module"
        )
    if isinstance(classifier, nn.Linear):
        return classifier.weight.detach(), None if classifier.bias is None else classifier.bias.detach()
    first, second = classifier
    return (second.weight @ first.weight).detach(), None if second.bias is None else second.bias.detach()


def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight`` (out x in) ~= ``second @ first`` with ``first = sqrt(S_r) V_r^T`` (rank x in) and ``second =
    U_r sqrt(S_r)`` (out x rank); also returns all singular values. Computed in float64, returned in the weight's
    dtype."""
    u, singular, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = singular[:rank].sqrt()
    first = root[:, None] * vh[:rank]
    second = u[:, :rank] * root[None, :]
    return first.to(weight.dtype), second.to(weight.dtype), singular


def _check_rank(rank: Any, in_features: int, out_features: int) -> int:
    full = min(in_features, out_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MobileNetError(f"classifier rank must be an integer >= 1, got {rank!r}")
    if rank > full:
        raise MobileNetError(
            f"classifier rank {rank} exceeds the full rank of the {in_features} -> {out_features} classifier, "
            f"min(in, out) = {full}; expected 1 <= rank <= {full}"
        )
    return rank


def factor_with_report(model: nn.Module, rank: int) -> tuple[MobileNet, Factorisation]:
    """:func:`factor_classifier` and what the truncation kept."""
    weight, bias = classifier_matrix(model)
    out_features, in_features = weight.shape
    rank = _check_rank(rank, in_features, out_features)
    first, second, singular = truncated_svd(weight, rank)
    factored = model_from_config(replace(model.config, classifier_rank=rank), name=model.name)
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("classifier.")}
    state["classifier.0.weight"] = first
    state["classifier.1.weight"] = second
    state["classifier.1.bias"] = bias if bias is not None else torch.zeros(out_features, dtype=weight.dtype)
    factored.load_state_dict(state, strict=True)
    factored.to(weight.device).train(model.training)
    factored.info = copy.deepcopy(model.info)
    squares = singular.square()
    energy = float(squares[:rank].sum() / squares.sum()) if float(squares.sum()) > 0 else 1.0
    report = Factorisation(
        in_features, out_features, rank, min(in_features, out_features), energy, math.sqrt(max(0.0, 1.0 - energy))
    )
    return factored, report


def factor_classifier(model: nn.Module, rank: int) -> MobileNet:
    """A copy of ``model`` whose classifier is its rank-``rank`` truncated SVD: two linear layers features -> rank
    -> classes, ``sqrt(S)`` of the singular values in each (see the module docstring). ``model`` is not changed.

    Raises :class:`MobileNetError` for a rank outside ``1 .. min(in, out)`` or a model without a classifier.
    """
    return factor_with_report(model, rank)[0]


# --------------------------------------------------------------------------------------------------------------
# Fine-tuning and evaluation on a data source
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FineTuneData:
    """A data source opened for one model: loaders over the training and validation sets."""

    classes: list[str]
    train: DataLoader
    val: DataLoader
    small_images: bool


def open_data(source: str, checkpoint: Checkpoint, *, batch_size: int, seed: int) -> FineTuneData:
    """Load ``source`` with the checkpoint's preprocessing; its classes must be the checkpoint's."""
    bundle: DataBundle = load_data(source, seed=seed)
    classes, num_classes = checkpoint.classes, checkpoint.config.num_classes
    if classes is not None and list(bundle.classes) != list(classes):
        raise MobileNetError(
            f"--data {source} has classes {_first(bundle.classes)}, the checkpoint {_first(classes)}; expected the "
            "data the model was trained on"
        )
    if len(bundle.classes) != num_classes:
        raise MobileNetError(
            f"--data {source} has {len(bundle.classes)} classes, the model {num_classes} outputs; expected the same"
        )
    stored = checkpoint.preprocessing
    prep = Preprocessing.from_dict(stored) if stored else bundle.preprocessing(checkpoint.config.resolution)
    generator = torch.Generator().manual_seed(seed)
    train_set = bundle.train_dataset(prep)
    return FineTuneData(
        classes=list(bundle.classes),
        train=DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator),
        val=DataLoader(bundle.val_dataset(prep), batch_size=batch_size),
        small_images=prep.style == "small",
    )


def _first(names: list[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def validation_top1(model: nn.Module, data: FineTuneData, device: torch.device) -> float:
    counts = accumulate(model, data.val, num_classes=len(data.classes), device=device)
    return float(summarize(counts, data.classes)["top1"])


def fine_tune(
    model: nn.Module,
    data: FineTuneData,
    *,
    epochs: int,
    lr: float | None = None,
    device: torch.device,
    limit_train_batches: int | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train every weight of ``model`` for ``epochs`` with train's "modern" recipe (SGD, cosine, label smoothing)
    at a fine-tuning rate (default :data:`FINE_TUNE_LR_PER_128` per 128 images, no warmup). Returns one row per
    epoch: mean training loss and validation top-1."""
    batch_size = data.train.batch_size or 1
    settings = SimpleNamespace(  # the options resolve_recipe reads (optim.RecipeOptions), as train's defaults
        recipe="modern",
        optimizer=None,
        lr=lr if lr is not None else FINE_TUNE_LR_PER_128 * batch_size / 128,
        schedule=None,
        warmup_epochs=0.0,
        weight_decay=None,
        label_smoothing=None,
        momentum=0.9,
        decay_depthwise=False,
        batch_size=batch_size,
        epochs=epochs,
    )
    recipe = resolve_recipe(settings, small_images=data.small_images)
    optimizer = build_optimizer(model, recipe)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    steps_per_epoch = len(data.train) if limit_train_batches is None else min(len(data.train), limit_train_batches)
    if steps_per_epoch == 0:
        raise MobileNetError(
            f"--batch-size {batch_size} is larger than the training set ({len(data.train.dataset)} images); "
            "use a smaller one"
        )
    total_steps, step, history = steps_per_epoch * epochs, 0, []
    model.to(device)
    for epoch in range(epochs):
        model.train()
        loss_sum = 0.0
        for batch, (images, labels) in enumerate(iterate_loader(data.train)):
            if batch >= steps_per_epoch:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, recipe=recipe, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
            loss = criterion(model(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach())
            step += 1
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / steps_per_epoch,
            "val_top1": validation_top1(model, data, device),
        }
        history.append(row)
        if log is not None:
            log(f"fine-tune epoch {epoch + 1}/{epochs}: loss {row['train_loss']:.4f}, val top-1 {row['val_top1']:.2%}")
    model.eval()
    return history


# --------------------------------------------------------------------------------------------------------------
# A checkpoint in, a checkpoint out
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompressionReport:
    """What :func:`compress_checkpoint` did: the truncation, the whole model's cost before and after (papers'
    convention: conv and FC weights, multiply-adds), and the validation top-1 of the original, the factored and
    the fine-tuned model where data was given."""

    source: str
    out: str
    factorisation: Factorisation
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    top1: dict[str, float] = field(default_factory=dict)
    fine_tune: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "out": self.out,
            "factorisation": self.factorisation.to_dict(),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "top1": dict(self.top1),
            "fine_tune": list(self.fine_tune),
        }


def _check_options(fine_tune_epochs: Any, data: str | None, batch_size: Any, lr: Any, seed: Any) -> None:
    if isinstance(fine_tune_epochs, bool) or not isinstance(fine_tune_epochs, int) or fine_tune_epochs < 0:
        raise MobileNetError(f"--fine-tune-epochs must be an integer >= 0, got {fine_tune_epochs!r}")
    if fine_tune_epochs and not data:
        raise MobileNetError("--fine-tune-epochs needs --data DIR, the data the model was trained on")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MobileNetError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    # The optimizer's own check raises ValueError for a negative rate and lets NaN through into the weights.
    number = isinstance(lr, int | float) and not isinstance(lr, bool)
    if lr is not None and not (number and math.isfinite(lr) and 0 < lr < FLOAT32_MAX):
        raise MobileNetError(f"--lr must be a positive number below {FLOAT32_MAX:.4g} (a float32), got {lr!r}")
    check_seed(seed, "--seed")


def compress_checkpoint(
    checkpoint: str | Path,
    rank: int,
    out: str | Path,
    *,
    fine_tune_epochs: int = 0,
    data: str | None = None,
    batch_size: int = 64,
    lr: float | None = None,
    device: str = "auto",
    seed: int = 0,
    limit_train_batches: int | None = None,
    log: Callable[[str], None] | None = None,
) -> CompressionReport:
    """Factor ``checkpoint``'s classifier to ``rank`` (:func:`factor_classifier`); with ``data``, measure the
    validation top-1 before and after and, with ``fine_tune_epochs``, fine-tune (:func:`fine_tune`); write the
    result to ``out`` with the same classes and preprocessing. ``load(out)`` rebuilds the factored model."""
    _check_options(fine_tune_epochs, data, batch_size, lr, seed)
    check_checkpoint_path(out, "--out")
    source = load_checkpoint(checkpoint)
    torch.manual_seed(seed)
    model, factorisation = factor_with_report(source.model, rank)
    top1: dict[str, float] = {}
    history: list[dict[str, Any]] = []
    if data:
        target = resolve_device(device)
        opened = open_data(data, source, batch_size=batch_size, seed=seed)
        top1["original"] = validation_top1(source.model.to(target), opened, target)
        top1["factored"] = validation_top1(model.to(target), opened, target)
        if fine_tune_epochs:
            history = fine_tune(
                model,
                opened,
                epochs=fine_tune_epochs,
                lr=lr,
                device=target,
                limit_train_batches=limit_train_batches,
                log=log,
            )
            top1["fine_tuned"] = history[-1]["val_top1"]
        model.cpu()
    before, after = count_costs(source.model), count_costs(model)
    report = CompressionReport(
        source=str(checkpoint),
        out=str(out),
        factorisation=factorisation,
        params_before=before.params,
        params_after=after.params,
        macs_before=before.macs,
        macs_after=after.macs,
        top1=top1,
        fine_tune=history,
    )
    metadata = {"compressed_from": Path(checkpoint).name, "compression": report.to_dict()}
    save(model, out, classes=source.classes, preprocessing=source.preprocessing, metadata=metadata)
    return report
