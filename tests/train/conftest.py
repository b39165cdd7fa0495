"""Fixtures for the training tests: a tiny local Llama, a small instruction data set, configs,
and a runner for the ``lorafit`` command in a subprocess."""

import itertools
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from lorafit.testing import DEFAULT_TEXTS, tiny_causal_lm_dir

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tiny_causal_lm_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def instruct_file(tmp_path_factory):
    """36 instruction records whose words the tiny tokenizer knows (short token sequences)."""
    texts = list(dict.fromkeys(DEFAULT_TEXTS))
    rows = [{"instruction": a, "input": "", "output": b} for a, b in itertools.product(texts, texts)]
    path = tmp_path_factory.mktemp("data") / "instruct.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    return SHARED_DATA


@pytest.fixture
def tiny_config(tiny_dir, instruct_file):
    """tiny_config(out_dir, **sections) -> plain config data for the tiny model; each keyword
    updates that section."""

    def make(out_dir, **sections):
        data = {
            "model": {"name_or_path": str(tiny_dir)},
            "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train_file": str(instruct_file), "format": "instruction", "eval_fraction": 0.25,
                     "max_length": 64},
            "train": {"max_steps": 6, "batch_size": 4, "grad_accum": 2, "lr": 1e-2, "warmup_steps": 2},
            "output": {"dir": str(out_dir), "plot": False},
        }
        for section, values in sections.items():
            data[section] = {**data.get(section, {}), **values}
        return data

    return make


@pytest.fixture
def cli():
    return lorafit


@pytest.fixture
def run_files():
    """``adapter(dir)``: an adapter's tensors; ``metrics(run_dir)``: metrics.jsonl without timing
    fields; ``yaml(path, data)``: write a config file."""
    return types.SimpleNamespace(adapter=adapter_tensors, metrics=metrics_without_timing, yaml=write_yaml)


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def lorafit(*args, check=True, input=None, timeout=300):
    """Run ``python -m lorafit ARGS`` from the repository root, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "lorafit", *map(str, args)], cwd=REPO, env=env, input=input,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lorafit {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def adapter_tensors(directory):
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "adapter_model.safetensors"))


def metrics_without_timing(run_dir):
    from lorafit.train.metrics import TIMING_FIELDS, read_metrics

    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_metrics(Path(run_dir) / "metrics.jsonl")]
