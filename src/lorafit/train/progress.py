"""Progress of a run over its optimizer steps: a live tqdm bar on a terminal, plain log lines
elsewhere (CI, nohup, a notebook, ``| tee``), where a bar prints nothing useful.

A log line reads ``step 12/100 (12%): loss 2.3456, lr 1.00e-03, 1,234 tok/s, elapsed 1m23s,
ETA 10m02s``. One is printed every `log_every` steps, at the last step, and at least every
`interval_s` seconds (30 by default) while steps or evaluations take longer than that: a
background thread repeats the latest figures with the time brought up to date. ETA is
``(total - step) x (time per step in this process so far)``.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Optional, TextIO


class Progress:
    """Show a run's progress on `stream`: a bar when it is a terminal, log lines otherwise.

    The default stream is stderr for the bar when stdout and stderr are both terminals, else
    stdout for the lines (so that ``lorafit train ... | tee log`` keeps them). `elapsed_s` is the
    training time before this process (a resumed run).
    """

    def __init__(self, total: int, initial: int = 0, stream: Optional[TextIO] = None, log_every: int = 1,
                 interval_s: float = 30.0, elapsed_s: float = 0.0):
        from tqdm import tqdm

        if stream is None:
            terminal = sys.stdout.isatty() and sys.stderr.isatty()
            stream = sys.stderr if terminal else sys.stdout
        self.stream, self.total, self.log_every, self.interval_s = stream, total, log_every, interval_s
        self.bar = tqdm(total=total, initial=initial, file=stream, unit="step", dynamic_ncols=True,
                        disable=not stream.isatty())
        self.initial, self.step = initial, initial
        self.figures = ""
        self.started = time.monotonic()
        self.elapsed_before = elapsed_s
        self.last_line = self.started
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.beat = None
        if self.bar.disable:
            self.beat = threading.Thread(target=self._beat, name="lorafit-progress", daemon=True)
            self.beat.start()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        """Record that optimizer step `step` ended with this `loss` (of the step), `lr` and rate."""
        figures = f"loss {loss:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tok/s"
        with self.lock:
            self.step, self.figures = step, figures
            if self.bar.disable:
                if step % self.log_every == 0 or step == self.total:
                    self._line()
                return
        self.bar.set_postfix_str(figures.replace(", ", "  "), refresh=False)
        self.bar.update(step - self.bar.n)

    def write(self, line: str) -> None:
        """Print `line` above the bar (or plainly when there is none)."""
        with self.lock:
            self.bar.write(line, file=sys.stdout)

    def close(self) -> None:
        """Stop the bar, or the thread that keeps the log lines coming."""
        self.stop.set()
        if self.beat is not None:
            self.beat.join()
        self.bar.close()

    def line(self) -> str:
        """The log line for the latest figures, with the time as of now."""
        now = time.monotonic()
        done = self.step - self.initial
        eta = (self.total - self.step) * (now - self.started) / done if done > 0 else None
        figures = self.figures or "waiting for the first step"
        return (f"step {self.step}/{self.total} ({100 * self.step / max(self.total, 1):.0f}%): {figures}, "
                f"elapsed {_duration(self.elapsed_before + now - self.started)}, "
                f"ETA {_duration(eta) if eta is not None else '?'}")

    def _line(self) -> None:
        """(Holding the lock.) Print the log line."""
        print(self.line(), file=self.stream, flush=True)
        self.last_line = time.monotonic()

    def _beat(self) -> None:
        """Print a line whenever `interval_s` has passed without one, until `close`."""
        while not self.stop.wait(max(0.0, self.last_line + self.interval_s - time.monotonic())):
            with self.lock:
                if time.monotonic() - self.last_line >= self.interval_s:
                    self._line()


def _duration(seconds: float) -> str:
    """``45s``, ``12m05s`` or ``3h07m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
