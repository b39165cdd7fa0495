"""What a run records: ``metrics.jsonl``, optional TensorBoard events, and ``loss.png``.

metrics.jsonl holds one JSON object per line with its ``step``: train lines (``loss``, ``lr``,
``grad_norm``, ``epoch``, ``tokens``, ``tokens_per_s``, ``elapsed_s``) and eval lines (``eval_loss``
and ``eval_perplexity`` or ``eval_accuracy``). Only ``tokens_per_s`` and ``elapsed_s`` depend on
timing; a resumed run writes every other value exactly as an uninterrupted one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from ..atomic import atomic_write_text

# Fields that measure time, not training: they differ between identical runs.
TIMING_FIELDS = ("tokens_per_s", "elapsed_s")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; a torn last line (a killed run) is dropped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records up to `step` (a resumed run rewrites what follows)."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class MetricsWriter:
    """Appends records to metrics.jsonl and, when asked and available, to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        self.board = _tensorboard_writer(run_dir / "tensorboard") if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(_board_tag(key), value, record["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _board_tag(key: str) -> str:
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


def _tensorboard_writer(path: Path) -> Optional[Any]:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("output.tensorboard: the tensorboard package is not installed; no events are written",
              file=sys.stderr)
        return None
    return SummaryWriter(str(path))


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """Train loss (and eval loss, when there is one) against the step, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for key, label, style in (("loss", "train", "-"), ("eval_loss", "eval", "o-")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
