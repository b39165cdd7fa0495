"""`wrap` / `LoraModel` on tiny Llama, GPT-2 and BERT models built from configs."""

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

import lorafit
from lorafit import AdapterError, ConfigError, LoraConfig, MergeError, TargetError
from lorafit.layers import LoraLayer, ModulesToSave
from lorafit.testing import tiny_llama


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()


def tiny_bert_cls():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


IDS = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(1))


def _factory_configs():
    return [
        (tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)),
        (tiny_gpt2, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "wte"],
                               init_lora_weights=False)),
        (tiny_bert_cls, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                                   init_lora_weights=False)),
    ]


def _out(model, ids=IDS, **kw):
    out = model(input_ids=ids, **kw)
    return out.logits


def test_init_true_starts_as_identity():
    base = tiny_llama()
    ref = _out(base)
    model = lorafit.wrap(base, LoraConfig(r=4, target_modules="all-linear"))
    torch.testing.assert_close(_out(model), ref, rtol=0, atol=0)


def test_all_linear_skips_output_head():
    model = lorafit.wrap(tiny_llama(), LoraConfig(target_modules="all-linear"))
    names = [n for n, _ in model.lora_layers()]
    assert "lm_head" not in names and len(names) == 2 * 7


@pytest.mark.parametrize("factory,cfg", _factory_configs())
def test_only_adapter_params_train_and_step_changes_nothing_else(factory, cfg):
    model = lorafit.wrap(factory(), cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n or ".modules_to_save." in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    _out(model).float().pow(2).mean().backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    assert any(not torch.equal(p, train_before[n]) for n, p in model.named_parameters() if n in train_before)


@pytest.mark.parametrize("factory,cfg", _factory_configs())
def test_merge_unmerge_and_merge_and_unload(factory, cfg):
    model = lorafit.wrap(factory(), cfg)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = _out(model)
    model.merge()
    torch.testing.assert_close(_out(model), unmerged, rtol=0, atol=1e-5)
    model.unmerge()
    for n, p in model.named_parameters():
        if n in weights:
            assert (p - weights[n]).abs().max() <= 1e-6, n
    plain = model.merge_and_unload()
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in plain.modules())
    torch.testing.assert_close(_out(plain), unmerged, rtol=0, atol=1e-5)


def test_disable_adapter_runs_base_even_when_merged():
    base = tiny_gpt2()
    ref = _out(base)
    model = lorafit.wrap(base, _factory_configs()[1][1])
    adapted = _out(model)
    model.merge()
    with model.disable_adapter():
        torch.testing.assert_close(_out(model), ref, rtol=0, atol=1e-5)
    assert model.merged_adapters == ["default"]
    torch.testing.assert_close(_out(model), adapted, rtol=0, atol=1e-5)


@pytest.mark.parametrize("factory,cfg", _factory_configs())
def test_mixed_batch_rows_equal_each_adapter_alone(factory, cfg):
    model = lorafit.wrap(factory(), cfg)
    model.add_adapter("b", cfg.replace(r=2, lora_alpha=5, use_rslora=True))
    rows = ["default", "b", None]
    mixed = _out(model, adapter_names=rows)
    for i, name in enumerate(rows):
        if name is None:
            with model.disable_adapter():
                alone = _out(model, IDS[i:i + 1])
        else:
            model.set_adapter(name)
            alone = _out(model, IDS[i:i + 1])
        torch.testing.assert_close(mixed[i], alone[0], rtol=0, atol=1e-5)


def test_mixed_batch_refuses_merged_and_unknown():
    model = lorafit.wrap(tiny_llama(), LoraConfig(r=2))
    with pytest.raises(AdapterError, match="unknown adapter 'x'"):
        model(input_ids=IDS, adapter_names=["x", None, None])
    with pytest.raises(AdapterError, match="3 rows"):
        model(input_ids=IDS, adapter_names=["default"])
    model.merge()
    with pytest.raises(AdapterError, match="unmerge"):
        model(input_ids=IDS, adapter_names=["default", None, None])


def test_adapters_add_set_delete():
    model = lorafit.wrap(tiny_llama(), LoraConfig(r=2, init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=3, target_modules=["k_proj"]))
    assert model.adapter_names == ["default", "b"] and model.active_adapters == ["default"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora.b." in n)
    model.set_adapter("b")
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora.b." in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora.default." in n)
    model.delete_adapter("b")
    assert model.adapter_names == ["default"] and not any(".lora.b." in n for n, _ in model.named_parameters())
    with pytest.raises(AdapterError, match="already exists"):
        model.add_adapter("default", LoraConfig())
    with pytest.raises(AdapterError, match="invalid"):
        model.add_adapter("a.b", LoraConfig())
    with pytest.raises(AdapterError, match="unknown adapter"):
        model.set_adapter("nope")


