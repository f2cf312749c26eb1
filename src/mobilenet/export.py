"""Export a MobileNet for deployment: ONNX, TorchScript, ``torch.export`` (``.pt2``), ExecuTorch (``.pte``) and
LiteRT (``.tflite``).

Every exporter works on a copy of the model with BatchNorm folded into the preceding convolution
(:func:`fold_batchnorm`): at inference a BatchNorm is an affine map per channel, so it disappears into the conv's
weights and bias, and the exported graph is the papers' "conv, ReLU" stack with no normalisation node (the V1
paper, section 3.1, counts BN with its conv; the V2 paper's Table 1 block is conv, ReLU6, dwise conv, ReLU6, linear
conv). ReLU6 (V2 paper section 3.1: "ReLU6 as the non-linearity because of its robustness when used with
low-precision computation") becomes one ONNX ``Clip(0, 6)`` node.

Every file is written to a temporary path and checked there before it replaces the target (:mod:`mobilenet.io`):
ONNX with ``onnx.checker`` and ONNX Runtime, the others with their own loader/runtime, each run on a batch of two
inputs (the batch dimension is dynamic) and compared with PyTorch's logits (max abs diff <= ``atol``, 1e-4 by
default). A file that fails the check is never left at the target path.

The model's name, config, class names and eval preprocessing travel with the file: ONNX ``metadata_props``,
TorchScript and ``.pt2`` extra files, and a ``.json`` file beside an ExecuTorch ``.pte`` or a LiteRT ``.tflite``
(``<file>.json``: those formats have no free-form metadata section this library writes).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import itertools
import json
import logging
import os
import re
import struct
import sys
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

try:
    from torch.onnx import _constants as _torch_onnx_constants
except ImportError:  # pragma: no cover - a torch that moved it
    _torch_onnx_constants = None

from mobilenet.data import resolve_preprocessing
from mobilenet.errors import INSTALL_HINTS, MobileNetError
from mobilenet.io import (
    atomic_path,
    atomic_write_text,
    check_output_file,
    loads_json,
    read_regular_file,
    regular_file_size,
)
from mobilenet.parity import compare_to_reference, seeded_batch

__all__ = [
    "EXPORT_FORMATS",
    "INPUT_NAME",
    "LITERT_BATCH",
    "ONNX_WEIGHTS_KEY",
    "OUTPUT_NAME",
    "PTE_BATCH_LIMIT",
    "PTE_MAX_BATCH",
    "ExportResult",
    "LoadedExport",
    "PteRunner",
    "TfliteRunner",
    "check_opset",
    "check_pte_max_batch",
    "check_suffix",
    "check_text_path",
    "export_executorch",
    "export_for_pte",
    "export_litert",
    "export_model",
    "export_onnx",
    "export_pt2",
    "export_torchscript",
    "fold_batchnorm",
    "in_chunks",
    "litert_metadata",
    "load_export",
    "lower_to_pte",
    "lower_to_tflite",
    "max_onnx_opset",
    "metadata_for",
    "module_pte_runner",
    "onnx_weights_digest",
    "ort_session",
    "pte_check_batches",
    "pte_metadata",
    "pte_output_paths",
    "pte_program",
    "pte_runner",
    "read_onnx_metadata",
    "sidecar_paths",
    "tflite_runner",
    "write_pte",
]

#: Formats :func:`export_model` writes, with their file suffix.
EXPORT_FORMATS: dict[str, str] = {
    "onnx": ".onnx",
    "torchscript": ".ts",
    "pt2": ".pt2",
    "pte": ".pte",
    "litert": ".tflite",
}
#: The graph's input (float32 NCHW, preprocessed as the metadata says) and output (logits, before softmax).
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: The ``metadata_props`` key of an exported or quantized ONNX file's weights digest (:func:`onnx_weights_digest`).
ONNX_WEIGHTS_KEY = "weights_sha256"
#: Name of the JSON with name/config/classes/preprocessing inside TorchScript and .pt2 archives.
METADATA_FILE = "mobilenet.json"
#: The most bytes a .pte/.tflite metadata file beside the program may hold (a few KiB are written).
SIDECAR_MAX_BYTES = 16 * 1024 * 1024
#: The most bytes a .pt2 or .ts may hold to be read (it is read whole, then checked): far above any MobileNet's weights.
PT2_MAX_BYTES = 4 * 1024**3
#: The members of a .pt2 archive that :func:`export_pt2` writes (``torch.export.save`` of one program "model").
_PT2_RECORD = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+|data/constants/model_constants_config\.json"
    r"|data/constants/tensor_\d+|data/sample_inputs/model\.pt|extra/[\w.-]+"
)
#: A raw tensor payload's name in a weights or constants config (not ``custom_obj_*`` or ``opaque_obj_*``).
_PT2_PAYLOAD = re.compile(r"(weight|tensor)_\d+")
#: The largest batch an ExecuTorch program accepts by default (the Predictor's default batch): the memory plan and
#: the XNNPACK runtime's buffers are sized for this upper bound of the dynamic batch whatever batch runs, so a
#: larger bound costs memory at batch 1 too (a phone runs batch 1: ``max_batch=1`` is the smallest program).
PTE_MAX_BATCH = 32
#: The largest bound :func:`check_pte_max_batch` accepts.
PTE_BATCH_LIMIT = 1024
DEFAULT_ATOL = 1e-4

#: The oldest ONNX opset written: Clip takes its min/max as inputs (ReLU6) from opset 11.
MIN_OPSET = 11
#: The newest opset torch.onnx wrote when this was written, used where torch does not say its own.
_KNOWN_MAX_OPSET = 23


@dataclass
class ExportResult:
    """What an export wrote and how it was checked.

    Attributes:
        path: the exported file.
        format: one of :data:`EXPORT_FORMATS`.
        max_abs_diff: the largest |logit difference| between the exported program (run in its own runtime) and
            the PyTorch model, over the check batch.
        checks: what was verified, in words (for the CLI and logs).
        extra_files: other files written beside ``path`` (the ``.json`` metadata of a ``.pte`` or ``.tflite``).
    """

    path: Path
    format: str
    max_abs_diff: float
    checks: list[str] = field(default_factory=list)
    extra_files: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm folding
# ---------------------------------------------------------------------------------------------------------------


def check_suffix(path: str | os.PathLike[str], suffix: str, what: str, *, given_as: str = "") -> None:
    """Refuse an output ``path`` for a ``suffix`` file that is not named with that suffix: predict, eval, bench and
    the export readers tell an exported file's format by its suffix alone, so an ONNX model written as ``m.bin`` or
    ``m.pt2`` could never be read back. ``what`` names the output (``--out``); ``given_as`` says where the format
    came from (``--format onnx``), for the message."""
    owners = {ending: name for name, ending in EXPORT_FORMATS.items()}
    owners[".safetensors"] = "checkpoint"
    found = Path(path).suffix.lower()
    if found == suffix:
        return
    because = f", but {given_as}" if given_as else ""
    if found in owners:
        named = f"ends in {found}, the suffix of {owners[found]} files{because}"
    else:
        ending = f"ends in {found}" if found else "has no suffix"
        named = f"{ending}, which predict, eval and bench do not read as an exported model{because}"
    raise MobileNetError(f"{what} {path} {named}; expected a name ending in {suffix}")


def check_text_path(path: str | os.PathLike[str], what: str, writer: str) -> None:
    """Refuse an output ``path`` that is not valid UTF-8 text for a ``writer`` whose C++ code takes paths only as
    text: a name of other bytes (b'm\\xff.onnx', held by Python as the lone surrogate '\\udcff') reached
    torch.onnx.export, torch.jit.save or ONNX Runtime's quantizer as a TypeError traceback after the export's work."""
    text = os.fspath(path)
    if isinstance(text, str):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            shown = text.encode("utf-8", "backslashreplace").decode("utf-8")
            raise MobileNetError(
                f"{what} {shown} is not valid UTF-8, which the {writer} writer cannot take as a path; expected a "
                "name in UTF-8"
            ) from None


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm folded into the conv before it.

    With running mean mu, variance var, scale gamma, shift beta and eps, BN(conv(x)) = gamma * (W x + b - mu) /
    sqrt(var + eps) + beta, which is a conv with W' = W * gamma / sqrt(var + eps) and b' = (b - mu) * gamma /
    sqrt(var + eps) + beta (``torch.nn.utils.fusion.fuse_conv_bn_eval``). Each folded BN is replaced by
    ``nn.Identity`` so the module tree (and every parameter name but the new conv biases) is unchanged.

    A conv-BN pair is a module with ``.conv`` (``nn.Conv2d``) and ``.bn`` (``nn.BatchNorm2d``) attributes, as
    :class:`mobilenet.layers.ConvBNAct`, or two consecutive children of an ``nn.Sequential``. The input model is
    not modified.
    """
    folded = copy.deepcopy(model).eval()
    for module in list(folded.modules()):
        conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(conv, bn)
            module.bn = nn.Identity()
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for first, second in itertools.pairwise(names):
                conv, bn = module._modules[first], module._modules[second]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    module._modules[first] = fuse_conv_bn_eval(conv, bn)
                    module._modules[second] = nn.Identity()
    return folded


