"""``python -m lorafit.demo --task chat``, shortened, then the three commands it tells a newcomer to
run next (``lorafit generate``, ``lorafit eval``, ``lorafit serve``), exactly as it prints them:
a causal LM trained, used and served with nothing from the hub."""

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from lorafit.demo.chat import data_files, read_rows
from lorafit.serve.harness import ServerProcess

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _lorafit(command: str) -> subprocess.CompletedProcess:
    """Run a printed ``lorafit ...`` command line (the console script, as ``python -m lorafit``)."""
    args = shlex.split(command)
    assert args[0] == "lorafit"
    proc = subprocess.run([sys.executable, "-m", "lorafit", *args[1:]], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_the_shipped_instruction_data_is_well_formed_and_its_held_out_part_is_apart():
    with data_files() as files:
        train, held_out = (read_rows(path) for path in files)
    assert len(train) >= 100 and len(held_out) >= 10
    for rows in (train, held_out):
        assert all(set(row) == {"instruction", "input", "output"} and row["instruction"] and row["output"]
                   for row in rows)
    prompts = [(row["instruction"], row["input"]) for row in train + held_out]
    assert len(set(prompts)) == len(prompts)  # no prompt twice, none in both parts


@pytest.mark.slow
def test_the_chat_demo_trains_offline_and_its_next_steps_run_as_printed(tmp_path):
    out = tmp_path / "chat"
    proc = subprocess.run([sys.executable, "-m", "lorafit.demo", "--task", "chat", "--max-steps", "6",
                           "--output", str(out)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = map(float, re.search(r"held-out loss: ([\d.]+) before, ([\d.]+) after", proc.stdout).groups())
    assert after < before
    assert re.search(r"^this demo took \d+ s on this machine", proc.stdout, re.MULTILINE)
    assert (out / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "base" / "config.json").is_file() and (out / "base" / "tokenizer.json").is_file()

    steps = [line.split("#")[0].strip() for line in proc.stdout.split("next, with the same files:")[1].splitlines()
             if line.strip().startswith("lorafit ")]
    assert [s.split()[1] for s in steps] == ["generate", "eval", "serve"]
    asked = shlex.split(steps[0])[-1]
    answered = re.search(rf"\(trained on\) {re.escape(repr(asked))} -> ('.*?'|\".*?\") \(the data", proc.stdout)
    assert _lorafit(steps[0]).stdout.strip() == ast.literal_eval(answered.group(1))  # the demo's own greedy answer
    assert json.loads(_lorafit(steps[1]).stdout)["loss"] == pytest.approx(after, abs=1e-3)  # the same held-out split

    with ServerProcess(shlex.split(steps[2])[2:], tmp_path / "serve.log") as server:
        reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
            "model": "adapter", "max_tokens": 8,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]
