"""Training: recipes, the loop, checkpoints that resume exactly, and DDP.

``train(TrainConfig(model="mobilenet_v2_1.0_224", data="cifar10", out="runs/c10"))`` is what ``mobilenet train``
calls. Two recipes:

- ``paper``: the V1/V2 papers' setup. RMSprop "with decay and momentum set to 0.9" (V2 paper section 6.1), TF's
  epsilon 1.0 inside the square root (the Inception-v3 setup the V1 paper cites), initial learning rate 0.045
  decayed by 0.98 per epoch and weight decay 4e-5 (V2 paper section 6.1); no weight decay on depthwise filters
  ("it's important to put very little or no weight decay (l2 regularization) on the depthwise filters since
  there are so few parameters in them", V1 paper section 3.2).
- ``modern``: SGD with Nesterov momentum, linear warmup then cosine decay (Loshchilov & Hutter 2017), label
  smoothing 0.1 (Szegedy et al. 2016); AdamW (Loshchilov & Hutter 2019) as an alternative optimizer.

In both, weight decay never applies to BatchNorm parameters or biases (1-d tensors), nor by default to depthwise
filters.

The run directory holds ``last.safetensors`` and ``best.safetensors`` (weights + model config, classes and
preprocessing, readable by :func:`mobilenet.weights.load`), ``train_state.safetensors`` (everything needed to
resume: weights, EMA, optimizer tensors, RNG states, with the structure and numbers as JSON in its header),
``config.json``, ``metrics.jsonl``/``metrics.csv`` and ``curves.png``. Every file is written atomically. A resumed
run ends with the same weights as an uninterrupted one: each epoch's shuffling and augmentation are seeded from
(seed, epoch, rank), and an interruption mid-epoch stores the RNG state and the batch position.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from mobilenet.errors import MobileNetError
from mobilenet.io import atomic_path, atomic_write_text

__all__ = [
    "RECIPES",
    "ModelEMA",
    "RMSpropTF",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "build_optimizer",
    "lr_at",
    "parameter_groups",
    "resolve_device",
    "speed_settings",
    "train",
]

STATE_FILE = "train_state.safetensors"
STATE_KEY = "mobilenet_train_state"
STATE_FORMAT = 1
OPTIMIZERS = ("sgd", "rmsprop", "adamw")
SCHEDULES = ("cosine", "exponential", "step", "constant")
AMP_MODES = ("auto", "off", "bf16", "fp16")


class TrainingDiverged(MobileNetError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything a run needs. ``None`` means "the recipe's default" (resolved in :meth:`resolved`)."""

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
    #: NHWC memory layout. None: on on the CPU, where oneDNN's NHWC convolutions made a MobileNetV2 training step
    #: 1.5x faster (224 px, batch 32, 2 threads: docs/speed.md), off elsewhere (faster on recent GPUs with AMP
    #: too, but not measured here: pass True).
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
    #: SyncBatchNorm under DDP on CUDA (per-GPU batches are small); CPU (gloo) cannot run it.
    sync_bn: bool = True
    #: Stop each epoch after this many batches (quick experiments and tests); None: the whole epoch.
    limit_train_batches: int | None = None
    #: RandomResizedCrop's lower scale bound for ImageNet-style inputs.
    crop_scale_min: float = 0.08
    #: Horizontal flips; off for data where mirroring changes the class (digits, text).
    hflip: bool = True
    #: Small-image augmentation on whole batches in the training process (when the images already have the input
    #: size, as CIFAR and digits do): one vectorised op per batch instead of a per-image pipeline.
    batch_augment: bool = True
    #: CPU threads for torch (None: torch's default). With other jobs on the same cores, 1 thread avoids OpenMP
    #: threads spinning against each other, which was measured to slow small models by 4-10x.
    threads: int | None = None

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any, minimum: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise MobileNetError(f"{name} must be an integer >= {minimum}, got {value!r}")

        positive_int("--epochs", self.epochs)
        positive_int("--batch-size", self.batch_size)
        positive_int("--num-workers", self.num_workers, 0)
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
            ("--lr", self.lr, 0.0, math.inf),
            ("--weight-decay", self.weight_decay, 0.0, math.inf),
            ("--warmup-epochs", self.warmup_epochs, 0.0, math.inf),
            ("--label-smoothing", self.label_smoothing, 0.0, 1.0),
        ):
            if value is not None and not (math.isfinite(value) and low <= value < high):
                bound = f"in [{low:g}, {high:g})" if math.isfinite(high) else f">= {low:g}"
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
            positive_int("--threads", self.threads)
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise MobileNetError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Recipe:
    """A recipe's concrete hyper-parameters after defaults are filled in."""

    name: str
    optimizer: str
    lr: float
    schedule: str
    warmup_epochs: float
    weight_decay: float
    label_smoothing: float
    momentum: float
    decay_depthwise: bool


