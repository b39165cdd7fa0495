"""Inference loads the base as the adapter was trained: recorded dtype and quantisation."""

import json

import bitsandbytes  # noqa: F401  (a dev dependency: the quantised base below)
import torch

import lorafit
from lorafit.adapter_files import inference_dtype, read_adapter_dir, trained_base
from lorafit.quant import is_quantized_linear, quantize_model
from lorafit.testing import tiny_causal_lm_dir, tiny_llama
from lorafit.train.modeling import load_trained


def test_save_records_the_base_dtype_and_quantisation(tmp_path):
    bf16 = lorafit.wrap(tiny_llama().to(torch.bfloat16), lorafit.LoraConfig(target_modules=["q_proj"]))
    bf16.save_adapter(tmp_path / "bf16")
    assert trained_base(read_adapter_dir(tmp_path / "bf16")) == lorafit.adapter_files.TrainedBase("bf16", None)
    nf4 = lorafit.wrap(quantize_model(tiny_llama(), "nf4"), lorafit.LoraConfig(target_modules=["q_proj"]))
    nf4.save_adapter(tmp_path / "nf4")
    record = trained_base(read_adapter_dir(tmp_path / "nf4"))
    assert record.dtype == "fp32" and record.quantization["mode"] == "nf4"


def test_auto_means_as_trained_and_an_explicit_dtype_wins(tmp_path):
    lorafit.wrap(tiny_llama().to(torch.bfloat16), lorafit.LoraConfig(target_modules=["q_proj"])).save_adapter(tmp_path)
    adapter = read_adapter_dir(tmp_path)
    assert inference_dtype("auto", [adapter]) == "bf16"
    assert inference_dtype("fp32", [adapter]) == "fp32"
    assert inference_dtype("auto", []) == "auto"


def test_generate_s_loader_quantises_like_training(tmp_path):
    base_dir = tiny_causal_lm_dir(tmp_path / "base")
    base = type(tiny_llama()).from_pretrained(base_dir)
    model = lorafit.wrap(quantize_model(base, "nf4", skip=("lm_head",)),
                         lorafit.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    model.save_adapter(tmp_path / "adapter")
    loaded, _, _ = load_trained(str(base_dir), tmp_path / "adapter")
    assert any(is_quantized_linear(m) for m in loaded.modules())
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-5, json.dumps(trained_base(read_adapter_dir(tmp_path / "adapter")).quantization)
