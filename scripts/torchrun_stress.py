"""Stress torchrun: start two ``lorafit train`` jobs (2 processes each, ``train.distributed=MODE``) at
the same moment on this machine, ROUNDS times, and report how each job ended; or, with
``--suite``, run the distributed tests (tests/distributed) ROUNDS times in a row. ``--busy`` keeps
every core busy with burner processes meanwhile.

    python scripts/torchrun_stress.py --rounds 10 [--busy] [--steps 20] [--mode fsdp]
    python scripts/torchrun_stress.py --suite --rounds 20 --busy

Every job must exit 0 and write its summary (every suite run must pass). One that does not is
printed with the tail of its output (a worker killed by a signal shows as ``Signal 6 (SIGABRT)`` /
``exitcode: -6`` there, with the Python stack of each of its threads: workers run with
PYTHONFAULTHANDLER=1), and the script exits 1. Everything runs offline on a tiny local Llama in a
temporary directory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lorafit.testing import DEFAULT_TEXTS, tiny_causal_lm_dir


REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONFAULTHANDLER": "1"}


def burn(stop_at: float) -> None:
    """Keep one core busy until `stop_at` (time.time())."""
    while time.time() < stop_at:
        sum(i * i for i in range(10_000))


def write_setup(root: Path, steps: int, mode: str) -> dict:
    """A tiny model directory and instruction data; returns the config data (without output.dir)."""
    texts = list(dict.fromkeys(DEFAULT_TEXTS))
    rows = [{"instruction": a, "input": "", "output": b} for a, b in itertools.product(texts, texts)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {
        "model": {"name_or_path": str(tiny_causal_lm_dir(root / "model"))},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train_file": str(root / "train.jsonl"), "format": "instruction", "eval_fraction": 0.2,
                 "max_length": 64},
        "train": {"max_steps": steps, "batch_size": 2, "lr": 1e-2, "eval_every": max(1, steps // 2),
                  "save_every": max(1, steps // 2), "distributed": mode, "dist_timeout_s": 60},
        "output": {"plot": False},
    }


def start_job(config: Path) -> subprocess.Popen:
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--monitor-interval=0.1", "-m", "lorafit", "train", str(config)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_pair(root: Path, base: dict, round_: int) -> list[str]:
    """Two jobs started together; how each ended ("ok" or what failed), tails printed."""
    runs = [root / f"round-{round_}-job-{j}" for j in (0, 1)]
    configs = []
    for run in runs:
        config = root / f"{run.name}.yaml"
        config.write_text(yaml.safe_dump({**base, "output": {**base["output"], "dir": str(run)}}), encoding="utf-8")
        configs.append(config)
    jobs = [start_job(config) for config in configs]
    outputs = [job.communicate()[0] for job in jobs]
    ends = []
    for run, job, out in zip(runs, jobs, outputs):
        ok = job.returncode == 0 and (run / "summary.json").is_file()
        ends.append("ok" if ok else f"FAILED (exit {job.returncode})")
        if not ok:
            print(f"--- {run.name}: exit {job.returncode}; output tail:\n{out[-3000:]}\n---")
    return ends


def run_suite() -> list[str]:
    """The distributed tests, once; ["ok"] or the failure, its output tail printed."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/distributed"],
                          cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode == 0:
        return ["ok"]
    print(f"--- tests/distributed: exit {proc.returncode}; output tail:\n{proc.stdout[-5000:]}\n---")
    return [f"FAILED (exit {proc.returncode})"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="pairs of simultaneous jobs, one pair at a time")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per job")
    parser.add_argument("--busy", action="store_true", help="keep every core busy with a burner process meanwhile")
    parser.add_argument("--mode", choices=("ddp", "fsdp"), default="ddp", help="train.distributed of the jobs")
    parser.add_argument("--suite", action="store_true", help="run the distributed tests instead of two jobs")
    args = parser.parse_args(argv)

    failures = 0
    with tempfile.TemporaryDirectory(prefix="lorafit-stress-") as tmp:
        root = Path(tmp)
        base = write_setup(root, args.steps, args.mode)
        burners = []
        if args.busy:
            stop_at = time.time() + 24 * 3600
            burners = [multiprocessing.Process(target=burn, args=(stop_at,), daemon=True)
                       for _ in range(os.cpu_count() or 1)]
            for burner in burners:
                burner.start()
        try:
            for round_ in range(1, args.rounds + 1):
                started = time.monotonic()
                ends = run_suite() if args.suite else run_pair(root, base, round_)
                failures += sum(end != "ok" for end in ends)
                print(f"round {round_}/{args.rounds}: {', '.join(ends)} in {time.monotonic() - started:.0f} s",
                      flush=True)
        finally:
            for burner in burners:
                burner.terminate()
    what = "runs of tests/distributed passed" if args.suite else "jobs finished"
    total = args.rounds if args.suite else 2 * args.rounds
    print(f"{total - failures} of {total} {what}{' (cores kept busy)' if args.busy else ''}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
