"""DoRA (`use_dora`): parity with PEFT (forward, dropout handling, gradients, merge), exact
merge/unmerge, mixed batches, several adapters, and refusals."""

import copy

import pytest
import torch
from torch import nn

import lorafit
from lorafit import ConfigError, LoraConfig
from lorafit.layers import LoraLayer
from lorafit.testing import tiny_llama
from lorafit.variants.dora import DoraWeights

import peft  # noqa: E402  (a dev dependency: a missing anchor fails)

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11], [8, 64, 128, 300, 2, 19, 77, 400]])
LLAMA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
GPT2 = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()


CASES = {"llama-linear": (tiny_llama, LLAMA), "gpt2-conv1d": (tiny_gpt2, GPT2)}


def peft_key(path, what):
    return f"base_model.model.{path}.{what}.default.weight"


def paired(factory, kwargs, **extra):
    """(PEFT model, lorafit model) on the same base with the same random A, B and magnitude."""
    base = factory()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs, **extra))
    ours = lorafit.wrap(base, LoraConfig(**kwargs, **extra))
    state = theirs.state_dict()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for path, layer in ours.lora_layers():
            w = layer.lora["default"]
            for name, key in (("A", "lora_A"), ("B", "lora_B"), ("magnitude", "lora_magnitude_vector")):
                src = state[peft_key(path, key)]
                if name == "magnitude":  # trained magnitudes move by a few percent
                    src.mul_(1 + 0.1 * torch.randn(src.shape, generator=gen))
                else:
                    src.add_(torch.randn(src.shape, generator=gen) * 0.3)
                getattr(w, name).copy_(src)
    return theirs, ours


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_peft(case):
    theirs, ours = paired(*CASES[case])
    with torch.no_grad():
        expected = theirs.eval()(IDS).logits
        got = ours.eval()(IDS).logits
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_dropout_and_gradients_match_peft(case):
    """With dropout on in training, PEFT feeds dropout(x) to both DoRA terms and recomputes
    W·dropout(x); the norm is detached. lorafit draws its masks as torch's dropout does on fp32
    inputs, so from one seed both libraries drop the same entries: same loss and gradients for
    A, B and m."""
    theirs, ours = paired(*CASES[case], lora_dropout=0.3)
    theirs.train()
    ours.train()
    torch.manual_seed(5)
    loss_theirs = theirs(IDS, labels=IDS).loss
    torch.manual_seed(5)
    loss_ours = ours(IDS, labels=IDS).loss
    loss_theirs.backward()
    loss_ours.backward()
    assert abs(loss_ours.item() - loss_theirs.item()) <= 1e-5
    grads = dict(theirs.named_parameters())
    for path, layer in ours.lora_layers():
        w = layer.lora["default"]
        for name, key in (("A", "lora_A"), ("B", "lora_B"), ("magnitude", "lora_magnitude_vector")):
            expected = grads[peft_key(path, key)].grad
            assert (getattr(w, name).grad - expected).abs().max() <= 1e-5, (path, name)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft_and_round_trips(case):
    theirs, ours = paired(*CASES[case])
    with torch.no_grad():
        unmerged = ours.eval()(IDS).logits
    before = {p: layer.base_layer.weight.detach().clone() for p, layer in ours.lora_layers()}
    merged_peft = theirs.merge_and_unload()
    ours.merge()
    with torch.no_grad():
        assert (ours(IDS).logits - unmerged).abs().max() <= 1e-5
    for path, layer in ours.lora_layers():
        assert (layer.base_layer.weight - merged_peft.get_submodule(path).weight).abs().max() <= 1e-5
    ours.unmerge()
    for path, layer in ours.lora_layers():
        assert (layer.base_layer.weight - before[path]).abs().max() <= 1e-6


def test_magnitude_starts_at_row_norms_and_output_is_unchanged():
    for factory, kwargs in CASES.values():
        base = factory()
        with torch.no_grad():
            expected = base(IDS).logits
        model = lorafit.wrap(base, LoraConfig(**kwargs))
        for _, layer in model.lora_layers():
            w = layer.lora["default"]
            assert isinstance(w, DoraWeights) and w.magnitude.requires_grad
            assert torch.allclose(w.magnitude, layer.weight_view().norm(dim=1), atol=1e-6)
        with torch.no_grad():
            assert (model(IDS).logits - expected).abs().max() <= 1e-5


def test_mixed_batch_rows_use_their_adapter():
    """PEFT refuses DoRA in a mixed batch; the group-by-adapter path serves it."""
    base = tiny_llama()
    model = lorafit.wrap(base, LoraConfig(**LLAMA, init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(**LLAMA, init_lora_weights=False))
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.eval()
    names = ["a", "b"]
    rows = torch.cat([IDS, IDS[:1]])
    with torch.no_grad():
        mixed = model(rows, adapter_names=["a", "b", None]).logits
        for i, name in enumerate(names):
            model.set_adapter(name)
            assert (mixed[i] - model(rows[i:i + 1]).logits[0]).abs().max() <= 1e-5
        with model.disable_adapter():
            assert (mixed[2] - model(rows[2:3]).logits[0]).abs().max() <= 1e-5
        # DoRA rows next to rows of a plain adapter (which alone would take the gathered path)
        assert (model(rows, adapter_names=["a", "plain", "plain"]).logits[0] - mixed[0]).abs().max() <= 1e-5


def test_several_active_adapters_merge_like_their_forward():
    """A plain and a DoRA adapter active together: merging both, or only one, changes no output,
    because DoRA always normalises against the base weight without merged adapters."""
    model = lorafit.wrap(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                         adapter_name="plain")
    model.add_adapter("dora", LoraConfig(**LLAMA, init_lora_weights=False))
    model.add_adapter("dora2", LoraConfig(**LLAMA, init_lora_weights=False))
    with torch.no_grad():
        for _, layer in model.lora_layers():
            for w in layer.lora.values():
                if isinstance(w, DoraWeights):
                    w.magnitude.mul_(1.2)
    model.set_adapter(["plain", "dora", "dora2"])
    model.eval()
    before = {p: layer.base_layer.weight.detach().clone() for p, layer in model.lora_layers()}
    with torch.no_grad():
        expected = model(IDS).logits
        for subset in (["dora"], ["plain"], ["dora2", "plain"], ["plain", "dora", "dora2"]):
            model.merge(subset)
            assert (model(IDS).logits - expected).abs().max() <= 1e-5, subset
            model.unmerge()
    for path, layer in model.lora_layers():
        assert (layer.base_layer.weight - before[path]).abs().max() <= 1e-6


def test_safe_merge_refuses_a_nan_magnitude():
    model = lorafit.wrap(tiny_llama(), LoraConfig(**LLAMA))
    layer = next(layer for _, layer in model.lora_layers())
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora["default"].magnitude[0] = float("nan")
    with pytest.raises(lorafit.MergeError):
        model.merge(safe=True)
    assert torch.equal(layer.base_layer.weight, before)


@pytest.mark.parametrize("model_fn, target, kind", [
    (tiny_llama, "embed_tokens", "Embedding"),
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)), "0", "Conv2d"),
])
def test_dora_on_unsupported_kinds_is_refused_by_name(model_fn, target, kind):
    model = model_fn()
    with pytest.raises(ConfigError, match=rf"use_dora.*'[\w.]*{target}' \({kind}\)"):
        lorafit.wrap(model, LoraConfig(target_modules=[target, *(["q_proj"] if kind == "Embedding" else [])],
                                       use_dora=True))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())  # nothing was replaced
