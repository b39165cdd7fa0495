"""Chat conversations to tokens, with the loss on assistant turns only.

Primary method (prefix spans). For the assistant message at index i the conversation is rendered
twice more through the tokenizer's chat template:

* ``messages[:i]`` with the generation prompt: its tokens P_i are what the model sees before it
  starts answering, exactly as at inference;
* ``messages[:i+1]`` without it: its tokens U_i end after the answer and the template's
  end-of-turn marker (EOS, ``<|im_end|>``, ...).

If P_i and U_i are both prefixes of the full conversation's tokens, positions ``[len(P_i),
len(U_i))`` are the assistant span and get their own ids as labels; every other position gets
`IGNORE_INDEX`. Causal LMs shift labels inside the model, so ``labels[t] = input_ids[t]`` means
"predict token t from tokens < t".

Fallback (offset spans), used when any prefix check fails (templates that render earlier turns
differently once later turns exist, e.g. ones that drop reasoning from past answers or mark the
final turn): each assistant content string is located in the rendered text, in order, and the
tokens overlapping it, plus the one special token right after it (the end-of-turn marker), form
the span. This needs a fast tokenizer (character offsets).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from .report import BadRecord

IGNORE_INDEX = -100
Message = dict[str, str]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def tokens(tokenizer: Any, text: str) -> list[int]:
    # The template already wrote BOS/EOS where it wants them; adding them again would double them.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(tokenizer: Any, messages: Sequence[Message]) -> tuple[list[int], list[int], bool]:
    """``(input_ids, labels, exact)`` of a conversation; `exact` is False when the fallback was used.

    Raises `BadRecord` when the template rejects the conversation or no span can be found.
    """
    try:
        text = render(tokenizer, messages, generation_prompt=False)
    except Exception as exc:  # jinja raises whatever the template's author chose
        raise BadRecord("chat template", f"the chat template cannot render this conversation ({exc})") from None
    ids = tokens(tokenizer, text)
    spans = _prefix_spans(tokenizer, messages, ids)
    exact = spans is not None
    if spans is None:
        spans = _offset_spans(tokenizer, messages, text, ids)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return ids, labels, exact


def _prefix_spans(tokenizer: Any, messages: Sequence[Message], ids: list[int]) -> Optional[list[tuple[int, int]]]:
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            prompt = tokens(tokenizer, render(tokenizer, messages[:i], generation_prompt=True))
            upto = ids if i == len(messages) - 1 else tokens(
                tokenizer, render(tokenizer, messages[: i + 1], generation_prompt=False))
        except Exception:  # a template may refuse a partial conversation: use the fallback
            return None
        if ids[: len(prompt)] != prompt or ids[: len(upto)] != upto or len(upto) <= len(prompt):
            return None
        spans.append((len(prompt), len(upto)))
    return spans


def _offset_spans(tokenizer: Any, messages: Sequence[Message], text: str,
                  ids: list[int]) -> list[tuple[int, int]]:
    if not getattr(tokenizer, "is_fast", False):
        raise BadRecord("chat template", "the chat template is not prefix-stable and the tokenizer is not "
                        "a fast tokenizer, so assistant spans cannot be located")
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    special = special_ids(tokenizer)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content = message["content"].strip()
        begin = text.find(content, cursor)
        if begin < 0:
            raise BadRecord("chat template", f"assistant message {i} does not appear in the rendered chat")
        finish = cursor = begin + len(content)
        first = next(t for t, (_, e) in enumerate(offsets) if e > begin)
        last = max(t for t, (s, _) in enumerate(offsets) if s < finish) + 1
        if last < len(ids) and ids[last] in special:
            last += 1
        spans.append((first, last))
    return spans


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of every special token, including added ones such as ``<|im_end|>``."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}