RECIPES = ("modern", "paper")


def resolve_recipe(config: TrainConfig, *, small_images: bool) -> Recipe:
    """Fill the ``None`` fields of ``config`` from its recipe (see the module docstring for the sources)."""
    if config.recipe == "paper":
        optimizer = config.optimizer or "rmsprop"
        base_lr = 0.045 if optimizer == "rmsprop" else (0.1 * config.batch_size / 128 if optimizer == "sgd" else 1e-3)
        schedule = config.schedule or "exponential"
        warmup = 0.0 if config.warmup_epochs is None else config.warmup_epochs
        weight_decay = 4e-5 if config.weight_decay is None else config.weight_decay
        smoothing = 0.0 if config.label_smoothing is None else config.label_smoothing
    else:
        optimizer = config.optimizer or "sgd"
        if optimizer == "sgd":
            base_lr = 0.1 * config.batch_size / 128
        elif optimizer == "adamw":
            base_lr = 1e-3 * config.batch_size / 128
        else:
            base_lr = 0.045
        schedule = config.schedule or "cosine"
        warmup = min(5.0, 0.05 * config.epochs) if config.warmup_epochs is None else config.warmup_epochs
        if config.weight_decay is not None:
            weight_decay = config.weight_decay
        elif optimizer == "adamw":
            weight_decay = 0.05  # decoupled decay: a different scale from L2 (Loshchilov & Hutter 2019)
        else:
            weight_decay = 5e-4 if small_images else 4e-5
        smoothing = 0.1 if config.label_smoothing is None else config.label_smoothing
    return Recipe(
        name=config.recipe,
        optimizer=optimizer,
        lr=config.lr if config.lr is not None else base_lr,
        schedule=schedule,
        warmup_epochs=warmup,
        weight_decay=weight_decay,
        label_smoothing=smoothing,
        momentum=config.momentum,
        decay_depthwise=config.decay_depthwise,
    )


