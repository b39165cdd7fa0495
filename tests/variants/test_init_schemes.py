"""PiSSA / OLoRA initialisation (parity with PEFT, unchanged output at init, conversion to a
plain LoRA for the original base), rsLoRA scaling parity, and refusals."""

import copy
import math

import pytest
import torch

import lorafit
from lorafit import ConfigError, LoraConfig
from lorafit.layers import LoraLayer
from lorafit.testing import tiny_llama
from lorafit.inits.conversion import plain_lora_config, plain_lora_factors, snapshot_factors

import peft  # noqa: E402  (a dev dependency: a missing anchor fails)
import peft.tuners.lora.layer as peft_layer  # noqa: E402

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11], [8, 64, 128, 300, 2, 19, 77, 400]])
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()


@pytest.fixture
def seeded_svd_lowrank(monkeypatch):
    """Both libraries draw the same random start for the randomised SVD."""
    real = torch.svd_lowrank

    def seeded(*args, **kwargs):
        torch.manual_seed(123)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    monkeypatch.setattr(peft_layer, "svd_lowrank", seeded)


@pytest.mark.parametrize("factory, targets, init, extra", [
    (tiny_llama, TARGETS, "pissa", {}),
    (tiny_llama, TARGETS, "pissa_niter_4", {}),
    (tiny_llama, TARGETS, "olora", {}),
    (tiny_llama, TARGETS, "pissa", {"use_rslora": True, "rank_pattern": {"v_proj": 2}}),
    (tiny_gpt2, ["c_attn", "c_fc"], "pissa", {"fan_in_fan_out": True}),
])
def test_residual_base_and_adapter_match_peft(factory, targets, init, extra, seeded_svd_lowrank):
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, **extra)
    base = factory()
    with torch.no_grad():
        original = base(IDS).logits
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = lorafit.wrap(base, LoraConfig(**kwargs))
    for path, layer in ours.lora_layers():
        peft_mod = theirs.get_submodule(f"base_model.model.{path}")
        w = layer.lora["default"]
        assert w.scaling == peft_mod.scaling["default"]
        # W_res, and the products s·B A (the factors themselves may differ by signs of pairs)
        assert (layer.base_layer.weight - peft_mod.base_layer.weight).abs().max() <= 1e-4, path
        theirs_ba = peft_mod.lora_B["default"].weight @ peft_mod.lora_A["default"].weight
        assert (w.B @ w.A - theirs_ba).abs().max() <= 1e-4, path
        assert w.A.requires_grad and w.B.requires_grad
    with torch.no_grad():
        assert (ours(IDS).logits - original).abs().max() <= 1e-4  # W_res + s·B A = W


def test_pissa_factors_are_the_principal_triplets():
    base = tiny_llama()
    weight = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = lorafit.wrap(base, LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    layer = model.model.model.layers[0].self_attn.q_proj
    w = layer.lora["default"]
    U, S, Vh = torch.linalg.svd(weight)
    top = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    assert (w.scaling * w.B @ w.A - top).abs().max() <= 1e-5
    assert (layer.base_layer.weight - (weight - top)).abs().max() <= 1e-5
    # B has orthogonal columns with norms sqrt(S/s); A orthogonal rows with the same norms
    expected = S[:4] / w.scaling
    assert torch.allclose(w.B.T @ w.B, torch.diag(expected), atol=1e-5)
    assert torch.allclose(w.A @ w.A.T, torch.diag(expected), atol=1e-5)


def test_olora_b_is_orthonormal_and_output_is_unchanged_on_conv1d():
    base = tiny_gpt2()
    with torch.no_grad():
        original = base(IDS).logits
    model = lorafit.wrap(base, LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                          init_lora_weights="olora"))
    for _, layer in model.lora_layers():
        B = layer.lora["default"].B
        assert torch.allclose(B.T @ B, torch.eye(4), atol=1e-5)
    with torch.no_grad():
        assert (model(IDS).logits - original).abs().max() <= 1e-4


@pytest.mark.parametrize("init, rslora", [("pissa", False), ("olora", True)])
def test_plain_lora_conversion_reproduces_the_trained_model_on_the_original_base(init, rslora):
    base = tiny_llama()
    original = copy.deepcopy(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, use_rslora=rslora,
                        rank_pattern={"up_proj": 2})
    model = lorafit.wrap(base, config)
    initial = snapshot_factors(model)
    with torch.no_grad():  # stand-in for training
        for _, layer in model.lora_layers():
            for p in layer.lora["default"].parameters():
                p.add_(0.05 * torch.randn_like(p))
        trained = model(IDS).logits
    plain_config = plain_lora_config(config)
    plain = lorafit.wrap(original, plain_config)
    factors = plain_lora_factors(model, "default", initial)
    for path, layer in plain.lora_layers():
        w = layer.lora["default"]
        assert w.scaling == pytest.approx(config.scaling_for(path))
        A, B = factors[path]
        assert A.shape[0] == 2 * config.rank_for(path)
        with torch.no_grad():
            w.A.copy_(A)
            w.B.copy_(B)
    with torch.no_grad():
        assert (plain(IDS).logits - trained).abs().max() <= 1e-5
    assert plain_config.lora_alpha == pytest.approx(8 * (math.sqrt(2) if rslora else 2))


def test_rslora_scaling_matches_peft():
    kwargs = dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = lorafit.wrap(base, LoraConfig(**kwargs))
    for path, layer in ours.lora_layers():
        peft_mod = theirs.get_submodule(f"base_model.model.{path}")
        w = layer.lora["default"]
        assert w.scaling == peft_mod.scaling["default"] == 8 / 4
        with torch.no_grad():
            w.A.copy_(peft_mod.lora_A["default"].weight)
            w.B.copy_(peft_mod.lora_B["default"].weight)
    with torch.no_grad():
        assert (ours(IDS).logits - theirs(IDS).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
def test_svd_inits_on_embeddings_are_refused_by_name(init):
    model = tiny_llama()
    with pytest.raises(ConfigError, match=rf"init_lora_weights = '{init}'.*'model.embed_tokens' \(Embedding\)"):
        lorafit.wrap(model, LoraConfig(target_modules=["q_proj", "embed_tokens"], init_lora_weights=init))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_rank_above_the_weight_dims_is_refused():
    model = tiny_llama()
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with pytest.raises(ConfigError, match=r"'model.layers.0.self_attn.q_proj'.*rank 128 exceeds min\(out, in\) = 64"):
        lorafit.wrap(model, LoraConfig(r=128, target_modules=["q_proj"], init_lora_weights="olora"))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, weight)  # base untouched
