"""trainable_token_indices: chosen embedding rows train, against PEFT 0.21.2 and by hand."""

import copy

import pytest
import torch
import torch.nn.functional as F

import lorafit
from lorafit.errors import ConfigError, TargetError
from lorafit.kinds.tokens import LoraTokens

import peft
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

IDS = torch.tensor([[1, 3, 5, 7], [5, 2, 3, 9], [6, 6, 0, 3]])


def tiny(tie: bool):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        tie_word_embeddings=tie)).eval()


TIED = dict(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5], init_lora_weights=False)
UNTIED = dict(r=2, target_modules=["q_proj"], init_lora_weights=False,
              trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [3, 6]})


def move_rows(model):
    torch.manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name or name.endswith(".values"):
                param.add_(torch.randn_like(param))


@pytest.mark.parametrize("tie, kwargs", [(True, TIED), (False, UNTIED), (True, {**TIED, "ensure_weight_tying": True})])
def test_files_and_logits_match_peft_both_ways(tmp_path, tie, kwargs):
    base = tiny(tie)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    move_rows(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    expected = peft_model(input_ids=IDS).logits
    assert (expected - base(input_ids=IDS).logits).abs().max() > 1e-2

    ours = lorafit.load(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(ours(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
    ours.save_adapter(tmp_path / "ours")
    saved = sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert saved == sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    # tied: only the embedding's rows are stored; untied: each module's own
    assert sum("trainable_tokens_delta" in k for k in saved) == (1 if tie else 2)
    strict = lorafit.load(copy.deepcopy(base), tmp_path / "ours", strict=True)  # fingerprint matches
    torch.testing.assert_close(strict(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(back(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)


def test_rows_replace_the_chosen_tokens_by_hand():
    model = lorafit.wrap(tiny(False), lorafit.LoraConfig(**{**UNTIED, "target_modules": ["v_proj"]}))
    move_rows(model)
    embed, head = model.model.model.embed_tokens, model.model.lm_head
    E = embed.base_layer.weight.detach().clone()
    E[[3, 5]] = embed.lora["default"].values.detach()
    torch.testing.assert_close(embed(IDS), F.embedding(IDS, E))
    H = head.base_layer.weight.detach().clone()
    H[[3, 6]] = head.lora["default"].values.detach()
    x = torch.randn(2, 16)
    torch.testing.assert_close(head(x), x @ H.T)


def test_three_training_steps_match_peft_and_tied_rows_stay_tied():
    base = tiny(True)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**TIED))
    ours = lorafit.wrap(copy.deepcopy(base), lorafit.LoraConfig(**TIED))
    state = peft_model.state_dict()
    with torch.no_grad():
        for path, layer in ours.lora_layers():
            w = layer.lora["default"]
            if isinstance(layer, LoraTokens):
                continue
            w.A.copy_(state[f"base_model.model.{path}.lora_A.default.weight"])
            w.B.copy_(state[f"base_model.model.{path}.lora_B.default.weight"])
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"
    start = state[key].detach().clone()
    for model in (peft_model, ours):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            model(input_ids=IDS, labels=IDS).loss.backward()
            optimizer.step()
    rows = ours.model.model.embed_tokens.lora["default"].values
    assert (rows - start).abs().max() > 1e-3
    torch.testing.assert_close(rows.detach(), peft_model.state_dict()[key], rtol=1e-5, atol=1e-6)
    assert ours.model.lm_head.lora["default"].rows() is rows  # the head reads the same rows
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_mixed_batch_equals_each_row_alone():
    model = lorafit.wrap(tiny(True), lorafit.LoraConfig(**TIED), "tokens")
    model.add_adapter("plain", lorafit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    move_rows(model)
    names = ["tokens", "plain", None]
    mixed = model(input_ids=IDS, adapter_names=names).logits
    for i, name in enumerate(names):
        if name is None:
            with model.disable_adapter():
                alone = model(input_ids=IDS[i:i + 1]).logits
        else:
            with model.using_adapter(name):
                alone = model(input_ids=IDS[i:i + 1]).logits
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=0)


def test_merge_writes_the_rows_and_unmerge_restores_them():
    model = lorafit.wrap(tiny(False), lorafit.LoraConfig(**UNTIED))
    move_rows(model)
    before = model.model.model.embed_tokens.base_layer.weight.detach().clone()
    unmerged = model(input_ids=IDS).logits
    model.merge()
    torch.testing.assert_close(model(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)
    model.unmerge()
    torch.testing.assert_close(model.model.model.embed_tokens.base_layer.weight, before)


@pytest.mark.parametrize("tokens, error, match", [
    ({"nope": [1]}, TargetError, "nope"), ([40], ConfigError, r"\[0, 32\)"), ([1, 1], ConfigError, "distinct"),
    ({"v_proj": [1]}, ConfigError, "target_modules also targets"), ({"norm": [1]}, ConfigError, "RMSNorm"),
])
def test_bad_indices_and_modules_are_refused_by_name(tokens, error, match):
    base = tiny(True)
    with pytest.raises(error, match=match):
        lorafit.wrap(base, lorafit.LoraConfig(r=2, target_modules=["v_proj"], trainable_token_indices=tokens))
    assert not any(isinstance(m, LoraTokens) for m in base.modules())


def test_ensure_weight_tying_refuses_different_rows_for_tied_modules():
    mismatch = dict(r=2, target_modules=["q_proj"], ensure_weight_tying=True,
                    trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [3, 6]})
    with pytest.raises(ValueError, match="different token indices"):  # PEFT refuses it too
        peft.get_peft_model(tiny(True), peft.LoraConfig(**mismatch))
    with pytest.raises(ConfigError, match="ensure_weight_tying = True.*different indices"):
        lorafit.wrap(tiny(True), lorafit.LoraConfig(**mismatch))
    with pytest.warns(UserWarning, match="no tied embeddings"):
        lorafit.wrap(tiny(False), lorafit.LoraConfig(**{**TIED, "ensure_weight_tying": True}))
