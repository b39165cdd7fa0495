"""Adapter combination: `cat` is the exact weighted delta, `svd` reports a bounded error."""

import math

import pytest
import torch

import lorafit
from lorafit import AdapterError, LoraConfig
from lorafit.testing import tiny_llama

from test_model import IDS


def _model():
    model = lorafit.wrap(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=3, use_rslora=True, init_lora_weights=False,
                                      target_modules=["q_proj", "o_proj"], rank_pattern={r"layers\.1\.self_attn\.q_proj": 6},
                                      alpha_pattern={"o_proj": 5}))
    return model


def _delta(layer, name):
    return layer.lora[name].delta() if name in layer.lora else 0


def test_cat_is_exact_weighted_sum_of_deltas():
    model = _model()
    report = model.combine({"default": 0.7, "b": 0.3}, name="ab", method="cat")
    for path, layer in model.lora_layers():
        expected = 0.7 * _delta(layer, "default") + 0.3 * _delta(layer, "b")
        assert (layer.lora["ab"].delta() - expected).abs().max() <= 1e-5, path
    assert report.ranks["model.layers.1.self_attn.q_proj"] == 4 + 6
    assert report.ranks["model.layers.0.self_attn.o_proj"] == 2


def test_cat_adapter_outputs_match_and_config_scaling_is_one():
    model = _model()
    model.combine({"default": 1.0, "b": 1.0}, name="ab")
    cfg = model.peft_config["ab"]
    for path, layer in model.lora_layers():
        assert cfg.scaling_for(path) == 1.0 and cfg.rank_for(path) == layer.lora["ab"].rank
    model.set_adapter(["default", "b"])
    both = model(input_ids=IDS).logits
    model.set_adapter("ab")
    torch.testing.assert_close(model(input_ids=IDS).logits, both, rtol=0, atol=1e-5)


def test_svd_error_reported_and_bounded_by_discarded_singular_values():
    model = _model()
    report = model.combine({"default": 0.5, "b": -1.5}, name="s", method="svd", rank=3)
    assert all(r == 3 for r in report.ranks.values())
    num = den = 0.0
    for path, layer in model.lora_layers():
        exact = 0.5 * _delta(layer, "default") - 1.5 * _delta(layer, "b")
        if not torch.is_tensor(exact):
            continue
        exact = exact.detach()
        sv = torch.linalg.svdvals(exact.double())
        err = (layer.lora["s"].delta().detach().double() - exact.double()).norm()
        assert err <= sv[3:].pow(2).sum().sqrt() + 1e-5 * sv.norm(), path  # Eckart-Young: error = discarded energy
        num, den = num + float(err) ** 2, den + float(exact.double().norm()) ** 2
    assert 0 < report.relative_error < 1
    assert report.relative_error == pytest.approx(math.sqrt(num / den), rel=1e-4)


def test_svd_at_full_rank_is_exact():
    model = _model()
    report = model.combine({"default": 0.7, "b": 0.3}, name="s", method="svd", rank=10)
    assert report.relative_error < 1e-6


def test_linear_documents_cross_terms():
    model = lorafit.wrap(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.combine({"default": 0.5, "b": 0.5}, name="lin", method="linear")
    layer = dict(model.lora_layers())["model.layers.0.self_attn.q_proj"]
    assert layer.lora["lin"].rank == 2
    exact = 0.5 * layer.lora["default"].delta() + 0.5 * layer.lora["b"].delta()
    assert (layer.lora["lin"].delta() - exact).abs().max() > 1e-4  # not the weighted delta


@pytest.mark.parametrize("kwargs,message", [
    (dict(weights={"default": 1.0}, name="x", method="mean"), "method 'mean' is unknown"),
    (dict(weights={}, name="x"), "no adapters"),
    (dict(weights={"nope": 1.0}, name="x"), "unknown adapter 'nope'"),
    (dict(weights={"default": 1.0}, name="default"), "already exists"),
    (dict(weights={"default": 1.0}, name="x", method="svd"), "positive integer rank"),
    (dict(weights={"default": 1.0, "b": 1.0}, name="x", method="linear"), "one rank"),
])
def test_refused_combinations(kwargs, message):
    with pytest.raises(AdapterError, match=message):
        _model().combine(**kwargs)


def test_modules_to_save_refused():
    from test_model import tiny_bert_cls

    model = lorafit.wrap(tiny_bert_cls(), LoraConfig(target_modules=["query"], modules_to_save=["classifier"]))
    with pytest.raises(AdapterError, match="modules_to_save"):
        model.combine({"default": 1.0}, name="x")
