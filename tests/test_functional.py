import pytest
import torch
import torch.nn.functional as F

import lorafit.functional
from lorafit.functional import causal_lm_loss, delta_weight, linear_cross_entropy


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
    w = weight.detach().requires_grad_()
    (want,) = torch.autograd.grad(F.cross_entropy(hidden @ w.T, targets, reduction="sum"), w)
    torch.testing.assert_close(grad, want)


def test_linear_cross_entropy_without_grad_gives_the_same_value():
    hidden, weight = torch.randn(9, 8), torch.randn(13, 8)
    targets = torch.randint(0, 13, (9,))
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, None, targets, chunk=4)
    want = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_items", [None, 97, "tensor", "shift_labels"])
def test_causal_lm_loss_equals_transformers_loss(monkeypatch, dtype, num_items):
    """Against transformers' own ForCausalLMLoss, in several chunks (the last one ragged), with
    ignored labels, `num_items_in_batch` (int or tensor) or given `shift_labels`: the loss within
    an ulp; the gradient of ``loss.backward()`` bit for bit in bf16/fp16 (both form it in fp32 and
    round once) and within an ulp in fp32; scaled by 3 (a second rounding) within two ulps."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    monkeypatch.setattr(lorafit.functional, "LOGITS_CHUNK", 7 * 300)
    torch.manual_seed(0)
    logits = (torch.randn(3, 17, 300) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, 300, (3, 17))
    labels[0, :5] = -100
    labels[2, 12:] = -100
    kwargs = {"num_items_in_batch": {None: None, 97: 97, "tensor": torch.tensor(97)}.get(num_items)}
    if num_items == "shift_labels":
        kwargs = {"shift_labels": torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].flip(0)}
    want = ForCausalLMLoss(logits, labels, 300, **kwargs)
    got = causal_lm_loss(logits, labels, 300, **kwargs)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    (g_want,) = torch.autograd.grad(want, logits)
    (g_got,) = torch.autograd.grad(got, logits, retain_graph=True)
    assert g_got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-9)
    else:
        assert torch.equal(g_got, g_want)
    (g_scaled,) = torch.autograd.grad(got * 3.0, logits)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(g_scaled.float(), 3.0 * g_want.float(), rtol=2 * eps, atol=2 * eps * torch.finfo(dtype).tiny)
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(logits, labels, 300, **kwargs), want, rtol=1e-6, atol=0)


def test_causal_lm_loss_with_every_label_ignored_is_nan_with_a_zero_gradient_as_transformers():
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), -100)
    for loss_fn in (ForCausalLMLoss, causal_lm_loss):
        loss = loss_fn(logits, labels, 11)
        (grad,) = torch.autograd.grad(loss, logits)
        assert loss.isnan() and torch.equal(grad, torch.zeros_like(grad))


def test_causal_lm_loss_keeps_only_the_gradient_in_the_logits_dtype():
    """For backward it keeps one tensor: dL/dlogits in the logits' dtype (bf16 here), where a
    cross-entropy on upcast logits keeps fp32 copies of them."""
    logits = torch.randn(2, 16, 500, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 500, (2, 16))
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(logits, labels)
    assert saved == [((32, 500), torch.bfloat16)]


# -- the kernels at real layer sizes, where oneDNN takes over, against fp64 -----------------------

def _rel(got, want):
    return float((got.double() - want).abs().max() / want.abs().max())


def test_sizes_below_are_above_the_onednn_threshold():
    from lorafit import functional

    assert 256 * 1024 * 1024 >= functional.ONEDNN_MIN_MACS  # the products below take the oneDNN route
    assert functional.onednn_applies(torch.zeros(256, 1024), torch.zeros(1024, 1024))


def test_fused_lora_linear_at_real_size_matches_fp64():
    """A 1024x1024 projection, 256 rows, r=16, with dropout: forward and every gradient."""
    from lorafit.functional import dropout_keep, fused_lora_linear

    torch.manual_seed(0)
    x = torch.randn(256, 1024, requires_grad=True)
    W, b = torch.randn(1024, 1024) / 32, torch.randn(1024)
    A = (torch.randn(16, 1024) / 32).requires_grad_()
    B = (torch.randn(1024, 16) / 4).requires_grad_()
    torch.manual_seed(7)
    y = fused_lora_linear(x, W, b, A, B, 2.0, p=0.1)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, A, B], g)
    torch.manual_seed(7)
    keep = dropout_keep(x, 0.1).double()
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y64 = x64 @ W.double().T + b.double() + 2.0 * ((x64 * keep / 0.9) @ A64.T) @ B64.T
    want = torch.autograd.grad(y64, [x64, A64, B64], g.double())
    assert _rel(y, y64) < 1e-5
    for got, ref in zip(grads, want):
        assert _rel(got, ref) < 1e-5


def test_frozen_linear_and_chunked_cross_entropy_at_real_size_match_fp64():
    from lorafit.functional import frozen_linear

    torch.manual_seed(0)
    x = torch.randn(512, 1024, requires_grad=True)
    W = torch.randn(2048, 1024) / 32
    y = frozen_linear(x, W)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x)
    x64 = x.detach().double().requires_grad_()
    y64 = x64 @ W.double().T
    (gx64,) = torch.autograd.grad(y64.pow(2).sum(), x64)
    assert _rel(y, y64) < 1e-5 and _rel(gx, gx64) < 1e-5

    head = torch.randn(8000, 256) / 16
    hidden = torch.randn(2, 300, 256, requires_grad=True)
    targets = torch.randint(0, 8000, (2, 300))
    loss = linear_cross_entropy(hidden, head, None, targets, chunk=256)
    (gh,) = torch.autograd.grad(loss, hidden)
    h64 = hidden.detach().double().requires_grad_()
    loss64 = F.cross_entropy((h64 @ head.double().T).reshape(-1, 8000), targets.reshape(-1), reduction="sum")
    (gh64,) = torch.autograd.grad(loss64, h64)
    assert abs(loss.item() - loss64.item()) / loss64.item() < 1e-5 and _rel(gh, gh64) < 1e-5


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["own dtype", "bf16 compute"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fused_and_frozen_linear_without_a_graph_equal_the_autograd_nodes(dtype, p):
    """Inference skips the autograd node (no ctx, nothing saved) and gives the node's output bit
    for bit: the same products, the same dropout mask for a seed, a callable weight, HF Conv1D's
    [in, out] layout."""
    from lorafit.functional import frozen_linear, fused_lora_linear

    torch.manual_seed(0)
    x = torch.randn(2, 128, 1024)
    W, b = torch.randn(1024, 768) / 32, torch.randn(768)
    A, B = (torch.randn(16, 1024) / 32).requires_grad_(), (torch.randn(768, 16) / 4).requires_grad_()
    outputs = []
    for grad in (True, False):
        torch.manual_seed(7)
        with torch.set_grad_enabled(grad):
            y = fused_lora_linear(x, lambda: W, b, A, B, 2.0, p=p, w_in_out=True, dtype=dtype)
            base = frozen_linear(x, W, b, w_in_out=True)
        assert (y.grad_fn is not None) == grad and base.grad_fn is None
        outputs.append((y, base))
    (with_graph, base_with_graph), (without, base_without) = outputs
    assert with_graph.dtype == without.dtype == (dtype or torch.float32)
    assert torch.equal(with_graph, without) and torch.equal(base_with_graph, base_without)
    assert torch.equal(base_without, frozen_linear(x.requires_grad_(), W, b, w_in_out=True).detach())


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16 head", "fp32 head under bf16 autocast"])
def test_chunked_cross_entropy_with_bf16_logits_matches_the_full_logits_loss(autocast):
    """bf16 logits take the fp32 workspace every chunk reuses (a ragged last chunk, a bias): the
    loss and dL/dh of HF's loss on full logits upcast to fp32, and the same loss without a graph."""
    torch.manual_seed(0)
    dtype = torch.float32 if autocast else torch.bfloat16
    hidden = torch.randn(700, 256, dtype=dtype, requires_grad=True)
    head, bias = (torch.randn(3000, 256) / 16).to(dtype), torch.randn(3000).to(dtype)
    targets = torch.randint(0, 3000, (700,))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = linear_cross_entropy(hidden, head, bias, targets, chunk=256)
        (g_got,) = torch.autograd.grad(got, hidden)
        logits = torch.addmm(bias, hidden, head.T)
        want = F.cross_entropy(logits.float(), targets, reduction="sum")
        (g_want,) = torch.autograd.grad(want, hidden)
        with torch.no_grad():
            no_graph = linear_cross_entropy(hidden, head, bias, targets, chunk=256)
    assert logits.dtype == torch.bfloat16 and got.dtype == torch.float32
    assert abs(got.item() - want.item()) <= 1e-5 * want.item()
    assert no_graph.item() == got.item()
    assert g_got.dtype == hidden.dtype and _rel(g_got, g_want.double()) < 1e-3
