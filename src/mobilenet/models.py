"""Layer list -> nn.Module, the registry of named models, and the backbone API.

``create_model("mobilenet_v2_1.0_224")`` builds the network the V2 paper's Table 2 describes; every channel
count, stride and kernel comes from :func:`mobilenet.spec.build_network`, which the cost model reads too.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from mobilenet.cost import check_fits_memory
from mobilenet.errors import MobileNetError
from mobilenet.layers import FullyConnected, build_block, build_classifier
from mobilenet.spec import FeatureInfo, ModelConfig, Network, build_network, list_models, model_config, resolve_name

__all__ = [
    "Backbone",
    "MobileNet",
    "ModelInfo",
    "create_backbone",
    "create_model",
    "list_models",
    "model_from_config",
]


@dataclass
class ModelInfo:
    """What a model carries besides its architecture, saved and exported with its weights.

    Attributes:
        classes: class names, index = logit index, or None.
        preprocessing: the eval preprocessing dict (``input_size``, ``resize_size``, ``mean``, ``std``,
            ``interpolation``, ``style``; see :mod:`mobilenet.data`), or None for the config's default.
        origin: where the weights came from (a conversion report, a training run), as JSON-ready data.
    """

    classes: list[str] | None = None
    preprocessing: dict[str, Any] | None = None
    origin: dict[str, Any] = field(default_factory=dict)


class MobileNet(nn.Module):
    """A MobileNet classifier: ``features`` (the table's blocks), global average pool, dropout, ``classifier``.

    The same builder makes every registered network: VGG-16 (the V1 paper's Table 8 baseline) adds a 7x7 average
    pool and two ``hidden`` fully connected layers before the classifier; a ``classifier_rank`` makes the
    classifier two linear layers (:func:`mobilenet.layers.build_classifier`).

    The forward pass returns logits; the papers' softmax is applied at inference (``predict``), not here, so the
    model trains with cross-entropy on logits.
    """

    def __init__(self, network: Network) -> None:
        super().__init__()
        self.network = network
        self.config = network.config
        self.name = network.name
        self.info = ModelInfo()
        self.features = nn.Sequential(*(build_block(block) for block in network.blocks))
        self.pool = nn.AdaptiveAvgPool2d(network.pool_output)
        dropout = network.config.dropout
        self.hidden = (
            nn.Sequential(
                *(FullyConnected(layer, dropout if index else 0.0) for index, layer in enumerate(network.hidden))
            )
            if network.hidden
            else None
        )
        self.dropout = nn.Dropout(p=dropout)
        self.classifier = build_classifier(network.classifier_layers)
        init_weights(self)

    @property
    def classes(self) -> list[str] | None:
        """Class names (``info.classes``)."""
        return self.info.classes

    @classes.setter
    def classes(self, names: list[str] | None) -> None:
        self.info.classes = None if names is None else list(names)

    @property
    def preprocessing(self) -> dict[str, Any] | None:
        """The eval preprocessing (``info.preprocessing``)."""
        return self.info.preprocessing

    @preprocessing.setter
    def preprocessing(self, value: dict[str, Any] | None) -> None:
        self.info.preprocessing = None if value is None else dict(value)

    @property
    def num_features(self) -> int:
        return self.network.features_out

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        return self.network.feature_info

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(self.pool(features), 1)
        if self.hidden is not None:
            pooled = self.hidden(pooled)
        return self.classifier(self.dropout(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def set_activation(self, activation: str | None) -> None:
        """Rebuild the blocks from the layer plan with another activation (``"relu6"`` for V1 weights trained with
        it), keeping every weight: the config and the plan then describe the model that runs."""
        config = replace(self.config, activation=activation)
        network = build_network(config, name=self.name)
        state = self.features.state_dict()
        reference = next(self.parameters())
        features = nn.Sequential(*(build_block(block) for block in network.blocks))
        features.load_state_dict(state)
        self.features = features.to(device=reference.device, dtype=reference.dtype)
        self.network, self.config = network, config

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier for fine-tuning on ``num_classes`` classes (the config is updated too; a
        factored classifier stays factored at the same rank when that rank still fits)."""
        config = replace(self.config, num_classes=num_classes)
        network = build_network(config, name=self.name)
        check_fits_memory(network)
        self.network, self.config = network, config
        self.info.classes = None
        self.classifier = build_classifier(self.network.classifier_layers)
        init_weights(self.classifier)


def init_weights(model: nn.Module) -> None:
    """Initialise as the reference implementations do (torchvision, timm): He normal with fan-out for convs,
    BatchNorm weight 1 and bias 0, classifier weights normal(0, 0.01) and bias 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def model_from_config(config: ModelConfig, name: str = "") -> MobileNet:
    """Build a model from a :class:`ModelConfig` (as stored in a checkpoint).

    Every model is built here, so this is where a config whose float32 weights cannot fit in the machine's memory
    is refused (:func:`mobilenet.cost.check_fits_memory`), before anything is allocated.
    """
    if not isinstance(config, ModelConfig):
        raise MobileNetError(f"expected a ModelConfig, got {type(config).__name__}")
    network = build_network(config, name=name)
    check_fits_memory(network)
    return MobileNet(network)


def create_model(name: str, **overrides: Any) -> MobileNet:
    """Build a registered model, e.g. ``create_model("mobilenet_v1_0.5_160", num_classes=10)``.

    Overrides: ``alpha``, ``resolution``, ``num_classes``, ``dropout``, ``small_input``, ``in_channels``,
    ``classifier_rank`` (the classifier as two linear layers, features -> rank -> classes).
    An unknown name raises :class:`MobileNetError` that suggests the closest registered names.
    """
    name = resolve_name(name)
    return model_from_config(model_config(name, **overrides), name=name)


class Backbone(nn.Module):
    """The ``features`` of a MobileNet returning named stage outputs, for detection and segmentation heads.

    ``feature_info`` lists each output's name, channels and reduction (stride relative to the input), as timm's
    ``features_only`` models do. Stages end at the last block before the stride doubles.
    """

    def __init__(
        self,
        model: MobileNet,
        out_stages: tuple[str, ...] | None = None,
        *,
        feature_info: tuple[FeatureInfo, ...] | None = None,
    ) -> None:
        super().__init__()
        available = {info.name: info for info in (feature_info or model.feature_info)}
        wanted = tuple(available) if out_stages is None else tuple(out_stages)
        unknown = [stage for stage in wanted if stage not in available]
        if unknown:
            raise MobileNetError(f"unknown stage(s) {', '.join(unknown)}; this model has {', '.join(available)}")
        order = [list(available).index(stage) for stage in wanted]
        if any(later <= earlier for earlier, later in itertools.pairwise(order)):
            # forward() returns the stages in the network's order: ``channels`` must list them the same way.
            raise MobileNetError(
                f"stages {', '.join(wanted)} repeat or are out of order; expected each once, in the network's order "
                f"({', '.join(available)})"
            )
        self.feature_info = tuple(available[stage] for stage in wanted)
        last = max(info.block_index for info in self.feature_info)
        self.features = nn.Sequential(*list(model.features.children())[: last + 1])
        self._taps = {info.block_index: info.name for info in self.feature_info}
        self.in_channels = model.config.in_channels

    @property
    def channels(self) -> dict[str, int]:
        return {info.name: info.channels for info in self.feature_info}

    @property
    def reductions(self) -> dict[str, int]:
        return {info.name: info.reduction for info in self.feature_info}

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        self._check_input(x)
        outputs: OrderedDict[str, torch.Tensor] = OrderedDict()
        for index, block in enumerate(self.features):
            x = block(x)
            if index in self._taps:
                outputs[self._taps[index]] = x
        return outputs

    def _check_input(self, x: torch.Tensor) -> None:
        """A detection or segmentation head hands the backbone whatever its data gives: say what was wrong with it
        rather than the first conv's error."""
        weight = next(self.features.parameters())
        expected = f"expected a {weight.dtype} batch (N, {self.in_channels}, H, W)"
        if not isinstance(x, torch.Tensor):
            raise MobileNetError(f"the backbone's input must be a tensor, got {type(x).__name__}; {expected}")
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.dtype != weight.dtype:
            raise MobileNetError(f"the backbone's input is a {x.dtype} tensor of shape {tuple(x.shape)}; {expected}")


def create_backbone(name: str, out_stages: tuple[str, ...] | None = None, **overrides: Any) -> Backbone:
    """A registered model as a backbone returning ``{"stage1": ..., "stage5": ...}`` feature maps."""
    return Backbone(create_model(name, **overrides), out_stages=out_stages)
