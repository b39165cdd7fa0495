"""Text generation with a causal LM and its adapter, prompted as the data pipeline trains:
`prompt_ids` encodes a conversation, `generate` continues it (greedy or sampled)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .data import DEFAULT_PROMPT_TEMPLATE
from .data.chat import has_chat_template, render, tokens
from .errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature`` 0 is greedy decoding (argmax); above 0 the
    token is drawn from ``softmax(logits / temperature)`` restricted to the ``top_k`` most
    likely tokens (0: all) and to the smallest set whose probability reaches ``top_p``."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
                  ("temperature", self.temperature >= 0, "0 (greedy) or more"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("top_k", self.top_k >= 0, "0 (all tokens) or more")]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"{name} = {getattr(self, name)!r}: expected {expected}")

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of Hugging Face ``generate`` for these settings."""
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k or None}


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the prompt for `messages` (ending with a user turn), encoded as the data
    pipeline encodes instruction and chat examples: the chat template (which writes its own
    special tokens), else the plain instruction template with the tokenizer's special tokens."""
    if has_chat_template(tokenizer):
        return tokens(tokenizer, render(tokenizer, messages, generation_prompt=True))
    if sum(m["role"] == "user" for m in messages) > 1:
        raise ConfigError("a conversation of several turns needs a tokenizer with a chat template; this one has none")
    system = "".join(f"{m['content']}\n\n" for m in messages if m["role"] == "system")
    return tokenizer(system + DEFAULT_PROMPT_TEMPLATE.format(prompt=messages[-1]["content"]))["input_ids"]


def generate(model: Any, tokenizer: Any, ids: list[int], sampling: Sampling = Sampling(),
             streamer: Optional[Any] = None) -> str:
    """The text `model` continues the prompt `ids` with, special tokens left out. A Hugging Face
    `streamer` (e.g. ``TextStreamer``) receives the tokens as they are generated. The sampler is
    seeded with ``sampling.seed``, so a sampled answer repeats for the same seed."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)  # (1, T)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(sampling.seed)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pad_token_id=pad_id,
                             streamer=streamer, **sampling.generate_kwargs())  # (1, T + new)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