# ---------------------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------------------


def metadata_for(
    model: nn.Module,
    *,
    classes: Sequence[str] | None = None,
    preprocessing: dict[str, Any] | Any | None = None,
) -> dict[str, Any]:
    """The JSON that travels with an exported file: the checkpoint header's fields (format_version, name, config,
    classes, preprocessing) plus the graph's input/output names and layout.

    ``classes`` and ``preprocessing`` default to the model's ``.info`` (set by
    :func:`mobilenet.checkpoint.load`); without either, the preprocessing is the default for the model's config
    (:func:`mobilenet.data.resolve_preprocessing`).
    """
    config = getattr(model, "config", None)
    if config is None:
        raise MobileNetError(
            f"can only export a mobilenet model (with .config), got {type(model).__name__}; "
            "build it with mobilenet.create_model(...) or load a checkpoint"
        )
    info = getattr(model, "info", None)
    if classes is None and info is not None:
        classes = info.classes
    if preprocessing is None and info is not None:
        preprocessing = info.preprocessing
    preprocessing = resolve_preprocessing(preprocessing, config.resolution).to_dict()
    if classes is not None and len(classes) != config.num_classes:
        raise MobileNetError(
            f"got {len(classes)} class names for {config.num_classes} outputs; expected one per output"
        )
    return {
        "format_version": 1,
        "name": str(getattr(model, "name", "") or ""),
        "config": config.to_dict(),
        "classes": list(classes) if classes is not None else None,
        "preprocessing": json.loads(json.dumps(dict(preprocessing))),
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "batch": "dynamic"},
        "output": {"name": OUTPUT_NAME, "meaning": "logits (apply softmax for probabilities)"},
    }


def _input_size(metadata: dict[str, Any]) -> int:
    return int(metadata["preprocessing"].get("input_size") or metadata["config"]["resolution"])


def _check_input(metadata: dict[str, Any], batch: int, seed: int = 0) -> torch.Tensor:
    """A fixed pseudo-random batch shaped as the model's input (normalised images are roughly N(0, 1))."""
    size = _input_size(metadata)
    return seeded_batch((batch, int(metadata["config"]["in_channels"]), size, size), seed)


def _verify_callable(
    run: Callable[[Any], Any], model: nn.Module, metadata: dict[str, Any], atol: float, what: str, rtol: float = 0.0
) -> float:
    """The largest |logit difference| from PyTorch at batch 2 and 3; above ``atol + rtol * max |logit|`` the
    export fails (:func:`mobilenet.parity.compare_to_reference`) and its file is not written."""
    inputs = [_check_input(metadata, 2, seed=1), _check_input(metadata, 3, seed=2)]
    return compare_to_reference(
        run, model, inputs, what=what, atol=atol, rtol=rtol, consequence="the file was not written"
    )


# ---------------------------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------------------------


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise MobileNetError(
            f"ONNX export needs onnx and onnxruntime ({error.name} is missing); {INSTALL_HINTS['onnx']}"
        ) from None
    return onnx, onnxruntime


def max_onnx_opset() -> int:
    """The newest ONNX opset the installed torch.onnx writes (torch names it only in a private module)."""
    return int(getattr(_torch_onnx_constants, "ONNX_MAX_OPSET", _KNOWN_MAX_OPSET))


def check_opset(opset: Any) -> int:
    """``opset`` if torch.onnx can write it (:data:`MIN_OPSET` to :func:`max_onnx_opset`), else
    :class:`MobileNetError` naming the range."""
    newest = max_onnx_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise MobileNetError(
            f"--opset must be an integer from {MIN_OPSET} (Clip with min/max inputs) to {newest} (the newest this "
            f"torch writes), got {opset!r}"
        )
    return opset


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    preprocessing: dict[str, Any] | Any | None = None,
    opset: int = 18,
    exporter: str = "torchscript",
    atol: float = DEFAULT_ATOL,
    rtol: float = 0.0,
) -> ExportResult:
    """Write ``model`` as an ONNX file with BatchNorm folded, a dynamic batch dimension, input ``image`` and output
    ``logits``, and check it with ``onnx.checker`` and ONNX Runtime against PyTorch.

    Args:
        model: a :class:`~mobilenet.models.MobileNet` (any mode; it is copied and put in eval mode).
        path: the ``.onnx`` file to write.
        classes, preprocessing: stored in ``metadata_props`` (default: the model's own, see :func:`metadata_for`).
        opset: the ONNX opset (Clip takes min/max as inputs from opset 11).
        exporter: ``"torchscript"`` (``torch.onnx.export(dynamo=False)``: the tracer, fast, deprecated upstream
            but still shipped) or ``"dynamo"`` (``torch.export`` + onnxscript; slower to run). Both produce the same
            graph of Conv, Clip, Add, pooling and Gemm nodes; ``"torchscript"`` falls back to ``"dynamo"`` where the
            tracer is gone.
        atol: the largest allowed |logit difference| between ONNX Runtime and PyTorch.
        rtol: plus this fraction of the largest |logit| (0 by default: the check is absolute; float32 sums of
            models with logits in the hundreds differ by more than 1e-4 in any two runtimes).

    ``metadata_props`` holds ``mobilenet`` (the whole JSON of :func:`metadata_for`), for readers that want
    one field, ``name``, ``config``, ``classes`` and ``preprocessing`` (each JSON), and ``weights_sha256``
    (:func:`onnx_weights_digest`), which :func:`read_onnx_metadata` checks.
    """
    onnx, _ = _require_onnx()
    if exporter not in ("torchscript", "dynamo"):
        raise MobileNetError(f"unknown ONNX exporter {exporter!r}; expected 'torchscript' or 'dynamo'")
    check_opset(opset)
    check_suffix(path, ".onnx", "ONNX output")
    check_text_path(path, "ONNX output", "ONNX")
    target = check_output_file(path, "ONNX output")
    metadata = metadata_for(model, classes=classes, preprocessing=preprocessing)
    folded = fold_batchnorm(model).float().cpu()
    example = _check_input(metadata, 2)
    with atomic_path(target) as tmp:
        _torch_onnx_export(torch, folded, example, tmp, opset=opset, exporter=exporter)
        graph = onnx.load(str(tmp))
        _onnx_set_metadata(graph, metadata)
        onnx.save(graph, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        diff, checks = _verify_onnx(tmp, model, metadata, atol, rtol)
    checks.insert(0, "onnx.checker (full_check) passed")
    return ExportResult(target, "onnx", diff, checks)


def _torch_onnx_export(torch: Any, model: nn.Module, example: torch.Tensor, path: Path, *, opset: int, exporter: str):
    common = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    if exporter == "torchscript":
        try:
            with warnings.catch_warnings():
                # The tracer-based exporter is deprecated in favour of dynamo; it still writes the same graph faster.
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    dynamo=False,
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    do_constant_folding=True,
                    **common,
                )
            return
        except (TypeError, RuntimeError, AttributeError) as error:
            if "dynamo" not in str(error) and "TorchScript" not in str(error):
                raise
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise MobileNetError(f"the dynamo ONNX exporter needs onnxscript; {INSTALL_HINTS['onnx']}") from None
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), dynamo=True, dynamic_shapes=({0: batch},), optimize=True, verbose=False, **common
        )
    program.save(str(path), external_data=False)


