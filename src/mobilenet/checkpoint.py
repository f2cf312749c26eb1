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

import hashlib
import json
import math
import os
import struct
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mobilenet.data import Preprocessing
from mobilenet.errors import MobileNetError
from mobilenet.io import atomic_path, check_output_file, loads_json, regular_file_size
from mobilenet.models import MobileNet, ModelInfo, model_from_config
from mobilenet.runtime import resolve_device
from mobilenet.spec import ModelConfig

__all__ = [
    "FORMAT_VERSION",
    "HEADER_KEY",
    "STATE_FILE",
    "Checkpoint",
    "check_checkpoint_path",
    "check_finite",
    "check_shapes",
    "check_state_dict",
    "describe_foreign",
    "is_pytorch_file",
    "load",
    "load_checkpoint",
    "read_config",
    "read_header",
    "read_raw_header",
    "read_state",
    "save",
    "state_dict_mismatch",
    "tensors_digest",
    "write_state",
]

#: The training state of a run directory (weights, optimizer, EMA, RNG, counters), beside last/best.safetensors.
STATE_FILE = "train_state.safetensors"
#: The safetensors metadata key of the training state's JSON.
STATE_KEY = "mobilenet_train_state"
#: Version of the training state's JSON: 2 added the tensors' checksum (1 is still read).
STATE_FORMAT = 2
#: Version of the JSON stored under the ``"mobilenet"`` header key; bumped on an incompatible change.
FORMAT_VERSION = 1
#: The safetensors header metadata key that holds this library's JSON.
HEADER_KEY = "mobilenet"
#: The suffixes of :mod:`mobilenet.export`'s formats, by which predict, eval and bench take a file for an exported
#: model: a checkpoint named with one could never be read back by them.
EXPORTED_MODEL_SUFFIXES = (".onnx", ".ts", ".pt2", ".pte", ".tflite")

# safetensors refuses headers above 100 MB; a length beyond that means the file is not safetensors at all.
_MAX_HEADER_BYTES = 100_000_000
# How PyTorch files begin: torch.save's default zip container, or a bare pickle (protocol >= 2 starts with PROTO).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"
_CONVERT_HINT = "mobilenet convert --from torchvision|timm FILE --model NAME --out OUT.safetensors"
# The safetensors dtypes a model's floating-point tensors may be stored in (mobilenet.save writes what the model
# holds: float32, or a half/bfloat16/double model's own type); loading casts them to the model's dtype.
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
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


def check_checkpoint_path(path: str | os.PathLike[str], what: str = "checkpoint path") -> Path:
    """``path`` as a checkpoint output: a writable file (:func:`mobilenet.io.check_output_file`) not named with an
    exported model's suffix (:data:`EXPORTED_MODEL_SUFFIXES`)."""
    suffix = Path(path).suffix.lower()
    if suffix in EXPORTED_MODEL_SUFFIXES:
        raise MobileNetError(
            f"{what} {path} ends in {suffix}, which predict, eval and bench read as an exported model, not a "
            "checkpoint; expected a name ending in .safetensors"
        )
    return check_output_file(path, what)


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
        classes: class names, one per output of the classifier (default: ``model.info.classes``).
        preprocessing: the eval preprocessing as a dict, or an object with ``to_dict()`` (``mobilenet.data``'s
            ``Preprocessing``); default ``model.info.preprocessing``.
        metadata: free-form JSON-serialisable dict stored as is.

    Returns:
        The path written.
    """
    if not isinstance(path, str | os.PathLike):
        raise MobileNetError(f"a checkpoint path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    check_checkpoint_path(path)
    model = _unwrap(model)
    config = getattr(model, "config", None)
    if not isinstance(model, MobileNet) or not isinstance(config, ModelConfig):
        raise MobileNetError(
            f"can only save a mobilenet model (with a ModelConfig in .config), got {type(model).__name__}; "
            "build it with mobilenet.create_model(...)"
        )
    # A model from load() carries its classes and preprocessing: saving it again (after fine-tuning) keeps them.
    if classes is None:
        classes = model.info.classes
    if preprocessing is None:
        preprocessing = model.info.preprocessing
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
    if isinstance(classes, str) or not all(_is_text(name) for name in classes):
        raise MobileNetError("classes must be a sequence of class-name strings (UTF-8 text), one per classifier output")
    class_list = list(classes)
    if len(class_list) != num_classes:
        raise MobileNetError(
            f"got {len(class_list)} class names for a classifier with {num_classes} outputs; expected one name per "
            "output"
        )
    return class_list


def _is_text(name: Any) -> bool:
    """A string that UTF-8 can encode: JSON's ``"\\udcff"`` escape (or a non-UTF-8 folder name) gives Python a lone
    surrogate, which no encoder, terminal or font takes."""
    if not isinstance(name, str):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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


def is_pytorch_file(first: bytes) -> bool:
    """Whether a file's first bytes are those of ``torch.save``'s zip container or of a bare pickle."""
    return first.startswith(_ZIP_MAGIC) or first.startswith(_PICKLE_PROTO)


def _export_kind(path: Path) -> str | None:
    """``".ts"`` or ``".pt2"`` when a zip file is a TorchScript or ``torch.export`` archive (by its entry names)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any("/code/" in name for name in names) and any(name.endswith("constants.pkl") for name in names):
        return ".ts"
    if any(name.endswith(("serialized_exported_program.json", "archive_format")) for name in names):
        return ".pt2"
    return None