# --------------------------------------------------------------------------------------------------------------
# Optimizer, schedule, EMA
# --------------------------------------------------------------------------------------------------------------


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def parameter_groups(model: nn.Module, weight_decay: float, *, decay_depthwise: bool = False) -> list[dict[str, Any]]:
    """Two groups: conv/linear weights with ``weight_decay``; BN parameters, biases and (unless
    ``decay_depthwise``) depthwise filters without (V1 paper section 3.2)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if param.ndim <= 1 or (is_depthwise(module) and name == "weight" and not decay_depthwise):
                no_decay.append(param)
            else:
                decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]


class RMSpropTF(torch.optim.Optimizer):
    """RMSprop as TensorFlow (and so the MobileNet papers) define it, which differs from ``torch.optim.RMSprop``:

    - epsilon is added inside the square root: ``g / sqrt(ms + eps)``; the papers' eps = 1.0 (V2 section 6.1 via
      TF-slim's ``--opt_epsilon=1.0``) would be a different optimizer in PyTorch's form ``g / (sqrt(ms) + eps)``;
    - the mean square starts at 1, not 0, so the first steps are not huge;
    - the learning rate multiplies the update inside the momentum buffer, so changing it takes effect smoothly;
    - weight decay is L2 in the loss, as TF-slim's ``l2_regularizer`` adds it.

    ``ms = rho * ms + (1 - rho) * g^2``; ``mom = momentum * mom + lr * g / sqrt(ms + eps)``; ``w -= mom``.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 0.045,
        rho: float = 0.9,
        momentum: float = 0.9,
        eps: float = 1.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "rho": rho, "momentum": momentum, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["square_avg"] = torch.ones_like(p)
                    state["momentum_buffer"] = torch.zeros_like(p)
                state["step"] += 1
                square_avg = state["square_avg"]
                square_avg.mul_(group["rho"]).addcmul_(grad, grad, value=1 - group["rho"])
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).addcdiv_(grad, square_avg.add(group["eps"]).sqrt_(), value=group["lr"])
                p.sub_(buf)
        return loss


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer over :func:`parameter_groups`. SGD and AdamW use PyTorch's multi-tensor
    (``foreach``) update on every device (PyTorch picks it only on GPUs by default): one kernel per group instead
    of one per parameter, the same arithmetic."""
    groups = parameter_groups(model, recipe.weight_decay, decay_depthwise=recipe.decay_depthwise)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.momentum > 0, foreach=True
        )
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr, foreach=True)
    return RMSpropTF(groups, lr=recipe.lr, rho=0.9, momentum=recipe.momentum, eps=1.0)


def speed_settings(config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Apply and describe the speed settings :func:`train` uses (issue 5; measured in benchmarks/train_speed.py,
    figures in docs/speed.md): on the CPU, glibc's allocator keeps activation pages instead of mapping and zeroing
    them again every step (:func:`mobilenet.runtime.tune_allocator`; ``MOBILENET_NO_MALLOC_TUNING=1`` opts out)
    and the memory layout is channels_last unless ``config.channels_last`` is False (elsewhere: only when True)."""
    from mobilenet.runtime import tune_allocator

    allocator = tune_allocator() if device.type == "cpu" else None
    channels_last = config.channels_last if config.channels_last is not None else device.type == "cpu"
    return {
        "allocator": allocator.to_dict() if allocator is not None else None,
        "channels_last": bool(channels_last),
    }


def lr_at(step: int, *, recipe: Recipe, steps_per_epoch: int, total_steps: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based): linear warmup, then the schedule.

    ``exponential`` is the V2 paper's 0.98 per epoch (staircase, as TF-slim's ``exponential_decay``); ``step``
    divides by 10 at 50% and 75% of the run; ``cosine`` decays to 0 at the last step.
    """
    warmup = round(recipe.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    if recipe.schedule == "cosine":
        span = max(1, total_steps - warmup)
        return 0.5 * recipe.lr * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
    if recipe.schedule == "exponential":
        return recipe.lr * 0.98 ** (step // steps_per_epoch)
    if recipe.schedule == "step":
        fraction = step / max(1, total_steps)
        return recipe.lr * (0.1 if fraction >= 0.5 else 1.0) * (0.1 if fraction >= 0.75 else 1.0)
    return recipe.lr


class ModelEMA:
    """Exponential moving average of the weights and BN statistics (TF's ``ExponentialMovingAverage`` with
    ``num_updates``: the decay ramps up as ``min(decay, (1 + n) / (10 + n))`` so early averages are not stuck at the
    random initialisation)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema_value, value in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if ema_value.dtype.is_floating_point:
                ema_value.lerp_(value.detach(), 1.0 - decay)
            else:
                ema_value.copy_(value)