class _quiet:
    """Silence the dynamo exporter's progress lines on stdout (the CLI prints its own)."""

    def __enter__(self) -> None:

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(io.StringIO()))

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def _onnx_set_metadata(graph: Any, metadata: dict[str, Any]) -> None:
    props = {
        "mobilenet": json.dumps(metadata),
        "name": metadata["name"],
        "config": json.dumps(metadata["config"]),
        "classes": json.dumps(metadata["classes"]),
        "preprocessing": json.dumps(metadata["preprocessing"]),
    }
    del graph.metadata_props[:]
    for key, value in {**props, ONNX_WEIGHTS_KEY: onnx_weights_digest(graph)}.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    graph.producer_name = "mobilenet"
    graph.doc_string = (
        f"{metadata['name'] or 'MobileNet'}: input {INPUT_NAME!r} float32 NCHW preprocessed as metadata "
        f"'preprocessing' says; output {OUTPUT_NAME!r} = logits."
    )


def onnx_weights_digest(model: Any) -> str:
    """The SHA-256 (hex) of every weight an ONNX model runs: its initializers (and sparse ones) in graph order, then
    each node's tensor attributes (the Constant nodes torch.onnx writes for Clip's bounds) and every attribute of a
    Constant node, subgraphs included. Each tensor counts by its name, data type, dims and values as little-endian
    bytes (``onnx.numpy_helper.to_array``), so the digest does not depend on how it is stored (``raw_data`` or
    ``float_data``...): protobuf has no checksum, and a flipped byte in a weight would otherwise load and run.

    Raises ``ValueError`` (or onnx's own error) for a tensor whose values cannot be read from the file itself
    (stored as external data, or fewer bytes than its dims)."""
    digest = hashlib.sha256()
    for label, tensor in _weight_tensors(model.graph):
        if isinstance(tensor, bytes):  # a Constant's scalar or list attribute, serialized
            _digest_entry(digest, label, -1, [], tensor)
        else:
            _digest_entry(digest, label, tensor.data_type, list(tensor.dims), _tensor_bytes(tensor))
    return digest.hexdigest()


def _weight_tensors(graph: Any, scope: str = "") -> Iterator[tuple[str, Any]]:
    """(label, TensorProto or serialized attribute) of every weight in ``graph``, in graph order (see
    :func:`onnx_weights_digest`)."""
    for tensor in graph.initializer:
        yield f"{scope}{tensor.name}", tensor
    for sparse in graph.sparse_initializer:
        yield f"{scope}{sparse.values.name}", sparse.values
        yield f"{scope}{sparse.values.name}/indices", sparse.indices
    for index, node in enumerate(graph.node):
        where = f"{scope}{index}:{node.name or ','.join(node.output)}/"
        for attribute in node.attribute:
            label = where + attribute.name
            if attribute.HasField("t"):
                yield label, attribute.t
            if attribute.HasField("sparse_tensor"):
                yield label, attribute.sparse_tensor.values
                yield label + "/indices", attribute.sparse_tensor.indices
            yield from ((label, tensor) for tensor in attribute.tensors)
            subgraphs = ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs)
            for number, subgraph in enumerate(subgraphs):
                yield from _weight_tensors(subgraph, f"{label}#{number}/")
            if node.op_type == "Constant" and attribute.type not in (attribute.TENSOR, attribute.SPARSE_TENSOR):
                yield label, attribute.SerializeToString(deterministic=True)


def _tensor_bytes(tensor: Any) -> Any:
    """A tensor's values as little-endian bytes (a buffer), whichever field of the TensorProto holds them."""
    from onnx import numpy_helper

    if tensor.data_type == tensor.STRING:
        return b"".join(struct.pack("<Q", len(value)) + value for value in tensor.string_data)
    array = np.ascontiguousarray(numpy_helper.to_array(tensor))
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        array = array.byteswap()
    return array.reshape(-1).view(np.uint8)


def _digest_entry(digest: Any, label: str, data_type: int, dims: list[int], payload: Any) -> None:
    """Feed one weight to ``digest``, each field length-prefixed so that no two weights' fields can run together."""
    name = label.encode("utf-8", errors="surrogatepass")
    size = memoryview(payload).nbytes
    digest.update(struct.pack(f"<Q{len(name)}siQ{len(dims)}qQ", len(name), name, data_type, len(dims), *dims, size))
    digest.update(payload)


