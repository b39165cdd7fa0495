"""The live progress bar: step/total, loss, lr, tokens/s and ETA on a terminal, silence elsewhere."""

from __future__ import annotations

import sys
from typing import Optional, TextIO


class Progress:
    """A tqdm bar over optimizer steps, shown only when `stream` is a terminal."""

    def __init__(self, total: int, initial: int = 0, stream: Optional[TextIO] = None):
        from tqdm import tqdm

        stream = stream or sys.stderr
        self.bar = tqdm(total=total, initial=initial, file=stream, unit="step", dynamic_ncols=True,
                        disable=not stream.isatty())

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s", refresh=False)
        self.bar.update(step - self.bar.n)

    def write(self, line: str) -> None:
        """Print `line` above the bar (or plainly when there is none)."""
        self.bar.write(line, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()
