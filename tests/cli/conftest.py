"""Fixtures for the command-line tests: a tiny Llama model directory with an adapter for it."""

import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

import lorafit
from lorafit.testing import tiny_causal_lm_dir

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "adapter_files"))  # adapter_models: the tiny models of the adapter-file tests
from adapter_models import perturb_trainable  # noqa: E402


@pytest.fixture(scope="session")
def llama_dirs(tmp_path_factory):
    """``(base, adapter, model)``: a tiny Llama model directory (with tokenizer), a trained-looking
    adapter for it, and the wrapped model that saved it."""
    root = tmp_path_factory.mktemp("llama")
    base = tiny_causal_lm_dir(root / "base")
    model = lorafit.wrap(AutoModelForCausalLM.from_pretrained(base), lorafit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2},
        init_lora_weights=False, task_type="CAUSAL_LM"))
    perturb_trainable(model)
    model.save_adapter(root / "adapter")
    return base, root / "adapter", model
