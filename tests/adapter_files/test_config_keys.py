"""adapter_config.json keys: PEFT's extras kept, newer keys reported, maths-changing ones refused."""

import json
import warnings

import pytest
import torch

import lorafit
from lorafit import AdapterFileError, LoraConfig
from lorafit.adapter_files import AdapterFileWarning
from lorafit.adapter_files.peft_config import config_from_peft, config_to_peft
from adapter_models import logits, small_llama

BASE = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


def test_use_dora_and_patterns_round_trip_through_the_json_object():
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True, use_rslora=True,
                        rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 4.0}, bias="lora_only",
                        modules_to_save=["lm_head"], layers_to_transform=[1], task_type="CAUSAL_LM")
    data = json.loads(json.dumps(config_to_peft(config, {})))
    assert data["peft_type"] == "LORA" and data["inference_mode"] is True and data["use_dora"] is True
    again, extras = config_from_peft(data, "x.json")
    assert again.replace(inference_mode=False) == config and extras == {}


def test_newer_keys_are_reported_and_written_back(tmp_path):
    model = lorafit.wrap(small_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.save_adapter(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data.update(future_option={"mode": "fast"}, future_flag=None, peft_version="9.0.0", megatron_core="megatron.core")
    config_file.write_text(json.dumps(data))
    with pytest.warns(AdapterFileWarning, match="keys lorafit does not use.*future_option = {'mode': 'fast'}") as seen:
        loaded = lorafit.load(small_llama(), tmp_path)
    assert not any("future_flag" in str(w.message) or "peft_version" in str(w.message) for w in seen)
    loaded.save_adapter(tmp_path / "again")
    written = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert written["future_option"] == {"mode": "fast"} and written["peft_version"] == "9.0.0"
    assert "future_flag" in written
    with pytest.warns(AdapterFileWarning, match="future_option"):
        reloaded = lorafit.load(small_llama(), tmp_path / "again")
    assert torch.equal(logits(reloaded), logits(model))


def test_unknown_init_scheme_loads_and_is_written_back(tmp_path):
    config, extras = config_from_peft({**BASE, "init_lora_weights": "mica"}, "x.json")
    assert config.init_lora_weights is True
    assert extras == {"init_lora_weights": "mica"}
    assert config_to_peft(config, extras)["init_lora_weights"] == "mica"


def test_base_rewriting_init_lorafit_cannot_redo_warns():
    with pytest.warns(AdapterFileWarning, match="init_lora_weights = 'corda' rewrites the base weights"):
        config_from_peft({**BASE, "init_lora_weights": "corda"}, "x.json")


def test_default_values_of_unsupported_keys_are_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config_from_peft({**BASE, "use_qalora": False, "lora_bias": False, "layer_replication": None,
                          "target_parameters": None, "trainable_token_indices": None, "qalora_group_size": 16,
                          "runtime_config": {"ephemeral_gpu_offload": False}}, "x.json")


@pytest.mark.parametrize("key,value", [("use_qalora", True), ("use_bdlora", {"block_size": 2}),
                                       ("arrow_config", {"top_k": 3}),
                                       ("alora_invocation_tokens", [5, 6]), ("kasa_config", {"a": 1})])
def test_maths_changing_keys_are_refused(key, value):
    with pytest.raises(AdapterFileError, match=f"x.json: uses PEFT features lorafit does not implement.*{key} = "):
        config_from_peft({**BASE, key: value}, "x.json")


def test_config_must_be_an_object():
    with pytest.raises(AdapterFileError, match="x.json: expected a JSON object, found list"):
        config_from_peft([1, 2], "x.json")
