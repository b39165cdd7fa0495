"""Same base, same A/B copied across: lorafit and PEFT must give the same logits."""

import copy

import pytest
import torch

import lorafit
from lorafit.kinds.embedding import LoraEmbedding

import peft  # noqa: E402  (a dev dependency: a missing anchor fails)

from test_model import IDS, tiny_bert_cls, tiny_gpt2  # noqa: E402
from lorafit.testing import tiny_llama  # noqa: E402

CASES = {
    "llama-all-linear": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                            "gate_proj", "up_proj", "down_proj"])),
    "llama-rslora-patterns": (tiny_llama, dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"],
                                               rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3})),
    "gpt2-conv1d": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "gpt2-embedding": (tiny_gpt2, dict(r=4, lora_alpha=4, target_modules=["wte", "c_proj"], fan_in_fan_out=True)),
    "llama-embedding-rslora": (tiny_llama, dict(r=4, lora_alpha=2, use_rslora=True, target_modules=["embed_tokens", "q_proj"])),
    "bert-classifier": (tiny_bert_cls, dict(r=4, lora_alpha=8, target_modules=["query", "value"],
                                            modules_to_save=["classifier"])),
}


def copy_lora_weights(peft_model, lora_model, adapter="default"):
    """Randomise PEFT's factors and copy them into lorafit's matching layers."""
    state = peft_model.state_dict()
    torch.manual_seed(1)
    for path, layer in lora_model.lora_layers():
        w = layer.lora[adapter]
        prefix = f"base_model.model.{path}."
        if isinstance(layer, LoraEmbedding):
            a_key, b_key = prefix + f"lora_embedding_A.{adapter}", prefix + f"lora_embedding_B.{adapter}"
        else:
            a_key, b_key = prefix + f"lora_A.{adapter}.weight", prefix + f"lora_B.{adapter}.weight"
        with torch.no_grad():
            state[a_key].normal_()
            state[b_key].normal_(std=0.1)
            w.A.copy_(state[a_key])
            w.B.copy_(state[b_key])
    for path, module in lora_model.wrappers():
        if hasattr(module, "modules_to_save"):
            with torch.no_grad():
                for name, param in module.modules_to_save[adapter].named_parameters():
                    key = f"base_model.model.{path}.modules_to_save.{adapter}.{name}"
                    state[key].normal_()
                    param.copy_(state[key])


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_peft(case):
    factory, kwargs = CASES[case]
    base = factory()
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).eval()
    ours = lorafit.wrap(base, lorafit.LoraConfig(**kwargs)).eval()
    assert sorted(n for n, _ in ours.lora_layers()) == sorted(
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
        if type(m).__module__.startswith("peft.tuners.lora") and hasattr(m, "base_layer"))
    copy_lora_weights(peft_model, ours)
    with torch.no_grad():
        expected = peft_model(input_ids=IDS).logits
        got = ours(input_ids=IDS).logits
    assert (got - expected).abs().max() <= 1e-5
    # Merged must equal PEFT's unmerged output. (PEFT's own merge of GPT-2's tied `wte` also
    # changes `lm_head`, so its merged model disagrees with its unmerged one; lorafit unties first.)
    ours_merged = ours.merge_and_unload()
    with torch.no_grad():
        assert (ours_merged(input_ids=IDS).logits - expected).abs().max() <= 1e-5


def test_trainable_parameter_count_matches_peft():
    kwargs = CASES["llama-rslora-patterns"][1]
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs))
    ours = lorafit.wrap(tiny_llama(), lorafit.LoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