def test_two_active_adapters_add_up():
    base = tiny_llama()
    ref = _out(base)
    model = lorafit.wrap(base, LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj"]))
    model.add_adapter("b", LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj"]))
    layer = dict(model.lora_layers())["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 64)
    model.set_adapter(["default", "b"])
    both = layer(x)
    expected = layer.base_layer(x) + sum(layer.lora[n].scaling * x @ layer.lora[n].A.T @ layer.lora[n].B.T
                                         for n in ("default", "b"))
    torch.testing.assert_close(both, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(_out(model), ref)


def test_targeting_rules():
    cfg = LoraConfig(target_modules=["q_proj", "mlp.up_proj"], exclude_modules=["layers.1.self_attn.q_proj"])
    names = [n for n, _ in lorafit.wrap(tiny_llama(), cfg).lora_layers()]
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    regex = [n for n, _ in lorafit.wrap(tiny_llama(), LoraConfig(target_modules=r".*\.1\..*_proj")).lora_layers()]
    assert len(regex) == 7 and all(".1." in n for n in regex)
    layered = LoraConfig(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")
    assert [n for n, _ in lorafit.wrap(tiny_llama(), layered).lora_layers()] == ["model.layers.1.self_attn.q_proj"]


def test_default_targets_by_model_type():
    names = [n.rsplit(".", 1)[-1] for n, _ in lorafit.wrap(tiny_llama(), LoraConfig()).lora_layers()]
    assert set(names) == {"q_proj", "v_proj"}


def test_target_matching_nothing_lists_candidates():
    with pytest.raises(TargetError) as err:
        lorafit.wrap(tiny_llama(), LoraConfig(target_modules=["query"]))
    assert "q_proj" in str(err.value) and "down_proj" in str(err.value)
    with pytest.raises(TargetError, match="modules_to_save"):
        lorafit.wrap(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]))


def test_bias_modes():
    lora_only = lorafit.wrap(tiny_bert_cls(), LoraConfig(target_modules=["query"], bias="lora_only"))
    trainable = {n for n, p in lora_only.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert trainable and all("query.base_layer.bias" in n for n in trainable)
    every = lorafit.wrap(tiny_bert_cls(), LoraConfig(target_modules=["query"], bias="all"))
    n_bias = sum(1 for n, _ in every.named_parameters() if n.endswith("bias"))
    assert sum(1 for n, p in every.named_parameters() if p.requires_grad and n.endswith("bias")) == n_bias


def test_modules_to_save_is_per_adapter_copy():
    base = tiny_bert_cls()
    original = base.classifier.weight.detach().clone()
    model = lorafit.wrap(base, LoraConfig(target_modules=["query"], modules_to_save=["classifier"]))
    wrapper = model.model.classifier
    assert isinstance(wrapper, ModulesToSave) and wrapper.modules_to_save["default"].weight.requires_grad
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(1.0)
    assert torch.equal(wrapper.original_module.weight, original)
    with model.disable_adapter():
        plain = _out(model)
    assert not torch.allclose(_out(model), plain)


def test_print_trainable_parameters(capsys):
    model = lorafit.wrap(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 2 * 2 * 4 * (64 + 64)
    assert capsys.readouterr().out.strip() == f"trainable: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"


def test_safe_merge_leaves_every_weight_untouched():
    model = lorafit.wrap(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    layers = dict(model.lora_layers())
    with torch.no_grad():
        layers["model.layers.1.self_attn.v_proj"].lora["default"].A[0, 0] = float("inf")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(MergeError, match="layers.1.self_attn.v_proj"):
        model.merge(safe=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and model.merged_adapters == []


def test_attribute_forwarding_and_generate():
    base = tiny_llama()
    model = lorafit.wrap(base, LoraConfig(r=2))
    assert model.config is base.config
    out = model.generate(input_ids=IDS[:2, :4], max_new_tokens=3, do_sample=False, adapter_names=["default", None])
    assert out.shape == (2, 7)


def test_wrap_refuses_non_config():
    with pytest.raises(ConfigError, match="LoraConfig"):
        lorafit.wrap(tiny_llama(), {"r": 2})


def test_causal_lms_get_the_lean_loss_and_unload_gives_it_back():
    """A wrapped Hugging Face causal LM computes ``model(labels=)`` with `causal_lm_loss`: under
    bf16 autocast the same loss and input-embedding gradient as transformers' loss on a copy of
    the plain model (a fresh adapter changes nothing); `unload` restores transformers' loss. A
    classifier, and a model given its own loss function, keep theirs."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    base = tiny_llama()
    plain = copy.deepcopy(base)
    model = lorafit.wrap(base, LoraConfig(r=4, target_modules="all-linear"))
    assert base.loss_function is lorafit.functional.causal_lm_loss
    labels = IDS.clone()
    labels[:, :3] = -100
    results = []
    for m in (plain, model):
        m.get_input_embeddings().weight.requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(input_ids=IDS, labels=labels).loss
        loss.backward()
        results.append((loss, m.get_input_embeddings().weight.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-7)
    assert model.unload().loss_function is ForCausalLMLoss

    custom = tiny_gpt2()
    custom.loss_function = own = lambda logits, labels, **_: logits.float().mean()
    assert lorafit.wrap(custom, LoraConfig(r=2, target_modules=["c_attn"])).loss_function is own
    classifier = lorafit.wrap(tiny_bert_cls(), LoraConfig(r=2, target_modules=["query"]))
    assert "_loss_function" not in classifier.model.__dict__


def test_drops_into_a_hugging_face_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = lorafit.wrap(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    ids = torch.randint(3, 400, (8, 10), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=data).train()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(".lora." in n for n in changed)
