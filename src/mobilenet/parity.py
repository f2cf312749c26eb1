"""The one logit comparison: how close another runtime's (or another library's) logits are to PyTorch's.

Every check that a converted, exported, quantized or optimised model computes what the PyTorch model computes goes
through :func:`check_close`: the largest absolute difference, allowed ``atol + rtol * max |reference|`` (float32 sums
in another order differ by a few ulps of the largest logit, so the scale-relative term is what lets large logits
pass without loosening the check for small ones).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mobilenet.errors import MobileNetError

__all__ = [
    "check_close",
    "compare_to_reference",
    "logit_difference",
    "max_abs_diff",
    "relative_error",
    "seeded_batch",
]


def seeded_batch(shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A fixed pseudo-random float32 batch (normalised images are roughly N(0, 1))."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _as_float64(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def max_abs_diff(got: Any, expected: Any, *, what: str = "output") -> tuple[float, float]:
    """``(max |got - expected|, max |expected|)`` for tensors or arrays of one shape (a shape mismatch raises)."""
    got_array, expected_array = _as_float64(got), _as_float64(expected)
    if got_array.shape != expected_array.shape:
        raise MobileNetError(
            f"{what}: output shape {got_array.shape} differs from the reference's {expected_array.shape}"
        )
    if not expected_array.size:
        return 0.0, 0.0
    return float(np.max(np.abs(got_array - expected_array))), float(np.max(np.abs(expected_array)))


def relative_error(got: Any, expected: Any, *, what: str = "output") -> float:
    """``||got - expected|| / ||expected||`` (Frobenius norms; 0 where both are zero): how far a lower-precision
    output is from the float32 one, whatever the logits' scale."""
    got_array, expected_array = _as_float64(got), _as_float64(expected)
    if got_array.shape != expected_array.shape:
        raise MobileNetError(
            f"{what}: output shape {got_array.shape} differs from the reference's {expected_array.shape}"
        )
    difference, scale = float(np.linalg.norm(got_array - expected_array)), float(np.linalg.norm(expected_array))
    return difference / scale if scale > 0 else (0.0 if difference == 0 else math.inf)


def check_close(
    got: Any, expected: Any, *, what: str, atol: float = 0.0, rtol: float = 0.0, consequence: str = ""
) -> float:
    """The max abs difference; raises :class:`MobileNetError` above ``atol + rtol * max |expected|`` (``what``
    names the runtime, ``consequence`` says what was not done because of it)."""
    diff, scale = max_abs_diff(got, expected, what=what)
    allowed = atol + rtol * scale
    if not diff <= allowed:
        tail = f"; {consequence}" if consequence else ""
        raise MobileNetError(
            f"{what}: logits differ from the reference's by up to {diff:.3g} (allowed {allowed:.3g}){tail}"
        )
    return diff


def _reference_outputs(reference: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    device = next(reference.parameters()).device
    with torch.inference_mode():
        return [reference.eval()(x.to(device)).float().cpu() for x in inputs]


def logit_difference(run: Callable[[Any], Any], reference: nn.Module, inputs: Sequence[torch.Tensor]) -> float:
    """The largest |logit difference| between ``run`` and the eager ``reference`` over ``inputs`` (no bound)."""
    expected = _reference_outputs(reference, inputs)
    with torch.inference_mode():
        return max(max_abs_diff(run(x), ref)[0] for x, ref in zip(inputs, expected, strict=True))


def compare_to_reference(
    run: Callable[[Any], Any],
    reference: nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    what: str,
    atol: float = 0.0,
    rtol: float = 0.0,
    consequence: str = "",
) -> float:
    """:func:`check_close` of ``run(x)`` against the eager ``reference(x)`` for each of ``inputs``; the largest
    difference."""
    expected = _reference_outputs(reference, inputs)
    with torch.inference_mode():
        return max(
            check_close(run(x), ref, what=what, atol=atol, rtol=rtol, consequence=consequence)
            for x, ref in zip(inputs, expected, strict=True)
        )