def _check_onnx_weights(file: Path, model: Any, props: dict[str, str]) -> None:
    """Refuse an ONNX file whose weights do not match the digest :func:`export_onnx` or
    :func:`mobilenet.quantize.quantize_onnx` stored under :data:`ONNX_WEIGHTS_KEY` (a flipped bit, a damaged copy:
    protobuf has no checksum, and ONNX Runtime would run the damaged weights). A file without the key (written by an
    older version of this library, or by another tool) is not checked."""
    if ONNX_WEIGHTS_KEY not in props:
        return
    try:
        found = onnx_weights_digest(model)
    except Exception as error:  # onnx's to_array raises ValueError/TypeError/...: the weights cannot be read
        raise MobileNetError(
            f"{file} is corrupt: its weights cannot be read to check them against the digest written when it was "
            f"exported ({type(error).__name__}: {_first_line(error)}); export the model again"
        ) from None
    if found != props[ONNX_WEIGHTS_KEY]:
        raise MobileNetError(
            f"{file} is corrupt: its weights do not match the digest ({ONNX_WEIGHTS_KEY}) written when it was "
            "exported (a damaged copy?); export the model again"
        )


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``mobilenet`` JSON stored in an ONNX file's ``metadata_props`` (by :func:`export_onnx` or
    :func:`mobilenet.quantize.quantize_onnx`), once the file's weights match the digest stored with them
    (:func:`_check_onnx_weights`; a file without one, from an older version or another tool, loads unchecked).
    Every reader of an ``.onnx`` (predict, eval, bench, quantize, cost, :class:`mobilenet.predict.Predictor`) comes
    through here."""
    onnx, _ = _require_onnx()
    file = Path(path)
    regular_file_size(file, "ONNX file", "an .onnx file written by `mobilenet export` or `mobilenet quantize`")
    try:
        graph = onnx.load(str(file), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError/ValueError/...: any failure means "not an ONNX model"
        raise MobileNetError(f"{file} is not a readable ONNX model ({type(error).__name__}: {error})") from None
    props = {entry.key: entry.value for entry in graph.metadata_props}
    _check_onnx_weights(file, graph, props)
    if "mobilenet" not in props:
        raise MobileNetError(f"{file} has no mobilenet metadata; expected a file written by `mobilenet export`")
    try:
        metadata = loads_json(props["mobilenet"])
    except json.JSONDecodeError as error:
        raise MobileNetError(f"{file} has corrupt mobilenet metadata ({error})") from None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("config"), dict):
        raise MobileNetError(f"{file} has corrupt mobilenet metadata (no 'config' object)")
    _check_onnx_signature(file, graph.graph, metadata)
    return metadata


def _check_onnx_signature(file: Path, graph: Any, metadata: dict[str, Any]) -> None:
    """Refuse an ONNX graph that does not take what its metadata describes (one NCHW input :data:`INPUT_NAME` with
    the config's channels at the preprocessing's input size, an output :data:`OUTPUT_NAME` of the config's
    ``num_classes`` logits per image): every runtime would fail on the first batch, or its logits would be read
    against the wrong classes. A symbolic dimension accepts any size; a value of the wrong type in the metadata is
    left to the config's own checks."""
    weights = {initializer.name for initializer in graph.initializer}
    inputs = [value for value in graph.input if value.name not in weights]
    outputs = {value.name: value for value in graph.output}
    config, preprocessing = metadata["config"], metadata.get("preprocessing")
    side = (preprocessing.get("input_size") if isinstance(preprocessing, dict) else None) or config.get("resolution")
    expected = ["batch", config.get("in_channels", 3), side, side]
    expected_out = ["batch", config.get("num_classes", 1000)]
    found = _input_dims(inputs[0]) if len(inputs) == 1 else []
    found_out = _input_dims(outputs[OUTPUT_NAME]) if OUTPUT_NAME in outputs else []
    if [value.name for value in inputs] != [INPUT_NAME] or not (
        _dims_fit(found, expected) and _dims_fit(found_out, expected_out)
    ):
        shown = ", ".join(f"{value.name!r} {_input_dims(value)}" for value in inputs) or "nothing"
        gives = ", ".join(f"{name!r} {_input_dims(value)}" for name, value in outputs.items()) or "nothing"
        raise MobileNetError(
            f"{file} takes {shown} and gives {gives}, not what its metadata describes ({INPUT_NAME!r} {expected} "
            f"-> {OUTPUT_NAME!r} {expected_out}); expected a file written by `mobilenet export` or `mobilenet "
            "quantize`"
        )


def _dims_fit(found: list[int | str], expected: list[Any]) -> bool:
    """Whether a graph value's dimensions fit the metadata's: as many, and equal where both are sizes."""
    return len(found) == len(expected) and all(
        not isinstance(want, int) or isinstance(want, bool) or not isinstance(have, int) or have == want
        for have, want in zip(found, expected, strict=True)
    )


def _input_dims(value: Any) -> list[int | str]:
    """A graph input's dimensions: each a size, or the name of a symbolic one."""
    dims = value.type.tensor_type.shape.dim
    return [dim.dim_value if dim.HasField("dim_value") else dim.dim_param or "?" for dim in dims]


def ort_session(path: Path | str, num_threads: int | None = None, *, spin: bool = False) -> Any:
    """An ONNX Runtime CPU session of ``path`` with ``num_threads`` intra-op threads.

    ``spin=False`` stops the intra-op threads spinning when a run ends (``session.force_spinning_stop``): right for a
    session used now and then (export checks, calibration), whose idle spinning would take the cores from the torch
    work that follows. ``spin=True`` leaves ONNX Runtime's default (spin a while after each run, then sleep): right
    for a session run back to back, as the Predictor's is, which keeps its own torch work on one thread; stopping
    there cost more than twice the latency at batch 1 (`benchmarks/thread_settings.py`, docs/speed.md).
    """
    _, ort = _require_onnx()
    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 4  # fatal only: an error is raised as one MobileNetError line, not logged too
    if not spin:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's own exception types (InvalidGraph, Fail, ...) share no base but this
        raise MobileNetError(f"{path} is not a model ONNX Runtime can load: {_first_line(error)}") from None


def _verify_onnx(
    path: Path, model: nn.Module, metadata: dict[str, Any], atol: float, rtol: float = 0.0
) -> tuple[float, list[str]]:
    session = ort_session(path)
    diff = _verify_callable(
        lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0], model, metadata, atol, "ONNX Runtime", rtol
    )
    return diff, [f"ONNX Runtime logits equal PyTorch's at batch 2 and 3 (max abs diff {diff:.2e})"]


# ---------------------------------------------------------------------------------------------------------------
# TorchScript and torch.export
# ---------------------------------------------------------------------------------------------------------------


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    preprocessing: dict[str, Any] | Any | None = None,
    atol: float = DEFAULT_ATOL,
) -> ExportResult:
    """Write a traced TorchScript module (BatchNorm folded; loads with ``torch.jit.load`` without this library)
    with ``mobilenet.json`` among its extra files, then reload it and compare logits at batch 2 and 3."""
    check_suffix(path, ".ts", "TorchScript output")
    check_text_path(path, "TorchScript output", "TorchScript")
    target = check_output_file(path, "TorchScript output")
    metadata = metadata_for(model, classes=classes, preprocessing=preprocessing)
    folded = fold_batchnorm(model).float().cpu()
    with atomic_path(target) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit is deprecated upstream in favour of torch.export
            traced = torch.jit.trace(folded, _check_input(metadata, 2))
            traced = torch.jit.freeze(traced.eval())
            torch.jit.save(traced, str(tmp), _extra_files={METADATA_FILE: json.dumps(metadata)})
            extra = {METADATA_FILE: ""}
            loaded = torch.jit.load(str(tmp), map_location="cpu", _extra_files=extra)
        if json.loads(extra[METADATA_FILE]) != metadata:
            raise MobileNetError("TorchScript export: the metadata read back differs from the one written")
        diff = _verify_callable(loaded, model, metadata, atol, "TorchScript")
    return ExportResult(
        target, "torchscript", diff, [f"torch.jit.load + run equals PyTorch at batch 2 and 3 (max abs diff {diff:.2e})"]
    )


