"""`lorafit inspect` and `lorafit merge`, run as real subprocesses."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import lorafit
from lorafit.adapter_cli import export_merged
from lorafit.testing import tiny_causal_lm_dir
from adapter_models import logits, perturb_trainable, tiny_bert_cls

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def lorafit_cli(*args):
    return subprocess.run([sys.executable, "-m", "lorafit", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300)


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """A tiny Llama model directory (with tokenizer) and a trained-looking adapter for it."""
    root = tmp_path_factory.mktemp("llama")
    base = tiny_causal_lm_dir(root / "base")
    model = lorafit.wrap(AutoModelForCausalLM.from_pretrained(base), lorafit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2},
        init_lora_weights=False, task_type="CAUSAL_LM"))
    perturb_trainable(model)
    model.save_adapter(root / "adapter")
    return base, root / "adapter", model


def test_inspect_describes_the_adapter(llama_dirs):
    base, adapter, _ = llama_dirs
    result = lorafit_cli("inspect", adapter)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "r                4   lora_alpha 8   scaling 2" in out
    assert "targets          6 modules: down_proj x2, q_proj x2, v_proj x2" in out
    assert "ranks            r=2 on 2 modules, r=4 on 4 modules" in out
    # hidden 64, intermediate 128: q/v 2 layers x r4 x (64 + 64), down_proj 2 x r2 x (128 + 64)
    assert "parameters       2,816 (2,816 in LoRA factors" in out
    assert f"base model       {base}; fingerprint: LlamaForCausalLM (llama), 6 targeted weights" in out
    assert "adapter_model.safetensors" in out and "ok    every module's A and B" in out
    report = json.loads(lorafit_cli("inspect", "--json", adapter).stdout)
    assert report["parameters"]["total"] == 2816 and report["ok"]


def test_inspect_fails_on_a_broken_adapter(tmp_path, llama_dirs):
    (tmp_path / "adapter_config.json").write_text("{")
    (tmp_path / "adapter_model.safetensors").write_bytes((llama_dirs[1] / "adapter_model.safetensors").read_bytes())
    result = lorafit_cli("inspect", tmp_path)
    assert result.returncode == 1
    assert "lorafit inspect: error:" in result.stderr and "adapter_config.json: invalid JSON" in result.stderr


def test_merge_writes_a_plain_model_with_the_same_logits(tmp_path, llama_dirs):
    base, adapter, model = llama_dirs
    result = lorafit_cli("merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    assert (logits(merged, ids) - logits(model, ids)).abs().max() <= 1e-4
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.vocab_size == AutoTokenizer.from_pretrained(base).vocab_size
    again = lorafit_cli("merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "merged")
    assert again.returncode == 1 and "already exists and is not an empty directory" in again.stderr


def test_merge_of_a_classifier_keeps_labels_and_casts(tmp_path):
    base = tiny_bert_cls()
    base.save_pretrained(tmp_path / "base")
    model = lorafit.wrap(base, lorafit.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS",
                                                  modules_to_save=["classifier"], init_lora_weights=False))
    perturb_trainable(model)
    model.save_adapter(tmp_path / "adapter", metadata={"labels": ["neg", "neu", "pos"]})
    export_merged(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"), dtype="bf16")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert merged.dtype == torch.bfloat16 and merged.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert (logits(merged.float()) - logits(model)).abs().max() <= 0.05  # bf16 rounding only


def test_merge_of_a_qlora_adapter_rounds_the_base_like_training(tmp_path):
    pytest.importorskip("bitsandbytes")
    from lorafit.quant import quantize_model

    base = tiny_causal_lm_dir(tmp_path / "base")
    trained = lorafit.wrap(quantize_model(AutoModelForCausalLM.from_pretrained(base), "nf4"), lorafit.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    perturb_trainable(trained)
    trained.save_adapter(tmp_path / "adapter")
    assert lorafit.adapter_files.read_adapter_dir(tmp_path / "adapter").user_metadata["quantization"]["mode"] == "nf4"
    with warnings.catch_warnings():
        warnings.simplefilter("error", lorafit.adapter_files.AdapterFileWarning)  # fingerprints agree
        export_merged(str(base), str(tmp_path / "adapter"), str(tmp_path / "out"), dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    assert (logits(merged, ids) - logits(trained, ids)).abs().max() <= 1e-4
