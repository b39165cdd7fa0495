"""The kernel calls behind lorafit's fast paths (`mm_t`, `frozen_linear`): same results as the
plain PyTorch ops up to fp32 summation order, and the oneDNN path present where it should be."""

import platform

import pytest
import torch

from lorafit import functional
from lorafit.functional import frozen_linear, mm_t


def _reference(x, w, b):
    out = x.double() @ w.double().T
    return out if b is None else out + b.double()


@pytest.mark.parametrize("rows", [0, 1, 37])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_mm_t_is_x_times_w_transposed_plus_bias(rows, transposed, with_bias):
    x = torch.randn(rows, 24)
    w = torch.randn(24, 19).T if transposed else torch.randn(19, 24)
    b = torch.randn(19) if with_bias else None
    got = mm_t(x, w, b)
    assert got.shape == (rows, 19) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _reference(x, w, b), rtol=1e-5, atol=1e-5)


def test_mm_t_leaves_other_dtypes_and_layouts_to_torch():
    w, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(mm_t(x, w, b), torch.addmm(b, x, w.T))
    strided = torch.randn(6, 4).T  # a non-contiguous [4, 6] input
    assert torch.equal(mm_t(strided, w.float()), strided @ w.float().T)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available(),
                    reason="oneDNN's linear is used on x86-64 builds with oneDNN only")
def test_the_onednn_linear_is_found_on_x86():
    assert functional._ONEDNN_LINEAR is not None


@pytest.mark.parametrize("w_in_out", [False, True])
def test_frozen_linear_gradients_match_f_linear(w_in_out):
    weight = torch.randn(6, 5) if w_in_out else torch.randn(5, 6)  # [in, out] when w_in_out
    bias = torch.randn(5, requires_grad=True)
    x = torch.randn(2, 3, 6, requires_grad=True)
    y = frozen_linear(x, weight, bias, w_in_out)
    want = torch.nn.functional.linear(x, weight.T if w_in_out else weight, bias)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    got_x, got_b = torch.autograd.grad(y, (x, bias), g)
    want_x, want_b = torch.autograd.grad(want, (x, bias), g)
    torch.testing.assert_close(got_x, want_x)
    torch.testing.assert_close(got_b, want_b)
