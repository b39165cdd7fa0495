"""Saves are atomic: whatever point a save is killed at, the directory loads whole, old or new."""

import json
import os
import random
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorafit
from lorafit import atomic
from lorafit.adapter_files import read_adapter_dir
from lorafit.adapter_files.report import describe_adapter
from adapter_models import logits, perturb_trainable, small_llama
from crash_writer import ALPHAS, RANKS, two_states

WRITER = Path(__file__).with_name("crash_writer.py")


def test_failing_writer_leaves_targets_and_no_temporaries(tmp_path):
    atomic.atomic_write_json(tmp_path / "a.json", {"v": 1})

    def boom(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic.atomic_write_files([(tmp_path / "a.json", lambda tmp: tmp.write_text("{}")), (tmp_path / "b", boom)])
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _two_saves(tmp_path):
    old = lorafit.wrap(small_llama(), lorafit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                         init_lora_weights=False))
    new = lorafit.wrap(small_llama(), lorafit.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
    perturb_trainable(new)
    old.save_adapter(tmp_path)
    return old, new


@pytest.mark.parametrize("renames_done", [0, 1])
def test_crash_between_renames_loads_old_or_new_whole(tmp_path, monkeypatch, renames_done):
    old, new = _two_saves(tmp_path)
    real_replace = os.replace
    calls = []

    def crash_after_some_renames(src, dst):
        if len(calls) == renames_done:
            raise KeyboardInterrupt("killed")
        calls.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crash_after_some_renames)
    with pytest.raises(KeyboardInterrupt):
        new.save_adapter(tmp_path)
    monkeypatch.undo()
    # after one rename: new weights beside the old config, which the weights file recognises
    expected = new if renames_done else old
    assert torch.equal(logits(lorafit.load(small_llama(), tmp_path)), logits(expected))
    notes = read_adapter_dir(tmp_path).notes
    assert bool(notes) == bool(renames_done)
    report = describe_adapter(tmp_path)
    assert any("temporary files from an interrupted save" in text for ok, text in report["checks"] if not ok)


def test_crash_on_first_save_recovers_the_config(tmp_path, monkeypatch):
    _, new = _two_saves(tmp_path / "unused")
    real_replace = os.replace

    def crash_before_config(src, dst):
        if Path(dst).name == "adapter_config.json":
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crash_before_config)
    with pytest.raises(KeyboardInterrupt):
        new.save_adapter(tmp_path / "first")
    monkeypatch.undo()
    assert torch.equal(logits(lorafit.load(small_llama(), tmp_path / "first")), logits(new))


def test_config_edited_after_saving_wins(tmp_path):
    _, new = _two_saves(tmp_path / "unused")
    new.save_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["lora_alpha"] = 6
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert lorafit.load(small_llama(), tmp_path).peft_config["default"].lora_alpha == 6


@pytest.mark.slow
def test_killed_saves_leave_a_loadable_adapter(tmp_path):
    """SIGKILL a process that saves two different adapters in turn, at random moments, several
    times into the same directory: each time it loads whole as one of the two."""
    host = two_states()  # holds the writer's two adapters, "s0" and "s1", to compare with
    rng = random.Random(0)
    for attempt in range(3):
        writer = subprocess.Popen([sys.executable, str(WRITER), str(tmp_path)], stdout=subprocess.PIPE)
        assert writer.stdout.readline().strip() == b"ready"
        try:
            writer.wait(timeout=rng.uniform(0.05, 0.6))
        except subprocess.TimeoutExpired:
            writer.send_signal(signal.SIGKILL)
            writer.wait()
        name = f"check{attempt}"
        lorafit.load(host, tmp_path, adapter_name=name)
        k = RANKS.index(host.peft_config[name].r)
        assert host.peft_config[name].lora_alpha == ALPHAS[k]
        for _, layer in host.lora_layers():
            loaded, saved = layer.lora[name], layer.lora[f"s{k}"]
            assert torch.equal(loaded.A, saved.A) and torch.equal(loaded.B, saved.B)
