"""Helpers for the multi-process tests: config files, launchers for ``torchrun ... -m lorafit``
and single-process ``python -m lorafit``, finding and killing a worker, comparing adapters."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
STEPS = 60  # of the runs the tests compare
# Finding a worker (and lowering its limits) goes through Linux's /proc and prlimit.
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and prlimit")


def write_config(path, data):
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def worker_env():
    """Offline, one thread per process (the tests share two cores), unbuffered output."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def torchrun(*args, nproc=2, max_restarts=0):
    """Start ``torchrun --standalone --nproc_per_node NPROC -m lorafit ARGS`` (a Popen)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               f"--max-restarts={max_restarts}", "--monitor-interval=0.1", "-m", "lorafit", *map(str, args)]
    return subprocess.Popen(command, cwd=REPO, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def lorafit(*args, timeout=240):
    """Run ``python -m lorafit ARGS`` in one process; the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "lorafit", *map(str, args)], cwd=REPO, env=worker_env(),
                          capture_output=True, text=True, timeout=timeout)


def finish(proc, timeout=240):
    """Wait for `proc`; ``(return code, output)``."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out


def wait_for(predicate, proc, timeout=120, what="the condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before {what}:\n{proc.communicate()[0][-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.01)


def worker_pid(launcher_pid, rank):
    """The pid of the torchrun worker of `rank` (a child of the launcher whose RANK is `rank`)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher_pid and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def running(pid):
    """Whether process `pid` exists and has not exited (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


def kill_worker(launcher_pid, rank, sig=signal.SIGKILL):
    pid = worker_pid(launcher_pid, rank)
    assert pid is not None, f"no worker of rank {rank} under pid {launcher_pid}"
    os.kill(pid, sig)
    return pid


def adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a_dir, b_dir, atol=1e-5):
    a, b = adapter(a_dir), adapter(b_dir)
    assert a.keys() == b.keys() and a
    assert all(b[k].abs().sum() > 0 for k in b), "an adapter tensor is all zeros"
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"adapters differ by {worst}"


def train_records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]
