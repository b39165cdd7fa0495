"""``lorafit train / eval / generate`` end to end, each in its own process."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_train_then_eval_then_generate(tmp_path, tiny_config, tiny_dir, cli, run_files):
    run = tmp_path / "run"
    config = run_files.yaml(tmp_path / "tiny.yaml", tiny_config(run, output={"plot": True}))
    out = cli("train", config, "train.max_steps=4", "train.eval_every=2", "train.eval_on_start=true").stdout
    assert "done: completed after 4 steps" in out
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 4
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert summary["adapter_bytes"] > 0 and summary["tokens_seen"] == records[-2]["tokens"]

    after = json.loads(cli("eval", run).stdout)
    assert after["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-6) and after["examples"] == 9
    before = json.loads(cli("eval", config).stdout)  # the base model: what the run logged at step 0
    assert before["loss"] == pytest.approx(records[0]["eval_loss"], rel=1e-6)

    prompt = "Write a short poem about the sea."
    text = cli("generate", "--base", tiny_dir, "--adapter", run / "adapter", "--prompt", prompt,
               "--max-new-tokens", 8).stdout
    assert text.strip() == _greedy(tiny_dir, run / "adapter", prompt, 8).strip()
    chat = cli("generate", "--base", tiny_dir, "--adapter", run / "adapter", "--chat", "--temperature", 0.8,
               "--seed", 3, "--max-new-tokens", 4, input="Hello there.\nAnd again?\n")
    assert chat.returncode == 0


def _greedy(model_dir, adapter_dir, prompt, new_tokens):
    """What greedy decoding with the adapter gives, computed here with the library."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lorafit

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = lorafit.load(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_sigkill_then_resume_ends_as_an_uninterrupted_run(tmp_path, tiny_config, cli, run_files):
    steps = {"max_steps": 40, "save_every": 4, "eval_every": 8, "keep_last": 2}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    cli("train", run_files.yaml(tmp_path / "whole.yaml", tiny_config(whole, train=steps)))

    config = run_files.yaml(tmp_path / "killed.yaml", tiny_config(killed, train=steps))
    proc = subprocess.Popen([sys.executable, "-m", "lorafit", "train", str(config)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / "step-8").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "adapter").exists()

    out = cli("train", "--resume", killed).stdout
    assert "resuming" in out and "done: completed after 40 steps" in out
    a, b = run_files.adapter(whole / "adapter"), run_files.adapter(killed / "adapter")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert run_files.metrics(whole) == run_files.metrics(killed)


@pytest.mark.slow
def test_a_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, tiny_config, cli, run_files):
    run = tmp_path / "run"
    config = run_files.yaml(tmp_path / "nan.yaml", tiny_config(run))
    proc = cli("train", config, "train.lr=1e37", "train.warmup_steps=0", "train.save_every=1", check=False)
    assert proc.returncode == 1
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("lorafit train: error: training diverged at step ")
    step = int(message.split("at step ")[1].split()[0])
    assert f"the last good checkpoint is {run / 'checkpoints' / f'step-{step - 1}'}" in message
    assert (run / "checkpoints" / f"step-{step - 1}" / "state.safetensors").is_file()
    assert not (run / "adapter").exists()


def test_an_unknown_key_is_refused_with_the_closest_name(tmp_path, tiny_config, cli, run_files):
    config = run_files.yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run"))
    proc = cli("train", config, "train.epoch=3", check=False)
    assert proc.returncode == 1
    assert "config.train: unknown key 'epoch' (did you mean 'epochs'?)" in proc.stderr
    assert not (tmp_path / "run").exists()
    proc = cli("train", "--resume", tmp_path / "run", "train.lr=1", check=False)
    assert proc.returncode == 1 and "takes no config or overrides" in proc.stderr