def _exported_program(model: nn.Module, metadata: dict[str, Any], max_batch: int) -> Any:
    folded = fold_batchnorm(model).float().cpu()
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    return torch.export.export(folded, (_check_input(metadata, 2),), dynamic_shapes=({0: batch},), strict=False)


def export_pt2(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    preprocessing: dict[str, Any] | Any | None = None,
    atol: float = DEFAULT_ATOL,
) -> ExportResult:
    """Write a ``torch.export`` ExportedProgram (``.pt2``, BatchNorm folded, dynamic batch 1..4096) with
    ``mobilenet.json`` among its extra files; reload it with ``torch.export.load`` and compare logits."""
    check_suffix(path, ".pt2", ".pt2 output")
    target = check_output_file(path, ".pt2 output")
    metadata = metadata_for(model, classes=classes, preprocessing=preprocessing)
    program = _exported_program(model, metadata, max_batch=4096)
    # torch.export wants a file name ending in .pt2 or a buffer: save to a buffer, then write it atomically.
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_FILE: json.dumps(metadata)})
    with atomic_path(target) as tmp:
        tmp.write_bytes(buffer.getvalue())
        extra = {METADATA_FILE: ""}
        loaded = torch.export.load(io.BytesIO(tmp.read_bytes()), extra_files=extra)
        if json.loads(extra[METADATA_FILE]) != metadata:
            raise MobileNetError(".pt2 export: the metadata read back differs from the one written")
        diff = _verify_callable(loaded.module(), model, metadata, atol, "torch.export (.pt2)")
    return ExportResult(
        target, "pt2", diff, [f"torch.export.load + run equals PyTorch at batch 2 and 3 (max abs diff {diff:.2e})"]
    )


# ---------------------------------------------------------------------------------------------------------------
# ExecuTorch (phone runtime)
# ---------------------------------------------------------------------------------------------------------------


def _require_executorch() -> None:
    try:
        import executorch  # noqa: F401
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
        from executorch.runtime import Runtime  # noqa: F401
    except ImportError as error:
        raise MobileNetError(
            f"ExecuTorch export needs executorch ({error.name} is missing); {INSTALL_HINTS['mobile']}"
        ) from None


def check_pte_max_batch(max_batch: Any) -> int:
    """``max_batch`` if it is an integer from 1 to :data:`PTE_BATCH_LIMIT`, else :class:`MobileNetError` naming the
    range (checked before anything is exported or imported, so a bad value costs nothing)."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= PTE_BATCH_LIMIT:
        raise MobileNetError(
            f"--max-batch (the largest batch an ExecuTorch program accepts) must be an integer from 1 to "
            f"{PTE_BATCH_LIMIT}, got {max_batch!r}; the runtime's memory grows with it, see docs/deploy.md"
        )
    return max_batch


def pte_output_paths(path: str | os.PathLike[str], inputs: Sequence[Any] = ()) -> tuple[Path, Path]:
    """The ``.pte`` to write and its metadata sidecar ``<path>.json``, both checked as writable outputs."""
    return sidecar_paths(path, ".pte", inputs)


def sidecar_paths(path: str | os.PathLike[str], suffix: str, inputs: Sequence[Any] = ()) -> tuple[Path, Path]:
    """A ``suffix`` file to write and its metadata sidecar ``<path>.json``, both checked as writable outputs."""
    check_suffix(path, suffix, f"{suffix} output")
    target = check_output_file(path, f"{suffix} output", inputs=inputs)
    return target, check_output_file(target.with_name(target.name + ".json"), f"{suffix} metadata", inputs=inputs)


def pte_metadata(metadata: dict[str, Any], max_batch: int, precision: str) -> dict[str, Any]:
    """:func:`metadata_for`'s JSON with what a ``.pte`` adds: its batch bound and its precision."""
    return {**metadata, "input": {**metadata["input"], "max_batch": max_batch}, "precision": precision}


def pte_program(module: nn.Module, metadata: dict[str, Any], max_batch: int) -> Any:
    """``torch.export`` of ``module`` (BatchNorm already folded) with the batch dimension dynamic from 1 to
    ``max_batch`` (static when ``max_batch`` is 1): the program ExecuTorch lowers and the PT2E quantizer takes."""
    check_pte_max_batch(max_batch)
    return export_for_pte(module, _check_input(metadata, min(2, max_batch)), max_batch)


def export_for_pte(module: nn.Module, example: torch.Tensor, max_batch: int) -> Any:
    """``torch.export`` of ``module`` at ``example``'s shape, the batch dimension dynamic from 1 to ``max_batch``
    (static when ``max_batch`` is 1; otherwise ``example``'s batch must be at least 2, as torch.export specialises
    a batch of 1)."""
    if max_batch == 1:
        return torch.export.export(module, (example,), strict=False)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    return torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)


def lower_to_pte(program: Any) -> bytes:
    """The ``.pte`` bytes of an ExportedProgram, with the whole graph delegated to XNNPACK (the CPU backend
    ExecuTorch ships for Android and iOS). Its memory plan is sized for the upper bound of the dynamic batch.

    torch's fake convolution asks ATen which conv backend it would pick, and the oneDNN and NNPACK heuristics compare
    the batch with 16: while XNNPACK's passes re-trace the graph, that comparison on the example batch becomes a
    guard ``batch < 16`` that narrows the exported range to at most 15. With both backends off while lowering no
    such comparison is made and the exported bound is kept (:func:`write_pte` checks it).
    """
    _require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # also torch's note on oneDNN's TF32 when the flags are set
        with torch.backends.mkldnn.flags(enabled=False), torch.backends.nnpack.flags(enabled=False):
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    return bytes(lowered.buffer)


def pte_check_batches(max_batch: int) -> list[int]:
    """The batch sizes a ``.pte`` is checked at: 1, 2 and its bound (those that fit)."""
    return sorted({1, min(2, max_batch), max_batch})


def write_pte(
    buffer: bytes,
    target: Path,
    sidecar: Path,
    metadata: dict[str, Any],
    verify: Callable[[PteRunner], list[str]],
) -> list[str]:
    """Write ``buffer`` to ``target`` (atomically: only once ``verify`` passed on the written file, run in
    ExecuTorch's runtime, and its memory plan was found to hold the bound in ``metadata``), then the sidecar."""
    expected = metadata["input"]["max_batch"]
    with atomic_path(target) as tmp:
        tmp.write_bytes(buffer)
        runner = pte_runner(tmp)
        if runner.max_batch != expected:
            raise MobileNetError(
                f"ExecuTorch planned memory for batches up to {runner.max_batch}, not the {expected} exported; "
                "the file was not written"
            )
        checks = verify(runner)
    atomic_write_text(sidecar, json.dumps(metadata, indent=2) + "\n")
    return checks


