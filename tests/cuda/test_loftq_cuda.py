"""LoftQ against PEFT 0.21.2, whose LoftQ runs only on CUDA (run by ``make gpu-check``; skipped
without CUDA). With lora_alpha == r (s = 1) PEFT's factors (B = L, A = R) and lorafit's (L/√s,
R/√s) are the same; the base becomes the same dequantised nf4 weights."""

import copy

import peft
import pytest
import torch

import lorafit
from lorafit import LoraConfig
from lorafit.inits import prepare
from lorafit.testing import tiny_llama

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.mark.parametrize("iterations", [1, 3])
def test_loftq_matches_peft(iterations):
    base = tiny_llama(vocab_size=1024, hidden=256, intermediate=512)
    settings = {"loftq_bits": 4, "loftq_iter": iterations}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=8, lora_alpha=8, target_modules=TARGETS, init_lora_weights="loftq",
        loftq_config=peft.LoftQConfig(**settings)))
    ours = lorafit.wrap(base, prepare(base, LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS,
                                                       init_lora_weights="loftq", loftq_config=settings)))
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    layers = dict(ours.lora_layers())
    assert sorted(layers) == sorted(peft_layers) and len(layers) == 6
    for path, layer in layers.items():
        w, p = layer.lora["default"], peft_layers[path]
        want = (p.scaling["default"] * p.lora_B["default"].weight @ p.lora_A["default"].weight).cpu()
        got = w.scaling * w.B @ w.A
        assert float((got - want).norm() / want.norm()) < 1e-4, path
        torch.testing.assert_close(layer.base_layer.weight, p.base_layer.weight.cpu(), rtol=0, atol=1e-6)
