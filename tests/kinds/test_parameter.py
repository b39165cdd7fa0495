"""target_parameters: LoRA on MoE expert parameters, against PEFT 0.21.2 and hand-written maths."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorafit
from lorafit.errors import AdapterFileError, ConfigError, TargetError
from lorafit.adapter_files.report import describe_adapter, format_report
from lorafit.kinds.parameter import LoraParameter

import peft
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import GptOssConfig, GptOssForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, \
    Qwen3MoeForCausalLM

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=8, num_experts_per_tok=2)


def tiny_mixtral():
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**SMALL, num_local_experts=3)).eval()


def tiny_qwen3_moe():
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**SMALL, num_experts=3, moe_intermediate_size=8,
                                              decoder_sparse_step=1)).eval()


def tiny_gpt_oss():
    torch.manual_seed(0)
    config = GptOssConfig(**SMALL, num_local_experts=3, layer_types=["full_attention"])
    return GptOssForCausalLM(config).eval()


EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
IDS = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(0))


def randomise(model):
    """Non-trivial factors (B is zero at init) in whichever library's model."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora" in name:
                param.normal_(std=0.3)


@pytest.mark.parametrize("factory, patterns", [
    (tiny_mixtral, {}), (tiny_qwen3_moe, {}), (tiny_gpt_oss, {}),
    (tiny_mixtral, dict(rank_pattern={"down_proj": 3}, alpha_pattern={"gate_up_proj": 5})),
])
def test_files_and_logits_match_peft_both_ways(tmp_path, factory, patterns):
    base = factory()
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_parameters=EXPERTS, **patterns))
    randomise(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    expected = peft_model(input_ids=IDS).logits
    assert (expected - base(input_ids=IDS).logits).abs().max() > 1e-3  # the adapter changes the output

    ours = lorafit.load(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(ours(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)

    ours.save_adapter(tmp_path / "ours")
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    strict = lorafit.load(copy.deepcopy(base), tmp_path / "ours", strict=True)  # fingerprint matches
    torch.testing.assert_close(strict(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(back(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", [EXPERTS, EXPERTS[::-1]])
def test_two_parameters_of_one_module_nest_as_peft_does(order):
    ours = lorafit.wrap(tiny_mixtral(), lorafit.LoraConfig(r=2, target_parameters=order))
    layers = dict(ours.lora_layers())
    # the parameter the module registers first (gate_up_proj) is wrapped first: the inner layer
    assert layers["model.layers.0.mlp.experts.base_layer"].parameter_name == "gate_up_proj"
    assert layers["model.layers.0.mlp.experts"].parameter_name == "down_proj"
    # A [E·r, in], B [out, r·E] with W [E, out, in]: gate_up_proj [3, 16, 16], down_proj [3, 16, 8]
    assert layers["model.layers.0.mlp.experts"].lora["default"].A.shape == (6, 8)
    assert layers["model.layers.0.mlp.experts"].lora["default"].B.shape == (16, 6)


def test_delta_is_per_expert_low_rank_by_hand():
    """ΔW[e] = s · B_e A_e with A_e = rows e·r..(e+1)·r of A, B_e = columns e, E+e, ... of B."""
    module = nn.Module()
    module.w = nn.Parameter(torch.randn(3, 5, 4))
    layer = LoraParameter(module, "w")
    weights = layer.create("a", r=2, scaling=0.5, init=False)
    A, B = weights.A.detach(), weights.B.detach()
    for e in range(3):
        a_e = A[2 * e: 2 * e + 2]  # [r, in]
        b_e = torch.stack([B[:, 0 * 3 + e], B[:, 1 * 3 + e]], dim=1)  # [out, r]
        torch.testing.assert_close(weights.delta()[e], 0.5 * b_e @ a_e)


def test_a_2d_parameter_is_a_linear_update():
    linear = nn.Linear(4, 3)
    holder = nn.Sequential(linear)
    model = lorafit.wrap(holder, lorafit.LoraConfig(r=2, lora_alpha=4, target_parameters=["0.weight"],
                                                    init_lora_weights=False))
    w = model.model[0].lora["default"]
    x = torch.randn(5, 4)
    expected = F.linear(x, linear.weight + 2.0 * w.B @ w.A, linear.bias)
    torch.testing.assert_close(model(x), expected)


def test_three_training_steps_match_peft():
    base = tiny_mixtral()
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_parameters=EXPERTS))
    ours = lorafit.wrap(copy.deepcopy(base), lorafit.LoraConfig(r=2, target_parameters=EXPERTS))
    randomise(peft_model)
    state = peft_model.state_dict()
    pairs = []
    for path, layer in ours.lora_layers():
        w = layer.lora["default"]
        for ours_param, key in ((w.A, f"base_model.model.{path}.lora_A.default.weight"),
                                (w.B, f"base_model.model.{path}.lora_B.default.weight")):
            with torch.no_grad():
                ours_param.copy_(state[key])
            pairs.append((ours_param, key, state[key].detach().clone()))
    for model in (peft_model, ours):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            model(input_ids=IDS, labels=IDS).loss.backward()
            optimizer.step()
    state = peft_model.state_dict()
    for param, key, start in pairs:
        assert (state[key] - start).abs().max() > 1e-3  # the steps moved it
        torch.testing.assert_close(param.detach(), state[key], rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_mixed_batch_equals_each_row_alone():
    """A row with the MoE adapter, one with a plain attention adapter and a base row, in one
    batch, against each row run alone (PEFT refuses such a batch)."""
    model = lorafit.wrap(tiny_mixtral(), lorafit.LoraConfig(r=2, target_parameters=EXPERTS), "moe")
    model.add_adapter("attn", lorafit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    randomise(model)
    names = ["moe", "attn", None]
    mixed = model(input_ids=IDS, adapter_names=names).logits
    for i, name in enumerate(names):
        if name is None:
            with model.disable_adapter():
                alone = model(input_ids=IDS[i:i + 1]).logits
        else:
            with model.using_adapter(name):
                alone = model(input_ids=IDS[i:i + 1]).logits
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=0)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-3


def test_merge_equals_unmerged_and_unmerge_restores():
    model = lorafit.wrap(tiny_mixtral(), lorafit.LoraConfig(r=2, target_parameters=EXPERTS))
    randomise(model)
    before = model.model.model.layers[0].mlp.experts.base_layer.base_layer.gate_up_proj.detach().clone()
    unmerged = model(input_ids=IDS).logits
    model.merge()
    torch.testing.assert_close(model(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)
    model.unmerge()
    torch.testing.assert_close(model.model.model.layers[0].mlp.experts.base_layer.base_layer.gate_up_proj,
                               before, atol=1e-6, rtol=0)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, LoraParameter) for m in plain.modules())
    torch.testing.assert_close(plain(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("change, field", [(dict(lora_dropout=0.1), "lora_dropout"), (dict(use_dora=True), "use_dora"),
                                           (dict(init_lora_weights="orthogonal"), "init_lora_weights")])
def test_settings_peft_refuses_are_refused_by_name(change, field):
    base = tiny_mixtral()
    with pytest.raises(ConfigError, match=field):
        lorafit.wrap(base, lorafit.LoraConfig(r=2, target_parameters=EXPERTS, **change))
    assert not any(isinstance(m, LoraParameter) for m in base.modules())


def test_unmatched_entries_and_different_sets_are_refused():
    with pytest.raises(TargetError, match="experts.nope"):
        lorafit.wrap(tiny_mixtral(), lorafit.LoraConfig(r=2, target_parameters=["experts.nope", EXPERTS[0]]))
    model = lorafit.wrap(tiny_mixtral(), lorafit.LoraConfig(r=2, target_parameters=EXPERTS))
    with pytest.raises(ConfigError, match="same parameters"):
        model.add_adapter("other", lorafit.LoraConfig(r=2, target_parameters=EXPERTS[:1]))
    model.add_adapter("second", lorafit.LoraConfig(r=4, target_parameters=EXPERTS))
    assert len(list(model.lora_layers())) == 2  # the second adapter joins the existing layers


def test_a_file_with_the_wrong_rank_is_refused_before_the_model_changes(tmp_path):
    base = tiny_mixtral()
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_parameters=EXPERTS))
    peft_model.save_pretrained(tmp_path)
    config = (tmp_path / "adapter_config.json").read_text().replace('"r": 2', '"r": 3')
    (tmp_path / "adapter_config.json").write_text(config)
    with pytest.raises(AdapterFileError, match="rank"):
        lorafit.load(base, tmp_path)
    assert not any(isinstance(m, LoraParameter) for m in base.modules())


@pytest.mark.parametrize("saved_by", ["lorafit", "peft"])
def test_inspect_gives_each_parameter_its_pattern_rank_and_names_a_wrong_tensor(tmp_path, saved_by):
    torch.manual_seed(0)
    base = MixtralForCausalLM(MixtralConfig(**{**SMALL, "num_hidden_layers": 3}, num_local_experts=3)).eval()
    kwargs = dict(r=2, target_parameters=EXPERTS, rank_pattern={"down_proj": 3})
    if saved_by == "peft":
        peft.get_peft_model(base, peft.LoraConfig(**kwargs)).save_pretrained(tmp_path)
    else:
        lorafit.wrap(base, lorafit.LoraConfig(**kwargs)).save_adapter(tmp_path)
    report = describe_adapter(tmp_path)
    assert report["ok"], report["checks"]
    experts = "model.layers.0.mlp.experts"  # gate_up_proj is registered first: the inner layer
    assert report["parameter_targets"][experts + ".base_layer"] == \
        {"parameter": experts + ".gate_up_proj", "rank": 2, "experts": 3}
    assert report["parameter_targets"][experts] == {"parameter": experts + ".down_proj", "rank": 3, "experts": 3}
    text = format_report(report)
    assert "r=2 on 3 modules, r=3 on 3 modules" in text and "gate_up_proj x3, down_proj x3" in text

    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    prefix = "base_model.model.model.layers."
    tensors[prefix + "0.mlp.experts.lora_A.weight"] = torch.zeros(10, 8)  # one row too many
    tensors[prefix + "1.mlp.experts.lora_A.weight"] = torch.zeros(6, 8)  # down_proj saved with r = 2
    tensors[prefix + "1.mlp.experts.lora_B.weight"] = torch.zeros(16, 6)
    save_file(tensors, path, metadata={"format": "pt"})
    failed = [text for ok, text in describe_adapter(tmp_path)["checks"] if not ok]
    assert len(failed) == 3, failed
    assert f"{prefix}0.mlp.experts.lora_A.weight' has shape (10, 8), expected (9, 8)" in failed[0]
    assert f"{prefix}1.mlp.experts.lora_A.weight' has shape (6, 8), expected (9, 8)" in failed[1]
    assert "rank 3 of model.layers.1.mlp.experts.down_proj from adapter_config.json, 3 experts" in failed[1]
