"""Foreign weights: torchvision's and timm's MobileNet checkpoints mapped onto our layer plan, checked, converted.

Keys are mapped by walking our network's blocks (V2 paper Table 2, V1 paper Table 1), so every tensor lands in the
layer of the paper's table it belongs to; the conversion is then checked against the source library's own model
on a random batch (:func:`compare_logits`) before anything is written. PyTorch ``.pth`` files are read with
``torch.load(weights_only=True)``, which unpickles tensors and plain containers only.
"""

from __future__ import annotations

import math
import os
import pickle
import urllib.error
import urllib.parse
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from mobilenet.checkpoint import (
    HEADER_KEY,
    check_checkpoint_path,
    check_finite,
    is_pytorch_file,
    read_raw_header,
    regular_file_size,
    save,
    shorten,
    state_dict_mismatch,
)
from mobilenet.errors import MobileNetError
from mobilenet.io import check_output_file
from mobilenet.models import MobileNet, create_model
from mobilenet.parity import check_close, seeded_batch
from mobilenet.spec import (
    PUBLISHED,
    SOURCES,
    V1_SHALLOW_REMOVED,
    V1_TABLE1,
    V2_TABLE2,
    ModelConfig,
    Network,
    default_source,
    model_config,
    published_sources,
    published_text,
)

__all__ = [
    "IMAGENET_PREPROCESSING",
    "LOGIT_RTOL",
    "PUBLISHED",
    "SOURCES",
    "TIMM_NAMES",
    "ConversionReport",
    "compare_logits",
    "convert",
    "convert_state_dict",
    "default_source",
    "imagenet_classes",
    "import_weights",
    "map_state_dict",
    "module_map",
    "pretrained",
    "pretrained_with_report",
    "published_sources",
    "read_foreign_state_dict",
    "reference_model",
    "source_preprocessing",
    "timm_module_map",
    "torchvision_module_map",
]


#: The eval preprocessing of the ImageNet weights of torchvision (``MobileNet_V2_Weights.IMAGENET1K_V1``) and of
#: the classic ImageNet recipe: 224 px center crop of a 256 px resize, ImageNet mean/std.
IMAGENET_PREPROCESSING: dict[str, Any] = {
    "input_size": 224,
    "resize_size": 256,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "interpolation": "bilinear",
    "style": "imagenet",
}

#: timm's model names for our (family, alpha); timm builds them offline with ``pretrained=False``.
TIMM_NAMES: dict[tuple[str, float], str] = {
    ("v1", 1.0): "mobilenetv1_100",
    ("v1", 1.25): "mobilenetv1_125",
    ("v2", 0.35): "mobilenetv2_035",
    ("v2", 0.5): "mobilenetv2_050",
    ("v2", 0.75): "mobilenetv2_075",
    ("v2", 1.0): "mobilenetv2_100",
    ("v2", 1.4): "mobilenetv2_140",
}

