"""Checkpoints: one ``.safetensors`` file with the weights and, in its header, everything needed to rebuild the model.

Format (``format_version`` 1): a standard safetensors file whose tensors are the model's ``state_dict`` (contiguous,
in the model's dtype) and whose header metadata has one key, ``"mobilenet"``, holding a JSON object::

    {"format_version": 1, "name": "mobilenet_v2_1.0_224", "config": {...ModelConfig.to_dict()...},
     "classes": [...] | null, "preprocessing": {...} | null, "metadata": {...}}

Why safetensors and not ``torch.save``: a pickle can run arbitrary code when it is loaded, so a checkpoint received
from someone else would be a program. safetensors is a JSON header plus raw little-endian tensor bytes: loading it
reads numbers and nothing else, it can be memory-mapped, and its header is readable without reading the tensors
(:func:`read_header`). This module never unpickles a user's file; a PyTorch ``.pth`` given where a checkpoint is
expected is recognised by its first bytes and refused with the command that converts it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobilenet.errors import MobileNetError
from mobilenet.io import atomic_path
from mobilenet.spec import ModelConfig, Network

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mobilenet.models import MobileNet

__all__ = [
    "FORMAT_VERSION",
    "SOURCES",
    "Checkpoint",
    "ConversionReport",
    "check_state_dict",
    "compare_logits",
    "convert",
    "convert_state_dict",
    "imagenet_classes",
    "import_weights",
    "load",
    "load_checkpoint",
    "map_state_dict",
    "module_map",
    "pretrained",
    "read_foreign_state_dict",
    "read_header",
    "reference_model",
    "save",
    "use_relu6",
]

#: Version of the JSON stored under the ``"mobilenet"`` header key; bumped on an incompatible change.
FORMAT_VERSION = 1
#: The safetensors header metadata key that holds this library's JSON.
HEADER_KEY = "mobilenet"

# safetensors refuses headers above 100 MB; a length beyond that means the file is not safetensors at all.
_MAX_HEADER_BYTES = 100_000_000
# How PyTorch files begin: torch.save's default zip container, or a bare pickle (protocol >= 2 starts with PROTO).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"
_CONVERT_HINT = "mobilenet convert --from torchvision|timm FILE --model NAME --out OUT.safetensors"
# Bytes per element of the safetensors dtypes, to check that the data section is complete.
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (in eval mode) and what was stored beside its weights.

    Attributes:
        model: the :class:`~mobilenet.models.MobileNet`, weights loaded, in eval mode.
        name: the registered name it was built from (``""`` for a custom config).
        config: the :class:`~mobilenet.spec.ModelConfig` that rebuilds the architecture.
        classes: class names, index = logit index, or None.
        preprocessing: the eval preprocessing dict (``input_size``, ``resize_size``, ``mean``, ``std``,
            ``interpolation``, ``style``; see :mod:`mobilenet.data`) or None.
        metadata: free-form JSON the writer added (training run, source of imported weights, ...).
    """

    model: MobileNet
    name: str
    config: ModelConfig
    classes: list[str] | None
    preprocessing: dict[str, Any] | None
    metadata: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------


