"""Resumable checkpoints: written whole or not at all, read without unpickling anything.

Layout of ``RUN_DIR/checkpoints/step-N/``:

* ``adapter/``: the adapter files at step N (usable with ``lorafit eval`` / ``lorafit.load``);
* ``state.safetensors``: tensors: trainable parameters (``param.<name>``), optimizer state
  (``optim.<i>.<key>``, i = position in the optimizer's parameter order), torch RNG states
  of rank 0 (``rng.torch``, ``rng.cuda.<device>``) and of each other rank r of a multi-process
  run (``rng.rank<r>.torch``, ``rng.rank<r>.cuda.<device>``);
* ``state.json``: everything else: `TrainState` (step, data position, ...), the optimizer's
  parameter groups and scalar state, scheduler and grad-scaler state, Python's (and numpy's,
  when loaded) RNG state.

Under early stopping, ``RUN_DIR/checkpoints/best-step-N/`` holds the adapter of step N, the best
evaluation so far by the watched metric; the run ends by making it ``RUN_DIR/adapter``. Older ones
are deleted once no checkpoint's `TrainState.best_step` names them.

Parameters and optimizer state are whole (a multi-process run keeps the trainable parameters
unsharded, see `distributed`), so a checkpoint resumes with any number of processes.

A checkpoint is built in ``checkpoints/.step-N.tmp-*`` (`lorafit.atomic.staged_directory`) and
renamed into place, so a run killed at any moment leaves only complete ``step-N`` directories;
the oldest beyond ``keep_last`` are deleted after the rename. A write that fails (disk full, unwritable directory) removes the
partial checkpoint and raises a `TrainingError` naming the path; earlier checkpoints stay.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write_files, is_temp_file, staged_directory
from ..errors import AdapterFileError, TrainingError

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass
class TrainState:
    """Where a run is, and the bookkeeping that must survive a restart."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Epoch of the next micro-batch."""
    batch: int = 0
    """Index of the next micro-batch in that epoch's `batch_plan`."""
    tokens: int = 0
    """Input tokens (padding excluded) seen so far."""
    elapsed_s: float = 0.0
    """Training wall time before the current process started (timing only)."""
    best: Optional[float] = None
    """Best value of the early-stopping metric so far."""
    best_step: Optional[int] = None
    bad_evals: int = 0
    """Evaluations since the best one."""
    pending_losses: list[float] = field(default_factory=list)
    """Step losses not yet written to metrics.jsonl (``log_every`` > 1)."""
    pending_metrics: dict[str, list[float]] = field(default_factory=dict)
    """The objective's other step figures (DPO's rewards, ...) not yet written, by name."""
    last_eval_step: Optional[int] = None
    world_size: int = 1
    """Processes of the run when the state was saved: `batch` indexes that world's batch plan."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / CHECKPOINTS
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name))] \
        if root.is_dir() else []
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: Path, state: TrainState, model, optimizer, scheduler, scaler,
                    keep_last: int, save_adapter: Callable[[Path], None],
                    rng: Optional[Sequence[dict[str, torch.Tensor]]] = None) -> Path:
    """Write the checkpoint of `state.step` atomically, then drop all but the newest `keep_last`.

    `rng` holds each rank's `torch_rng()`, by rank (default: this process's alone).
    """
    final = checkpoint_dir(run_dir, state.step)
    previous = latest_checkpoint(run_dir)
    tensors, optim_json = _optimizer_state(optimizer)
    tensors.update({f"param.{name}": p.detach().contiguous().cpu()
                    for name, p in model.named_parameters() if p.requires_grad})
    for rank, states in enumerate(rng or [torch_rng()]):
        prefix = "rng." if rank == 0 else f"rng.rank{rank}."
        tensors.update({prefix + key: value for key, value in states.items()})
    meta = {
        "train": asdict(state),
        "optimizer": optim_json,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": _host_rng(),
    }
    try:
        with staged_directory(final, replace=True) as tmp:
            save_adapter(tmp / "adapter")
            atomic_write_files([(tmp / "state.safetensors", lambda p: save_file(tensors, p)),  # fsync'ed
                                (tmp / "state.json", lambda p: p.write_text(json.dumps(meta), encoding="utf-8"))])
    except (OSError, SafetensorError, AdapterFileError) as exc:
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        raise TrainingError(f"cannot write the checkpoint of step {state.step} to {final} ({exc}); {kept}. "
                            f"Free space or fix the directory, then `lorafit train --resume {run_dir}`") from None
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def best_adapter_dir(run_dir: Path, step: int) -> Path:
    """Where the adapter of step `step`, the best evaluation so far, is kept until the run ends."""
    return run_dir / CHECKPOINTS / f"best-step-{step}"


def prune_best_adapters(run_dir: Path, keep: Iterable[Optional[int]]) -> None:
    """Delete the kept best adapters (`best_adapter_dir`) of steps not in `keep`."""
    kept = {best_adapter_dir(run_dir, step).name for step in keep if step is not None}
    root = run_dir / CHECKPOINTS
    for path in root.glob("best-step-*") if root.is_dir() else ():
        if path.name not in kept:
            shutil.rmtree(path, ignore_errors=True)


def read_train_state(path: Path) -> TrainState:
    """The `TrainState` of the checkpoint at `path`, without loading anything else."""
    return TrainState(**_read_meta(path)["train"])


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler, rank: int = 0) -> TrainState:
    """Restore parameters, optimizer, scheduler, scaler and RNG states; return the `TrainState`.

    The torch RNG states restored are those saved for `rank`; a rank the checkpoint has none for
    (the run had fewer processes) keeps its own. Python's and numpy's come from rank 0.
    """
    meta = _read_meta(path)
    try:
        tensors = load_file(path / "state.safetensors")
    except (OSError, SafetensorError) as exc:
        raise TrainingError(f"{path}: broken checkpoint ({exc})") from None
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    stored = {key[len("param."):] for key in tensors if key.startswith("param.")}
    if stored != set(trainable):
        raise TrainingError(f"{path}: the checkpoint's trainable parameters do not match the model "
                            f"(missing {sorted(set(trainable) - stored)[:3]}, extra {sorted(stored - set(trainable))[:3]})")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(tensors[f"param.{name}"])
    _load_optimizer(optimizer, tensors, meta["optimizer"], path)
    scheduler.load_state_dict(meta["scheduler"])
    scaler.load_state_dict(meta["scaler"])
    _set_rng(tensors, meta["rng"], rank)
    return TrainState(**meta["train"])


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{path}: broken checkpoint ({exc})") from None


def remove_partial(run_dir: Path) -> None:
    """Delete checkpoints a killed run left half written."""
    root = run_dir / CHECKPOINTS
    for tmp in [p for p in root.iterdir() if is_temp_file(p)] if root.is_dir() else ():
        shutil.rmtree(tmp, ignore_errors=True)


# -- optimizer state as tensors + JSON ------------------------------------------------------------


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                    stored: dict[str, Any], path: Path) -> None:
    live = optimizer.state_dict()["param_groups"]
    groups = stored["param_groups"]
    if [g.get("names") for g in groups] != [g.get("names") for g in live]:
        raise TrainingError(f"{path}: the checkpoint's optimizer covers other parameters than this model's")
    # JSON turned tuples (AdamW's betas) into lists: give each value the type it has live.
    groups = [{k: tuple(v) if isinstance(g_live.get(k), tuple) else v for k, v in g.items()}
              for g, g_live in zip(groups, live)]
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, entries in stored["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- random number generators ----------------------------------------------------------------------


def torch_rng() -> dict[str, torch.Tensor]:
    """This process's torch RNG states: ``torch`` (CPU) and ``cuda.<i>`` for its current device."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        states[f"cuda.{device}"] = torch.cuda.get_rng_state(device)
    return states


def _host_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {"python": [version, list(internal), gauss]}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        name, keys, pos, has_gauss, cached = numpy.random.get_state()
        states["numpy"] = [name, keys.tolist(), pos, has_gauss, cached]
    return states


def _set_rng(tensors: dict[str, torch.Tensor], host: dict[str, Any], rank: int) -> None:
    prefix = "rng." if rank == 0 else f"rng.rank{rank}."
    if prefix + "torch" in tensors:
        torch.set_rng_state(tensors[prefix + "torch"])
    for key, state in tensors.items():
        device = key[len(prefix + "cuda."):]
        if key.startswith(prefix + "cuda.") and torch.cuda.is_available() and int(device) < torch.cuda.device_count():
            torch.cuda.set_rng_state(state, int(device))
    version, internal, gauss = host["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in host and "numpy" in sys.modules:
        import numpy

        name, keys, pos, has_gauss, cached = host["numpy"]
        numpy.random.set_state((name, numpy.asarray(keys, dtype=numpy.uint32), pos, has_gauss, cached))