def describe_foreign(path: Path, first: bytes) -> str | None:
    """A message for a file that is a PyTorch pickle/zip rather than safetensors, else None."""
    export = _export_kind(path) if first.startswith(_ZIP_MAGIC) else None
    if export is not None:
        return (
            f"{path} is a {'TorchScript' if export == '.ts' else 'torch.export'} archive (as `mobilenet export` "
            f"writes), not a .safetensors checkpoint; name it with the {export} suffix and give it to predict, eval "
            "or bench as it is"
        )
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


def read_raw_header(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """Parse and validate a safetensors header: the length prefix, the JSON, and that every tensor's bytes are
    present (a truncated download is refused here instead of failing half-way or being silently used)."""
    if not isinstance(path, str | os.PathLike):
        raise MobileNetError(f"a checkpoint path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    file = Path(path)
    size = regular_file_size(file, "checkpoint", "a .safetensors file written by mobilenet")
    with open(file, "rb") as handle:
        prefix = handle.read(9)
        if len(prefix) < 9:
            foreign = describe_foreign(file, prefix)
            raise MobileNetError(foreign or f"{file} is empty or truncated ({size} bytes); not a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix[:8])
        # A safetensors header is a JSON object right after the 8-byte length: check that before the magic bytes,
        # because a header length whose low byte is 0x80 also starts with the pickle opcode.
        looks_safetensors = prefix[8:9] == b"{" and 2 <= header_len <= _MAX_HEADER_BYTES
        if not looks_safetensors:
            foreign = describe_foreign(file, prefix)
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
        header = loads_json(raw.decode("utf-8"))
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
    if text is None and isinstance(metadata, dict) and STATE_KEY in metadata:
        raise MobileNetError(
            f"{file} is a training state, not a checkpoint; use last.safetensors or best.safetensors from its run "
            "directory (or continue the run with `mobilenet train ... --resume`)"
        )
    if text is None:
        raise MobileNetError(
            f"{file} is a safetensors file without mobilenet metadata (a bare state_dict, e.g. from timm); convert it "
            f"with: {_CONVERT_HINT}"
        )
    if not isinstance(text, str):  # safetensors metadata values are strings; anything else is an edited header
        raise MobileNetError(f"{file} has corrupt mobilenet metadata (not a JSON string); write it again")
    try:
        info = loads_json(text)
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
    file, header = read_raw_header(path)
    return _mobilenet_header(file, header)


def state_dict_mismatch(
    what: str, target: str, missing: Sequence[str], unexpected: Sequence[str], misshaped: Sequence[str]
) -> MobileNetError:
    """The one message for weights that do not fit a model: which keys are missing, unexpected or mis-shaped."""
    parts = [f"{what} does not fit {target} (another architecture, width or number of classes?)"]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {shorten(list(missing))}")
    if unexpected:
        # Natural order (features.2 before features.10): safetensors returns keys sorted as strings.
        parts.append(f"unexpected keys ({len(unexpected)}): {shorten(sorted(unexpected, key=_natural_key))}")
    if misshaped:
        parts.append(f"mis-shaped keys ({len(misshaped)}, theirs vs ours): {shorten(list(misshaped))}")
    return MobileNetError("; ".join(parts))


def check_shapes(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], *, what: str, target: str
) -> None:
    """Raise :func:`state_dict_mismatch`'s error unless ``found`` has exactly ``expected``'s keys and shapes."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    misshaped = [
        f"{key} {tuple(found[key])} vs {tuple(shape)}"
        for key, shape in expected.items()
        if key in found and tuple(found[key]) != tuple(shape)
    ]
    if missing or unexpected or misshaped:
        raise state_dict_mismatch(what, target, missing, unexpected, misshaped)


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The :class:`ModelConfig` a checkpoint describes, from its header alone (no tensor is read)."""
    file, header = read_raw_header(path)
    return _config_from_header(file, _mobilenet_header(file, header))


def check_state_dict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str = "the checkpoint"
) -> None:
    """Raise :class:`MobileNetError` listing the missing, unexpected and mis-shaped keys if ``state_dict`` does not
    fit ``model`` exactly (a checkpoint of another architecture or width)."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state_dict.items()}
    target = getattr(model, "name", "") or type(model).__name__
    check_shapes(expected, found, what=what, target=target)


def _natural_key(key: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in key.split("."))


def shorten(items: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... and {len(items) - limit} more"


def _config_from_header(file: Path, info: Mapping[str, Any]) -> ModelConfig:
    config_data = info["config"]
    if not isinstance(config_data, dict):
        raise MobileNetError(f"{file} has corrupt mobilenet metadata: 'config' is not an object")
    # Files written before the activation was part of the config recorded it beside the config.
    legacy_activation = info.get("activation")
    if legacy_activation is not None and "activation" not in config_data:
        if legacy_activation != "relu6":
            raise MobileNetError(f"{file} asks for activation {legacy_activation!r}; expected 'relu6'")
        config_data = {**config_data, "activation": legacy_activation}
    try:
        return ModelConfig.from_dict(config_data)
    except (TypeError, MobileNetError) as error:
        raise MobileNetError(f"{file} has an invalid model config: {error}") from None


def _info_from_header(file: Path, info: Mapping[str, Any], config: ModelConfig) -> ModelInfo:
    classes = info.get("classes")
    if classes is not None:
        if not isinstance(classes, list) or not all(_is_text(name) for name in classes):
            raise MobileNetError(
                f"{file} has corrupt mobilenet metadata: 'classes' must be a list of names (UTF-8 text) or null"
            )
        if len(classes) != config.num_classes:
            raise MobileNetError(f"{file} stores {len(classes)} class names for {config.num_classes} outputs")
    preprocessing = info.get("preprocessing")
    if preprocessing is not None:
        if not isinstance(preprocessing, dict):
            raise MobileNetError(f"{file} has corrupt mobilenet metadata: 'preprocessing' must be an object or null")
        try:
            Preprocessing.from_dict(preprocessing)
        except (TypeError, ValueError) as error:
            raise MobileNetError(f"{file} has invalid preprocessing: {error}") from None
    metadata = info.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise MobileNetError(f"{file} has corrupt mobilenet metadata: 'metadata' must be an object")
    return ModelInfo(classes=classes, preprocessing=preprocessing, origin=metadata)


def _stored_shapes(header: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(int(d) for d in entry["shape"]) for key, entry in header.items() if key != "__metadata__"}


def load_checkpoint(path: str | os.PathLike[str], *, map_location: str | Any = "cpu") -> Checkpoint:
    """Rebuild the model a checkpoint describes and load its weights (never unpickles anything).

    Everything is checked before memory is committed: the header's JSON, the config (sizes a machine cannot hold
    are refused by :func:`mobilenet.models.model_from_config`), and each stored tensor's shape against the model the
    config describes (built on the meta device, which allocates nothing). The weights' SHA-256 is checked after
    reading, and weights holding NaN or infinity are refused.

    Args:
        path: a ``.safetensors`` file written by :func:`save` or ``mobilenet convert``.
        map_location: device to load the tensors onto (``"cpu"``, ``"cuda:0"``, a ``torch.device``).

    Returns:
        A :class:`Checkpoint` whose model is in eval mode and carries its classes and preprocessing in ``.info``.
    """
    device = str(resolve_device(map_location))
    file, header = read_raw_header(path)
    info = _mobilenet_header(file, header)
    config = _config_from_header(file, info)
    name = info.get("name") or ""
    if not isinstance(name, str):
        raise MobileNetError(f"{file} has corrupt mobilenet metadata: 'name' must be a string")
    model_info = _info_from_header(file, info, config)
    with torch.device("meta"):
        skeleton = model_from_config(config, name=name)
    expected = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    check_shapes(expected, _stored_shapes(header), what=str(file), target=name or config.family)
    _check_dtypes(file, header, skeleton.state_dict())
    expected_digest = info.get("weights_sha256")
    if not isinstance(expected_digest, str):
        raise MobileNetError(
            f"{file} has no weights_sha256 checksum, so corruption could not be detected; expected a file written "
            "by mobilenet.save or `mobilenet convert`"
        )

    try:
        state_dict = load_file(str(file), device=device)
    except SafetensorError as error:
        raise MobileNetError(f"{file} could not be read as safetensors ({error}); write it again") from None
    if tensors_digest(state_dict) != expected_digest:
        raise MobileNetError(
            f"{file} is corrupt: its tensor data does not match the checksum written with it; write it again"
        )
    check_finite(state_dict, str(file))
    model = model_from_config(config, name=name)
    model.load_state_dict(state_dict, strict=True)
    model.to(device).eval()
    model.info = model_info
    return Checkpoint(
        model=model,
        name=name,
        config=config,
        classes=model_info.classes,
        preprocessing=model_info.preprocessing,
        metadata=model_info.origin,
    )


def _check_dtypes(file: Path, header: Mapping[str, Any], expected: Mapping[str, torch.Tensor]) -> None:
    """Refuse tensors stored in a type of the wrong kind (weights as integers or booleans, a counter as floats):
    ``load_state_dict`` would cast them silently into meaningless weights. Checked from the header alone."""
    wrong = [
        f"{key} {entry['dtype']}"
        for key, entry in header.items()
        if key != "__metadata__" and (entry["dtype"] in _FLOAT_DTYPES) != expected[key].is_floating_point()
    ]
    if wrong:
        raise MobileNetError(
            f"{file} stores {len(wrong)} tensor(s) in a type of the wrong kind ({shorten(wrong)}); expected weights "
            f"and BatchNorm statistics in {', '.join(_FLOAT_DTYPES)} and num_batches_tracked as an integer; write it "
            "again"
        )


def check_finite(state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse weights holding NaN or infinity (``what`` names their file): every output of such a model is NaN (or
    its ranking arbitrary), which a user would otherwise meet as confident-looking predictions. Training never saves
    them (it stops on a non-finite loss); they come from weights edited, converted or written by other code."""
    bad = [key for key, tensor in state_dict.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise MobileNetError(
            f"{what} holds NaN or infinite values in {len(bad)} tensor(s) ({shorten(bad)}): its outputs would be "
            "meaningless; use weights from before the values broke, or convert or train them again"
        )
    # A variance below zero (BatchNorm's running_var; a variance is a mean of squares) makes the normalisation's
    # square root NaN for every image.
    negative = [
        key
        for key, tensor in state_dict.items()
        if key.endswith("running_var") and tensor.is_floating_point() and bool((tensor < 0).any())
    ]
    if negative:
        raise MobileNetError(
            f"{what} holds negative BatchNorm variances in {len(negative)} tensor(s) ({shorten(negative)}): every "
            "output would be NaN; use weights from before the values broke, or convert or train them again"
        )


def load(path: str | os.PathLike[str], *, map_location: str | Any = "cpu") -> MobileNet:
    """The model stored in a checkpoint, in eval mode, with its classes and preprocessing in ``.info``."""
    return load_checkpoint(path, map_location=map_location).model


# --------------------------------------------------------------------------------------------------------------
# The training-state file (safetensors + JSON; never pickle)
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
    tensors: dict[str, torch.Tensor] = {}
    structure = _split_tensors(tensors_tree, "s", tensors)
    header = json.dumps(
        {
            "format_version": STATE_FORMAT,
            "info": info,
            "structure": structure,
            "tensors_sha256": tensors_digest(tensors),
        }
    )
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={STATE_KEY: header})


def read_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tensors tree and ``info`` of :func:`write_state`'s file, after checking its checksum (format 2 on)."""
    regular_file_size(Path(path), "training state", f"a {STATE_FILE} written by mobilenet train")
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
    try:
        header = loads_json(metadata[STATE_KEY])
        version, structure, info = header["format_version"], header["structure"], header["info"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise MobileNetError(f"{path} has a corrupt training-state header; it cannot be resumed") from None
    if not isinstance(version, int) or version > STATE_FORMAT:
        raise MobileNetError(f"{path} has state format {version!r}; this mobilenet reads up to {STATE_FORMAT}")
    if version >= 2 and header.get("tensors_sha256") != tensors_digest(tensors):
        raise MobileNetError(
            f"{path} is corrupt: its tensors do not match the checksum written with them; it cannot be resumed "
            "(start the run again, or resume from a copy)"
        )
    try:
        return _join_tensors(structure, tensors), info
    except (KeyError, TypeError, ValueError):
        raise MobileNetError(f"{path} has a corrupt training-state structure; it cannot be resumed") from None