def save(
    model: MobileNet,
    path: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    preprocessing: Mapping[str, Any] | Any | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as one ``.safetensors`` checkpoint, atomically (a crash leaves the previous file intact).

    Args:
        model: a :class:`~mobilenet.models.MobileNet`, possibly wrapped by ``torch.compile`` or
            DistributedDataParallel (the wrapper's key prefixes are not stored).
        path: the file to write; its directory is created.
        classes: class names, one per output of the classifier (default: ``model.classes`` if set, as
            :func:`load` sets it).
        preprocessing: the eval preprocessing as a dict, or an object with ``to_dict()`` (``mobilenet.data``'s
            ``Preprocessing``); default ``model.preprocessing`` if set.
        metadata: free-form JSON-serialisable dict stored as is.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    model = _unwrap(model)
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise MobileNetError(
            f"can only save a mobilenet model (with a ModelConfig in .config), got {type(model).__name__}; "
            "build it with mobilenet.create_model(...)"
        )
    # A model from load() carries its classes and preprocessing: saving it again (after fine-tuning) keeps them.
    if classes is None:
        classes = getattr(model, "classes", None)
    if preprocessing is None:
        preprocessing = getattr(model, "preprocessing", None)
    class_list = _validate_classes(classes, config.num_classes)
    preprocessing_dict = _preprocessing_dict(preprocessing)
    header = {
        "format_version": FORMAT_VERSION,
        "name": str(getattr(model, "name", "") or ""),
        "config": config.to_dict(),
        "classes": class_list,
        "preprocessing": preprocessing_dict,
        "metadata": dict(metadata) if metadata is not None else {},
    }
    # Written only when a V1 model was switched to ReLU6 for imported weights (see use_relu6), so files of
    # models built from the config alone keep exactly the keys above.
    if getattr(model, "activation", None) == "relu6":
        header["activation"] = "relu6"
    try:
        # allow_nan=False: NaN/Infinity are not JSON, and other readers of the header would reject them.
        text = json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise MobileNetError(
            f"checkpoint metadata/preprocessing must be JSON-serialisable (str, numbers, lists, dicts): {error}"
        ) from None
    # safetensors wants contiguous tensors that share no storage; clone() breaks any sharing a user introduced.
    tensors = {key: value.detach().contiguous().clone() for key, value in model.state_dict().items()}
    # safetensors has no checksum: a flipped or overwritten byte in the data would load silently as a wrong
    # weight. The digest of the tensors lets load_checkpoint refuse such a file.
    header["weights_sha256"] = tensors_digest(tensors)
    text = json.dumps(header, allow_nan=False)
    target = Path(path)
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: text})
    return target


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and raw bytes of ``tensors`` in sorted name order."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # view as bytes: works for every dtype, including bfloat16 that NumPy lacks.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _unwrap(model: Any) -> Any:
    """The MobileNet inside ``torch.compile`` (``_orig_mod``) or DistributedDataParallel / DataParallel
    (``module``) wrappers, whose state_dict keys carry a prefix that would not fit the rebuilt model."""
    for _ in range(4):
        if isinstance(getattr(model, "config", None), ModelConfig) and not hasattr(model, "_orig_mod"):
            return model
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if inner is None:
            return model
        model = inner
    return model


def _validate_classes(classes: Sequence[str] | None, num_classes: int) -> list[str] | None:
    if classes is None:
        return None
    if isinstance(classes, str) or not all(isinstance(name, str) for name in classes):
        raise MobileNetError("classes must be a sequence of class-name strings, one per classifier output")
    class_list = list(classes)
    if len(class_list) != num_classes:
        raise MobileNetError(
            f"got {len(class_list)} class names for a classifier with {num_classes} outputs; expected one name per "
            "output"
        )
    return class_list


def _preprocessing_dict(preprocessing: Mapping[str, Any] | Any | None) -> dict[str, Any] | None:
    if preprocessing is None:
        return None
    if hasattr(preprocessing, "to_dict"):
        preprocessing = preprocessing.to_dict()
    if not isinstance(preprocessing, Mapping):
        raise MobileNetError(
            f"preprocessing must be a dict (input_size, resize_size, mean, std, interpolation, style) or an object "
            f"with to_dict(), got {type(preprocessing).__name__}"
        )
    # Tuples become lists so the dict read back equals the one JSON stores.
    return json.loads(json.dumps(dict(preprocessing)))


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def _describe_foreign(path: Path, first: bytes) -> str | None:
    """A message for a file that is a PyTorch pickle/zip rather than safetensors, else None."""
    if first.startswith(_ZIP_MAGIC):
        kind = "a PyTorch zip checkpoint (torch.save)"
    elif first.startswith(_PICKLE_PROTO):
        kind = "a PyTorch pickle checkpoint (torch.save)"
    else:
        return None
    return (
        f"{path} is {kind}, not a mobilenet .safetensors checkpoint; pickles are never loaded here because they can "
        f"run code. Convert it with: {_CONVERT_HINT}"
    )


