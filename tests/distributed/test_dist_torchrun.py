"""``torchrun --nproc_per_node 2 -m lorafit train`` on CPU (gloo): DDP and FSDP equal one process
with the same global batch; SIGTERM saves and resume ends as if uninterrupted; a killed worker
stops the job fast and the run resumes, by hand or by torchrun's restart."""

import json
import re
import signal
import time

import pytest
from dist_support import (STEPS, assert_same_adapter, finish, kill_worker, linux_only, lorafit, running, torchrun,
                          train_records, wait_for, worker_pid, write_config)

from lorafit.train.checkpoints import list_checkpoints, read_train_state

pytestmark = pytest.mark.slow


def _steps_logged_once(run, steps=STEPS):
    assert [r["step"] for r in train_records(run)] == list(range(1, steps + 1))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_the_adapter_of_one_with_the_same_global_batch(mode, tmp_path, dist_config,
                                                                            reference_run):
    run = tmp_path / "run"
    code, out = finish(torchrun("train", write_config(tmp_path / "c.yaml", dist_config(run)),
                                f"train.distributed={mode}"))
    assert code == 0, out[-20000:]  # whole faulthandler dumps (a rare SIGABRT under load)
    assert out.count("done: completed") == 1  # rank 0 alone reports
    assert f"batch 2 x 2 accumulation x 2 processes ({mode}) = global batch 8" in out
    assert_same_adapter(reference_run, run)  # non-empty, and equal up to float summation order
    ours, theirs = (json.loads((r / "summary.json").read_text()) for r in (run, reference_run))
    assert (ours["processes"], ours["distributed"], ours["global_batch"]) == (2, mode, 8)
    assert ours["tokens_seen"] == theirs["tokens_seen"] and ours["train_loss"] == pytest.approx(theirs["train_loss"])
    assert ours["eval"]["loss"] == pytest.approx(theirs["eval"]["loss"], rel=1e-5)
    _steps_logged_once(run)
    from safetensors import safe_open

    fingerprints = []
    for r in (run, reference_run):
        with safe_open(str(r / "adapter" / "adapter_model.safetensors"), "pt") as f:
            fingerprints.append(f.metadata()["lorafit.fingerprint"])
    assert fingerprints[0] == fingerprints[1]  # under FSDP, sampled from gathered base weights


def test_sigterm_saves_the_step_in_progress_and_resume_ends_as_one_uninterrupted_run(tmp_path, dist_config,
                                                                                     reference_run):
    run = tmp_path / "run"
    proc = torchrun("train", write_config(tmp_path / "c.yaml", dist_config(run, train={"save_every": None})))
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(train_records(run)) >= 3, proc, what="step 3")
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to both workers
    code, out = finish(proc, timeout=60)
    assert code != 0
    step = len(train_records(run))
    assert f"lorafit train: stopped by SIGTERM after step {step} (checkpoint " in out
    assert [s for s, _ in list_checkpoints(run)] == [step] and not (run / "adapter").exists()
    assert read_train_state(run / "checkpoints" / f"step-{step}").world_size == 2

    code, out = finish(torchrun("train", "--resume", run))
    assert code == 0, out[-4000:]
    assert_same_adapter(reference_run, run)
    _steps_logged_once(run)


@linux_only
def test_a_killed_worker_stops_the_job_within_seconds_and_the_run_resumes_on_one_process(tmp_path, dist_config):
    """15 epochs: 4 steps each on 2 processes, 7 on one; the resumed run ends with epoch 15."""
    run = tmp_path / "run"
    proc = torchrun("train", write_config(tmp_path / "c.yaml", dist_config(run, train={"max_steps": None,
                                                                                      "epochs": 15})))
    wait_for(lambda: (run / "checkpoints" / "step-10").is_dir(), proc, what="checkpoint 10")
    kill_worker(proc.pid, rank=1)
    killed = time.monotonic()
    code, out = finish(proc, timeout=120)
    assert code != 0 and time.monotonic() - killed < 60
    assert "rank 0 of 2 lost contact with the other processes" in out
    assert "Continue with `lorafit train --resume" in out

    done = lorafit("train", "--resume", run)  # one process now: the position moves to the new world
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["epochs"], summary["processes"], summary["global_batch"]) == (15, 1, 4)
    _steps_logged_once(run, summary["steps"])


@linux_only
def test_a_hung_worker_stops_the_job_after_the_collective_timeout(tmp_path, dist_config):
    run = tmp_path / "run"
    proc = torchrun("train", write_config(tmp_path / "c.yaml", dist_config(run, train={"dist_timeout_s": 3})))
    wait_for(lambda: (run / "checkpoints" / "step-5").is_dir(), proc, what="checkpoint 5")
    rank0 = worker_pid(proc.pid, 0)
    kill_worker(proc.pid, rank=1, sig=signal.SIGSTOP)  # alive, silent
    stopped = time.monotonic()
    wait_for(lambda: not running(rank0), proc, timeout=60, what="rank 0 giving up")
    assert time.monotonic() - stopped < 30
    kill_worker(proc.pid, rank=1)  # torchrun would wait out its own grace period for a stopped worker
    code, out = finish(proc, timeout=60)
    assert code != 0
    assert "rank 0 of 2 lost contact with the other processes (Timed out waiting 3000ms" in out
    assert "one of them died, or did not answer within train.dist_timeout_s = 3 s" in out


@linux_only
def test_torchrun_restarts_resume_from_the_last_checkpoint_by_themselves(tmp_path, dist_config, reference_run):
    run = tmp_path / "run"
    # two restarts allowed, as real jobs do, so a slow machine's failed rendezvous is not fatal
    proc = torchrun("train", write_config(tmp_path / "c.yaml", dist_config(run)), max_restarts=2)
    wait_for(lambda: (run / "checkpoints" / "step-10").is_dir(), proc, what="checkpoint 10")
    kill_worker(proc.pid, rank=1)
    code, out = finish(proc)
    assert code == 0, out[-4000:]
    assert re.search(rf"elastic restart [12]: resuming {re.escape(str(run))}", out)
    assert_same_adapter(reference_run, run)
    _steps_logged_once(run)
