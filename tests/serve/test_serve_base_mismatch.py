"""lorafit serve refuses an adapter saved on another base model (at start-up, and with a 400 naming
the flag for one that is loaded later) unless started with --allow-base-mismatch."""

import warnings

import pytest
from transformers import AutoModelForCausalLM

import lorafit
from lorafit.adapter_files import AdapterFileWarning
from lorafit.adapter_files.fingerprints import BaseModelMismatch
from lorafit.cli import build_parser
from lorafit.serve.adapters import AdapterPool
from lorafit.serve.app import as_api_error
from lorafit.serve.launch import LaunchConfig
from lorafit.testing import tiny_llama


@pytest.fixture
def other_base_adapter(tmp_path):
    """An adapter saved on a tiny Llama with other weights (seed 1) than the served one (seed 0)."""
    model = lorafit.wrap(tiny_llama(hidden=32, heads=2, seed=1), lorafit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_adapter(tmp_path / "other")
    return tmp_path / "other"


def test_mismatched_base_is_refused_with_a_400_naming_the_flag(other_base_adapter):
    model = lorafit.LoraModel(tiny_llama(hidden=32, heads=2, seed=0))
    pool = AdapterPool(model, {"other": other_base_adapter}, capacity=2)
    with pytest.raises(BaseModelMismatch) as info:
        pool.acquire("other")
    message = str(info.value)
    assert message.startswith("adapter 'other' was saved on another base model: ")
    assert "the targeted base weights differ" in message and "lorafit serve --allow-base-mismatch" in message
    assert model.adapter_names == [] and pool.loaded == []
    error = as_api_error(info.value)
    assert (error.status, error.code) == (400, "base_model_mismatch")


def test_allow_base_mismatch_serves_it_with_a_warning(other_base_adapter):
    model = lorafit.LoraModel(tiny_llama(hidden=32, heads=2, seed=0))
    pool = AdapterPool(model, {"other": other_base_adapter}, capacity=2, allow_base_mismatch=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pool.acquire("other")
    assert pool.loaded == ["other"] and any(issubclass(w.category, AdapterFileWarning) for w in caught)


def test_serve_command_takes_the_flag():
    args = build_parser().parse_args(["serve", "--base", "b", "--allow-base-mismatch"])
    options = {name: value for name, value in vars(args).items() if name not in ("command", "func")}
    assert LaunchConfig(**options).allow_base_mismatch is True
    assert build_parser().parse_args(["serve", "--base", "b"]).allow_base_mismatch is False


def test_start_up_names_every_adapter_saved_on_another_base(other_base_adapter, tmp_path):
    from lorafit.serve.launch import build_engine
    from lorafit.testing import tiny_causal_lm_dir

    base_dir = tiny_causal_lm_dir(tmp_path / "base")
    adapters = tmp_path / "adapters"
    same = lorafit.wrap(AutoModelForCausalLM.from_pretrained(base_dir), lorafit.LoraConfig(r=2, target_modules=["q_proj"]))
    same.save_adapter(adapters / "same")
    other = lorafit.wrap(tiny_llama(seed=1), lorafit.LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_adapter(adapters / "other")
    with pytest.raises(BaseModelMismatch) as info:
        build_engine(LaunchConfig(base=str(base_dir), adapters=adapters))
    message = str(info.value)
    assert message.startswith("1 adapter(s) were saved on another base model: other (")
    assert "same" not in message and message.endswith("serving them needs --allow-base-mismatch")
    engine, _ = build_engine(LaunchConfig(base=str(base_dir), adapters=adapters, allow_base_mismatch=True))
    assert engine.adapters.names() == ["other", "same"]
