"""Recipes, optimizers, learning-rate schedules and the weights' moving average: what :mod:`mobilenet.train` steps.

Two recipes:

- ``paper``: the V1/V2 papers' setup. RMSprop "with decay and momentum set to 0.9" (V2 paper section 6.1), TF's
  epsilon 1.0 inside the square root (the Inception-v3 setup the V1 paper cites), initial learning rate 0.045
  decayed by 0.98 per epoch and weight decay 4e-5 (V2 paper section 6.1); no weight decay on depthwise filters
  ("it's important to put very little or no weight decay (l2 regularization) on the depthwise filters since
  there are so few parameters in them", V1 paper section 3.2).
- ``modern``: SGD with Nesterov momentum, linear warmup then cosine decay (Loshchilov & Hutter 2017), label
  smoothing 0.1 (Szegedy et al. 2016); AdamW (Loshchilov & Hutter 2019) as an alternative optimizer.

In both, weight decay never applies to BatchNorm parameters or biases (1-d tensors), nor by default to depthwise
filters.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

__all__ = [
    "OPTIMIZERS",
    "RECIPES",
    "SCHEDULES",
    "ModelEMA",
    "RMSpropTF",
    "Recipe",
    "RecipeOptions",
    "build_optimizer",
    "is_depthwise",
    "lr_at",
    "parameter_groups",
    "resolve_recipe",
]

RECIPES = ("modern", "paper")
OPTIMIZERS = ("sgd", "rmsprop", "adamw")
SCHEDULES = ("cosine", "exponential", "step", "constant")


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


class RecipeOptions(Protocol):
    """The options a recipe is resolved from (:class:`mobilenet.train.TrainConfig` has them); ``None`` means "the
    recipe's default"."""

    recipe: str
    optimizer: str | None
    lr: float | None
    schedule: str | None
    warmup_epochs: float | None
    weight_decay: float | None
    label_smoothing: float | None
    momentum: float
    decay_depthwise: bool
    batch_size: int
    epochs: int


def resolve_recipe(config: RecipeOptions, *, small_images: bool) -> Recipe:
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
