"""Adapters made by the prepared schemes: saved with their scheme and settings (PEFT's keys),
PEFT's files of them load, `lorafit inspect` says how each was initialised, and a wrong config
between prepare and wrap is refused."""

import copy
import json
import re

import peft
import pytest
import torch

import lorafit
from lorafit import ConfigError, LoraConfig
from lorafit.adapter_files.report import describe_adapter, format_report
from lorafit.inits import prepare
from lorafit.layers import LoraLayer
from lorafit.inits.conversion import plain_lora_config, plain_lora_factors, snapshot_factors

from init_data import TARGETS, token_batches


def test_saved_corda_adapter_records_its_init_and_reloads_on_the_rewritten_base(base, tmp_path):
    batches = token_batches()
    config = prepare(base, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="corda",
                                      corda_config={"corda_method": "kpm"}), batches)
    model = lorafit.wrap(base, config)
    out = model.save_adapter(tmp_path / "corda")[0]
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "corda" and saved["corda_config"] == {"corda_method": "kpm"}
    text = format_report(describe_adapter(out))
    assert re.search(r'initialised +init_lora_weights "corda" \({"corda_method": "kpm"}\); it rewrote the base '
                     r'weights', text)
    rewritten = copy.deepcopy(model).unload()  # the base that ships with the adapter
    ids = batches[0]["input_ids"]
    with pytest.warns(UserWarning, match="'corda' rewrites the base weights"):
        loaded = lorafit.load(rewritten, out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_peft_eva_adapter_loads_with_its_settings(base, tmp_path):
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, target_modules=["q_proj", "o_proj"], init_lora_weights="eva", eva_config=peft.EvaConfig(rho=1.5)))
    batch = token_batches(count=1, rows=4, length=16)[0]
    peft.initialize_lora_eva_weights(theirs, [batch], show_progress_bar=False)
    theirs.save_pretrained(tmp_path / "eva")
    report = describe_adapter(tmp_path / "eva")
    assert report["initialised"]["scheme"] == "eva" and report["initialised"]["settings"]["rho"] == 1.5
    assert report["initialised"]["rewrites_base"] is False
    ours = lorafit.load(base, tmp_path / "eva")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=batch["input_ids"]).logits,
                                   theirs(input_ids=batch["input_ids"]).logits)


def test_wrap_refuses_a_config_other_than_the_prepared_one_before_changing_the_model(base):
    config = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="loftq")
    prepare(base, config)
    with pytest.raises(ConfigError, match=r"'model.layers.0.self_attn.q_proj' was prepared for rank 4 and scale 2, "
                                          r"but the config gives rank 2 and scale 1"):
        lorafit.wrap(base, config.replace(r=2, lora_alpha=2))
    assert not any(isinstance(m, LoraLayer) for m in base.modules())  # refused before any module changed
    lorafit.wrap(base, config)  # the prepared factors are still there for the right config


def test_prepare_on_a_lora_model_runs_the_base_and_adds_an_adapter(base):
    """Preparing a second adapter: the first (non-zero) adapter is off during the passes."""
    batches = token_batches()
    reference = prepare(copy.deepcopy(base), LoraConfig(r=4, target_modules=["o_proj"], init_lora_weights="eva"),
                        batches)
    model = lorafit.wrap(base, LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    config = prepare(model, LoraConfig(r=4, target_modules=["o_proj"], init_lora_weights="eva"), batches)
    assert config.rank_pattern == reference.rank_pattern
    model.add_adapter("eva", config)
    assert model.peft_config["eva"].init_lora_weights == "eva"
    assert not model.model.model.layers[0].self_attn.o_proj.lora["eva"].B.any()


def test_lora_ga_adapter_converts_to_a_plain_lora_for_the_original_base(base):
    """W_res = W − s·B₀A₀, so ΔW = s(BA − B₀A₀) on the original W is the trained layer."""
    original = copy.deepcopy(base)
    batches = token_batches()
    config = prepare(base, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="lora_ga"), batches)
    model = lorafit.wrap(base, config)
    initial = snapshot_factors(model)
    with torch.no_grad():
        for _, layer in model.lora_layers():
            layer.lora["default"].A.add_(0.01 * torch.randn_like(layer.lora["default"].A))  # "training"
    plain = lorafit.wrap(original, plain_lora_config(config).replace(init_lora_weights=False))
    factors = plain_lora_factors(model, "default", initial)
    with torch.no_grad():
        for path, layer in plain.lora_layers():
            layer.lora["default"].A.copy_(factors[path][0])
            layer.lora["default"].B.copy_(factors[path][1])
        ids = batches[0]["input_ids"]
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
