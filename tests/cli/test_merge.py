"""``lorafit merge`` and the library call behind it (`lorafit.export.export_merged`)."""

import warnings

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import lorafit
from lorafit.cli import main
from lorafit.export import export_merged
from lorafit.quant import quantize_model
from lorafit.testing import tiny_causal_lm_dir

from adapter_models import logits, perturb_trainable, tiny_bert_cls


def test_merge_writes_a_plain_model_with_the_same_logits(tmp_path, llama_dirs, capsys):
    base, adapter, model = llama_dirs
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]
    assert main(argv) == 0 and capsys.readouterr().out == f"merged model written to {tmp_path / 'merged'}\n"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    assert (logits(merged, ids) - logits(model, ids)).abs().max() <= 1e-4
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.vocab_size == AutoTokenizer.from_pretrained(base).vocab_size
    assert main(argv) == 1 and "already exists and is not an empty directory" in capsys.readouterr().err


def test_merge_of_a_classifier_keeps_labels_and_casts(tmp_path):
    base = tiny_bert_cls()
    base.save_pretrained(tmp_path / "base")
    model = lorafit.wrap(base, lorafit.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS",
                                                  modules_to_save=["classifier"], init_lora_weights=False))
    perturb_trainable(model)
    model.save_adapter(tmp_path / "adapter", metadata={"labels": ["neg", "neu", "pos"]})
    export_merged(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"), dtype="bfloat16")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert merged.dtype == torch.bfloat16 and merged.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert (logits(merged.float()) - logits(model)).abs().max() <= 0.05  # bf16 rounding only


def test_merge_of_a_qlora_adapter_rounds_the_base_like_training(tmp_path):
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
