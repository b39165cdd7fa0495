"""``lora_bias``: PEFT 0.21.2 parity both ways (files, logits), 3 training steps from copied weights,
merge, and PEFT's refusals."""

import copy

import peft
import pytest
import torch
from torch import nn

import lorafit
from lorafit import ConfigError, LoraConfig, MergeError
from lorafit.testing import tiny_llama

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11], [8, 64, 128, 300, 2, 19, 77, 400]])
KWARGS = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_bias=True)


def biased_llama():
    """tiny Llama whose targeted projections have a bias (Llama's attention_bias / mlp_bias)."""
    return tiny_llama(attention_bias=True, mlp_bias=True)


def perturbed(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def test_forward_is_hand_math():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    model = lorafit.wrap(nn.Sequential(base), LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                                         init_lora_weights=False, lora_bias=True))
    w = perturbed(model).model[0].lora["default"]
    x = torch.randn(3, 6)
    expected = x @ base.weight.T + base.bias + 2.0 * ((x @ w.A.T) @ w.B.T + w.bias)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("direction", ["peft_to_lorafit", "lorafit_to_peft"])
def test_files_load_in_the_other_library_with_equal_logits(tmp_path, direction):
    base = biased_llama()
    if direction == "peft_to_lorafit":
        theirs = perturbed(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**KWARGS)))
        theirs.save_pretrained(tmp_path)
        expected = theirs.eval()(IDS).logits
        got = lorafit.load(base, tmp_path)(input_ids=IDS).logits
    else:
        ours = perturbed(lorafit.wrap(copy.deepcopy(base), LoraConfig(**KWARGS)))
        ours.save_adapter(tmp_path)
        expected = ours.eval()(input_ids=IDS).logits
        got = peft.PeftModel.from_pretrained(base, tmp_path).eval()(IDS).logits
    assert (got - expected).abs().max() <= 1e-5


def test_three_training_steps_give_peft_s_adapter():
    base = biased_llama()
    theirs = perturbed(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**KWARGS)))
    ours = lorafit.wrap(base, LoraConfig(**KWARGS))
    state = theirs.state_dict()
    with torch.no_grad():
        for path, layer in ours.lora_layers():
            w = layer.lora["default"]
            w.A.copy_(state[f"base_model.model.{path}.lora_A.default.weight"])
            w.B.copy_(state[f"base_model.model.{path}.lora_B.default.weight"])
            w.bias.copy_(state[f"base_model.model.{path}.lora_B.default.bias"])
    for model in (theirs, ours):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            model(input_ids=IDS, labels=IDS).loss.backward()
            opt.step()
    state = theirs.state_dict()
    for path, layer in ours.lora_layers():
        w = layer.lora["default"]
        for ours_t, key in ((w.A, "lora_A.default.weight"), (w.B, "lora_B.default.weight"),
                            (w.bias, "lora_B.default.bias")):
            ref = state[f"base_model.model.{path}.{key}"]
            assert (ours_t - ref).norm() <= 1e-5 * ref.norm(), (path, key)


def test_merge_adds_the_scaled_bias_and_unmerge_restores():
    base = biased_llama()
    model = perturbed(lorafit.wrap(base, LoraConfig(**KWARGS)))
    before = model(input_ids=IDS).logits
    bias0 = model.model.model.layers[0].self_attn.q_proj.base_layer.bias.detach().clone()
    model.merge()
    torch.testing.assert_close(model(input_ids=IDS).logits, before, rtol=1e-5, atol=1e-5)
    model.unmerge()
    torch.testing.assert_close(model.model.model.layers[0].self_attn.q_proj.base_layer.bias, bias0)


def test_peft_rules_are_kept():
    with pytest.raises(ConfigError, match="use_dora = True cannot be combined with lora_bias"):
        LoraConfig(lora_bias=True, use_dora=True)
    with pytest.raises(ConfigError, match="needs init_lora_weights True or False"):
        lorafit.wrap(tiny_llama(), LoraConfig(lora_bias=True, init_lora_weights="gaussian"))
    with pytest.raises(ConfigError, match="embed_tokens.*linear and convolution layers only"):
        lorafit.wrap(tiny_llama(), LoraConfig(lora_bias=True, target_modules=["embed_tokens"]))
    with pytest.warns(UserWarning, match="has no base bias"):
        model = lorafit.wrap(tiny_llama(), LoraConfig(lora_bias=True, target_modules=["q_proj"]))
    with pytest.raises(MergeError, match="has no bias"):
        model.merge()
