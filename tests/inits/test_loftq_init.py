"""LoftQ on the CPU against the algorithm written out here (PEFT's LoftQ runs only on CUDA; its
comparison is in tests/cuda/test_loftq_cuda.py): NF4 / int8 round trips by hand, SVD of the
residual, alternation; the rewritten base re-quantises to the same codes."""

import bitsandbytes.functional as bnbf
import pytest
import torch
from torch import nn

import lorafit
from lorafit import ConfigError, LoraConfig
from lorafit.inits import prepare
from lorafit.quant import quantize_model

from init_data import relative


def nf4_by_hand(w):
    """Blocks of 64 consecutive weights, each scaled by its absmax and rounded to the nearest of
    the 16 NF4 levels (QLoRA §3, Appendix E's table)."""
    levels = bnbf.get_4bit_type("nf4", device="cpu")
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    nearest = (blocks / absmax)[..., None].sub(levels).abs().argmin(-1)
    return (levels[nearest] * absmax).reshape(w.shape)


def int8_by_hand(w):
    """Per row: absmax / 127 steps, rounded to nearest."""
    absmax = w.abs().amax(1, keepdim=True)
    return torch.round(w * 127 / absmax) * absmax / 127


def loftq_by_hand(w, r, iterations, roundtrip):
    """LoftQ's Algorithm 1: Q = roundtrip(W − L R), L R = best rank-r approximation of W − Q."""
    low = torch.zeros_like(w)
    for _ in range(iterations):
        q = roundtrip(w - low)
        U, S, Vh = torch.linalg.svd(w - q)
        low = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    return q, low


@pytest.mark.parametrize("bits,iterations,roundtrip", [(4, 1, nf4_by_hand), (4, 3, nf4_by_hand),
                                                       (8, 2, int8_by_hand)])
def test_loftq_matches_the_algorithm(bits, iterations, roundtrip):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))  # in: whole nf4 blocks per row
    weights = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["0", "2"], init_lora_weights="loftq",
                        loftq_config={"loftq_bits": bits, "loftq_iter": iterations})
    wrapped = lorafit.wrap(model, prepare(model, config))
    for index, w in zip(["0", "2"], weights):
        layer = getattr(wrapped.model, index)
        q, low = loftq_by_hand(w, 4, iterations, roundtrip)
        adapter = layer.lora["default"]
        assert adapter.scaling == 4.0  # alpha 16 / r 4: the factors carry 1/√s each
        torch.testing.assert_close(layer.base_layer.weight.detach(), q, rtol=0, atol=1e-6)
        assert relative(adapter.scaling * adapter.B @ adapter.A, low) < 1e-4
        # the point of LoftQ: base + update is closer to W than the quantised W alone
        assert (w - q - low).norm() < (w - roundtrip(w)).norm()


def test_loftq_base_requantises_to_the_same_codes():
    """Ship the rewritten base in full precision; nf4 quantisation of it gives Q back exactly, so
    the adapter trained on it works on the 4-bit model (QLoRA memory)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    config = LoraConfig(r=4, target_modules=["0"], init_lora_weights="loftq")
    wrapped = lorafit.wrap(model, prepare(model, config))
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = wrapped(x)
        adapter = {k: v.clone() for k, v in wrapped.model[0].lora["default"].state_dict().items()}
    base = wrapped.unload()
    rewritten = base[0].weight.detach().clone()
    quantize_model(base, "nf4", skip=["2"])
    dequantized = bnbf.dequantize_4bit(base[0].weight.data, base[0].weight.quant_state)
    torch.testing.assert_close(dequantized, rewritten, rtol=0, atol=0)
    again = lorafit.wrap(base, LoraConfig(r=4, target_modules=["0"]))
    again.model[0].lora["default"].load_state_dict(adapter)
    with torch.no_grad():
        torch.testing.assert_close(again(x), want, rtol=1e-5, atol=1e-5)


def test_loftq_refusals():
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ConfigError, match=r"loftq_config\.loftq_bits = 2"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 2})
    quantize_model(model, "nf4", skip=[])
    with pytest.raises(ConfigError, match="the base is quantised"):
        prepare(model, LoraConfig(r=4, target_modules=["0"], init_lora_weights="loftq"))