def _read_raw_header(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """Parse and validate a safetensors header: the length prefix, the JSON, and that every tensor's bytes are
    present (a truncated download is refused here instead of failing half-way or being silently used)."""
    file = Path(path)
    if not file.exists():
        raise MobileNetError(f"checkpoint {file} does not exist; expected a .safetensors file written by mobilenet")
    if file.is_dir():
        raise MobileNetError(f"checkpoint {file} is a directory; expected a .safetensors file")
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(9)
        if len(prefix) < 9:
            foreign = _describe_foreign(file, prefix)
            raise MobileNetError(foreign or f"{file} is empty or truncated ({size} bytes); not a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix[:8])
        # A safetensors header is a JSON object right after the 8-byte length: check that before the magic bytes,
        # because a header length whose low byte is 0x80 also starts with the pickle opcode.
        looks_safetensors = prefix[8:9] == b"{" and 2 <= header_len <= _MAX_HEADER_BYTES
        if not looks_safetensors:
            foreign = _describe_foreign(file, prefix)
            raise MobileNetError(
                foreign
                or f"{file} is not a safetensors file (no JSON header after the length prefix); expected a "
                f".safetensors checkpoint written by mobilenet.save or `mobilenet convert`"
            )
        if 8 + header_len > size:
            raise MobileNetError(
                f"{file} is truncated: its header says {header_len} bytes but the file has {size - 8} after the "
                "length prefix; download or write it again"
            )
        handle.seek(8)
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MobileNetError(f"{file} has a corrupt safetensors header ({error}); write it again") from None
    if not isinstance(header, dict):
        raise MobileNetError(f"{file} has a corrupt safetensors header (not a JSON object); write it again")
    data_len = size - 8 - header_len
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, stop = (int(v) for v in info["data_offsets"])
            count = math.prod(int(d) for d in info["shape"])
            itemsize = _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise MobileNetError(f"{file} has a corrupt safetensors header (bad entry for {key!r})") from None
        if stop - start != count * itemsize or start < 0:
            raise MobileNetError(
                f"{file} is corrupt: tensor {key!r} has {stop - start} bytes for shape {info['shape']}"
            )
        end = max(end, stop)
    if end > data_len:
        raise MobileNetError(
            f"{file} is truncated: its tensors need {end} bytes of data but only {data_len} are present; download or "
            "write it again"
        )
    return file, header


def _mobilenet_header(file: Path, header: Mapping[str, Any]) -> dict[str, Any]:
    metadata = header.get("__metadata__") or {}
    text = metadata.get(HEADER_KEY) if isinstance(metadata, dict) else None
    if text is None:
        raise MobileNetError(
            f"{file} is a safetensors file without mobilenet metadata (a bare state_dict, e.g. from timm); convert it "
            f"with: {_CONVERT_HINT}"
        )
    try:
        info = json.loads(text)
    except json.JSONDecodeError as error:
        raise MobileNetError(f"{file} has corrupt mobilenet metadata ({error})") from None
    if not isinstance(info, dict) or "config" not in info:
        raise MobileNetError(f"{file} has corrupt mobilenet metadata (no 'config'); expected format_version 1")
    version = info.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise MobileNetError(f"{file} has an invalid format_version {version!r}; expected an integer >= 1")
    if version > FORMAT_VERSION:
        raise MobileNetError(
            f"{file} has format_version {version}, newer than this mobilenet understands ({FORMAT_VERSION}); "
            "upgrade the mobilenet package"
        )
    return info


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's ``"mobilenet"`` JSON (name, config, classes, preprocessing, metadata), without reading
    any tensor data. The file's structure is checked (a truncated file raises :class:`MobileNetError`)."""
    file, header = _read_raw_header(path)
    return _mobilenet_header(file, header)


def check_state_dict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str = "the checkpoint"
) -> None:
    """Raise :class:`MobileNetError` listing the missing, unexpected and mis-shaped keys if ``state_dict`` does not
    fit ``model`` exactly (a checkpoint of another architecture or width)."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    # Natural order (features.2 before features.10): safetensors returns keys sorted as strings.
    unexpected = sorted((key for key in state_dict if key not in expected), key=_natural_key)
    misshaped = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != tuple(value.shape)
    ]
    if not (missing or unexpected or misshaped):
        return
    name = getattr(model, "name", "") or type(model).__name__
    parts = [f"{what} does not fit {name} (another architecture, width or number of classes?)"]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_shorten(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_shorten(unexpected)}")
    if misshaped:
        parts.append(f"mis-shaped keys ({len(misshaped)}, theirs vs ours): {_shorten(misshaped)}")
    raise MobileNetError("; ".join(parts))


def _natural_key(key: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in key.split("."))


def _shorten(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... and {len(items) - limit} more"


def load_checkpoint(path: str | os.PathLike[str], *, map_location: str | Any = "cpu") -> Checkpoint:
    """Rebuild the model a checkpoint describes and load its weights (never unpickles anything).

    Args:
        path: a ``.safetensors`` file written by :func:`save` or ``mobilenet convert``.
        map_location: device to load the tensors onto (``"cpu"``, ``"cuda:0"``, a ``torch.device``).

    Returns:
        A :class:`Checkpoint` whose model is in eval mode and has ``.classes`` and ``.preprocessing`` set.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mobilenet.models import model_from_config

    file, header = _read_raw_header(path)
    info = _mobilenet_header(file, header)
    config_data = info["config"]
    if not isinstance(config_data, dict):
        raise MobileNetError(f"{file} has corrupt mobilenet metadata: 'config' is not an object")
    try:
        config = ModelConfig.from_dict(config_data)
    except TypeError as error:
        raise MobileNetError(f"{file} has an invalid model config: {error}") from None
    name = str(info.get("name") or "")
    classes = info.get("classes")
    if classes is not None and (not isinstance(classes, list) or len(classes) != config.num_classes):
        raise MobileNetError(f"{file} stores {len(classes)} class names for {config.num_classes} outputs")
    preprocessing = info.get("preprocessing")
    metadata = info.get("metadata") or {}

    device = str(torch.device(map_location))
    try:
        state_dict = load_file(str(file), device=device)
    except SafetensorError as error:
        raise MobileNetError(f"{file} could not be read as safetensors ({error}); write it again") from None
    expected_digest = info.get("weights_sha256")
    if expected_digest is not None and tensors_digest(state_dict) != expected_digest:
        raise MobileNetError(
            f"{file} is corrupt: its tensor data does not match the checksum written with it; write it again"
        )
    model = model_from_config(config, name=name)
    check_state_dict(model, state_dict, what=str(file))
    model.load_state_dict(state_dict, strict=True)
    activation = info.get("activation")
    if activation == "relu6":
        use_relu6(model)
    elif activation is not None:
        raise MobileNetError(f"{file} asks for activation {activation!r}; this mobilenet knows only 'relu6'")
    model.to(device).eval()
    model.classes = classes
    model.preprocessing = preprocessing
    return Checkpoint(
        model=model, name=name, config=config, classes=classes, preprocessing=preprocessing, metadata=metadata
    )


def load(path: str | os.PathLike[str], *, map_location: str | Any = "cpu") -> MobileNet:
    """The model stored in a checkpoint, in eval mode, with ``.classes`` and ``.preprocessing`` set."""
    return load_checkpoint(path, map_location=map_location).model


# ---------------------------------------------------------------------------------------------------------------
# Importing torchvision / timm weights
# ---------------------------------------------------------------------------------------------------------------

#: Where foreign weights come from.
SOURCES: tuple[str, ...] = ("torchvision", "timm")

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
    from importlib.resources import files

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
    from mobilenet.spec import V1_SHALLOW_REMOVED, V1_TABLE1, V2_TABLE2

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


def _mismatch_error(
    what: str, target: str, missing: list[str], unexpected: list[str], misshaped: list[str]
) -> MobileNetError:
    parts = [f"{what} does not fit {target} (another architecture, width or number of classes?)"]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_shorten(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_shorten(unexpected)}")
    if misshaped:
        parts.append(f"mis-shaped keys ({len(misshaped)}, theirs vs ours): {_shorten(misshaped)}")
    return MobileNetError("; ".join(parts))


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
    unexpected = sorted((key for key in theirs if key not in used), key=_natural_key)
    if missing or unexpected or misshaped:
        target = f"{model.name or 'the model'} ({model.config.family}, alpha {model.config.alpha:g})"
        raise _mismatch_error(f"the {source} state_dict", target, missing, unexpected, misshaped)
    return renamed, dropped


def use_relu6(model: MobileNet) -> MobileNet:
    """Replace every ReLU of ``model`` by ReLU6, for V1 weights trained with ReLU6.

    The V1 paper (section 3, Figure 3) says ReLU, but TF-slim's ``mobilenet_v1.py`` (``activation_fn=tf.nn.relu6``),
    Keras and timm's ``mobilenetv1_*`` all use ReLU6, and their weights rely on the clipping. The choice is recorded
    as ``model.activation = "relu6"`` and stored in checkpoints, so :func:`load` rebuilds it.
    """
    from torch import nn

    for parent in model.modules():
        for child_name, child in parent.named_children():
            if type(child) is nn.ReLU:
                setattr(parent, child_name, nn.ReLU6(inplace=True))
    model.activation = "relu6"
    return model


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
    to ReLU6 (:func:`use_relu6`), the activation those weights were trained with. A 1001-class TF-style head loses
    its background row for a 1000-class model. An architecture mismatch raises :class:`MobileNetError` listing the
    missing, unexpected and mis-shaped keys.
    """
    import torch

    from mobilenet.models import MobileNet

    _validate_source(source)
    if not isinstance(model, MobileNet):
        raise MobileNetError(f"import_weights needs a mobilenet model (create_model(...)), got {type(model).__name__}")
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise MobileNetError("import_weights needs a state_dict: a mapping of parameter names to tensors")
    renamed, _ = map_state_dict(model, state_dict, source, drop_background=drop_background)
    model.load_state_dict(renamed, strict=True)
    if source == "timm" and model.config.family == "v1":
        use_relu6(model)
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
    are removed. Nothing but tensors and plain containers is ever unpickled."""
    import pickle
    import zipfile

    import torch

    file = Path(path)
    if not file.exists():
        raise MobileNetError(f"checkpoint {file} does not exist; expected a torchvision/timm .pth or .safetensors file")
    if file.is_dir():
        raise MobileNetError(f"checkpoint {file} is a directory; expected a .pth or .safetensors file")
    with open(file, "rb") as handle:
        prefix = handle.read(9)
    # Decide by content, not by name: a .pth renamed .safetensors is still a pickle.
    is_pytorch = prefix.startswith(_ZIP_MAGIC) or prefix.startswith(_PICKLE_PROTO)
    is_safetensors = len(prefix) == 9 and prefix[8:9] == b"{"
    if is_safetensors or (file.suffix == ".safetensors" and not is_pytorch):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        _, header = _read_raw_header(file)
        metadata = header.get("__metadata__") or {}
        if isinstance(metadata, dict) and HEADER_KEY in metadata:
            raise MobileNetError(f"{file} is already a mobilenet checkpoint; load it with mobilenet.load()")
        try:
            data: Any = load_file(str(file), device="cpu")
        except SafetensorError as error:
            raise MobileNetError(f"{file} could not be read as safetensors ({error})") from None
    elif is_pytorch:
        try:
            data = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else "unsupported object"
            raise MobileNetError(
                f"{file} holds objects other than tensors, which are refused because unpickling them could run "
                f"code ({first_line}); save only model.state_dict() and convert that"
            ) from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as error:
            raise MobileNetError(f"{file} is truncated or corrupt, torch.load failed: {error}") from None
    else:
        raise MobileNetError(
            f"{file} is neither a PyTorch checkpoint (.pth, zip or pickle) nor a .safetensors file; expected the "
            "weights file of a torchvision or timm MobileNet"
        )
    return _flatten_state_dict(file, data)


def _flatten_state_dict(file: Path, data: Any) -> dict[str, torch.Tensor]:
    import torch

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
            f"{file} is not a plain state_dict: entries {_shorten(non_tensors)} are not tensors; expected "
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
        import torchvision

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
    :class:`MobileNetError` if the difference exceeds ``LOGIT_RTOL * max |theirs|``. With ``dropped_background``
    the reference's logit 0 (TF's background class) is left out."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, resolution, resolution, generator=generator)
    ours.eval()
    reference.eval()
    with torch.no_grad():
        mine = ours(x).double()
        theirs = reference(x).double()
    if dropped_background:
        theirs = theirs[:, 1:]
    if mine.shape != theirs.shape:
        raise MobileNetError(f"logit shapes differ: ours {tuple(mine.shape)}, reference {tuple(theirs.shape)}")
    diff = (mine - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    if not diff <= LOGIT_RTOL * scale:
        raise MobileNetError(
            f"converted model disagrees with the reference: max |ours - theirs| = {diff:.3g} > {LOGIT_RTOL:g} * "
            f"max |theirs| = {LOGIT_RTOL * scale:.3g}; the weights were not written"
        )
    return diff, scale


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
    import torch

    from mobilenet.models import create_model

    _validate_source(source)
    rows = _classifier_rows(state_dict, source)
    if keep_background and rows != 1001:
        raise MobileNetError(f"--keep-background applies to a 1001-class head (background first); this one has {rows}")
    drop = rows == 1001 and not keep_background
    num_classes = 1000 if drop else rows
    model = create_model(name, num_classes=num_classes)
    renamed, dropped = map_state_dict(model, state_dict, source, drop_background=drop)
    model.load_state_dict(renamed, strict=True)
    if source == "timm" and model.config.family == "v1":
        use_relu6(model)
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
        with torch.no_grad():
            diff, scale = compare_logits(model, reference, model.config.resolution, dropped_background=dropped)

    if num_classes == 1000:
        model.classes = imagenet_classes()
    elif num_classes == 1001:
        model.classes = ["background", *imagenet_classes()]
    else:
        model.classes = None
    report = ConversionReport(source, name, num_classes, dropped, diff, scale, label)
    return model, report


def default_preprocessing(source: str, config: ModelConfig) -> dict[str, Any]:
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
    state_dict = read_foreign_state_dict(path)
    model, report = convert_state_dict(state_dict, source, name, keep_background=keep_background, check=check)
    prep = dict(preprocessing) if preprocessing is not None else default_preprocessing(source, model.config)
    metadata = {"converted_from": Path(path).name, **report.to_dict()}
    save(model, out, classes=model.classes, preprocessing=prep, metadata=metadata)
    return report


def pretrained(name: str, source: str = "torchvision", *, check: bool = True) -> MobileNet:
    """Our model ``name`` with the ImageNet weights published by torchvision or timm (downloaded, cached by
    torch.hub / Hugging Face Hub), converted and checked as :func:`convert_state_dict` does.

    torchvision publishes V2 1.0 only (``MobileNet_V2_Weights.DEFAULT``); timm publishes V1 1.0 and V2 0.5 to 1.4
    (see :data:`TIMM_NAMES`). Offline, a :class:`MobileNetError` says so and how to convert a local file instead.
    """
    import urllib.error

    from mobilenet.spec import model_config

    _validate_source(source)
    config = model_config(name)
    try:
        if source == "torchvision":
            state_dict, prep = _download_torchvision(config)
        else:
            state_dict, prep = _download_timm(config)
    except (urllib.error.URLError, OSError, ConnectionError, TimeoutError) as error:
        raise MobileNetError(
            f"could not download the {source} weights for {name} (network unreachable? {type(error).__name__}: "
            f"{error}); download the weights file elsewhere and run: mobilenet convert --from {source} FILE "
            f"--model {name} --out OUT.safetensors"
        ) from None
    model, report = convert_state_dict(state_dict, source, name, check=check)
    model.preprocessing = prep
    model.conversion = report
    return model


def _download_torchvision(config: ModelConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import torch
    import torchvision

    if config.family != "v2" or config.alpha != 1.0:
        raise MobileNetError(
            "torchvision publishes ImageNet weights for MobileNet V2 alpha 1.0 only; use source='timm' for others"
        )
    weights = torchvision.models.MobileNet_V2_Weights.DEFAULT
    state_dict = torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True, weights_only=True)
    transforms = weights.transforms()
    prep = dict(
        IMAGENET_PREPROCESSING,
        input_size=int(transforms.crop_size[0]),
        resize_size=int(transforms.resize_size[0]),
    )
    return dict(state_dict), prep


def _download_timm(config: ModelConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    timm_name = TIMM_NAMES.get((config.family, config.alpha))
    if timm_name is None:
        raise MobileNetError(f"timm publishes no MobileNet {config.family} weights for alpha {config.alpha:g}")
    import timm

    model = timm.create_model(timm_name, pretrained=True)
    return dict(model.state_dict()), _timm_preprocessing(model.pretrained_cfg)
