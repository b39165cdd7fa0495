"""Adapters move between PEFT and lorafit both ways with the same logits."""

import copy

import pytest
import torch

import lorafit
from adapter_models import logits, perturb_trainable, small_llama, tiny_bert_cls, tiny_gpt2

import peft  # noqa: E402  (a dev dependency: a missing anchor fails)

ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "llama-attn-mlp": (small_llama, dict(r=4, lora_alpha=8, target_modules=ALL_LLAMA, task_type="CAUSAL_LM")),
    "gpt2-conv1d": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                    fan_in_fan_out=True)),
    "bert-classifier": (tiny_bert_cls, dict(r=4, lora_alpha=8, target_modules=["query", "value"],
                                            modules_to_save=["classifier"], task_type="SEQ_CLS")),
    "llama-embedding": (small_llama, dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])),
    "llama-rslora-patterns": (small_llama, dict(r=8, lora_alpha=16, use_rslora=True,
                                                target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                                                alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3})),
    "bert-bias-lora-only": (tiny_bert_cls, dict(r=2, target_modules=["query", "value"], bias="lora_only",
                                                modules_to_save=["classifier"], task_type="SEQ_CLS")),
    "gpt2-bias-all": (tiny_gpt2, dict(r=2, target_modules=["c_attn"], bias="all", fan_in_fan_out=True)),
    "bert-bias-all": (tiny_bert_cls, dict(r=2, target_modules=["key"], bias="all", modules_to_save=["classifier"],
                                          task_type="SEQ_CLS")),
    "llama-dora": (small_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_saves_lorafit_loads(case, tmp_path):
    factory, kwargs = CASES[case]
    # PEFT extends the caller's modules_to_save list in place, hence the deep copy
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(init_lora_weights=False, **copy.deepcopy(kwargs))).eval()
    perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lorafit.load(factory(), tmp_path)
    assert not any(p.requires_grad for p in ours.parameters())
    assert (logits(ours) - logits(theirs)).abs().max() <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_lorafit_saves_peft_loads(case, tmp_path):
    factory, kwargs = CASES[case]
    ours = lorafit.wrap(factory(), lorafit.LoraConfig(init_lora_weights=False, **kwargs)).eval()
    perturb_trainable(ours)
    ours.save_adapter(tmp_path)
    theirs = peft.PeftModel.from_pretrained(factory(), tmp_path).eval()
    assert (logits(theirs) - logits(ours)).abs().max() <= 1e-5
    assert (logits(theirs) - logits(factory())).abs().max() > 1e-3  # the adapter really changes the output


def _two_adapters_lorafit():
    model = lorafit.wrap(small_llama(), lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    model.add_adapter("b", lorafit.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "down_proj"],
                                              init_lora_weights=False))
    model.set_adapter(["default", "b"])
    perturb_trainable(model)
    return model.eval()


def test_two_adapters_lorafit_to_peft(tmp_path):
    ours = _two_adapters_lorafit()
    written = ours.save_adapter(tmp_path)
    assert written == [tmp_path, tmp_path / "b"]
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "b" / "adapter_config.json").is_file()
    theirs = peft.PeftModel.from_pretrained(small_llama(), tmp_path).eval()
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    for name in ("default", "b"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        assert (logits(theirs) - logits(ours)).abs().max() <= 1e-5


def test_two_adapters_peft_to_lorafit(tmp_path):
    theirs = peft.get_peft_model(small_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                 init_lora_weights=False))
    theirs.add_adapter("b", peft.LoraConfig(r=2, target_modules=["v_proj", "up_proj"], init_lora_weights=False))
    for name in ("default", "b"):
        theirs.set_adapter(name)
        perturb_trainable(theirs, seed=len(name))
    theirs.save_pretrained(tmp_path)
    ours = lorafit.load(small_llama(), tmp_path)
    ours.load_adapter(tmp_path / "b", adapter_name="b")
    assert ours.adapter_names == ["default", "b"]
    for name in ("default", "b"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        assert (logits(ours) - logits(theirs)).abs().max() <= 1e-5


def test_lorafit_round_trip_keeps_weights_metadata_and_trainability(tmp_path):
    ours = lorafit.wrap(tiny_bert_cls(), lorafit.LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS",
                                                            modules_to_save=["classifier"], init_lora_weights=False))
    perturb_trainable(ours)
    ours.save_adapter(tmp_path, metadata={"labels": ["neg", "neu", "pos"]})
    again = lorafit.load(tiny_bert_cls(), tmp_path, trainable=True)
    assert torch.equal(logits(again.eval()), logits(ours.eval()))
    assert lorafit.adapter_files.loaded_metadata(again) == {"base_dtype": "float32", "labels": ["neg", "neu", "pos"]}
    trainable = {n for n, p in again.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n or ".modules_to_save." in n for n in trainable)
    again.save_adapter(tmp_path / "copy")  # metadata carried over without being passed again
    assert lorafit.adapter_files.read_adapter_dir(tmp_path / "copy").user_metadata == {"base_dtype": "float32", "labels": ["neg", "neu", "pos"]}


def test_single_non_default_adapter_saves_to_the_directory_itself(tmp_path):
    ours = _two_adapters_lorafit()
    assert ours.save_adapter(tmp_path, adapter_names=["b"]) == [tmp_path]
    loaded = lorafit.load(small_llama(), tmp_path, adapter_name="b")
    ours.set_adapter("b")
    assert torch.equal(logits(loaded), logits(ours))


def test_loading_onto_a_lorafit_model_leaves_its_other_adapters(tmp_path):
    ours = _two_adapters_lorafit()
    ours.save_adapter(tmp_path, adapter_names=["b"])
    host = lorafit.wrap(small_llama(), lorafit.LoraConfig(r=4, target_modules=["q_proj", "k_proj"]))
    before = {p: p.detach().clone() for p in host.parameters()}
    host.load_adapter(tmp_path, adapter_name="b")
    assert all(torch.equal(p, before[p]) for p in host.parameters() if p in before)
    assert host.adapter_names == ["default", "b"] and host.active_adapters == ["default"]
    host.set_adapter("b")
    ours.set_adapter("b")
    assert (logits(host) - logits(ours)).abs().max() <= 1e-6


def test_merged_copy_matches_peft_merge(tmp_path):
    factory, kwargs = CASES["gpt2-conv1d"]
    ours = lorafit.wrap(factory(), lorafit.LoraConfig(init_lora_weights=False, **kwargs))
    perturb_trainable(ours)
    ours.save_adapter(tmp_path)
    theirs = peft.PeftModel.from_pretrained(factory(), tmp_path).merge_and_unload()
    assert (logits(theirs) - logits(copy.deepcopy(ours).merge_and_unload())).abs().max() <= 1e-5
