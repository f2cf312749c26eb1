"""``mobilenet.create_model``: the registry's builder with the arguments a timm user types without thinking.

``create_model(name, pretrained=True, num_classes=0, features_only=True, out_indices=(1, 3), in_chans=1,
drop_rate=0.1)`` behaves as ``timm.create_model`` does for the same names: pretrained weights from the source that
publishes them (:data:`mobilenet.convert.PUBLISHED`), a headless model returning pooled features, a backbone
returning the stage outputs timm's ``feature_info`` lists (same channels and reductions), the stem's pretrained
weights adapted to another number of input channels (summed for one, repeated and rescaled for more, as timm's
``adapt_input_conv``), and the dropout before the classifier.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mobilenet.checkpoint import load
from mobilenet.convert import SOURCES, default_source
from mobilenet.convert import pretrained as published_weights
from mobilenet.errors import MobileNetError
from mobilenet.models import Backbone, MobileNet, model_from_config
from mobilenet.spec import model_config, resolve_name

__all__ = ["adapt_input_conv", "create_model", "features_backbone"]

#: The stem conv's weight key (V1 Table 1 and V2 Table 2 both start with one 3x3 conv).
STEM_WEIGHT = "features.0.conv.weight"


def create_model(
    name: str,
    pretrained: bool | str | os.PathLike[str] = False,
    *,
    num_classes: int | None = None,
    features_only: bool = False,
    out_indices: tuple[int, ...] | list[int] | None = None,
    in_chans: int | None = None,
    drop_rate: float | None = None,
    **overrides: Any,
) -> MobileNet | Backbone:
    """Build a registered model, e.g. ``create_model("mobilenet_v1_0.5_160", num_classes=10)``.

    Args:
        name: a registered name (``mobilenet list`` / :func:`mobilenet.list_models`).
        pretrained: ``False``; ``True`` (the ImageNet weights of the source that publishes them for ``name``);
            ``"torchvision"`` or ``"timm"``; or the path of a ``.safetensors`` checkpoint of the same architecture.
        num_classes: classifier outputs; 0 = headless (the model returns pooled features). With pretrained
            weights, a different number gets a new classifier.
        features_only: return a :class:`~mobilenet.models.Backbone` whose outputs are timm's ``feature_info``
            stages (V2: the last bottleneck, not the 1x1 head conv, ends the last stage).
        out_indices: which of those stages (default: all five).
        in_chans: input channels (``in_channels``); pretrained stem weights are adapted.
        drop_rate: dropout before the classifier (``dropout``).
        overrides: the registry's other options (``alpha``, ``resolution``, ``small_input``, ...).
    """
    name = resolve_name(name)
    if in_chans is not None:
        overrides["in_channels"] = in_chans
    if drop_rate is not None:
        overrides["dropout"] = drop_rate
    if pretrained is False or pretrained is None:
        if num_classes is not None:
            overrides["num_classes"] = num_classes
        model = model_from_config(model_config(name, **overrides), name=name)
    else:
        model = _pretrained(name, pretrained, num_classes, overrides)
    if features_only:
        return features_backbone(model, out_indices)
    if out_indices is not None:
        raise MobileNetError("out_indices applies to features_only=True; pass features_only=True as well")
    return model


def _pretrained(
    name: str, pretrained: bool | str | os.PathLike[str], num_classes: int | None, overrides: dict[str, Any]
) -> MobileNet:
    """The model with pretrained weights, rebuilt with the options that change no weight (resolution, dropout,
    small_input), the stem adapted to ``in_channels`` and a new classifier for another ``num_classes``."""
    for weight_option in ("alpha", "variant", "classifier_rank"):
        if weight_option in overrides:
            raise MobileNetError(
                f"{weight_option} changes the weights' shapes, so it cannot be combined with pretrained weights; "
                f"choose the registered name with that {weight_option} instead"
            )
    donor = _donor(name, pretrained)
    in_channels = int(overrides.pop("in_channels", donor.config.in_channels))
    config = replace(donor.config, in_channels=in_channels, **overrides)
    model = model_from_config(config, name=name)
    state = donor.state_dict()
    state[STEM_WEIGHT] = adapt_input_conv(in_channels, state[STEM_WEIGHT])
    model.load_state_dict(state)
    model.info = replace(donor.info)
    if num_classes is not None and num_classes != config.num_classes:
        model.reset_classifier(num_classes)
    return model.eval()


def _donor(name: str, pretrained: bool | str | os.PathLike[str]) -> MobileNet:
    if pretrained is True:
        return published_weights(name, default_source(model_config(name)))
    if isinstance(pretrained, str) and pretrained in SOURCES:
        return published_weights(name, pretrained)
    if isinstance(pretrained, str | os.PathLike):
        donor = load(Path(pretrained))
        if donor.config.family != model_config(name).family or donor.config.alpha != model_config(name).alpha:
            raise MobileNetError(
                f"pretrained={pretrained!s} holds {donor.name or donor.config.family} (alpha "
                f"{donor.config.alpha:g}), not {name}; expected a checkpoint of the same architecture and width"
            )
        return donor
    raise MobileNetError(
        f"pretrained must be True/False, 'torchvision', 'timm' or a checkpoint path, got {pretrained!r}"
    )


def adapt_input_conv(in_channels: int, weight: torch.Tensor) -> torch.Tensor:
    """The stem weights of an RGB model for ``in_channels`` inputs, as timm's ``adapt_input_conv``: summed over
    RGB for one channel (a grey image then gives what the RGB model gives for it in all three channels), repeated
    cyclically and scaled by 3 / ``in_channels`` for more (the activations keep their magnitude)."""
    if in_channels == weight.shape[1]:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(in_channels / weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def features_backbone(model: MobileNet, out_indices: tuple[int, ...] | list[int] | None = None) -> Backbone:
    """``model``'s stages as timm's ``features_only`` lists them, those at ``out_indices`` (default all)."""
    stages = model.network.stages(without_head_conv=True)
    indices = tuple(range(len(stages))) if out_indices is None else tuple(out_indices)
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(stages)]
    if bad or not indices:
        raise MobileNetError(
            f"out_indices {list(indices)} must be stage indices from 0 to {len(stages) - 1} (this model has "
            f"{len(stages)} stages)"
        )
    return Backbone(model, tuple(stages[i].name for i in indices), feature_info=stages)
