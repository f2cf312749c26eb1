"""The independent count: multiply-adds and weights read off a built ``nn.Module`` by forward hooks.

The analytic cost model (:mod:`mobilenet.cost`) reads the layer plan; this module reads the modules and the tensors
a forward pass produces, and knows nothing of the plan, so a test comparing the two catches a builder that drifts
from the plan (DESIGN: "if the builder and the cost model ever disagree, the test ... fails").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["MeasuredLayer", "measure_costs"]


@dataclass(frozen=True)
class MeasuredLayer:
    """What a forward hook saw for one ``nn.Conv2d`` or ``nn.Linear``: its multiply-adds for one image, computed
    from the module's own attributes and the output tensor's shape, and its weight count."""

    name: str
    kind: str
    macs: int
    params: int
    out_shape: tuple[int, ...]


def measure_costs(model: Any, resolution: int | None = None, device: Any = None) -> list[MeasuredLayer]:
    """Count multiply-adds and weights by running ``model`` once on one image and hooking every conv and linear
    layer: independent of the layer list, it reads kernel sizes, groups and channel counts from the modules and
    output sizes from the tensors the forward pass produces.

    ``device="meta"`` (or a model on the meta device) runs without allocating memory or computing anything, so
    every registered model can be checked in milliseconds.
    """
    config = getattr(model, "config", None)
    side = resolution or (config.resolution if config is not None else 224)
    in_channels = config.in_channels if config is not None else 3
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else "cpu"
    measured: list[MeasuredLayer] = []
    handles = []

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            batch = output.shape[0]
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                per_output = kh * kw * (module.in_channels // module.groups)
                macs = per_output * output.numel() // batch
                kind = "conv"
            else:
                macs = module.in_features * output.numel() // batch
                kind = "linear"
            measured.append(MeasuredLayer(name, kind, macs, module.weight.numel(), tuple(output.shape[1:])))

        return record

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_channels, side, side, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return measured
