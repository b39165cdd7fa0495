"""``init_lora_weights="orthogonal"`` against PEFT 0.21.2's definition: A and B non-zero with
B A = 0, each of rank r/2, entries of PEFT's scale; even ranks only; files load in PEFT."""

import copy

import peft
import pytest
import torch

import lorafit
from lorafit import ConfigError, LoraConfig
from lorafit.testing import tiny_llama

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
KWARGS = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights="orthogonal")


def factors(model, lorafit_model: bool):
    if lorafit_model:
        return [(w.A, w.B) for _, layer in model.lora_layers() for w in [layer.lora["default"]]]
    return [(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in model.modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A]


@pytest.mark.parametrize("library", ["lorafit", "peft"])
def test_factors_are_nonzero_with_zero_product(library):
    """The guarantees of the definition, checked on both libraries' factors alike."""
    torch.manual_seed(0)
    base = tiny_llama(hidden=128)
    model = (lorafit.wrap(base, LoraConfig(**KWARGS)) if library == "lorafit"
             else peft.get_peft_model(base, peft.LoraConfig(**KWARGS)))
    pairs = factors(model, library == "lorafit")
    assert len(pairs) == 6
    for A, B in pairs:
        A, B = A.detach().double(), B.detach().double()
        assert (B @ A).abs().max() <= 1e-7 * B.abs().max() * A.abs().max() * A.shape[1]
        assert torch.linalg.matrix_rank(A, rtol=1e-4) == 4 and torch.linalg.matrix_rank(B, rtol=1e-4) == 4
        # A = (G Q_o)ᵀ / 10: var(A_ij) = Σ_k Q_o[k, i]² / 100, and Σ_i Σ_k Q_o[k, i]² = r/2
        assert abs(A.pow(2).sum(dim=1).mean() / A.shape[1] - 0.005) < 0.001
        assert abs(B.pow(2).sum(dim=0).mean() / B.shape[0] - 0.005) < 0.001


def test_model_is_unchanged_at_start_and_both_factors_learn():
    base = tiny_llama()
    expected = base(IDS).logits
    model = lorafit.wrap(base, LoraConfig(**KWARGS))
    out = model(input_ids=IDS, labels=IDS)
    assert (out.logits - expected).abs().max() <= 1e-5
    out.loss.backward()
    w = next(layer for _, layer in model.lora_layers()).lora["default"]
    assert w.A.grad.abs().max() > 0 and w.B.grad.abs().max() > 0  # with B = 0, A would get none


def test_odd_rank_and_non_linear_targets_are_refused():
    with pytest.raises(ConfigError, match="'model.layers.0.self_attn.q_proj'.*rank must be even, got 3"):
        lorafit.wrap(tiny_llama(), LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights="orthogonal"))
    with pytest.raises(ConfigError, match="embed_tokens.*only linear layers"):
        lorafit.wrap(tiny_llama(), LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights="orthogonal"))


@pytest.mark.parametrize("direction", ["peft_to_lorafit", "lorafit_to_peft"])
def test_files_load_in_the_other_library_with_equal_logits(tmp_path, direction):
    base = tiny_llama()
    if direction == "peft_to_lorafit":
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**KWARGS))
        theirs.save_pretrained(tmp_path)
        expected = theirs.eval()(IDS).logits
        loaded = lorafit.load(base, tmp_path)
        assert loaded.peft_config["default"].init_lora_weights == "orthogonal"
        got = loaded(input_ids=IDS).logits
    else:
        ours = lorafit.wrap(copy.deepcopy(base), LoraConfig(**KWARGS))
        with torch.no_grad():  # a trained adapter: B A no longer zero
            for _, layer in ours.lora_layers():
                layer.lora["default"].B.add_(0.05)
        ours.save_adapter(tmp_path)
        expected = ours.eval()(input_ids=IDS).logits
        got = peft.PeftModel.from_pretrained(base, tmp_path).eval()(IDS).logits
    assert (got - expected).abs().max() <= 1e-5