def export_executorch(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    preprocessing: dict[str, Any] | Any | None = None,
    max_batch: int = PTE_MAX_BATCH,
    atol: float = DEFAULT_ATOL,
    rtol: float = 0.0,
) -> ExportResult:
    """Write an ExecuTorch program (``.pte``) for phones, float32, with the whole graph delegated to XNNPACK
    (:func:`lower_to_pte`), and its metadata as ``<path>.json``; then load the ``.pte`` in ExecuTorch's Python
    runtime and compare its logits with PyTorch's at batch 1, 2 and ``max_batch``.

    The batch dimension is dynamic from 1 to ``max_batch`` (1 to :data:`PTE_BATCH_LIMIT`): the memory plan, and the
    runtime's memory at any batch, are sized for that bound.
    """
    check_pte_max_batch(max_batch)
    _require_executorch()
    target, sidecar = pte_output_paths(path)
    metadata = pte_metadata(metadata_for(model, classes=classes, preprocessing=preprocessing), max_batch, "float32")
    buffer = lower_to_pte(pte_program(fold_batchnorm(model).float().cpu(), metadata, max_batch))
    batches = pte_check_batches(max_batch)
    diffs: list[float] = []

    def verify(runner: PteRunner) -> list[str]:
        inputs = [_check_input(metadata, batch, seed=batch) for batch in batches]
        diffs.append(
            compare_to_reference(
                runner, model, inputs, what="ExecuTorch (XNNPACK)", atol=atol, rtol=rtol,
                consequence="the file was not written",
            )
        )  # fmt: skip
        sizes = ", ".join(map(str, batches))
        return [f"ExecuTorch runtime (XNNPACK delegate) equals PyTorch at batch {sizes} (max abs diff {diffs[0]:.2e})"]

    checks = write_pte(buffer, target, sidecar, metadata, verify)
    return ExportResult(target, "pte", diffs[0], checks, [sidecar])


class PteRunner:
    """Runs a ``.pte``'s ``forward`` in ExecuTorch's Python runtime, after checking the input against the program's
    planned input: float32, four dimensions, the exported channels and image size, batch 1 to :attr:`max_batch`.
    (The runtime answers a batch above its plan with a C++ log line and an error code, and runs another image size
    that fits the plan.)"""

    def __init__(self, data: bytes, name: str) -> None:
        from executorch.runtime import Runtime

        # The method borrows from the program, and the program from the buffer: all three live as long as this.
        self._data = data
        self.name = name
        try:
            self._program = Runtime.get().load_program(data)
            self._method = self._program.load_method("forward")
        except (RuntimeError, ValueError) as error:
            raise MobileNetError(f"{name} is not a readable ExecuTorch program ({_first_line(error)})") from None
        info = self._method.metadata
        shape = tuple(info.input_tensor_meta(0).sizes()) if info.num_inputs() == 1 else ()
        if len(shape) != 4 or info.num_outputs() != 1:
            raise MobileNetError(f"{name} is not a mobilenet program; expected one NCHW image input and one output")
        self.input_shape: tuple[int, ...] = shape
        self.max_batch: int = shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        try:
            return self._method.execute([x.contiguous()])[0].clone()
        except RuntimeError as error:
            raise MobileNetError(f"ExecuTorch failed to run {self.name} ({_first_line(error)})") from None

    def _check(self, x: Any) -> None:
        _, channels, height, width = self.input_shape
        expected = f"float32 batches of shape (1..{self.max_batch}, {channels}, {height}, {width})"
        if not isinstance(x, torch.Tensor):
            raise MobileNetError(f"{self.name} takes {expected}; got a {type(x).__name__}")
        if x.dtype != torch.float32 or x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape[1:]:
            raise MobileNetError(f"{self.name} takes {expected}; got {x.dtype} of shape {tuple(x.shape)}")
        if not 1 <= x.shape[0] <= self.max_batch:
            raise MobileNetError(
                f"{self.name} takes {expected}; got a batch of {x.shape[0]} (its memory plan holds at most "
                f"{self.max_batch}: split the batch, or export again with a larger --max-batch)"
            )


def module_pte_runner(module: nn.Module, example: torch.Tensor, *, name: str = "the module") -> PteRunner:
    """Any float32 module from one NCHW tensor to one tensor (a whole network, or one block of it) as an ExecuTorch
    program run from memory: BatchNorm folded (:func:`fold_batchnorm`), exported for batches 1 to ``example``'s
    batch at ``example``'s channels and size (:func:`export_for_pte`), the whole graph delegated to XNNPACK
    (:func:`lower_to_pte`) and loaded in ExecuTorch's runtime (:class:`PteRunner`, named ``name`` in its errors).

    Nothing is written and nothing is compared: the caller checks the runner against ``module``
    (:func:`mobilenet.parity.check_close`). ``module`` and ``example`` are checked before ExecuTorch is imported.
    """
    _check_pte_example(module, example)
    _require_executorch()
    folded = fold_batchnorm(module).float().cpu().eval()
    return PteRunner(lower_to_pte(export_for_pte(folded, example, example.shape[0])), name)


def _check_pte_example(module: Any, example: Any) -> None:
    if not isinstance(module, nn.Module):
        raise MobileNetError(f"an ExecuTorch program is lowered from a torch.nn.Module; got a {type(module).__name__}")
    expected = (
        f"ExecuTorch lowering takes a float32 NCHW example input with a batch from 1 to {PTE_BATCH_LIMIT} (the "
        "program's bound)"
    )
    if not isinstance(example, torch.Tensor):
        raise MobileNetError(f"{expected}; got a {type(example).__name__}")
    if example.dtype != torch.float32 or example.dim() != 4 or 0 in example.shape[1:]:
        raise MobileNetError(f"{expected}; got {example.dtype} of shape {tuple(example.shape)}")
    if not 1 <= example.shape[0] <= PTE_BATCH_LIMIT:
        raise MobileNetError(f"{expected}; got a batch of {example.shape[0]}")


def pte_runner(path: Path | str) -> PteRunner:
    """A callable that runs a ``.pte``'s ``forward`` in ExecuTorch's Python runtime (:class:`PteRunner`)."""
    _require_executorch()
    file = Path(path)
    regular_file_size(file, ".pte file", "an ExecuTorch program written by `mobilenet export --format pte`")
    return PteRunner(file.read_bytes(), str(file))


