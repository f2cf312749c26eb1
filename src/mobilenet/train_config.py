"""What a training run is asked to do: :class:`TrainConfig`, every option validated before any data is loaded.

One module for the options so that the loop (:mod:`mobilenet.train`) reads as the steps of a run; ``None`` in a
field means the recipe's default (:func:`mobilenet.optim.resolve_recipe`).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from mobilenet.cost import check_fits_memory
from mobilenet.data import check_seed
from mobilenet.errors import MobileNetError
from mobilenet.optim import OPTIMIZERS, RECIPES, SCHEDULES
from mobilenet.runtime import check_thread_count, check_worker_count
from mobilenet.spec import model_config

__all__ = ["AMP_MODES", "TrainConfig"]

AMP_MODES = ("auto", "off", "bf16", "fp16")
#: The largest float32: the optimizers multiply float32 tensors by the learning rate and the weight decay, and a
#: larger factor cannot be converted (torch raises mid-step).
FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class TrainConfig:
    """Everything a run needs. ``None`` means "the recipe's default" (see :func:`mobilenet.optim.resolve_recipe`)."""

    model: str
    data: str
    out: str
    epochs: int = 10
    #: 128: fits a CPU's caches and a small GPU, and is what the CIFAR literature uses; the lr scales with it.
    batch_size: int = 128
    #: "modern" converges faster in short runs (cosine + warmup + label smoothing); "paper" reproduces the papers.
    recipe: str = "modern"
    optimizer: str | None = None
    #: None: modern SGD 0.1 per 128 images (linear scaling rule, Goyal et al. 2017); AdamW 1e-3 per 128; paper 0.045.
    lr: float | None = None
    schedule: str | None = None
    #: None: 5% of the run, at most 5 epochs (warmup keeps early large-lr steps from wrecking BN statistics).
    warmup_epochs: float | None = None
    #: None: 5e-4 for small images (CIFAR-style regularisation), 4e-5 at ImageNet sizes (V2 paper section 6.1).
    weight_decay: float | None = None
    #: False: the V1 paper (section 3.2) puts little or no weight decay on depthwise filters.
    decay_depthwise: bool = False
    #: None: 0.1 in the modern recipe (Szegedy et al. 2016), 0 in the paper's.
    label_smoothing: float | None = None
    #: 0.9: the papers' RMSprop momentum and the usual SGD momentum.
    momentum: float = 0.9
    #: 0 turns EMA off; 0.9999 is the TF-slim/timm value for long ImageNet runs, ~0.999 suits short CIFAR runs.
    ema_decay: float = 0.0
    #: "auto": bf16 (or fp16 with loss scaling) on CUDA, off on CPU/MPS where it is slower or unsupported.
    amp: str = "auto"
    #: NHWC memory layout. None: on on the CPU, where oneDNN's NHWC convolutions make a training step faster
    #: (docs/speed.md), off elsewhere (faster on recent GPUs with AMP too, but not measured here: pass True).
    channels_last: bool | None = None
    #: Max gradient L2 norm; 0 disables clipping (the papers do not clip).
    grad_clip: float = 0.0
    device: str = "auto"
    seed: int = 0
    #: Data-loading worker processes; 0 loads in the main process (deterministic and simplest on 2 cores).
    num_workers: int = 2
    #: None: the data's own image side when known (32 for CIFAR and digits), else the model's resolution.
    resolution: int | None = None
    alpha: float | None = None
    #: None: on when resolution <= 64, so a 32x32 image is not reduced to a 1x1 map by the 32x ImageNet stride.
    small_input: bool | None = None
    dropout: float | None = None
    val_fraction: float | None = None
    on_bad_image: str = "error"
    resume: bool = False
    #: Fine-tuning: start from these weights instead of random ones: a checkpoint of this library (.safetensors) or
    #: "torchvision"/"timm" for their published ImageNet weights. The classifier is kept only if its shape matches
    #: (same number of classes); otherwise it starts fresh, as transfer learning needs.
    init: str | None = None
    #: With ``init``: train the classifier only (the body's weights and BatchNorm statistics stay as loaded).
    freeze_backbone: bool = False
    #: SyncBatchNorm under DDP on CUDA (per-GPU batches are small); CPU (gloo) cannot run it.
    sync_bn: bool = True
    #: Stop each epoch after this many batches (quick experiments and tests); None: the whole epoch.
    limit_train_batches: int | None = None
    #: RandomResizedCrop's lower scale bound for ImageNet-style inputs.
    crop_scale_min: float = 0.08
    #: Horizontal flips. None: on, except for the built-in digits, where a mirrored digit is another digit (or none);
    #: pass False for other data where mirroring changes the class (text).
    hflip: bool | None = None
    #: Small-image augmentation on whole batches in the training process (when the images already have the input
    #: size, as CIFAR and digits do): one vectorised op per batch instead of a per-image pipeline.
    batch_augment: bool = True
    #: Keep the images on the training device (one uint8 tensor, copied once) and gather, augment and normalise
    #: each batch there, with no loader workers (:class:`mobilenet.data.DeviceBatches`). None: on a GPU, for sets
    #: held as one tensor at the input size with ``batch_augment`` (digits, torchvision's CIFAR, image packs,
    #: ``reproduce``'s sets); True: wherever the data allows, the CPU too; False: never.
    device_data: bool | None = None
    #: CPU threads for torch (None: torch's default). With other jobs on the same cores, 1 thread avoids OpenMP
    #: threads spinning against each other, which slows small models down several times (docs/speed.md).
    threads: int | None = None

    def __post_init__(self) -> None:
        self._check_types()

        def positive_int(name: str, value: Any, minimum: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise MobileNetError(f"{name} must be an integer >= {minimum}, got {value!r}")

        positive_int("--epochs", self.epochs)
        positive_int("--batch-size", self.batch_size)
        check_worker_count(self.num_workers, "--num-workers")
        check_seed(self.seed, "--seed")
        if self.limit_train_batches is not None:
            positive_int("limit_train_batches", self.limit_train_batches)
        if self.recipe not in RECIPES:
            raise MobileNetError(f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise MobileNetError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise MobileNetError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.amp not in AMP_MODES:
            raise MobileNetError(f"--amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        for name, value, low, high in (
            ("--lr", self.lr, 0.0, FLOAT32_MAX),
            ("--weight-decay", self.weight_decay, 0.0, FLOAT32_MAX),
            ("--warmup-epochs", self.warmup_epochs, 0.0, math.inf),
            ("--label-smoothing", self.label_smoothing, 0.0, 1.0),
        ):
            if value is not None and not (math.isfinite(value) and low <= value < high):
                bound = f">= {low:g}" if not math.isfinite(high) else f"in [{low:g}, {high:g})"
                bound += " (a float32)" if high == FLOAT32_MAX else ""
                raise MobileNetError(f"{name} must be a number {bound}, got {value!r}")
        if self.lr is not None and self.lr <= 0:
            raise MobileNetError(f"--lr must be a positive number, got {self.lr!r}")
        if not (0.0 <= self.ema_decay < 1.0):
            raise MobileNetError(f"--ema-decay must be in [0, 1) (0 disables EMA), got {self.ema_decay!r}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise MobileNetError(f"--grad-clip must be >= 0 (0 disables clipping), got {self.grad_clip!r}")
        if self.on_bad_image not in ("skip", "error"):
            raise MobileNetError(f"--on-bad-image must be 'skip' or 'error', got {self.on_bad_image!r}")
        if self.threads is not None:
            check_thread_count(self.threads, "--threads")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise MobileNetError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min!r}")
        if self.freeze_backbone and not self.init:
            raise MobileNetError("--freeze-backbone needs --init: a random body is not worth freezing")
        self._check_numbers()
        self._check_model_options()

    def _check_types(self) -> None:
        """What the Python API may be handed that the CLI's parser never gives: a string where a number goes (a
        TypeError at the first comparison), a string where a flag goes (``hflip="no"`` was true), a Path for the data
        or the run (the run wrote its config.json and crashed), None or a number as the run directory."""
        for name in ("data", "out", "init"):
            value = getattr(self, name)
            if value is None and name == "init":
                continue
            text = os.fspath(value) if isinstance(value, str | os.PathLike) else None
            if not isinstance(text, str) or not text:
                raise MobileNetError(f"{name} must be a non-empty path (str or os.PathLike), got {value!r}")
            setattr(self, name, text)
        for name in ("lr", "weight_decay", "warmup_epochs", "label_smoothing", "ema_decay", "grad_clip"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise MobileNetError(f"--{name.replace('_', '-')} must be a number, got {value!r}")
        if isinstance(self.crop_scale_min, bool) or not isinstance(self.crop_scale_min, int | float):
            raise MobileNetError(f"crop_scale_min must be a number in (0, 1], got {self.crop_scale_min!r}")
        for name in ("decay_depthwise", "resume", "freeze_backbone", "sync_bn", "batch_augment"):
            if not isinstance(getattr(self, name), bool):
                raise MobileNetError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("channels_last", "small_input", "hflip", "device_data"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise MobileNetError(f"{name} must be True, False or None (the default), got {getattr(self, name)!r}")

    def _check_numbers(self) -> None:
        """Fractions outside what the optimizer and the data split can use (an SGD or RMSprop momentum >= 1 makes
        every update grow without bound; a negative one is not momentum)."""

        def fraction(name: str, value: Any, *, open_low: bool = False) -> None:
            number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not number or not (0.0 < value < 1.0 if open_low else 0.0 <= value < 1.0):
                raise MobileNetError(f"{name} must be a number in {'(0' if open_low else '[0'}, 1), got {value!r}")

        fraction("--momentum", self.momentum)
        if self.dropout is not None:
            fraction("--dropout", self.dropout)
        if self.val_fraction is not None:
            fraction("--val-fraction", self.val_fraction, open_low=True)

    def _check_model_options(self) -> None:
        """The model name, and the resolution and alpha overrides, before any data is loaded; with an explicit
        resolution, the batch's activations must fit in memory (:func:`mobilenet.cost.check_fits_memory`)."""
        if self.resolution is not None and (
            isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < 8
        ):
            raise MobileNetError(
                f"--resolution must be an integer >= 8 (>= 32 without --small-input), got {self.resolution!r}"
            )
        overrides = {"resolution": self.resolution, "alpha": self.alpha, "small_input": self.small_input}
        if self.resolution is not None and self.resolution <= 64 and self.small_input is None:
            overrides["small_input"] = True  # what the run will choose at this size
        config = model_config(self.model, **overrides)
        if self.resolution is not None:
            check_fits_memory(config, batch_size=self.batch_size, name=self.model)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
