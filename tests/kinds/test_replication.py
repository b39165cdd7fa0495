"""layer_replication: a deeper model from shared layers, against PEFT 0.21.2; refused where the
rewritten base cannot be shared (mixed batches, merges, lorafit serve)."""

import copy

import pytest
import torch

import lorafit
from lorafit.errors import AdapterError, AdapterFileError, ConfigError, MergeError
from lorafit.serve.adapters import AdapterPool
from lorafit.testing import tiny_llama

import peft
from peft import PeftModel
from safetensors.torch import load_file

MAP = [[0, 2], [1, 2]]  # layers [0, 1] -> [0, 1, 1]
KWARGS = dict(r=2, target_modules=["q_proj", "v_proj"], layer_replication=MAP, init_lora_weights=False)
IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def base():
    return tiny_llama(vocab_size=64, hidden=16, layers=2, heads=2).eval()


def test_files_and_logits_match_peft_both_ways(tmp_path):
    plain = base()
    peft_model = peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(**KWARGS))
    peft_model.save_pretrained(tmp_path / "peft")
    expected = peft_model(input_ids=IDS).logits

    ours = lorafit.load(copy.deepcopy(plain), tmp_path / "peft")
    torch.testing.assert_close(ours(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
    layers = ours.model.model.layers
    assert len(layers) == 3 and ours.model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    # the copies of layer 1 share its weights but hold their own adapters
    assert layers[1].self_attn.q_proj.base_layer.weight is layers[2].self_attn.q_proj.base_layer.weight
    assert not torch.equal(layers[1].self_attn.q_proj.lora["default"].A, layers[2].self_attn.q_proj.lora["default"].A)

    ours.save_adapter(tmp_path / "ours")
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    strict = lorafit.load(copy.deepcopy(plain), tmp_path / "ours", strict=True)  # fingerprint matches
    torch.testing.assert_close(strict(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
    back = PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path / "ours")
    torch.testing.assert_close(back(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)


def test_three_training_steps_match_peft():
    plain = base()
    peft_model = peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(**KWARGS))
    ours = lorafit.wrap(copy.deepcopy(plain), lorafit.LoraConfig(**KWARGS))
    state = peft_model.state_dict()
    pairs = []
    with torch.no_grad():
        for path, layer in ours.lora_layers():
            for param, factor in ((layer.lora["default"].A, "lora_A"), (layer.lora["default"].B, "lora_B")):
                key = f"base_model.model.{path}.{factor}.default.weight"
                param.copy_(state[key])
                pairs.append((param, key, state[key].clone()))
    for model in (peft_model, ours):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            model(input_ids=IDS, labels=IDS).loss.backward()
            optimizer.step()
    state = peft_model.state_dict()
    for param, key, start in pairs:
        assert (state[key] - start).abs().max() > 1e-3
        torch.testing.assert_close(param.detach(), state[key], rtol=1e-5, atol=1e-6)


def test_mixed_batches_and_merges_are_refused_by_name():
    model = lorafit.wrap(base(), lorafit.LoraConfig(**KWARGS))
    with pytest.raises(AdapterError, match="layer_replication"):
        model(input_ids=IDS, adapter_names=["default", None])
    with pytest.raises(MergeError, match="layer_replication"):
        model.merge()


def test_a_bad_map_or_a_failed_load_leaves_the_model_as_it_was(tmp_path):
    plain = base()
    with pytest.raises(ConfigError, match=r"layer_replication entry \[1, 5\]"):
        lorafit.wrap(plain, lorafit.LoraConfig(**{**KWARGS, "layer_replication": [[0, 2], [1, 5]]}))
    assert len(plain.model.layers) == 2
    peft.get_peft_model(base(), peft.LoraConfig(**KWARGS)).save_pretrained(tmp_path)
    config = (tmp_path / "adapter_config.json").read_text().replace('"r": 2', '"r": 3')
    (tmp_path / "adapter_config.json").write_text(config)
    with pytest.raises(AdapterFileError, match="rank"):
        lorafit.load(plain, tmp_path)
    assert len(plain.model.layers) == 2 and plain.config.num_hidden_layers == 2


def test_serve_refuses_it_by_name(tmp_path):
    peft.get_peft_model(base(), peft.LoraConfig(**KWARGS)).save_pretrained(tmp_path / "deep")
    model = lorafit.LoraModel(base())
    pool = AdapterPool(model, {"deep": tmp_path / "deep"}, capacity=2)
    with pytest.raises(AdapterFileError, match="'deep' sets layer_replication"):
        pool.acquire("deep")
    assert model.adapter_names == [] and len(model.model.model.layers) == 2
