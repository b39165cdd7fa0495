"""DPO under ``torchrun`` ddp: two processes train the adapter one process trains with the same
global batch, and log the same figures."""

import itertools
import json

import pytest

from dist_support import assert_same_adapter, finish, lorafit, torchrun, train_records, write_config
from lorafit.testing import DEFAULT_TEXTS


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """13 pairs: 2 processes x batch 2 leave rank 1 an empty share of the last global batch."""
    texts = list(dict.fromkeys(DEFAULT_TEXTS))
    rows = [{"prompt": p, "chosen": f" {a}", "rejected": f" {b}"}
            for p, (a, b) in zip(itertools.cycle(texts), itertools.permutations(texts, 2))][:13]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def config(dist_data, pairs, run, grad_accum):
    return {
        "model": {"name_or_path": str(dist_data["model"])},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train_file": str(pairs), "format": "preference", "max_length": 64},
        "train": {"objective": "dpo", "epochs": 2, "batch_size": 2, "grad_accum": grad_accum, "lr": 2e-2,
                  "dist_timeout_s": 20},
        "output": {"dir": str(run), "plot": False},
    }


def test_dpo_on_two_processes_equals_one(tmp_path, dist_data, pairs):
    one, two = tmp_path / "one", tmp_path / "two"
    done = lorafit("train", write_config(tmp_path / "one.yaml", config(dist_data, pairs, one, grad_accum=4)))
    assert done.returncode == 0, done.stderr[-4000:]
    code, out = finish(torchrun("train", write_config(tmp_path / "two.yaml", config(dist_data, pairs, two, 2))))
    assert code == 0, out[-4000:]
    assert_same_adapter(one, two)
    a, b = train_records(one), train_records(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("loss", "rewards/chosen", "rewards/accuracies", "rewards/margins", "logps/rejected"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key
