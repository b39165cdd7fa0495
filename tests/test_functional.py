import torch
import torch.nn.functional as F

from lorafit.functional import delta_weight, linear_cross_entropy


def test_delta_weight_is_scaled_product():
    A, B = torch.randn(3, 5), torch.randn(4, 3)
    torch.testing.assert_close(delta_weight(A, B, 0.5), 0.5 * B @ A)


def test_delta_weight_conv_layout():
    A, B = torch.randn(2, 3, 3, 3), torch.randn(4, 2, 1, 1)
    expected = torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A)
    torch.testing.assert_close(delta_weight(A, B, 1.0), expected)


def test_linear_cross_entropy_matches_full_logits_value_and_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    weight, bias = torch.randn(50, 16), torch.randn(50)
    targets = torch.randint(0, 50, (2, 7))
    targets[0, :3] = -100
    got = linear_cross_entropy(hidden, weight, bias, targets, chunk=4)
    (g_got,) = torch.autograd.grad(got * 2.0, hidden)
    logits = hidden @ weight.T + bias
    want = F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), ignore_index=-100, reduction="sum")
    (g_want,) = torch.autograd.grad(want * 2.0, hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)


def test_linear_cross_entropy_trainable_head_falls_back_to_full_logits():
    hidden = torch.randn(5, 8)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 11, (5,))
    loss = linear_cross_entropy(hidden, weight, None, targets)
    (grad,) = torch.autograd.grad(loss, weight)
    assert grad.shape == weight.shape and grad.abs().sum() > 0


def test_linear_cross_entropy_without_grad_gives_the_same_value():
    hidden, weight = torch.randn(9, 8), torch.randn(13, 8)
    targets = torch.randint(0, 13, (9,))
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, None, targets, chunk=4)
    want = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
