"""Faults: Ctrl-C saves the step it finishes; a full disk while rank 0 saves keeps the previous
checkpoint and stops every process; an output directory that cannot exist is named. (Tests run
as root, which permissions do not stop: the write failures below come from the kernel for all.)"""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from dist_support import (REPO, adapter, finish, linux_only, lorafit, torchrun, train_records, wait_for, worker_env,
                          worker_pid, write_config)
from lorafit.errors import TrainingError
from lorafit.train import resume, run_config, train
from lorafit.train.checkpoints import list_checkpoints, read_train_state


def _start(config):
    return subprocess.Popen([sys.executable, "-m", "lorafit", "train", str(config)], cwd=REPO, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_ctrl_c_saves_the_step_in_progress_and_resume_is_bit_exact(tmp_path, dist_config):
    """With dropout on: the RNG state saved at the interrupt is restored."""
    sections = {"lora": {"lora_dropout": 0.1}, "train": {"save_every": None, "eval_every": None}}
    whole = tmp_path / "whole"
    train(run_config(dist_config(whole, **sections)))

    run = tmp_path / "run"
    proc = _start(write_config(tmp_path / "c.yaml", dist_config(run, **sections)))
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(train_records(run)) >= 3, proc, what="step 3")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    step = len(train_records(run))
    assert f"lorafit train: stopped by SIGINT after step {step} (checkpoint {run / 'checkpoints' / f'step-{step}'})" in err
    assert [s for s, _ in list_checkpoints(run)] == [step] and not (run / "adapter").exists()

    resume(run)
    a, b = adapter(whole), adapter(run)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.slow
@linux_only
def test_a_full_disk_while_rank_0_saves_names_the_path_keeps_the_previous_checkpoint_and_stops_all(
        tmp_path, dist_config):
    """The disk fills up mid-run: rank 0's file-size limit (RLIMIT_FSIZE, binding root too) drops
    below the size of an adapter file, so its next checkpoint's writes fail (EFBIG) the way they
    do on a full disk (ENOSPC): a write in the middle of a file. Rank 1, waiting for the
    checkpoint, learns of the failure and exits instead of hanging."""
    run = tmp_path / "run"
    proc = torchrun("train", write_config(tmp_path / "c.yaml", dist_config(run, train={"eval_every": None})))
    wait_for(lambda: (run / "checkpoints" / "step-5").is_dir(), proc, what="the first checkpoint")
    rank0 = worker_pid(proc.pid, 0)
    os.kill(rank0, signal.SIGSTOP)
    resource.prlimit(rank0, resource.RLIMIT_FSIZE, (8192, 8192))  # an adapter file is ~11 KB
    os.kill(rank0, signal.SIGCONT)
    code, out = finish(proc, timeout=60)
    assert code != 0
    errors = [line for line in out.splitlines() if line.startswith("lorafit train: error: ")]
    assert len(errors) == 1, out[-4000:]  # rank 0's; rank 1 stops quietly
    message = errors[0]
    assert message.startswith("lorafit train: error: cannot write the checkpoint of step ")
    failed = int(message.split("of step ")[1].split()[0])
    previous = run / "checkpoints" / f"step-{failed - 5}"
    assert f"to {run / 'checkpoints' / f'step-{failed}'} (" in message and "File too large" in message
    assert f"the previous checkpoint {previous} is intact" in message
    assert list_checkpoints(run)[-1] == (failed - 5, previous)
    assert read_train_state(previous).step == failed - 5
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]

    done = lorafit("train", "--resume", run)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 60


def test_an_output_directory_that_cannot_exist_is_named(tmp_path, dist_config):
    (tmp_path / "plain-file").write_text("not a directory")
    run = tmp_path / "plain-file" / "run"
    started = time.monotonic()
    with pytest.raises(TrainingError, match=f"cannot write {run}: Not a directory"):
        train(run_config(dist_config(run)))
    assert time.monotonic() - started < 5  # refused before the model is loaded


@pytest.mark.parametrize("failed", [False, True])
def test_a_stop_signal_while_a_session_closes_waits_for_the_close(failed):
    """torchrun's SIGTERM to the survivors of a dead worker arrives while they close their session:
    it must not end a failed rank before its error is out; after a clean run it takes effect."""
    from lorafit.train import distributed

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with distributed._stop_signals_held(drop=failed):
            signal.raise_signal(signal.SIGTERM)
            assert seen == []  # held
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == ([] if failed else [signal.SIGTERM])
