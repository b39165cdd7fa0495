"""The kernel calls behind lorafit's fast paths (`mm_t`, `mm_tn`, `frozen_linear`): same results as the
plain PyTorch ops up to fp32 summation order, and the oneDNN path present where it should be."""

import platform

import pytest
import torch

from lorafit import functional
from lorafit.functional import frozen_linear, mm_t, mm_tn


def _reference(x, w, b):
    out = x.double() @ w.double().T
    return out if b is None else out + b.double()


# (rows, in, out): empty, one row, small (mm), and above `ONEDNN_MIN_MACS` (oneDNN where present)
SHAPES = [(0, 24, 19), (1, 24, 19), (37, 24, 19), (300, 96, 80)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_mm_t_is_x_times_w_transposed_plus_bias(shape, transposed, with_bias):
    rows, k, m = shape
    x = torch.randn(rows, k)
    w = torch.randn(k, m).T if transposed else torch.randn(m, k)
    b = torch.randn(m) if with_bias else None
    got = mm_t(x, w, b)
    assert got.shape == (rows, m) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _reference(x, w, b), rtol=1e-5, atol=1e-4)


def test_mm_t_calls_onednn_only_for_large_products(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args[0].shape)
        return torch.nn.functional.linear(*args[:3])

    monkeypatch.setattr(functional, "ONEDNN_LINEAR", spy)
    mm_t(torch.randn(37, 24), torch.randn(19, 24))
    mm_t(torch.randn(300, 96), torch.randn(80, 96))
    assert calls == [(300, 96)]


@pytest.mark.parametrize("p, q", [(16, 300), (300, 16), (7, 9)])
def test_mm_tn_is_a_transposed_times_b(p, q):
    rows = 1024 if p * q > 100 else 5  # large enough for oneDNN, and a tiny product
    a, b = torch.randn(rows, p), torch.randn(rows, q)
    got = mm_tn(a, b)
    assert got.shape == (p, q)
    torch.testing.assert_close(got.double(), a.double().T @ b.double(), rtol=1e-5, atol=1e-4)
    if p * q <= 100:
        assert torch.equal(got, a.T @ b)


def test_mm_t_leaves_other_dtypes_and_layouts_to_torch():
    w, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(mm_t(x, w, b), torch.addmm(b, x, w.T))
    strided = torch.randn(6, 4).T  # a non-contiguous [4, 6] input
    assert torch.equal(mm_t(strided, w.float()), strided @ w.float().T)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available(),
                    reason="oneDNN's linear is used on x86-64 builds with oneDNN only")
def test_the_onednn_linear_is_found_on_x86():
    assert functional.ONEDNN_LINEAR is not None


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


def test_the_fused_node_compiles_above_the_onednn_threshold():
    """torch.compile traces the plain ops (Inductor's lowering of the oneDNN op wants frozen weights)."""
    x = torch.randn(512, 64, requires_grad=True)
    weight, A, B = torch.randn(64, 64), torch.randn(8, 64, requires_grad=True), torch.randn(64, 8, requires_grad=True)

    def layer(x, A, B):
        return functional.fused_lora_linear(x, weight, None, A, B, 2.0)

    got = torch.compile(layer)(x, A, B)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (A, B), g)
    eager = layer(x, A, B)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-4)
    for got_g, want_g in zip(grads, torch.autograd.grad(eager, (A, B), g)):
        torch.testing.assert_close(got_g, want_g, rtol=1e-4, atol=1e-3)


def test_mm_t_follows_cpu_autocast_like_the_plain_op():
    x, w = torch.randn(300, 96), torch.randn(80, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mm_t(x, w).dtype == (x @ w.T).dtype == torch.bfloat16
