"""The README stays true: generated sections are current, the quickstart runs, CI runs its test command."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_generated_sections_are_current():
    proc = subprocess.run([sys.executable, "scripts/update_readme.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_ci_runs_the_readme_test_command():
    assert "make test    #" in README and "make demo    #" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    quickstart = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(quickstart, "README quickstart", "exec"), {})
    printed = capsys.readouterr().out
    assert "trainable: 74,498 of 22,788,484 (0.327%)" in printed
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    assert "trainable: 74,498 of 22,788,484 (0.327%)" in quickstart


def test_more_of_the_api_runs_after_the_quickstart(tmp_path, monkeypatch):
    quickstart, more = re.findall(r"```python\n(.*?)```", README, re.S)[:2]
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(quickstart, "README quickstart", "exec"), names)
    exec(compile(more, "README more of the API", "exec"), names)
    model, plain = names["model"], names["plain"]
    assert set(model.peft_config) == set() and not any(".lora." in n for n, _ in plain.named_parameters())