def in_chunks(runner: PteRunner | TfliteRunner) -> Callable[[torch.Tensor], torch.Tensor]:
    """``runner`` on a batch of any size: a batch above its bound runs in pieces of at most :attr:`max_batch`."""

    def run(x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[0] > runner.max_batch:
            return torch.cat([runner(part) for part in x.split(runner.max_batch)])
        return runner(x)

    return run


# ---------------------------------------------------------------------------------------------------------------
# LiteRT (.tflite, the TensorFlow Lite runtime)
# ---------------------------------------------------------------------------------------------------------------

#: The batch a ``.tflite`` is written for. litert-torch's lowering of the classifier's flatten (a ``view`` whose
#: size is the symbolic batch) fails with a dynamic batch, so the input shape is static; 1 is what a phone runs.
LITERT_BATCH = 1
#: LiteRT's XNNPACK kernels sum in another order than PyTorch's: the logits agree to a fraction of their scale.
LITERT_RTOL = 1e-5


def _require_litert_runtime() -> None:
    try:
        from ai_edge_litert.interpreter import Interpreter  # noqa: F401
    except ImportError as error:
        raise MobileNetError(
            f"LiteRT needs ai-edge-litert ({error.name} is missing); {INSTALL_HINTS['litert']}"
        ) from None


def _require_litert() -> None:
    try:
        import litert_torch  # noqa: F401
    except ImportError as error:
        raise MobileNetError(
            f"LiteRT export needs litert-torch ({error.name} is missing); {INSTALL_HINTS['litert']}"
        ) from None
    _require_litert_runtime()


def litert_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """:func:`metadata_for`'s JSON with what a ``.tflite`` adds: its static batch (also its bound) and precision."""
    shape = {"batch": LITERT_BATCH, "max_batch": LITERT_BATCH}
    return {**metadata, "input": {**metadata["input"], **shape}, "precision": "float32"}


def lower_to_tflite(module: nn.Module, metadata: dict[str, Any]) -> bytes:
    """The ``.tflite`` bytes of ``module`` (BatchNorm already folded), converted by litert-torch from its
    ``torch.export`` graph at a static batch of :data:`LITERT_BATCH`. The input keeps the PyTorch signature's
    NCHW layout (the converter inserts the transposes its NHWC kernels need inside the graph)."""
    _require_litert()
    import litert_torch

    example = _check_input(metadata, LITERT_BATCH)
    # The converter reports its progress on stdout, which is the CLI's.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        converted = litert_torch.convert(module, (example,))
        return bytes(converted.model_content())


def export_litert(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    preprocessing: dict[str, Any] | Any | None = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = LITERT_RTOL,
) -> ExportResult:
    """Write a LiteRT model (``.tflite``, float32, batch :data:`LITERT_BATCH`, NCHW input) for phones
    (:func:`lower_to_tflite`) and its metadata as ``<path>.json``; then load the ``.tflite`` in LiteRT's interpreter
    (XNNPACK delegate) and compare its logits with PyTorch's on a seeded image and on a seeded batch of three run
    image by image; above ``atol + rtol * max |logit|`` nothing is written."""
    _require_litert()
    target, sidecar = sidecar_paths(path, ".tflite")
    metadata = litert_metadata(metadata_for(model, classes=classes, preprocessing=preprocessing))
    buffer = lower_to_tflite(fold_batchnorm(model).float().cpu(), metadata)
    inputs = [_check_input(metadata, 1, seed=1), _check_input(metadata, 3, seed=2)]
    with atomic_path(target) as tmp:
        tmp.write_bytes(buffer)
        diff = compare_to_reference(
            in_chunks(tflite_runner(tmp)), model, inputs, what="LiteRT (XNNPACK)", atol=atol, rtol=rtol,
            consequence="the file was not written",
        )  # fmt: skip
    atomic_write_text(sidecar, json.dumps(metadata, indent=2) + "\n")
    checks = [f"LiteRT interpreter (XNNPACK delegate) equals PyTorch on 4 images (max abs diff {diff:.2e})"]
    return ExportResult(target, "litert", diff, checks, [sidecar])


class TfliteRunner:
    """Runs a ``.tflite`` in LiteRT's interpreter on the CPU, after checking the input against the model's one
    input: float32, four dimensions (NCHW, as exported), the exported channels and image size, batch
    :attr:`max_batch`. The interpreter uses as many threads as torch's intra-op pool (which the backends set from
    their thread count): it is rebuilt when that count changes, as LiteRT fixes it when the interpreter is made."""

    def __init__(self, data: bytes, name: str) -> None:
        self._data = data
        self.name = name
        self._threads = 0
        self._interpreter_for: Any = None
        interpreter = self._interpreter()
        inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
        shape = tuple(int(n) for n in inputs[0]["shape"]) if len(inputs) == 1 else ()
        if len(shape) != 4 or shape[0] != LITERT_BATCH or len(outputs) != 1 or inputs[0]["dtype"] != np.float32:
            raise MobileNetError(
                f"{name} is not a mobilenet LiteRT model; expected one float32 NCHW input of batch {LITERT_BATCH} "
                "and one output"
            )
        self.input_shape: tuple[int, ...] = shape
        self.max_batch: int = shape[0]

    @property
    def threads(self) -> int:
        """The thread count of the interpreter now in use."""
        return self._threads

    def _interpreter(self) -> Any:
        from ai_edge_litert.interpreter import Interpreter

        threads = torch.get_num_threads()
        if threads != self._threads:
            try:
                interpreter = Interpreter(model_content=self._data, num_threads=threads)
                interpreter.allocate_tensors()
            except (RuntimeError, ValueError) as error:
                raise MobileNetError(f"{self.name} is not a readable LiteRT model ({_first_line(error)})") from None
            self._interpreter_for, self._threads = interpreter, threads
        return self._interpreter_for

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        interpreter = self._interpreter()
        try:
            interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x.detach().contiguous().numpy())
            interpreter.invoke()
            return torch.from_numpy(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))
        except (RuntimeError, ValueError) as error:
            raise MobileNetError(f"LiteRT failed to run {self.name} ({_first_line(error)})") from None

    def _check(self, x: Any) -> None:
        _, channels, height, width = self.input_shape
        expected = f"float32 batches of shape ({self.max_batch}, {channels}, {height}, {width})"
        if not isinstance(x, torch.Tensor):
            raise MobileNetError(f"{self.name} takes {expected}; got a {type(x).__name__}")
        if x.dtype != torch.float32 or tuple(x.shape) != self.input_shape:
            raise MobileNetError(f"{self.name} takes {expected}; got {x.dtype} of shape {tuple(x.shape)}")


def tflite_runner(path: Path | str) -> TfliteRunner:
    """A callable that runs a ``.tflite`` in LiteRT's interpreter (:class:`TfliteRunner`)."""
    _require_litert_runtime()
    file = Path(path)
    regular_file_size(file, ".tflite file", "a LiteRT model written by `mobilenet export --format litert`")
    return TfliteRunner(file.read_bytes(), str(file))


# ---------------------------------------------------------------------------------------------------------------
# Reading back what was written
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedExport:
    """An exported file read back: its metadata (as :func:`metadata_for` wrote it) and a callable from a float32
    NCHW batch to logits."""

    path: Path
    format: str
    metadata: dict[str, Any]
    run: Callable[[torch.Tensor], torch.Tensor]


