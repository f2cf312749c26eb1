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
from mobilenet.spec import ModelConfig

if TYPE_CHECKING:
    import torch

    from mobilenet.models import MobileNet

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "check_state_dict",
    "load",
    "load_checkpoint",
    "read_header",
    "save",
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
        model: a :class:`~mobilenet.models.MobileNet` (anything with ``.config``, ``.name`` and a ``state_dict``).
        path: the file to write; its directory is created.
        classes: class names, one per output of the classifier.
        preprocessing: the eval preprocessing as a dict, or an object with ``to_dict()`` (``mobilenet.data``'s
            ``Preprocessing``).
        metadata: free-form JSON-serialisable dict stored as is.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise MobileNetError(
            f"can only save a mobilenet model (with a ModelConfig in .config), got {type(model).__name__}; "
            "build it with mobilenet.create_model(...)"
        )
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
    try:
        # allow_nan=False: NaN/Infinity are not JSON, and other readers of the header would reject them.
        text = json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise MobileNetError(
            f"checkpoint metadata/preprocessing must be JSON-serialisable (str, numbers, lists, dicts): {error}"
        ) from None
    # safetensors wants contiguous tensors that share no storage; clone() breaks any sharing a user introduced.
    tensors = {key: value.detach().contiguous().clone() for key, value in model.state_dict().items()}
    target = Path(path)
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: text})
    return target


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
    model = model_from_config(config, name=name)
    check_state_dict(model, state_dict, what=str(file))
    model.load_state_dict(state_dict, strict=True)
    model.to(device).eval()
    model.classes = classes
    model.preprocessing = preprocessing
    return Checkpoint(
        model=model, name=name, config=config, classes=classes, preprocessing=preprocessing, metadata=metadata
    )


def load(path: str | os.PathLike[str], *, map_location: str | Any = "cpu") -> MobileNet:
    """The model stored in a checkpoint, in eval mode, with ``.classes`` and ``.preprocessing`` set."""
    return load_checkpoint(path, map_location=map_location).model
