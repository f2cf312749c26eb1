"""``mobilenet.create_model``: the registry's builder with the arguments a timm user types without thinking.

``create_model(name, pretrained=True, num_classes=0, features_only=True, out_indices=(1, 3), in_chans=1,
drop_rate=0.1)`` behaves as ``timm.create_model`` does for the same names: pretrained weights from the source that
publishes them (:data:`mobilenet.convert.PUBLISHED`), a headless model returning pooled features, a backbone
returning the stage outputs timm's ``feature_info`` lists (same channels and reductions), the stem's pretrained
weights adapted to another number of input channels (summed for one, repeated and rescaled for more, as timm's
``adapt_input_conv``), and the dropout before the classifier.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mobilenet.checkpoint import load, shorten
from mobilenet.convert import SOURCES, default_source
from mobilenet.convert import pretrained as published_weights
from mobilenet.cost import physical_memory_bytes
from mobilenet.errors import MobileNetError
from mobilenet.models import Backbone, MobileNet, model_from_config
from mobilenet.spec import OVERRIDABLE, model_config, resolve_name

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
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise MobileNetError(f"cannot override {', '.join(unknown)}; options that can be set: {', '.join(OVERRIDABLE)}")
    donor = _donor(name, pretrained)
    # Not int(): True, 1.5 or "3" would become 1, 1 or 3; the config's own check refuses them.
    in_channels = overrides.pop("in_channels", donor.config.in_channels)
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
    if isinstance(pretrained, str | os.PathLike) and os.fspath(pretrained):
        donor = load(Path(pretrained))
        wanted, held = model_config(name), donor.config
        # The variant too: V1's conv and shallow networks (Tables 4 and 5) are other architectures of the same width.
        if (held.family, held.alpha, held.variant) != (wanted.family, wanted.alpha, wanted.variant):
            raise MobileNetError(
                f"pretrained={pretrained!s} holds {donor.name or held.family} (alpha {held.alpha:g}, variant "
                f"{held.variant}), not {name}; expected a checkpoint of the same architecture and width"
            )
        return donor
    raise MobileNetError(
        f"pretrained must be True/False, 'torchvision', 'timm' or a checkpoint path, got {pretrained!r}"
    )


def adapt_input_conv(in_channels: int, weight: torch.Tensor) -> torch.Tensor:
    """The stem weights of an RGB model for ``in_channels`` inputs, as timm's ``adapt_input_conv``: summed over
    RGB for one channel (a grey image then gives what the RGB model gives for it in all three channels), repeated
    cyclically and scaled by 3 / ``in_channels`` for more (the activations keep their magnitude)."""
    _check_adapt_arguments(in_channels, weight)
    if in_channels == weight.shape[1]:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(in_channels / weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def _check_adapt_arguments(in_channels: int, weight: torch.Tensor) -> None:
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise MobileNetError(f"in_channels must be an integer >= 1, got {in_channels!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or not weight.is_floating_point():
        described = f"a {weight.dim()}-D {weight.dtype} tensor" if isinstance(weight, torch.Tensor) else repr(weight)
        raise MobileNetError(
            f"weight must be a conv weight: a 4-D floating-point tensor (out, in, kh, kw), got {described}"
        )
    if weight.shape[1] < 1:
        raise MobileNetError(f"weight {tuple(weight.shape)} has no input channels to adapt; expected at least one")
    needed = weight[:, :1].numel() * in_channels * weight.element_size()
    limit = physical_memory_bytes()
    if limit is not None and needed > limit:
        raise MobileNetError(
            f"in_channels {in_channels:,} needs {needed / 1e9:,.1f} GB of stem weights, more than this machine's "
            f"{limit / 1e9:,.1f} GB of memory; expected a smaller in_channels"
        )


def features_backbone(model: MobileNet, out_indices: tuple[int, ...] | list[int] | None = None) -> Backbone:
    """``model``'s stages as timm's ``features_only`` lists them, those at ``out_indices`` (default all)."""
    if not isinstance(model, MobileNet):
        raise MobileNetError(f"features_backbone takes a mobilenet model (MobileNet), got {type(model).__name__}")
    stages = model.network.stages(without_head_conv=True)
    indices = tuple(range(len(stages))) if out_indices is None else _check_out_indices(out_indices, len(stages))
    return Backbone(model, tuple(stages[i].name for i in indices), feature_info=stages)


def _check_out_indices(out_indices: Any, count: int) -> tuple[int, ...]:
    """``out_indices`` as a tuple: increasing stage indices without repeats (the order the backbone returns its
    outputs in, so that ``channels`` and the outputs line up), each from 0 to ``count - 1``."""
    expected = f"expected increasing stage indices from 0 to {count - 1} (this model has {count} stages)"
    if not isinstance(out_indices, list | tuple | range):
        kind = type(out_indices).__name__
        raise MobileNetError(f"out_indices must be a list or tuple of ints, got {kind}; {expected}")
    indices = tuple(out_indices)
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count]
    if bad or not indices:
        shown = ", ".join(repr(i) for i in bad[:5]) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise MobileNetError(f"out_indices {'is empty' if not indices else f'has {shown}'}; {expected}")
    if any(later <= earlier for earlier, later in itertools.pairwise(indices)):
        raise MobileNetError(
            f"out_indices {shorten([str(i) for i in indices])} repeats or reorders stages; {expected}, each once"
        )
    return indices
