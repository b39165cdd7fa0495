"""CorDA against PEFT 0.21.2 (same model and batches): the same initial update s·B A and the same
residual base, for IPM and KPM; the model is unchanged at step 0."""

import copy

import peft
from peft.tuners.lora.config import CordaConfig
import pytest
import torch
from peft.tuners.lora.corda import preprocess_corda

import lorafit
from lorafit import ConfigError, LoraConfig
from lorafit.inits import prepare

from init_data import TARGETS, relative, token_batches


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_matches_peft(base, method):
    batches = token_batches(count=4, length=16)  # one sequence per call, as PEFT's hook expects
    reference = copy.deepcopy(base)
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                                  corda_config=CordaConfig(corda_method=method))
    preprocess_corda(reference, peft_config, run_model=lambda: [reference(**b) for b in batches])
    theirs = peft.get_peft_model(reference, peft_config)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        before = base(input_ids=ids).logits
    config = prepare(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                                      corda_config={"corda_method": method}), batches)
    ours = lorafit.wrap(base, config)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    layers = dict(ours.lora_layers())
    assert sorted(layers) == sorted(peft_layers) and len(layers) == 8
    for path, layer in layers.items():
        w, p = layer.lora["default"], peft_layers[path]
        want = p.scaling["default"] * p.lora_B["default"].weight @ p.lora_A["default"].weight
        assert relative(w.scaling * w.B @ w.A, want) < 1e-4, path
        assert relative(layer.base_layer.weight, p.base_layer.weight) < 1e-5, path
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, before, rtol=1e-4, atol=1e-5)


def test_corda_by_hand():
    """One linear layer: A, B from the SVD of W·(C + λI) with C the scaled input Gram matrix."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(6, 5))
    xs = [torch.randn(10, 6) for _ in range(3)]
    W = layer[0].weight.detach().clone()
    C = sum((x / x.max().abs()).T @ (x / x.max().abs()) for x in xs) / 3
    damped = C + 0.01 * C.diagonal().mean() * torch.eye(6)  # well conditioned: the first damping is kept
    U, S, Vh = torch.linalg.svd(W @ damped, full_matrices=False)
    V = (Vh @ torch.linalg.inv(damped)).T
    want = U[:, :2] @ torch.diag(S[:2]) @ V[:, :2].T
    model = lorafit.wrap(layer, prepare(layer, LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                                          init_lora_weights="corda"), xs))
    w = model.model[0].lora["default"]
    assert relative(w.scaling * w.B @ w.A, want) < 1e-5
    torch.testing.assert_close(model.model[0].base_layer.weight, W - want, rtol=0, atol=1e-5)


def test_corda_refuses_pickle_caches(base):
    config = LoraConfig(init_lora_weights="corda", target_modules=TARGETS, corda_config={"cache_file": "c.pt"})
    with pytest.raises(ConfigError, match=r"corda_config\.cache_file = 'c\.pt'"):
        prepare(base, config, token_batches())
    with pytest.raises(ConfigError, match=r"corda_config\.corda_method"):
        LoraConfig(init_lora_weights="corda", corda_config={"corda_method": "xpm"})