# --------------------------------------------------------------------------------------------------------------
# Device, distributed
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistContext:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistContext:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: CUDA (this process's local rank), else Apple MPS, else CPU; an explicit name must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MobileNetError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MobileNetError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MobileNetError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    return device


def setup_distributed(dist_ctx: DistContext, device: torch.device) -> None:
    """Join the ``torchrun`` process group: NCCL between GPUs, gloo on CPU."""
    import torch.distributed as dist

    if dist_ctx.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def wrap_distributed(model: nn.Module, device: torch.device, *, sync_bn: bool) -> nn.Module:
    """DDP-wrap a model. On CUDA, BatchNorm becomes SyncBatchNorm when ``sync_bn`` (statistics over the global
    batch); gloo on CPU cannot run SyncBatchNorm, so there each process normalises with its own batch's
    statistics, as plain DDP does."""
    from torch.nn.parallel import DistributedDataParallel

    if sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _all_reduce_sum(values: torch.Tensor, dist_ctx: DistContext) -> torch.Tensor:
    if dist_ctx.enabled:
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class EpochSampler(Sampler[int]):
    """The epoch's shuffled order for this rank (``DistributedSampler``'s split: ``perm[rank::world]``), starting
    at batch ``skip_batches`` so an interrupted epoch resumes where it stopped."""

    def __init__(self, dataset: Dataset, dist_ctx: DistContext, seed: int, batch_size: int) -> None:
        from torch.utils.data import DistributedSampler

        self.inner = DistributedSampler(
            dataset, num_replicas=dist_ctx.world_size, rank=dist_ctx.rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[int]:
        indices = list(self.inner)
        return iter(indices[self.skip_batches * self.batch_size :])

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip_batches * self.batch_size)


class ShardSampler(Sampler[int]):
    """Every index exactly once across ranks (``range(rank, n, world)``): exact validation under DDP."""

    def __init__(self, size: int, dist_ctx: DistContext) -> None:
        self.indices = list(range(dist_ctx.rank, size, dist_ctx.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# --------------------------------------------------------------------------------------------------------------
# Run state (safetensors + JSON; never pickle)
# --------------------------------------------------------------------------------------------------------------


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every tensor of a nested dict/list into ``tensors`` (by path); return the JSON-able rest."""
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_json_key(k), _split_tensors(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    return obj


def _json_key(key: Any) -> Any:
    return key if isinstance(key, str | int | float | bool) or key is None else str(key)


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__float__" in obj:
            return float(obj["__float__"])
        return {k: _join_tensors(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def write_state(path: Path, tensors_tree: dict[str, Any], info: dict[str, Any]) -> None:
    """One file: the tensors of ``tensors_tree`` in safetensors, its structure and ``info`` as JSON in the header."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = _split_tensors(tensors_tree, "s", tensors)
    header = json.dumps({"format_version": STATE_FORMAT, "info": info, "structure": structure})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={STATE_KEY: header})


def read_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open API)
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise MobileNetError(
            f"cannot read the training state {path} ({error}); it is corrupt or not a state file"
        ) from None
    if STATE_KEY not in metadata:
        raise MobileNetError(f"{path} is not a mobilenet training state (no '{STATE_KEY}' metadata)")
    header = json.loads(metadata[STATE_KEY])
    return _join_tensors(header["structure"], tensors), header["info"]


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    interrupted: bool
    best_top1: float
    history: list[dict[str, Any]] = field(default_factory=list)
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next batch boundary and returns."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum


@contextmanager
def _signal_handlers(flag: _StopFlag) -> Iterator[None]:
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, flag) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63 - 1)


def _amp_settings(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether to use a GradScaler)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None, False
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, device.type == "cuda"


def _progress(enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def initialise_from(model: nn.Module, source: str) -> list[str]:
    """Copy weights into ``model`` from a checkpoint file or ``"torchvision"``/``"timm"`` published weights
    (:func:`mobilenet.weights.pretrained`), for fine-tuning. Every body tensor must match in shape (same
    architecture and width; the input resolution and ``small_input`` may differ, since they change no weight);
    the classifier is copied only when it has the same number of classes. Returns what was done, as notes."""
    from mobilenet.weights import load_checkpoint, pretrained

    if source in ("torchvision", "timm"):
        donor = pretrained(model.name or "", source)
        origin = f"{source}'s ImageNet weights"
    else:
        path = Path(source)
        if not path.is_file():
            raise MobileNetError(
                f"--init: {source} is not a file; expected a .safetensors checkpoint of this library or "
                "'torchvision'/'timm'"
            )
        donor = load_checkpoint(path).model
        origin = str(path)
    theirs = donor.state_dict()
    ours = model.state_dict()
    head = {key for key in ours if key.startswith("classifier.")}
    missing = sorted(set(ours) - set(theirs) - head)
    misshaped = sorted(k for k in set(ours) & set(theirs) - head if ours[k].shape != theirs[k].shape)
    if missing or misshaped:
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing[:5])}" if missing else "",
                ", ".join(f"{k} {tuple(theirs[k].shape)} vs {tuple(ours[k].shape)}" for k in misshaped[:5]),
            )
            if part
        )
        raise MobileNetError(
            f"--init: {origin} does not fit {model.name or 'this model'} ({detail}); expected weights of the same "
            "architecture and width multiplier"
        )
    keep_head = all(k in theirs and theirs[k].shape == ours[k].shape for k in head)
    selected = {k: v for k, v in theirs.items() if k in ours and (keep_head or k not in head)}
    model.load_state_dict({**ours, **selected})
    notes = [f"initialised {len(selected)} of {len(ours)} tensors from {origin}"]
    if not keep_head:
        notes.append("the classifier starts fresh: the number of classes differs from the initial weights'")
    return notes