_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard index order (as torchvision's weights' ``categories``),
    shipped with the package for ``predict`` with imported ImageNet weights."""
    text = files("mobilenet").joinpath("resources/imagenet_classes.txt").read_text(encoding="utf-8")
    return text.splitlines()


def _validate_source(source: str) -> str:
    if source not in SOURCES:
        raise MobileNetError(f"unknown weight source {source!r}; expected one of {', '.join(SOURCES)}")
    return source


def _conv_bn(ours: str, conv: str, bn: str) -> dict[str, str]:
    """Module map for one of our ConvBNAct (``ours`` is its path, e.g. ``features.3.depthwise``)."""
    return {f"{ours}.conv": conv, f"{ours}.bn": bn}


def _block_prefix(layer_name: str) -> str:
    return layer_name.removesuffix(".conv")


def torchvision_module_map(network: Network) -> dict[str, str]:
    """Our module paths -> torchvision ``mobilenet_v2``'s, walking the network's blocks (V2 paper Table 2).

    torchvision: ``features.0`` = stem ``[Conv2d, BatchNorm2d, ReLU6]``; each bottleneck ``features.i.conv`` is a
    Sequential of Conv-BN-ReLU6 triples (``conv.j.0``, ``conv.j.1``) followed by the linear projection as a bare
    conv and BN (``conv.k``, ``conv.k+1``); ``features.18`` the 1x1 head; ``classifier.1`` the Linear (after
    Dropout). torchvision has no V1; a V1 separable block is mapped as torchvision would name a t=1 bottleneck
    (depthwise then pointwise), so V1 weights and torchvision files are told apart by the key lists.
    """
    mapping: dict[str, str] = {}
    for index, block in enumerate(network.blocks):
        theirs = f"features.{index}"
        if block.kind == "conv":
            mapping |= _conv_bn(block.name, f"{theirs}.0", f"{theirs}.1")
            continue
        *activated, last = block.layers
        for j, layer in enumerate(activated):
            mapping |= _conv_bn(_block_prefix(layer.name), f"{theirs}.conv.{j}.0", f"{theirs}.conv.{j}.1")
        k = len(activated)
        mapping |= _conv_bn(_block_prefix(last.name), f"{theirs}.conv.{k}", f"{theirs}.conv.{k + 1}")
    mapping[network.classifier.name] = "classifier.1"
    return mapping


def _timm_stage_positions(config: ModelConfig) -> list[tuple[int, int]]:
    """(stage, index) of each body block in timm's EfficientNet-style builder.

    timm's V1 (``_gen_mobilenet_v1``) groups the separable blocks of Table 1 into five stages, a new one at each
    stride-2 row; its V2 (``_gen_mobilenet_v2``) has one stage per row of Table 2. The strides are the paper's,
    before ``small_input`` edits them.
    """
    positions: list[tuple[int, int]] = []
    if config.family == "v1":
        rows = [
            row for i, row in enumerate(V1_TABLE1) if not (config.variant == "shallow" and i in V1_SHALLOW_REMOVED)
        ][1:]
        stage, index = 0, 0
        for n, row in enumerate(rows):
            if n > 0 and row.stride > 1:
                stage, index = stage + 1, 0
            positions.append((stage, index))
            index += 1
    else:
        for stage, row in enumerate(V2_TABLE2):
            positions += [(stage, index) for index in range(row.n)]
    return positions


def timm_module_map(network: Network) -> dict[str, str]:
    """Our module paths -> timm ``mobilenetv1_*`` / ``mobilenetv2_*``'s, walking the network's blocks.

    timm: stem ``conv_stem`` + ``bn1``; ``blocks.S.I`` per stage S and block I (see :func:`_timm_stage_positions`);
    a depthwise separable block (V1, and V2's t=1 first bottleneck) is ``conv_dw, bn1, conv_pw, bn2``; an inverted
    residual is ``conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3``; V2's 1x1 head is ``conv_head`` + ``bn2``; the
    Linear is ``classifier``.
    """
    config = network.config
    blocks = list(network.blocks)
    mapping = _conv_bn(blocks[0].name, "conv_stem", "bn1")
    body = blocks[1:]
    if config.family == "v2":
        head, body = body[-1], body[:-1]
        mapping |= _conv_bn(head.name, "conv_head", "bn2")
    for block, (stage, index) in zip(body, _timm_stage_positions(config), strict=True):
        theirs = f"blocks.{stage}.{index}"
        if block.kind == "conv":  # V1 "Conv MobileNet" (Table 4): timm's ConvBnAct naming
            mapping |= _conv_bn(block.name, f"{theirs}.conv", f"{theirs}.bn1")
            continue
        names = (
            [("conv_dw", "bn1"), ("conv_pw", "bn2")]
            if len(block.layers) == 2
            else [("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")]
        )
        for layer, (conv, bn) in zip(block.layers, names, strict=True):
            mapping |= _conv_bn(_block_prefix(layer.name), f"{theirs}.{conv}", f"{theirs}.{bn}")
    mapping[network.classifier.name] = "classifier"
    return mapping


def module_map(network: Network, source: str) -> dict[str, str]:
    """Our module paths -> the ``source`` library's (``"torchvision"`` or ``"timm"``)."""
    _validate_source(source)
    return torchvision_module_map(network) if source == "torchvision" else timm_module_map(network)


def map_state_dict(
    model: MobileNet,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "torchvision",
    *,
    drop_background: bool = True,
) -> tuple[dict[str, torch.Tensor], bool]:
    """Rename a torchvision/timm ``state_dict`` to ``model``'s keys, checking every shape.

    A TF-style 1001-class head (background class at index 0) given to a 1000-class model loses its row 0 when
    ``drop_background`` is true. Returns the renamed dict and whether the background row was dropped. Raises
    :class:`MobileNetError` listing missing (their names), unexpected (theirs) and mis-shaped keys.
    """
    modules = module_map(model.network, source)
    ours = model.state_dict()
    theirs = dict(state_dict)
    renamed: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    misshaped: list[str] = []
    used: set[str] = set()
    dropped = False
    for key, value in ours.items():
        module, _, param = key.rpartition(".")
        their_key = f"{modules[module]}.{param}" if module in modules else key
        if their_key not in theirs:
            # Checkpoints written before PyTorch 0.4.1 have no BN step counter; it does not affect eval.
            if param == "num_batches_tracked":
                renamed[key] = value.clone()
            else:
                missing.append(their_key)
            continue
        used.add(their_key)
        tensor = theirs[their_key]
        if (
            module == model.network.classifier.name
            and drop_background
            and tensor.ndim >= 1
            and tensor.shape[0] == value.shape[0] + 1 == 1001
        ):
            tensor, dropped = tensor[1:], True
        if tuple(tensor.shape) != tuple(value.shape):
            misshaped.append(f"{their_key} {tuple(tensor.shape)} vs {key} {tuple(value.shape)}")
            continue
        renamed[key] = tensor
    unexpected = [key for key in theirs if key not in used]
    if missing or unexpected or misshaped:
        target = f"{model.name or 'the model'} ({model.config.family}, alpha {model.config.alpha:g})"
        raise state_dict_mismatch(f"the {source} state_dict", target, missing, unexpected, misshaped)
    return renamed, dropped


def _source_activation(config: ModelConfig, source: str) -> str | None:
    """The activation the source's weights were trained with, where it differs from the paper's.

    The V1 paper (section 3, Figure 3) says ReLU, but TF-slim's ``mobilenet_v1.py`` (``activation_fn=tf.nn.relu6``),
    Keras and timm's ``mobilenetv1_*`` all use ReLU6, and their weights rely on the clipping.
    """
    return "relu6" if source == "timm" and config.family == "v1" else config.activation


def import_weights(
    model: MobileNet,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "torchvision",
    *,
    drop_background: bool = True,
) -> MobileNet:
    """Load a torchvision or timm MobileNet ``state_dict`` into our ``model`` (in place; returned).

    Keys are mapped by walking our network's blocks (:func:`torchvision_module_map`, :func:`timm_module_map`), so
    every tensor lands in the layer of the paper's table it belongs to. A V1 model importing timm weights switches
    to ReLU6 (:meth:`~mobilenet.models.MobileNet.set_activation`: the layer plan is rebuilt, so it describes what
    runs), the activation those weights were trained with. A 1001-class TF-style head loses
    its background row for a 1000-class model. An architecture mismatch raises :class:`MobileNetError` listing the
    missing, unexpected and mis-shaped keys.
    """
    _validate_source(source)
    if not isinstance(model, MobileNet):
        raise MobileNetError(f"import_weights needs a mobilenet model (create_model(...)), got {type(model).__name__}")
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise MobileNetError("import_weights needs a state_dict: a mapping of parameter names to tensors")
    renamed, _ = map_state_dict(model, state_dict, source, drop_background=drop_background)
    model.load_state_dict(renamed, strict=True)
    activation = _source_activation(model.config, source)
    if activation != model.config.activation:
        model.set_activation(activation)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Converting foreign checkpoints (``mobilenet convert``) and downloading pretrained ImageNet weights
# ---------------------------------------------------------------------------------------------------------------

#: Logit agreement required between our converted model and the reference library's model (the issue's
#: criterion): ``max |ours - theirs| <= LOGIT_RTOL * max |theirs|``.
LOGIT_RTOL = 1e-5
# Wrappers that training scripts put around a state_dict (timm's train.py writes "state_dict" and
# "state_dict_ema"; others "model" or "model_state_dict"); the plain weights are preferred over the EMA.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema")
#: The most a foreign checkpoint may unpack to (a zip's declared uncompressed sizes, or a bare pickle's size):
#: MobileNet weights are tens of megabytes, so anything near this is not one, and torch.load would read it all
#: into memory before it could be refused.
MAX_FOREIGN_BYTES = 512 * 1024 * 1024


@dataclass
class ConversionReport:
    """What :func:`convert_state_dict` did: the check's figures and whether the background row was dropped."""

    source: str
    name: str
    num_classes: int
    dropped_background: bool
    max_abs_diff: float | None
    max_abs_reference: float | None
    reference: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "name": self.name,
            "num_classes": self.num_classes,
            "dropped_background": self.dropped_background,
            "logit_check": None
            if self.max_abs_diff is None
            else {
                "reference": self.reference,
                "max_abs_diff": self.max_abs_diff,
                "max_abs_reference": self.max_abs_reference,
                "rtol": LOGIT_RTOL,
            },
        }


