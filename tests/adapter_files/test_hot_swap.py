"""load_adapter(..., replace=True): in place when shapes fit (no recompilation), rebuilt otherwise."""

import pytest
import torch
from torch import nn

import lorafit
from lorafit import AdapterError, LoraConfig
from adapter_models import logits, perturb_trainable, small_llama


def adapter_dir(path, seed, **config):
    model = lorafit.wrap(small_llama(), LoraConfig(init_lora_weights=False, **config))
    perturb_trainable(model, seed=seed)
    model.save_adapter(path)
    return path


def params(model, name="default"):
    return [p for _, layer in model.lora_layers() if name in layer.lora for p in layer.lora[name].parameters()]


def test_same_shapes_swap_in_place_and_take_the_new_scaling(tmp_path):
    """Another lora_alpha and rsLoRA: the file's factors are copied into the same parameters and
    each layer's `LoraWeights.scaling` becomes the new config's, so the model equals a fresh load."""
    first = adapter_dir(tmp_path / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    second = adapter_dir(tmp_path / "b", 2, r=4, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "v_proj"])
    model = lorafit.load(small_llama(), first)
    before = params(model)
    model.load_adapter(second, replace=True)
    assert all(p is q for p, q in zip(params(model), before))
    expected = logits(lorafit.load(small_llama(), second))
    assert (logits(model) - expected).abs().max() <= 1e-6
    assert model.peft_config["default"].lora_alpha == 2 and model.active_adapters == ["default"]
    model.save_adapter(tmp_path / "saved")  # the new config with the copied factors: reloads the same
    assert (logits(lorafit.load(small_llama(), tmp_path / "saved")) - expected).abs().max() <= 1e-6


def test_swap_under_torch_compile_does_not_recompile(tmp_path):
    """Same ranks and scaling: the tensors are copied in place and the compiled graph is reused.
    Another scaling is taken from the file too (it lives in one place, `LoraWeights.scaling`), at
    the price of one recompile."""
    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))

    paths = []
    for seed, alpha in ((1, 4), (2, 4), (3, 12)):
        wrapped = lorafit.wrap(mlp(), LoraConfig(r=4, lora_alpha=alpha, target_modules=["0", "2"],
                                                 init_lora_weights=False))
        perturb_trainable(wrapped, seed=seed)
        paths.append(wrapped.save_adapter(tmp_path / str(seed))[0])
    x = torch.randn(3, 16)
    model = lorafit.load(mlp(), paths[0])
    compiled = torch.compile(model.model, backend="eager")
    with torch.no_grad():
        compiled(x)
        model.load_adapter(paths[1], replace=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = compiled(x)
        expected = lorafit.load(mlp(), paths[1])(x)
        model.load_adapter(paths[2], replace=True)
        rescaled = compiled(x)
        expected_rescaled = lorafit.load(mlp(), paths[2])(x)
    assert (got - expected).abs().max() <= 1e-6
    assert (rescaled - expected_rescaled).abs().max() <= 1e-6


def test_other_rank_rebuilds_and_stays_active(tmp_path):
    first = adapter_dir(tmp_path / "a", 1, r=4, target_modules=["q_proj", "v_proj"])
    second = adapter_dir(tmp_path / "b", 2, r=2, target_modules=["q_proj", "k_proj"])
    model = lorafit.load(small_llama(), first)
    before = params(model)
    model.load_adapter(second, replace=True)
    assert not any(p is q for p in params(model) for q in before)
    assert model.active_adapters == ["default"]
    assert (logits(model) - logits(lorafit.load(small_llama(), second))).abs().max() <= 1e-6
    assert {n.rsplit(".", 1)[-1] for n, layer in model.lora_layers() if "default" in layer.lora} == {"q_proj", "k_proj"}


def test_replace_of_an_absent_adapter_just_loads(tmp_path):
    model = lorafit.wrap(small_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.load_adapter(adapter_dir(tmp_path / "a", 1, r=4, target_modules=["v_proj"]), adapter_name="b", replace=True)
    assert model.adapter_names == ["default", "b"]


def test_merged_adapter_is_not_replaced(tmp_path):
    first = adapter_dir(tmp_path / "a", 1, r=4, target_modules=["q_proj"])
    model = lorafit.load(small_llama(), first)
    model.merge()
    with pytest.raises(AdapterError, match="merged into the base weights; unmerge"):
        model.load_adapter(first, replace=True)
