"""LoRA-GA against PEFT 0.21.2: same model, batches and randomised-SVD seed give the same factors,
the same rewritten base and an unchanged model at step 0."""

import copy

import peft
import pytest
import torch

import lorafit
from lorafit import ConfigError, LoraConfig
from lorafit.inits import prepare

from init_data import TARGETS, relative, token_batches


def peft_lora_ga(base, batches, **settings):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig(**settings))

    def train_step():
        for batch in batches:
            base(**batch).loss.backward()

    peft.preprocess_loraga(base, config, train_step)
    return peft.get_peft_model(base, config)


@pytest.mark.parametrize("settings", [{}, {"direction": "A2rBr", "scale": "weight_svd"},
                                      {"direction": "ArBr", "scale": "gd_scale"}, {"scale": "unit"}])
def test_lora_ga_matches_peft(base, seeded_svd_lowrank, settings):
    batches = token_batches()
    theirs = peft_lora_ga(copy.deepcopy(base), batches, **settings)
    config = prepare(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga",
                                      lora_ga_config=settings), batches)
    ours = lorafit.wrap(base, config)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    layers = dict(ours.lora_layers())
    assert sorted(peft_layers) == sorted(layers) and len(layers) == 8
    for path, layer in layers.items():
        w, p = layer.lora["default"], peft_layers[path]
        want = p.scaling["default"] * p.lora_B["default"].weight @ p.lora_A["default"].weight
        assert relative(w.scaling * w.B @ w.A, want) < 1e-4, path
        assert relative(layer.base_layer.weight, p.base_layer.weight) < 1e-6, path
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_lora_ga_keeps_the_model_at_step_0_and_follows_the_gradient(base):
    """s·B A lies in the top-2r gradient subspace, and W − s·B A + s·B A = W."""
    batches = token_batches()
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        before = base(input_ids=ids).logits
    weight = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    grad = torch.autograd.grad(sum(base(**b).loss for b in batches) / len(batches),
                               base.model.layers[0].self_attn.q_proj.weight)[0]
    model = lorafit.wrap(base, prepare(base, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="lora_ga"),
                                       batches))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-5)
    layer = model.model.model.layers[0].self_attn.q_proj
    w = layer.lora["default"]
    torch.testing.assert_close(layer.base_layer.weight + w.scaling * w.B @ w.A, weight, rtol=0, atol=1e-6)
    U, S, Vh = torch.linalg.svd(grad)
    top = Vh[:8]  # A's rows are among the top-2r right singular vectors of the gradient
    assert torch.linalg.matrix_norm(w.A.detach() - w.A.detach() @ top.T @ top) < 1e-3
    assert float(torch.linalg.svdvals(top[:4] @ w.A.detach().T).min()) > 0.99  # ArB2r: A = V[:r]


def test_lora_ga_refusals(base):
    with pytest.raises(ConfigError, match="needs data"):
        prepare(base, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="lora_ga"))
    with pytest.raises(ConfigError, match="2r = 40 singular vectors"):
        prepare(base, LoraConfig(r=20, target_modules=TARGETS, init_lora_weights="lora_ga"), token_batches())
    with pytest.raises(ConfigError, match=r"lora_ga_config\.direction"):
        LoraConfig(init_lora_weights="lora_ga", lora_ga_config={"direction": "BA"})
    with pytest.raises(ConfigError, match="none were computed for 'model.layers.0.self_attn.q_proj': call config"):
        lorafit.wrap(base, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="lora_ga"))
