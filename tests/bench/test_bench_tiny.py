"""`make bench` in miniature: bench/run.py runs every case at ``--size tiny`` and writes its files,
so the benchmark script does not rot between full runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = {"train", "train_bf16", "step_labels", "step_labels_autocast", "infer", "merge", "qlora", "sft", "dpo", "moe"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_benchmark_runs_at_tiny_size(tmp_path):
    out = tmp_path / "results.json"
    readme = (ROOT / "README.md").read_bytes() if (ROOT / "README.md").exists() else None
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--size", "tiny", "--repeats", "1",
                           "--no-readme", "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads(out.read_text())
    assert set(results["cases"]) | set(results["skipped"]) == CASES
    for case, sides in results["cases"].items():
        assert sides["repeats"] == 1
        assert set(sides) == {"repeats", "load_avg_max", "pairs", "peft", "lorafit"}, case
        assert all(len(ratios) == 1 for ratios in sides["pairs"].values()), case
    for case in ("train_bf16", "step_labels_autocast"):  # low precision: the step's bound is measured
        assert all(results["cases"][case][side]["bound_s"] > 0 for side in ("peft", "lorafit")), case
    assert "bound_s" not in results["cases"]["train"]["lorafit"]
    if "sft" in results["cases"]:
        sft = results["cases"]["sft"]
        assert sft["peft"]["same_tokens"] == 1.0  # TRL and lorafit trained on the same tokens
        assert sft["peft"]["steps"] == sft["lorafit"]["steps"]
    if "dpo" in results["cases"]:
        dpo = results["cases"]["dpo"]
        assert dpo["peft"]["steps"] == dpo["lorafit"]["steps"] > 0
        assert all(0 <= dpo[side]["reward_accuracy"] <= 1 for side in ("peft", "lorafit"))
    rows = results["rows"]
    assert rows and all(r["lorafit"] is not None for r in rows)
    assert all(isinstance(r["met"], bool) for r in rows if r["target"])

    table = out.with_suffix(".md").read_text()
    assert table.startswith("| case | PEFT | lorafit | lorafit / PEFT | target | met |")
    assert all(f"| {r['label']} |" in table for r in rows)
    assert table.strip() in done.stdout
    if readme is not None:  # --no-readme leaves the README alone
        assert (ROOT / "README.md").read_bytes() == readme


@pytest.fixture
def bench(monkeypatch):
    """bench/run.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_run", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_a_partial_run_fills_its_own_readme_section(tmp_path, monkeypatch, bench):
    """``--out NAME.json`` renders into ``<!-- bench:NAME:start -->``, leaving the main table alone."""
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- bench:start -->\nmain\n<!-- bench:end -->\nb\n"
                      "<!-- bench:part:start -->\nold\n<!-- bench:part:end -->\nc\n")
    monkeypatch.setattr(bench, "README", readme)
    results = json.loads((ROOT / "bench" / "precision-results.json").read_text())
    bench.publish(results, tmp_path / "part.json", readme=True)
    table = (tmp_path / "part.md").read_text().strip()
    assert readme.read_text() == ("a\n<!-- bench:start -->\nmain\n<!-- bench:end -->\nb\n"
                                  f"<!-- bench:part:start -->\n{table}\n<!-- bench:part:end -->\nc\n")


def test_the_notes_give_each_ratio_targets_spread_over_the_pairs_of_runs(bench):
    peft_runs = [{"step_s": 1.0, "flag": True}, {"step_s": 2.0, "flag": True}, {"step_s": 1.0, "flag": True}]
    lorafit_runs = [{"step_s": 0.8, "flag": True}, {"step_s": 1.9, "flag": True}, {"step_s": 0.9, "flag": True}]
    pairs = bench.pair_ratios(peft_runs, lorafit_runs)
    assert pairs == {"step_s": pytest.approx([0.8, 0.95, 0.9])}
    results = json.loads((ROOT / "bench" / "precision-results.json").read_text())
    results["cases"]["train_bf16"]["pairs"] = pairs
    notes = bench._notes(results)
    assert "train step, bf16 base + fp32 adapters 0.80-0.95" in " ".join(notes)


def test_the_notes_give_lorafits_bound_against_peft(bench):
    results = json.loads((ROOT / "bench" / "precision-results.json").read_text())
    case = results["cases"]["train_bf16"]
    case["lorafit"]["bound_s"] = 0.8 * case["peft"]["step_s"]
    notes = " ".join(bench._notes(results))
    assert "train_bf16: lorafit's bound is 0.80 x PEFT's step (target 0.85)" in notes
