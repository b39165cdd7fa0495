"""``python -m lorafit.demo``, shortened: accuracy on the held-out reviews must rise."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_improves_held_out_accuracy(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lorafit.demo", "--max-steps", "60", "--output", str(tmp_path / "demo")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = map(float, re.search(r"held-out accuracy: ([\d.]+)% before, ([\d.]+)% after", proc.stdout).groups())
    assert before < 70 and after >= 80, proc.stdout
    assert re.search(r"^this demo took \d+ s on this machine", proc.stdout, re.MULTILINE)  # measured, not quoted
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()
    predictions = proc.stdout.split("it says:")[1].split()
    assert predictions.count("positive") + predictions.count("negative") == 4
