"""Per-request sampling settings, token choice, and the text a request may show so far.

Every request carries its own `SamplingParams` and its own random generator, so a seeded request
samples the same tokens whether it runs alone or shares a batch with others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

# A trailing U+FFFD means the last tokens end inside a multi-byte character: wait for the rest.
_INCOMPLETE_CHAR = "\ufffd"


class ParamError(ConfigError):
    """A request parameter has a value outside its range; `param` names it as the API spells it."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens and when it stops.

    `temperature` 0 picks the most likely token (greedy); otherwise tokens are drawn from
    ``softmax(logits / temperature)`` restricted to the smallest set of tokens whose probability
    reaches `top_p` (nucleus sampling). Generation ends at an end-of-sequence token, when the text
    contains one of `stop` (the stop string is cut off), or after `max_tokens` tokens.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ParamError("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ParamError("temperature", f"must be between 0 and 2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ParamError("top_p", f"must be in (0, 1], got {self.top_p}")
        if len(self.stop) > 4 or not all(self.stop):
            raise ParamError("stop", "must be at most 4 non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with `seed`, or from the OS's entropy when there is none."""
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Draw one token id from `logits` (V,) with temperature and nucleus (top-p) filtering."""
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep a token if the tokens before it do not yet reach top_p (the first is always kept)
        keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class TextTracker:
    """Turns one request's generated token ids into text that is safe to show.

    Text is held back while it could still be the start of a stop string or ends inside a
    multi-byte character, so a streamed answer never shows text that is later taken back.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._stop = stop
        self.token_ids: list[int] = []
        self.text = ""  # everything shown so far
        self.stopped = False  # a stop string was found; `text` ends just before it

    def add(self, token_id: int) -> str:
        """Append a token and return the newly showable text (may be empty)."""
        self.token_ids.append(token_id)
        full = self._tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = self._stop_index(full)
        if cut is not None:
            self.stopped = True
            return self._show(full[:cut])
        return self._show(full[: len(full) - self._held_back(full)])

    def _stop_index(self, full: str) -> int | None:
        # search only where a stop string could newly appear: just before the shown text ends
        start = max(0, len(self.text) - max((len(s) for s in self._stop), default=0))
        hits = [i for i in (full.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, full: str) -> int:
        """How many trailing characters of `full` must wait for the next token."""
        held = len(full) - len(full.rstrip(_INCOMPLETE_CHAR))
        for s in self._stop:
            for n in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:n]):
                    held = max(held, n)
                    break
        return held

    def flush(self) -> str:
        """At the end of generation: release held-back text (it can no longer become a stop)."""
        if self.stopped:
            return ""
        full = self._tokenizer.decode(self.token_ids, skip_special_tokens=True)
        return self._show(full)

    def _show(self, upto: str) -> str:
        delta = upto[len(self.text):] if upto.startswith(self.text) else ""
        if delta:
            self.text += delta
        return delta
