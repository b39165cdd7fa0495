"""Fixtures for multi-process training: a tiny Llama with a small data set whose last global batch
leaves rank 1 of 2 an empty micro-batch, configs, and a single-process reference run (helpers to
launch and inspect runs are in dist_support.py)."""

import itertools
import json

import pytest

from dist_support import STEPS
from lorafit.testing import DEFAULT_TEXTS, tiny_causal_lm_dir

TRAIN_EXAMPLES = 25  # 2 ranks x batch 2: 6 full global batches, then one example (rank 1: empty)


@pytest.fixture(scope="session")
def dist_data(tmp_path_factory):
    """A tiny model directory, 25 train and 6 eval instruction records."""
    root = tmp_path_factory.mktemp("dist")
    texts = list(dict.fromkeys(DEFAULT_TEXTS))
    rows = [{"instruction": a, "input": "", "output": b} for a, b in itertools.product(texts, texts)]
    for name, part in (("train", rows[:TRAIN_EXAMPLES]), ("eval", rows[TRAIN_EXAMPLES:TRAIN_EXAMPLES + 6])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return {"model": tiny_causal_lm_dir(root / "model"), "train": root / "train.jsonl", "eval": root / "eval.jsonl"}


@pytest.fixture(scope="session")
def dist_config(dist_data):
    """dist_config(out_dir, **sections) -> config data: batch 2 x 2 accumulation per process,
    no dropout (runs are compared across process counts), evaluation and checkpoints on."""

    def make(out_dir, **sections):
        data = {
            "model": {"name_or_path": str(dist_data["model"])},
            "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train_file": str(dist_data["train"]), "eval_file": str(dist_data["eval"]),
                     "format": "instruction", "max_length": 64},
            "train": {"max_steps": STEPS, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "warmup_steps": 2,
                      "eval_every": 20, "save_every": 5, "keep_last": 2, "dist_timeout_s": 20},
            "output": {"dir": str(out_dir), "plot": False},
        }
        for section, values in sections.items():
            data[section] = {**data.get(section, {}), **values}
        return data

    return make


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, dist_config):
    """The single-process run with the global batch of 2 processes: batch 2 x 4 accumulation."""
    from lorafit.train import run_config, train

    run = tmp_path_factory.mktemp("reference") / "run"
    train(run_config(dist_config(run, train={"grad_accum": 4})))
    return run
