"""mobilenet.parity: the comparisons every backend's check rests on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mobilenet.errors import MobileNetError
from mobilenet.parity import max_abs_diff, relative_error


def test_relative_error_is_the_norm_of_the_difference_over_the_norm_of_the_reference():
    expected = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    got = expected + 0.01 * torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    reference = float(torch.linalg.norm(got.double() - expected.double()) / torch.linalg.norm(expected.double()))
    assert relative_error(got, expected) == pytest.approx(reference, rel=1e-12)
    assert relative_error(got.numpy(), expected.numpy()) == pytest.approx(reference, rel=1e-12)  # arrays too
    assert relative_error(1e6 * got, 1e6 * expected) == pytest.approx(reference, rel=1e-6)  # scale-free, to float32
    assert relative_error(expected, expected) == 0.0


def test_relative_error_of_zeros_nans_and_shapes():
    zeros = np.zeros((2, 3))
    assert relative_error(zeros, zeros) == 0.0
    assert relative_error(np.ones((2, 3)), zeros) == math.inf
    assert math.isnan(relative_error(np.full((2, 3), np.nan), np.ones((2, 3))))  # never "within" a bound
    with pytest.raises(MobileNetError, match=r"int8: output shape \(2, 3\) differs from the reference's \(3, 2\)"):
        relative_error(zeros, np.zeros((3, 2)), what="int8")


def test_max_abs_diff_returns_the_difference_and_the_scale():
    assert max_abs_diff(torch.tensor([1.0, -4.0]), torch.tensor([1.5, -2.0])) == (2.0, 2.0)
    with pytest.raises(MobileNetError, match="differs from the reference"):
        max_abs_diff(np.zeros(2), np.zeros(3))
