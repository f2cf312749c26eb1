"""mobilenet: the MobileNet family (V1: Howard et al. 2017; V2: Sandler et al. 2018) on PyTorch.

The light parts (the architecture spec and the cost model) import without torch; the rest is imported on first
use, so ``import mobilenet`` and ``mobilenet cost`` stay instant.
"""

from __future__ import annotations

import importlib
from typing import Any

from mobilenet.errors import MobileNetError
from mobilenet.spec import ModelConfig, build_network, list_models, model_config, network_for

__version__ = "0.1.0"

# Public names served lazily: name -> module that defines it.
_LAZY = {
    "MobileNet": "mobilenet.models",
    "Backbone": "mobilenet.models",
    "create_model": "mobilenet.hub",
    "create_backbone": "mobilenet.models",
    "model_from_config": "mobilenet.models",
    "ModelInfo": "mobilenet.models",
    "save": "mobilenet.checkpoint",
    "load": "mobilenet.checkpoint",
    "load_checkpoint": "mobilenet.checkpoint",
    "import_weights": "mobilenet.convert",
    "pretrained": "mobilenet.convert",
    "imagenet_classes": "mobilenet.convert",
    "count_costs": "mobilenet.cost",
    "layer_cost": "mobilenet.cost",
    "TrainConfig": "mobilenet.train",
    "Predictor": "mobilenet.predict",
}

__all__ = [
    "MobileNetError",
    "ModelConfig",
    "build_network",
    "list_models",
    "model_config",
    "network_for",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mobilenet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