def load_export(path: str | os.PathLike[str]) -> LoadedExport:
    """Read a ``.ts``, ``.pt2``, ``.pte`` or ``.tflite`` file written by :func:`export_model` (the metadata of a
    ``.pte`` or ``.tflite`` is its ``<path>.json`` sidecar). TorchScript and ``torch.export`` archives hold graphs
    of torch operators and raw tensor data, which these loaders run without unpickling Python objects."""
    file = Path(path)
    suffix = file.suffix.lower()
    if not file.is_file():
        raise MobileNetError(f"exported model {file} does not exist or is not a file")
    if suffix == ".ts":
        data = read_regular_file(file, ".ts export", "a .ts file written by `mobilenet export`", limit=PT2_MAX_BYTES)
        _check_zip_crcs(file, data)
        extra = {METADATA_FILE: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit is deprecated upstream
                module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
        except (RuntimeError, ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise MobileNetError(f"{file} is not a readable {suffix} export ({_first_line(error)})") from None
        return _checked_program(LoadedExport(file, "torchscript", _metadata_text(file, extra[METADATA_FILE]), module))
    if suffix == ".pt2":
        return _load_pt2(file)
    if suffix == ".pte":
        return LoadedExport(file, "pte", _sidecar_metadata(file), in_chunks(pte_runner(file)))
    if suffix == ".tflite":
        return LoadedExport(file, "litert", _sidecar_metadata(file), in_chunks(tflite_runner(file)))
    raise MobileNetError(f"{file}: unknown export suffix {suffix!r}; expected .ts, .pt2, .pte or .tflite")


def _load_pt2(file: Path) -> LoadedExport:
    """A ``.pt2`` read once into memory, its archive checked by :func:`_check_pt2_archive`, then loaded from those
    same bytes (a file swapped after the check is never what torch reads)."""
    data = read_regular_file(file, ".pt2 export", "a .pt2 file written by `mobilenet export`", limit=PT2_MAX_BYTES)
    _check_zip_crcs(file, data)
    _check_pt2_archive(file, data)
    extra = {METADATA_FILE: ""}
    try:
        with _quiet_logger("torch.export"):  # it logs its own copy of the error before raising it
            program = torch.export.load(io.BytesIO(data), extra_files=extra)
        module = program.module()
    except Exception as error:  # torch.export's verifier and deserializer raise their own types (SpecViolationError..)
        raise MobileNetError(f"{file} is not a readable .pt2 export ({_first_line(error)})") from None
    return _checked_program(LoadedExport(file, "pt2", _metadata_text(file, extra[METADATA_FILE]), module))


def _checked_program(loaded: LoadedExport) -> LoadedExport:
    """``loaded`` once its program has run one input shaped as its metadata describes (channels, input size) and
    given one row of the config's ``num_classes`` logits: a program and metadata that disagree would otherwise fail
    on the first batch, deep in the runtime, or have their logits read against the wrong classes."""
    try:
        with torch.no_grad():
            logits = loaded.run(_check_input(loaded.metadata, 1))
    except Exception as error:  # the program's own failure (a shape guard, a conv's channel check) or bad metadata
        # TorchScript's message starts with its interpreter's frames; the reason is its last line.
        reason = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        raise MobileNetError(
            f"{loaded.path}'s program does not take what its metadata describes ({reason[-1][:300]}); expected a "
            "file written by `mobilenet export`"
        ) from None
    expected = [1, loaded.metadata["config"].get("num_classes", 1000)]
    found = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
    if found != expected:
        raise MobileNetError(
            f"{loaded.path}'s program gives logits of shape {found} for one image, not the {expected} its metadata "
            "describes; expected a file written by `mobilenet export`"
        )
    return loaded


def _check_zip_crcs(file: Path, data: bytes) -> None:
    """Refuse a ``.ts`` or ``.pt2`` archive whose members do not match their zip CRC-32 (a flipped bit, a damaged
    copy): torch's reader does not check them, and would run the damaged weights as they stand."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, zlib.error) as error:
        raise MobileNetError(f"{file} is not a readable {file.suffix} export ({_first_line(error)})") from None
    if damaged is not None:
        raise MobileNetError(
            f"{file} is corrupt: its member {damaged.split('/', 1)[-1]} does not match its checksum (a damaged "
            "copy?); export the model again"
        )


def _check_pt2_archive(file: Path, data: bytes) -> None:
    """Refuse a ``.pt2`` whose loading would unpickle, or run native code: ``torch.export.load`` unpickles a weight or
    constant marked ``use_pickle``, an opaque constant, and a legacy-format archive without restriction, loads an
    AOTInductor shared library, and retries its sample inputs' weights-only unpickling without the restriction when
    it fails. What :func:`export_pt2` writes holds none of these: JSON, raw tensor bytes and sample inputs that the
    weights-only unpickler reads; anything else in the archive is refused before torch reads it."""
    refuse = f"{file} is not a .pt2 written by `mobilenet export`"
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        names = list(reader.get_all_records())
    except RuntimeError as error:
        raise MobileNetError(f"{file} is not a readable .pt2 export ({_first_line(error)})") from None
    unknown = sorted(name for name in names if not _PT2_RECORD.fullmatch(name))
    if unknown or len(set(names)) != len(names) or not _same_zip_members(data, names):
        listed = ", ".join(unknown[:3]) or "duplicate or hidden archive members"
        raise MobileNetError(f"{refuse}: it holds {listed}, which loading could unpickle or run; never loaded")
    for config_name in (n for n in names if n.endswith("_config.json")):
        try:
            entries = loads_json(reader.get_record(config_name)).get("config", {})
            pickled = [key for key, entry in entries.items() if entry.get("use_pickle") is not False]
            pickled += [key for key, entry in entries.items() if not _PT2_PAYLOAD.fullmatch(entry.get("path_name", ""))]
        except (AttributeError, TypeError, json.JSONDecodeError):
            raise MobileNetError(f"{refuse}: its {config_name} is corrupt") from None
        if pickled:
            raise MobileNetError(f"{refuse}: tensors {', '.join(pickled[:3])} are stored as pickles; never loaded")
    for name in (n for n in names if n.startswith("data/sample_inputs/")):
        try:
            torch.load(io.BytesIO(reader.get_record(name)), weights_only=True)
        except Exception:  # any failure here would send torch.export.load to its unrestricted unpickler
            raise MobileNetError(f"{refuse}: its {name} is a pickle that could run code; never loaded") from None


def _same_zip_members(data: bytes, names: Sequence[str]) -> bool:
    """Whether Python's zip reader sees the members torch's reader sees, all below one folder, no others (the legacy
    fallback of ``torch.export.load`` reads the archive with :mod:`zipfile`)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    folders = {member.split("/", 1)[0] for member in members}
    relative = [member.split("/", 1)[-1] for member in members]
    return len(folders) == 1 and all("/" in m for m in members) and sorted(relative) == sorted(names)


def _sidecar_metadata(file: Path) -> dict[str, Any]:
    """The metadata of a ``.pte`` or ``.tflite``: the JSON file ``<file>.json`` beside it."""
    sidecar = file.with_name(file.name + ".json")
    if not sidecar.is_file():
        raise MobileNetError(f"{file} has no metadata beside it; expected {sidecar.name} as mobilenet export wrote")
    raw = read_regular_file(sidecar, "metadata file", "the JSON mobilenet export wrote", limit=SIDECAR_MAX_BYTES)
    return _metadata_text(sidecar, raw.decode("utf-8", errors="replace"))


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _metadata_text(file: Path, text: str) -> dict[str, Any]:
    try:
        metadata = loads_json(text) if text else None
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("config"), dict):
        raise MobileNetError(f"{file} has no mobilenet metadata; expected a file written by `mobilenet export`")
    return metadata


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------

_EXPORTERS: dict[str, Callable[..., ExportResult]] = {
    "onnx": export_onnx,
    "torchscript": export_torchscript,
    "pt2": export_pt2,
    "pte": export_executorch,
    "litert": export_litert,
}


def export_model(
    model: nn.Module,
    path: str | os.PathLike[str] | None = None,
    *,
    format: str = "onnx",
    classes: Sequence[str] | None = None,
    preprocessing: dict[str, Any] | Any | None = None,
    **options: Any,
) -> ExportResult:
    """Export ``model`` in ``format`` (one of :data:`EXPORT_FORMATS`) to ``path`` (default: the model's name with
    the format's suffix, in the current directory) and verify the written file; see the ``export_*`` functions."""
    if format not in _EXPORTERS:
        raise MobileNetError(f"unknown export format {format!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    if path is None:
        path = Path((getattr(model, "name", "") or "mobilenet") + EXPORT_FORMATS[format])
    return _EXPORTERS[format](model, path, classes=classes, preprocessing=preprocessing, **options)
