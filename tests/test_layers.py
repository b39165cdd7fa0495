"""Each layer kind against ``W x + s·B A x`` written out by hand."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafit import ConfigError, MergeError
from lorafit.kinds.conv import LoraConv
from lorafit.kinds.embedding import LoraEmbedding
from lorafit.kinds.linear import LoraLinear
from lorafit.routing import RowAdapters


def _randomise(layer, name="a"):
    w = layer.lora[name]
    with torch.no_grad():
        w.A.normal_()
        w.B.normal_()
    return w


def test_linear_forward_is_hand_math():
    base = nn.Linear(6, 5)
    layer = LoraLinear(base)
    layer.create("a", r=3, scaling=0.7, dropout=0.0, init=True)
    w = _randomise(layer)
    layer.active = ("a",)
    x = torch.randn(4, 2, 6)
    expected = x @ base.weight.T + base.bias + 0.7 * (x @ w.A.T) @ w.B.T
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_conv1d_fan_in_fan_out_is_hand_math():
    base = Conv1D(5, 6)  # nf=5 outputs, nx=6 inputs, weight stored [6, 5]
    layer = LoraLinear(base, fan_in_fan_out=True)
    layer.create("a", r=2, scaling=2.0, dropout=0.0, init=True)
    w = _randomise(layer)
    layer.active = ("a",)
    assert w.A.shape == (2, 6) and w.B.shape == (5, 2)
    x = torch.randn(3, 6)
    expected = x @ base.weight + base.bias + 2.0 * (x @ w.A.T) @ w.B.T
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_embedding_is_hand_math():
    base = nn.Embedding(10, 4, padding_idx=0)
    layer = LoraEmbedding(base)
    layer.create("a", r=3, scaling=0.5, dropout=0.0, init=True)
    w = _randomise(layer)
    layer.active = ("a",)
    ids = torch.tensor([[0, 3, 9], [1, 1, 2]])
    table = base.weight + 0.5 * (w.B @ w.A).T  # [num, dim]
    torch.testing.assert_close(layer(ids), table[ids], rtol=0, atol=1e-6)


@pytest.mark.parametrize("make,shape", [(lambda: nn.Conv2d(3, 4, 3, padding=1, stride=2), (2, 3, 7, 7)),
                                        (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 9))])
def test_conv_is_hand_math(make, shape):
    conv = make()
    layer = LoraConv(conv)
    layer.create("a", r=2, scaling=1.5, dropout=0.0, init=True)
    w = _randomise(layer)
    layer.active = ("a",)
    x = torch.randn(*shape)
    delta = 1.5 * (w.B.reshape(4, 2) @ w.A.reshape(2, -1)).reshape(conv.weight.shape)
    fn = F.conv2d if isinstance(conv, nn.Conv2d) else F.conv1d
    expected = fn(x, conv.weight + delta, conv.bias, conv.stride, conv.padding)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_grouped_conv_refused():
    with pytest.raises(ConfigError, match="groups=2"):
        LoraConv(nn.Conv2d(4, 4, 3, groups=2))


@pytest.mark.parametrize("make", [lambda: LoraLinear(nn.Linear(6, 5)),
                                  lambda: LoraLinear(Conv1D(5, 6), fan_in_fan_out=True),
                                  lambda: LoraEmbedding(nn.Embedding(10, 5)),
                                  lambda: LoraConv(nn.Conv2d(3, 5, 3))])
def test_merge_unmerge_round_trip(make):
    layer = make()
    layer.create("a", r=2, scaling=0.9, dropout=0.0, init=False)
    layer.active = ("a",)
    x = torch.randint(0, 10, (2, 3)) if isinstance(layer, LoraEmbedding) else (
        torch.randn(2, 3, 6, 6) if isinstance(layer, LoraConv) else torch.randn(2, 6))
    before = layer.base_layer.weight.detach().clone()
    unmerged = layer(x)
    layer.merge(["a"])
    assert layer.merged == ["a"]
    torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.base_layer(x), unmerged, rtol=0, atol=1e-5)
    layer.unmerge()
    assert (layer.base_layer.weight - before).abs().max() <= 1e-6


def test_bf16_merge_computes_delta_in_fp32():
    base = nn.Linear(64, 64).to(torch.bfloat16)
    layer = LoraLinear(base)
    w = layer.create("a", r=4, scaling=0.01, dropout=0.0, init=False)
    exact = (base.weight.float() + w.delta()).to(torch.bfloat16)
    layer.merge(["a"])
    assert torch.equal(base.weight, exact)


def test_safe_merge_refuses_nan_and_leaves_weight():
    layer = LoraLinear(nn.Linear(4, 4))
    w = layer.create("a", r=2, scaling=1.0, dropout=0.0, init=False)
    with torch.no_grad():
        w.B[0, 0] = float("nan")
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(MergeError, match="NaN/Inf"):
        layer.merge(["a"], safe=True)
    assert torch.equal(layer.base_layer.weight, before) and layer.merged == []


def test_mixed_rows_gathered_equals_each_adapter_alone():
    base = nn.Linear(6, 5)
    layer = LoraLinear(base)
    for name, r, s in (("a", 2, 0.5), ("b", 4, 2.0)):
        layer.create(name, r=r, scaling=s, dropout=0.0, init=False)
    x = torch.randn(3, 4, 6)
    with layer.router.using(rows=RowAdapters(["b", None, "a"])):
        assert layer.path(x, layer.router.route) == "gathered"
        mixed = layer(x)
    for row, name in enumerate(["b", None, "a"]):
        layer.active = (name,) if name else ()
        torch.testing.assert_close(mixed[row], layer(x[row:row + 1])[0], rtol=0, atol=1e-6)


def test_mixed_rows_gathered_gradients_are_each_rows_own():
    """Training on a mixed batch: the gathered path (which adds into the base output in place) gives
    x, a trainable bias and every adapter's factors the gradients of each row computed alone."""
    base = nn.Linear(6, 5)
    base.weight.requires_grad_(False)
    layer = LoraLinear(base)
    for name, r, s in (("a", 2, 0.5), ("b", 4, 2.0)):
        layer.create(name, r=r, scaling=s, dropout=0.0, init=False)
    names = ["b", None, "a"]
    x = torch.randn(3, 4, 6, requires_grad=True)
    params = [x, base.bias] + [p for n in ("a", "b") for p in (layer.lora[n].A, layer.lora[n].B)]
    with layer.router.using(rows=RowAdapters(names)):
        assert layer.path(x, layer.router.route) == "gathered"
        got = torch.autograd.grad(layer(x).pow(2).sum(), params)

    def alone(row, name):
        y = x[row] @ base.weight.T + base.bias
        if name is None:
            return y
        w = layer.lora[name]
        return y + w.scaling * (x[row] @ w.A.T) @ w.B.T

    want = torch.autograd.grad(torch.stack([alone(i, n) for i, n in enumerate(names)]).pow(2).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("bias_trains", [False, True])
def test_fused_linear_matches_composed_autograd(fan_in_fan_out, bias_trains):
    base = Conv1D(5, 6) if fan_in_fan_out else nn.Linear(6, 5)
    base.weight.requires_grad_(False)
    base.bias.requires_grad_(bias_trains)
    layer = LoraLinear(base, fan_in_fan_out=fan_in_fan_out)
    layer.create("a", r=3, scaling=0.7, dropout=0.0, init=False)
    layer.active = ("a",)
    w = layer.lora["a"]
    x = torch.randn(2, 4, 6, requires_grad=True)
    assert layer.path(x, layer.router.route) == "fused"
    y = layer(x)
    grads = torch.autograd.grad(y.pow(2).sum(), [x, w.A, w.B] + ([base.bias] if bias_trains else []))
    weight = base.weight.T if fan_in_fan_out else base.weight
    ref = x @ weight.T + base.bias + 0.7 * (x @ w.A.T) @ w.B.T
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), [x, w.A, w.B] + ([base.bias] if bias_trains else []))
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _OwnLinear(nn.Linear):
    """A base the fused kernel does not read (`kernel_weight` is None): the stacked path runs."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_draws_one_mask_stream_on_every_path(dtype):
    """Fused and stacked paths drop the same inputs for a seed, in forward and backward alike."""
    outputs = []
    for cls in (nn.Linear, _OwnLinear):
        torch.manual_seed(0)
        base = cls(16, 8).to(dtype).requires_grad_(False)
        layer = LoraLinear(base)
        layer.create("a", r=2, scaling=1.0, dropout=0.5, init=False)
        layer.lora["a"].to(dtype)  # adapters in the input's dtype, so the fused kernel can take them
        layer.active = ("a",)
        layer.train()
        x = torch.randn(64, 16, dtype=dtype, requires_grad=True)
        assert layer.path(x, layer.router.route) == ("fused" if cls is nn.Linear else "stacked")
        torch.manual_seed(3)
        y = layer(x)
        outputs.append((y, *torch.autograd.grad(y.float().pow(2).sum(), [x, layer.lora["a"].A, layer.lora["a"].B])))
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the paths round in another order
    for fused, stacked in zip(*outputs):
        assert (fused - stacked).abs().max() <= tol * stacked.abs().max()


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=["fp32_base", "bf16_base"])
def test_fused_linear_follows_autocast(base_dtype, autocast_dtype):
    """Under autocast the fused kernel computes in autocast's dtype as the composed path does:
    the same output dtype and values (one dropout mask stream), gradients in each input's dtype."""
    outputs = []
    for cls in (nn.Linear, _OwnLinear):
        torch.manual_seed(0)
        layer = LoraLinear(cls(256, 384).to(base_dtype).requires_grad_(False))
        w = layer.create("a", r=16, scaling=2.0, dropout=0.1, init=False)
        layer.active = ("a",)
        layer.train()
        x = torch.randn(4, 32, 256, dtype=base_dtype, requires_grad=True)
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=autocast_dtype):
            assert layer.path(x, layer.router.route) == ("fused" if cls is nn.Linear else "stacked")
            y = layer(x)
        assert y.dtype == autocast_dtype
        grads = torch.autograd.grad(y.float().pow(2).sum(), [x, w.A, w.B])
        assert [g.dtype for g in grads] == [base_dtype, torch.float32, torch.float32]
        outputs.append((y, *grads))
    for fused, stacked in zip(*outputs):
        assert (fused.float() - stacked.float()).abs().max() <= 2e-2 * stacked.float().abs().max()


