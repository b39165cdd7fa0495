"""bench/gpu.py (the bench half of make gpu-check) runs its code on the CPU at a tiny size, so the
script a GPU session runs once is known to work before the GPU is there."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_bench_dry_run_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--device", "cpu", "--size", "tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["train_step"]["time_ratio"] > 0
    assert {"unmerged_over_base", "mixed_over_one", "mixed_over_peft"} <= set(report["inference"])
    assert "time_ratio" in report["qlora_nf4"]