def train(
    config: TrainConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    on_step: Callable[[int], None] | None = None,
    data: Any = None,
) -> TrainResult:
    """Train (or resume) a run described by ``config``; returns when done or after a SIGINT/SIGTERM checkpoint.

    ``data``: an already loaded :class:`mobilenet.data.DataBundle` to use instead of loading ``config.data`` (which
    is then only recorded): :mod:`mobilenet.reproduce` trains many models on one dataset and decodes it once.

    Raises :class:`TrainingDiverged` when the loss turns NaN/inf (the last good checkpoint stays in place) and
    :class:`MobileNetError` for any mistake in the inputs.
    """
    from mobilenet.data import iterate_loader, load_data
    from mobilenet.evaluate import accumulate, summarize
    from mobilenet.models import create_model
    from mobilenet.weights import save as save_weights

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    dist_ctx = DistContext.from_env()
    device = resolve_device(config.device, dist_ctx.local_rank)
    channels_last = speed_settings(config, device)["channels_last"]
    setup_distributed(dist_ctx, device)
    say = log if dist_ctx.is_main and log is not None else (lambda _message: None)
    run_dir = Path(config.out)
    state_path = run_dir / STATE_FILE
    if state_path.exists() and not config.resume:
        raise MobileNetError(
            f"{run_dir} already holds a run ({STATE_FILE}); pass --resume to continue it or choose another --out"
        )
    if config.resume and not state_path.exists():
        raise MobileNetError(f"--resume: no {STATE_FILE} in {run_dir}; start a run there first (without --resume)")

    torch.manual_seed(config.seed)
    bundle = (
        data
        if data is not None
        else load_data(
            config.data, val_fraction=config.val_fraction, seed=config.seed, on_bad_image=config.on_bad_image
        )
    )
    for note in bundle.notes:
        say(f"note: {note}")
    from mobilenet.spec import model_config

    base = model_config(config.model)
    resolution = config.resolution or bundle.native_size or base.resolution
    small_input = config.small_input if config.small_input is not None else resolution <= 64
    overrides: dict[str, Any] = {"num_classes": len(bundle.classes), "resolution": resolution}
    overrides["small_input"] = small_input
    if config.alpha is not None:
        overrides["alpha"] = config.alpha
    if config.dropout is not None:
        overrides["dropout"] = config.dropout
    model = create_model(config.model, **overrides)
    if config.init and not config.resume:
        for note in initialise_from(model, config.init):
            say(note)
    preprocessing = bundle.preprocessing(resolution)
    recipe = resolve_recipe(config, small_images=preprocessing.style == "small")

    batch_augment = None
    if config.batch_augment and preprocessing.style == "small" and bundle.native_size == resolution:
        from mobilenet.data import BatchSmallAugment

        batch_augment = BatchSmallAugment(preprocessing, flip=config.hflip)
        train_set = bundle.train  # raw uint8 images; augmented per batch below
    else:
        train_set = bundle.train_dataset(preprocessing, scale=(config.crop_scale_min, 1.0), flip=config.hflip)
    val_set = bundle.val_dataset(preprocessing)
    global_batch = config.batch_size
    if global_batch % dist_ctx.world_size:
        raise MobileNetError(
            f"--batch-size {global_batch} must be divisible by the number of processes ({dist_ctx.world_size})"
        )
    per_rank_batch = global_batch // dist_ctx.world_size
    steps_per_epoch = len(train_set) // global_batch
    if steps_per_epoch == 0:
        raise MobileNetError(
            f"--batch-size {global_batch} is larger than the training set ({len(train_set)} images); use a smaller one"
        )
    if config.limit_train_batches:
        steps_per_epoch = min(steps_per_epoch, config.limit_train_batches)
    total_steps = steps_per_epoch * config.epochs

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, recipe)
    ema = ModelEMA(model, config.ema_decay) if config.ema_decay > 0 else None
    amp_dtype, use_scaler = _amp_settings(config.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)

    epoch, step_in_epoch, global_step, best_top1 = 0, 0, 0, -1.0
    history: list[dict[str, Any]] = []
    partial = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    if config.resume:
        tree, info = read_state(state_path)
        stored = info["model"]
        if stored["name"] != config.model or stored["config"] != model.config.to_dict():
            raise MobileNetError(
                f"--resume: {state_path} is a run of {stored['name']} ({_short_config(stored['config'])}), not "
                f"{config.model} ({_short_config(model.config.to_dict())}); use the same --model and options or "
                "another --out"
            )
        model.load_state_dict(tree["model"])
        optimizer.load_state_dict(tree["optimizer"])
        if ema is not None and tree.get("ema") is not None:
            ema.module.load_state_dict(tree["ema"])
            ema.updates = info.get("ema_updates", 0)
        if info.get("scaler"):
            scaler.load_state_dict(info["scaler"])
        epoch, step_in_epoch, global_step = info["epoch"], info["step_in_epoch"], info["global_step"]
        best_top1, history, partial = info["best_top1"], info["history"], info["partial"]
        rng = tree["rng"][dist_ctx.rank] if dist_ctx.rank < len(tree["rng"]) else None
        if rng is not None and step_in_epoch:
            torch.set_rng_state(rng["cpu"])
            if device.type == "cuda" and rng.get("cuda") is not None:
                torch.cuda.set_rng_state(rng["cuda"], device)
        say(f"resuming {run_dir} at epoch {epoch + 1}, batch {step_in_epoch} (best val top-1 so far {best_top1:.2%})")
        if epoch >= config.epochs:
            say(f"the run already finished its {epoch} epochs; pass a larger --epochs to continue")

    train_model: nn.Module = wrap_distributed(model, device, sync_bn=config.sync_bn) if dist_ctx.enabled else model
    sampler = EpochSampler(train_set, dist_ctx, config.seed, per_rank_batch)
    val_loader = DataLoader(
        val_set,
        batch_size=per_rank_batch,
        sampler=ShardSampler(len(val_set), dist_ctx),
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )

    def save_run(*, finished_epoch: bool, val_metrics: dict[str, Any] | None) -> None:
        """Write the resumable state (all ranks' RNG), then the weights checkpoints; rank 0 writes files."""
        rng = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }
        all_rng = [rng]
        if dist_ctx.enabled:
            import torch.distributed as dist

            all_rng = [None] * dist_ctx.world_size
            dist.all_gather_object(all_rng, rng)
        if not dist_ctx.is_main:
            return
        info = {
            "model": {"name": config.model, "config": model.config.to_dict()},
            "train_config": config.to_dict(),
            "recipe": asdict(recipe),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "best_top1": best_top1,
            "history": history,
            "partial": partial,
            "scaler": scaler.state_dict() if use_scaler else None,
            "ema_updates": ema.updates if ema is not None else 0,
            "world_size": dist_ctx.world_size,
        }
        tree = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "rng": all_rng,
        }
        write_state(state_path, tree, info)
        deployable = ema.module if ema is not None else model
        metadata = {
            "epoch": epoch,
            "weights": "ema" if ema is not None else "raw",
            "val": val_metrics,
            "train_config": config.to_dict(),
        }
        save_weights(
            deployable,
            run_dir / "last.safetensors",
            classes=bundle.classes,
            preprocessing=preprocessing,
            metadata=metadata,
        )
        if finished_epoch and val_metrics is not None and val_metrics.get("is_best"):
            save_weights(
                deployable,
                run_dir / "best.safetensors",
                classes=bundle.classes,
                preprocessing=preprocessing,
                metadata=metadata,
            )

    if dist_ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            run_dir / "config.json",
            json.dumps(
                {
                    "model": config.model,
                    "model_config": model.config.to_dict(),
                    "classes": bundle.classes,
                    "preprocessing": preprocessing.to_dict(),
                    "train_config": config.to_dict(),
                    "recipe": asdict(recipe),
                    "data": {
                        "name": bundle.name,
                        "train": len(bundle.train),
                        "val": len(bundle.val),
                        "val_split": bundle.val_name,
                    },
                    "device": str(device),
                    "world_size": dist_ctx.world_size,
                },
                indent=2,
            )
            + "\n",
        )
    say(
        f"training {config.model} ({resolution}px, small_input={small_input}, {len(bundle.classes)} classes) on "
        f"{bundle.name}: {len(bundle.train)} train / {len(bundle.val)} {bundle.val_name} images, {config.epochs} "
        f"epochs x {steps_per_epoch} steps, batch {global_batch}, {recipe.optimizer} lr {recipe.lr:g} "
        f"{recipe.schedule}, wd {recipe.weight_decay:g}, device {device}"
        + (f" x {dist_ctx.world_size} processes" if dist_ctx.enabled else "")
    )

    stop = _StopFlag()
    interrupted = False
    autocast = (
        (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else (lambda: nullcontext())
    )
    with _signal_handlers(stop), _progress(progress and dist_ctx.is_main) as bar:
        while epoch < config.epochs and not interrupted:
            if step_in_epoch == 0:
                torch.manual_seed(_epoch_seed(config.seed, epoch, dist_ctx.rank))
                partial = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
            sampler.set_epoch(epoch, skip_batches=step_in_epoch)
            loader = DataLoader(
                train_set,
                batch_size=per_rank_batch,
                sampler=sampler,
                num_workers=config.num_workers,
                pin_memory=device.type == "cuda",
                drop_last=True,
                # Its own generator: creating the iterator must not draw from the global RNG, or a resumed epoch
                # would see different augmentation than the uninterrupted one.
                generator=torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, dist_ctx.rank)),
                persistent_workers=False,
            )
            task = bar.add_task(
                f"epoch {epoch + 1}/{config.epochs}", total=steps_per_epoch, completed=step_in_epoch, stats=""
            )
            train_model.train()
            started = time.perf_counter()
            for images, labels in iterate_loader(loader):
                if step_in_epoch >= steps_per_epoch:
                    break
                lr = lr_at(global_step, recipe=recipe, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if batch_augment is not None:
                    images = batch_augment(images)
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast():
                    logits = train_model(images)
                    loss = criterion(logits.float(), labels)
                finite = torch.isfinite(loss.detach()).float().reshape(1)
                if not bool(_all_reduce_sum(finite, dist_ctx).item() == dist_ctx.world_size):
                    bar.stop()
                    last = run_dir / "last.safetensors"
                    kept = (
                        f"the last good checkpoint is kept at {last} (epoch {epoch})"
                        if last.exists() and epoch > 0
                        else "no checkpoint was written yet"
                    )
                    raise TrainingDiverged(
                        f"training stopped: the loss became {loss.item()} at epoch {epoch + 1}, batch "
                        f"{step_in_epoch + 1}; {kept}; try a lower --lr (now {recipe.lr:g}) or --grad-clip 5"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                if ema is not None:
                    ema.update(model)
                global_step += 1
                step_in_epoch += 1
                batch = labels.shape[0]
                partial["loss_sum"] += loss.item() * batch
                partial["correct"] += int((logits.argmax(1) == labels).sum())
                partial["seen"] += batch
                elapsed = partial["seconds"] + time.perf_counter() - started
                bar.update(
                    task,
                    completed=step_in_epoch,
                    stats=(
                        f"loss {partial['loss_sum'] / partial['seen']:.3f} "
                        f"acc {partial['correct'] / partial['seen']:.1%} "
                        f"{partial['seen'] * dist_ctx.world_size / max(elapsed, 1e-9):.0f} img/s lr {lr:.3g}"
                    ),
                )
                if on_step is not None:
                    on_step(global_step)
                stop_now = torch.tensor([1.0 if stop.signal is not None else 0.0])
                if bool(_all_reduce_sum(stop_now, dist_ctx).item() > 0) and step_in_epoch < steps_per_epoch:
                    partial["seconds"] += time.perf_counter() - started
                    save_run(finished_epoch=False, val_metrics=None)
                    say(
                        f"interrupted: saved the state at epoch {epoch + 1}, batch {step_in_epoch} in {state_path}; "
                        "continue with the same command plus --resume"
                    )
                    interrupted = True
                    break
            if interrupted:
                bar.remove_task(task)
                break
            partial["seconds"] += time.perf_counter() - started
            bar.remove_task(task)
            # Validation (EMA weights when on: those are the ones saved for deployment).
            eval_model = ema.module if ema is not None else model
            counts = accumulate(
                eval_model,
                val_loader,
                num_classes=len(bundle.classes),
                device=device,
                amp_dtype=amp_dtype,
                channels_last=channels_last,
            )
            counts = counts.all_reduce(dist_ctx)
            val = summarize(counts, bundle.classes)
            # Training loss/accuracy over all processes' images, not rank 0's share only.
            totals = _all_reduce_sum(
                torch.tensor(
                    [partial["loss_sum"], float(partial["correct"]), float(partial["seen"])], dtype=torch.float64
                ),
                dist_ctx,
            ).tolist()
            seen_total = totals[2]
            row = {
                "epoch": epoch + 1,
                "train_loss": totals[0] / max(1.0, seen_total),
                "train_top1": totals[1] / max(1.0, seen_total),
                "val_loss": val["loss"],
                "val_top1": val["top1"],
                "val_top5": val["top5"],
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": seen_total / max(partial["seconds"], 1e-9),
                "epoch_seconds": partial["seconds"],
            }
            history.append(row)
            is_best = val["top1"] > best_top1
            best_top1 = max(best_top1, val["top1"])
            epoch += 1
            step_in_epoch = 0
            save_run(
                finished_epoch=True,
                val_metrics={"top1": val["top1"], "top5": val["top5"], "loss": val["loss"], "is_best": is_best},
            )
            if dist_ctx.is_main:
                _write_metrics(run_dir, history)
            say(
                f"epoch {row['epoch']}/{config.epochs}: train loss {row['train_loss']:.3f} top-1 "
                f"{row['train_top1']:.2%} | {bundle.val_name} loss {row['val_loss']:.3f} top-1 {row['val_top1']:.2%} "
                f"top-5 {row['val_top5']:.2%} | {row['images_per_s']:.0f} img/s, {row['epoch_seconds']:.0f} s"
                + (" (best)" if is_best else "")
            )
            if stop.signal is not None:
                interrupted = epoch < config.epochs
                if interrupted:
                    say(f"interrupted after epoch {epoch}; continue with the same command plus --resume")

    if dist_ctx.is_main and history:
        from mobilenet.plots import plot_training_curves

        plot_training_curves(history, run_dir / "curves.png", title=f"{config.model} on {bundle.name}")
    if not interrupted and dist_ctx.is_main and history:
        say(
            f"done: best {bundle.val_name} top-1 {best_top1:.2%}; checkpoints in {run_dir} (best.safetensors, "
            f"last.safetensors), curves in {run_dir / 'curves.png'}"
        )
    return TrainResult(
        run_dir=run_dir,
        epochs_done=epoch,
        interrupted=interrupted,
        best_top1=best_top1,
        history=history,
        last_checkpoint=run_dir / "last.safetensors" if (run_dir / "last.safetensors").exists() else None,
        best_checkpoint=run_dir / "best.safetensors" if (run_dir / "best.safetensors").exists() else None,
    )


def _short_config(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={config[k]}" for k in ("alpha", "resolution", "num_classes", "small_input", "variant"))


METRIC_FIELDS = (
    "epoch",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "lr",
    "images_per_s",
    "epoch_seconds",
)


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl and metrics.csv from the run's history (kept in the training state, so a resumed run's
    files never hold a duplicated or missing epoch); one row per epoch, written atomically."""
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / "metrics.csv", buffer.getvalue())