def read_foreign_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a torchvision/timm checkpoint (``.pth`` via ``torch.load(weights_only=True)``, or ``.safetensors``)
    as a flat ``{name: tensor}`` dict; training wrappers (``state_dict``, ``model``) and DDP's ``module.`` prefix
    are removed; weights holding NaN or infinity are refused. Nothing but tensors and plain containers is ever
    unpickled."""
    file = Path(path)
    regular_file_size(file, "checkpoint", "a torchvision/timm .pth or .safetensors file")
    with open(file, "rb") as handle:
        prefix = handle.read(9)
    # Decide by content, not by name: a .pth renamed .safetensors is still a pickle.
    is_pytorch = is_pytorch_file(prefix)
    is_safetensors = len(prefix) == 9 and prefix[8:9] == b"{"
    if is_safetensors or (file.suffix == ".safetensors" and not is_pytorch):
        _, header = read_raw_header(file)
        metadata = header.get("__metadata__") or {}
        if isinstance(metadata, dict) and HEADER_KEY in metadata:
            raise MobileNetError(f"{file} is already a mobilenet checkpoint; load it with mobilenet.load()")
        try:
            data: Any = load_file(str(file), device="cpu")
        except SafetensorError as error:
            raise MobileNetError(f"{file} could not be read as safetensors ({error})") from None
    elif is_pytorch:
        data = _torch_load_tensors(file, prefix)
    else:
        raise MobileNetError(
            f"{file} is neither a PyTorch checkpoint (.pth, zip or pickle) nor a .safetensors file; expected the "
            "weights file of a torchvision or timm MobileNet"
        )
    state = _flatten_state_dict(file, data)
    _check_plain_weights(file, state)
    check_finite(state, str(file))
    return state


#: The dtypes a published checkpoint stores weights in, each cast exactly (or by rounding) to float32.
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_plain_weights(file: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse tensors a published checkpoint never holds: sparse, quantized or data-less (meta) tensors, on which the
    checks and the copy fail, and weights stored as integers, booleans, complex numbers or 8-bit floats, which
    ``load_state_dict`` would cast silently into meaningless weights, or which the finiteness check cannot read
    (BatchNorm's ``num_batches_tracked`` counter is an integer)."""
    odd = [key for key, value in state.items() if value.layout != torch.strided or value.is_quantized or value.is_meta]
    if odd:
        raise MobileNetError(
            f"{file} holds sparse, quantized or data-less tensors ({shorten(odd)}); expected the plain float weights "
            "torchvision/timm publish"
        )
    integral = [
        f"{key} {value.dtype}".replace("torch.", "")
        for key, value in state.items()
        if value.dtype not in _WEIGHT_DTYPES and not key.endswith("num_batches_tracked")
    ]
    if integral:
        raise MobileNetError(
            f"{file} stores weights as integers or booleans, complex numbers or 8-bit floats ({shorten(integral)}); "
            "expected the float32, float16, bfloat16 or float64 weights torchvision/timm publish"
        )