def test_fused_linear_under_autocast_keeps_no_cast_copy_of_the_weight():
    """What the node saves for backward under autocast: the fp32 base weight itself (cast again in
    backward), not a bf16 copy of it alive from forward to backward."""
    base = nn.Linear(64, 96).requires_grad_(False)
    layer = LoraLinear(base)
    layer.create("a", r=4, scaling=1.0, dropout=0.0, init=False)
    layer.active = ("a",)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(8, 64, requires_grad=True))
    node = next(f for f, _ in y.grad_fn.next_functions if f is not None and "Fused" in type(f).__name__)
    weights = [t for t in node.saved_tensors if t is not None and t.shape == base.weight.shape]
    assert len(weights) == 1 and weights[0].dtype == torch.float32
    assert weights[0].data_ptr() == base.weight.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dropout_is_unbiased_in_every_dtype(dtype):
    """E[keep / (1 − p)] = 1: the kept fraction of 2²⁰ draws lies within 5σ of 1 − p."""
    from lorafit.functional import dropout_keep

    n, p = 1 << 20, 0.1
    kept = dropout_keep(torch.zeros(n, dtype=dtype), p).double().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept - (1 - p)) < 5 * sigma


def test_core_import_needs_only_torch_and_safetensors():
    import subprocess
    import sys

    code = ("import sys, lorafit; heavy = {'transformers', 'bitsandbytes', 'yaml', 'fastapi', 'peft'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