def _torch_load_tensors(file: Path, prefix: bytes) -> Any:
    """``torch.load(weights_only=True)`` after checking what the file would unpack to; torch's errors become one
    line without its advice to retry with ``weights_only=False``, which would run whatever the file holds."""
    _check_unpacked_size(file, prefix)
    try:
        # An open file, not the path: torch.load hands a path ending in .safetensors to safetensors by its name.
        with open(file, "rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation notes about what the file holds: not the user's
            return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise MobileNetError(
            f"{file} holds objects other than tensors, which are refused because unpickling them could run "
            f"code ({_torch_reason(error)}); save only model.state_dict() and convert that"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, SafetensorError) as error:
        raise MobileNetError(f"{file} is truncated or corrupt, torch.load failed: {_torch_reason(error)}") from None


def _check_unpacked_size(file: Path, prefix: bytes) -> None:
    """Refuse a PyTorch file that would unpack to more than :data:`MAX_FOREIGN_BYTES` (a zip bomb: a small
    compressed file declaring a huge pickle), from the zip's directory alone, before anything is decompressed."""
    if prefix.startswith(b"PK"):
        try:
            with zipfile.ZipFile(file) as archive:
                declared = sum(info.file_size for info in archive.infolist())
        except (zipfile.BadZipFile, OSError, ValueError) as error:
            raise MobileNetError(f"{file} is truncated or corrupt: not a readable zip ({error})") from None
    else:
        declared = file.stat().st_size
    if declared > MAX_FOREIGN_BYTES:
        raise MobileNetError(
            f"{file} would unpack to {declared:,} bytes, over the {MAX_FOREIGN_BYTES:,}-byte limit for a MobileNet "
            "checkpoint; expected the weights file of a torchvision or timm MobileNet"
        )


def _torch_reason(error: BaseException) -> str:
    """The line of a torch.load error that says what was wrong: never its advice to unpickle anyway
    (``weights_only=False``), its history notes or its documentation links."""
    noise = ("weights_only", "weights only", "documentation", "trusted source", "https://")
    for line in str(error).splitlines():
        text = line.strip()
        if text and not any(word in text.lower() for word in noise):
            return text.rstrip(".")
    return type(error).__name__


def _flatten_state_dict(file: Path, data: Any) -> dict[str, torch.Tensor]:
    if isinstance(data, Mapping) and not any(isinstance(v, torch.Tensor) for v in data.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    if not isinstance(data, Mapping) or not data:
        raise MobileNetError(f"{file} does not hold a state_dict (a dict of parameter names to tensors)")
    non_tensors = [str(key) for key, value in data.items() if not isinstance(value, torch.Tensor)]
    if non_tensors:
        raise MobileNetError(
            f"{file} is not a plain state_dict: entries {shorten(non_tensors)} are not tensors; expected "
            "{name: tensor} as torchvision/timm publish"
        )
    state = {str(key): value for key, value in data.items()}
    if all(key.startswith("module.") for key in state):  # saved from DistributedDataParallel
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def _classifier_rows(state_dict: Mapping[str, torch.Tensor], source: str) -> int:
    key = "classifier.1.weight" if source == "torchvision" else "classifier.weight"
    weight = state_dict.get(key)
    if weight is None or weight.ndim != 2:
        raise MobileNetError(
            f"no classifier {key!r} in the {source} state_dict; expected the weights of a {source} MobileNet "
            f"(is --from {source} right?)"
        )
    return int(weight.shape[0])


def reference_model(config: ModelConfig, source: str, num_classes: int) -> nn.Module:
    """The ``source`` library's own model for ``config`` (random weights), to check a conversion against."""
    _validate_source(source)
    if config.small_input or config.in_channels != 3 or config.variant != "separable":
        raise MobileNetError(
            f"{source} has no model for small_input / in_channels / variant options; use --no-check to skip the "
            "logit comparison"
        )
    if source == "torchvision":
        if config.family != "v2":
            raise MobileNetError("torchvision has no MobileNet V1; convert V1 weights with --from timm")
        return torchvision.models.mobilenet_v2(width_mult=config.alpha, num_classes=num_classes)
    timm_name = TIMM_NAMES.get((config.family, config.alpha))
    if timm_name is None:
        known = ", ".join(f"{family} alpha {alpha:g}" for family, alpha in TIMM_NAMES)
        raise MobileNetError(
            f"timm has no MobileNet {config.family} with alpha {config.alpha:g}; it has {known} (or use --no-check)"
        )
    try:
        import timm
    except ImportError:
        raise MobileNetError("the timm package is needed to check a timm conversion: pip install timm") from None
    return timm.create_model(timm_name, pretrained=False, num_classes=num_classes)


def _reference_label(config: ModelConfig, source: str, num_classes: int) -> str:
    if source == "torchvision":
        return f"torchvision.models.mobilenet_v2(width_mult={config.alpha:g}, num_classes={num_classes})"
    return f"timm.create_model({TIMM_NAMES.get((config.family, config.alpha))!r}, num_classes={num_classes})"


def compare_logits(
    ours: nn.Module,
    reference: nn.Module,
    resolution: int,
    *,
    dropped_background: bool = False,
    batch: int = 2,
    seed: int = 0,
) -> tuple[float, float]:
    """Run both models in eval mode on one random batch; return ``(max |ours - theirs|, max |theirs|)`` and raise
    :class:`MobileNetError` if the difference exceeds ``LOGIT_RTOL * max |theirs|``
    (:func:`mobilenet.parity.check_close`). With ``dropped_background`` the reference's logit 0 (TF's background
    class) is left out."""
    x = seeded_batch((batch, ours.config.in_channels, resolution, resolution), seed)
    with torch.inference_mode():
        mine = ours.eval()(x)
        theirs = reference.eval()(x)
    if dropped_background:
        theirs = theirs[:, 1:]
    diff = check_close(
        mine,
        theirs,
        what="the converted model disagrees with the reference",
        rtol=LOGIT_RTOL,
        consequence="the weights were not written",
    )
    return diff, float(theirs.abs().max())


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    name: str,
    *,
    keep_background: bool = False,
    check: bool = True,
) -> tuple[MobileNet, ConversionReport]:
    """Build our registered model ``name`` from a torchvision/timm ``state_dict`` and check it.

    The number of classes comes from the state_dict's classifier: a 1001-class TF-style head (background at index
    0) becomes 1000 classes by dropping row 0, unless ``keep_background`` (then the model has 1001 outputs).
    With ``check``, the source library's own model is loaded with the same weights and both are compared on a
    random batch (:func:`compare_logits`). 1000/1001-class models get the ImageNet class names as ``.classes``.
    """
    _validate_source(source)
    rows = _classifier_rows(state_dict, source)
    if keep_background and rows != 1001:
        raise MobileNetError(f"--keep-background applies to a 1001-class head (background first); this one has {rows}")
    drop = rows == 1001 and not keep_background
    num_classes = 1000 if drop else rows
    model = create_model(name, num_classes=num_classes)
    activation = _source_activation(model.config, source)
    if activation != model.config.activation:
        model = create_model(name, num_classes=num_classes, activation=activation)
    renamed, dropped = map_state_dict(model, state_dict, source, drop_background=drop)
    model.load_state_dict(renamed, strict=True)
    model.eval()

    diff = scale = None
    label = None
    if check:
        reference = reference_model(model.config, source, rows)
        try:
            reference.load_state_dict(dict(state_dict), strict=True)
        except RuntimeError as error:
            raise MobileNetError(f"the {source} reference model rejects these weights: {error}") from None
        label = _reference_label(model.config, source, rows)
        diff, scale = compare_logits(model, reference, model.config.resolution, dropped_background=dropped)

    if num_classes == 1000:
        model.classes = imagenet_classes()
    elif num_classes == 1001:
        model.classes = ["background", *imagenet_classes()]
    else:
        model.classes = None
    report = ConversionReport(source, name, num_classes, dropped, diff, scale, label)
    return model, report


def source_preprocessing(source: str, config: ModelConfig) -> dict[str, Any]:
    """The eval preprocessing of the source's ImageNet weights for ``config``'s model.

    torchvision: the classic 224/256 ImageNet crop with ImageNet mean/std (``IMAGENET1K_V1``). timm: the
    ``pretrained_cfg`` of the default weights of the matching timm model (e.g. ``mobilenetv1_100``'s
    ``ra4_e3600_r224_in1k`` normalises with mean = std = 0.5 and bicubic resizing at crop 0.875).
    """
    if source == "timm":
        timm_name = TIMM_NAMES.get((config.family, config.alpha))
        if timm_name is not None:
            try:
                import timm

                cfg = timm.create_model(timm_name, pretrained=False).pretrained_cfg
            except ImportError:
                cfg = None
            if cfg:
                return _timm_preprocessing(cfg)
    return dict(IMAGENET_PREPROCESSING)


def _timm_preprocessing(cfg: Mapping[str, Any]) -> dict[str, Any]:
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    crop_pct = float(cfg.get("crop_pct", 0.875))
    interpolation = cfg.get("interpolation", "bilinear")
    return {
        "input_size": size,
        # timm's eval transform resizes to floor(size / crop_pct) before the center crop.
        "resize_size": math.floor(size / crop_pct),
        "mean": [float(v) for v in cfg.get("mean", IMAGENET_PREPROCESSING["mean"])],
        "std": [float(v) for v in cfg.get("std", IMAGENET_PREPROCESSING["std"])],
        "interpolation": interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear",
        "style": "imagenet",
    }


def convert(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    source: str,
    name: str,
    keep_background: bool = False,
    check: bool = True,
    preprocessing: Mapping[str, Any] | None = None,
) -> ConversionReport:
    """``mobilenet convert``: a torchvision/timm checkpoint file becomes our ``.safetensors`` checkpoint ``out``
    (with classes, preprocessing and the conversion report in its metadata), after the logit check passes."""
    _validate_source(source)
    check_checkpoint_path(out, "--out")
    check_output_file(out, "--out", inputs=[path])
    state_dict = read_foreign_state_dict(path)
    model, report = convert_state_dict(state_dict, source, name, keep_background=keep_background, check=check)
    prep = dict(preprocessing) if preprocessing is not None else source_preprocessing(source, model.config)
    metadata = {"converted_from": Path(path).name, **report.to_dict()}
    save(model, out, classes=model.classes, preprocessing=prep, metadata=metadata)
    return report


def pretrained(name: str, source: str = "torchvision", *, check: bool = True) -> MobileNet:
    """Our model ``name`` with the ImageNet weights published by torchvision or timm (downloaded, cached by
    torch.hub / Hugging Face Hub), converted and checked as :func:`convert_state_dict` does; the conversion report
    is in ``model.info.origin``.

    torchvision publishes V2 1.0 only (``MobileNet_V2_Weights.DEFAULT``); timm publishes V1 1.0 and V2 0.5 to 1.4
    (see :data:`TIMM_NAMES`). Offline, a :class:`MobileNetError` says so and how to convert a local file instead.
    """
    return pretrained_with_report(name, source, check=check)[0]


def pretrained_with_report(
    name: str, source: str = "torchvision", *, check: bool = True
) -> tuple[MobileNet, ConversionReport]:
    """:func:`pretrained` and the :class:`ConversionReport` of its check."""
    _validate_source(source)
    config = model_config(name)
    if source not in published_sources(config):
        raise MobileNetError(f"{source} publishes no ImageNet weights for {name}; published: {published_text()}")
    try:
        if source == "torchvision":
            state_dict, prep = _download_torchvision(config)
        else:
            state_dict, prep = _download_timm(config)
    except (urllib.error.URLError, OSError, ConnectionError, TimeoutError) as error:
        url, cache = _download_location(source, config)
        raise MobileNetError(
            f"could not download the {source} weights for {name} from {url} into {cache} (network unreachable? "
            f"{type(error).__name__}: {error}); download the weights file elsewhere and run: mobilenet convert "
            f"--from {source} FILE --model {name} --out OUT.safetensors"
        ) from None
    model, report = convert_state_dict(state_dict, source, name, check=check)
    model.preprocessing = prep
    model.info.origin = report.to_dict()
    return model, report


def _download_torchvision(config: ModelConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if config.family != "v2" or config.alpha != 1.0:
        raise MobileNetError(
            "torchvision publishes ImageNet weights for MobileNet V2 alpha 1.0 only; use source='timm' for others"
        )
    weights = torchvision.models.MobileNet_V2_Weights.DEFAULT
    cached = _torchvision_cache_file(weights.url)
    if os.path.lexists(cached):
        # torch.hub loads a cached file without checking it: a FIFO there would block the read forever.
        regular_file_size(cached, "the cached torchvision weights", f"the file downloaded from {weights.url}")
    try:
        state_dict = torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, zipfile.BadZipFile) as error:
        raise MobileNetError(
            f"the torchvision weights {cached} (from {weights.url}) could not be read ({_torch_reason(error)}); "
            "delete the file to download it again"
        ) from None
    transforms = weights.transforms()
    prep = dict(
        IMAGENET_PREPROCESSING,
        input_size=int(transforms.crop_size[0]),
        resize_size=int(transforms.resize_size[0]),
    )
    return dict(state_dict), prep


def _torchvision_cache_file(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps ``url``'s file (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name


def _download_location(source: str, config: ModelConfig) -> tuple[str, str]:
    """The URL the weights of ``source`` come from and the cache they are kept in, for the offline message."""
    if source == "torchvision":
        url = torchvision.models.MobileNet_V2_Weights.DEFAULT.url
        return url, str(_torchvision_cache_file(url).parent)
    name = TIMM_NAMES.get((config.family, config.alpha), "")
    import timm  # only reached after a timm download failed, so it is installed

    pretrained_cfg = timm.models.get_pretrained_cfg(name) if name else None
    hub_id = getattr(pretrained_cfg, "hf_hub_id", None) or f"timm/{name}"  # the tagged repository timm downloads
    url = f"https://huggingface.co/{hub_id}"
    try:  # timm downloads through huggingface_hub, which resolves its cache from the environment
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return url, "huggingface_hub's cache"
    return url, HF_HUB_CACHE


def _download_timm(config: ModelConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    timm_name = TIMM_NAMES.get((config.family, config.alpha))
    if timm_name is None:
        raise MobileNetError(f"timm publishes no MobileNet {config.family} weights for alpha {config.alpha:g}")
    import timm

    model = timm.create_model(timm_name, pretrained=True)
    return dict(model.state_dict()), _timm_preprocessing(model.pretrained_cfg)
