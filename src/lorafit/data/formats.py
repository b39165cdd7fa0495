"""Record formats: the fields a record must have, and how it becomes a tokenized example.

Each format is a `Format` in the `FORMATS` table: ``parse`` checks one record's fields and
returns its payload (raising `BadRecord`), ``encode`` turns a list of payloads into examples
(tokenizing in one call where it can). Causal-LM examples are ``{"input_ids", "labels"}`` with
``labels[t] = input_ids[t]`` where the loss applies and `IGNORE_INDEX` elsewhere (the model
shifts labels itself); classification examples are ``{"input_ids", "label"}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

from .chat import IGNORE_INDEX, Message, encode_conversation, tokens
from .config import DataConfig
from .report import BadRecord, DataReport

Example = dict[str, Any]


@dataclass(frozen=True)
class Context:
    """What encoding needs besides the payloads."""

    tokenizer: Any
    cfg: DataConfig
    report: DataReport
    labels: Optional[list[str]] = None
    """Class names in id order (classification)."""
    plain_template: Optional[str] = None
    """Instruction prompt template when the chat template is not used."""


@dataclass(frozen=True)
class Format:
    parse: Callable[[Mapping[str, Any], DataConfig], Any]
    encode: Callable[[list[Any], Context], list[Union[Example, BadRecord]]]


def _field(fields: Mapping[str, Any], name: str) -> Any:
    value = fields.get(name)
    if value is None:
        present = ", ".join(map(str, fields)) or "none"
        raise BadRecord("missing field", f"missing field {name!r} (fields present: {present})")
    return value


def _text(fields: Mapping[str, Any], name: str) -> str:
    value = _field(fields, name)
    if not isinstance(value, str):
        raise BadRecord("wrong type", f"field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRecord("empty text", f"field {name!r} is empty")
    return value


def parse_text(fields: Mapping[str, Any], cfg: DataConfig) -> str:
    return _text(fields, cfg.text_field)


def parse_instruction(fields: Mapping[str, Any], cfg: DataConfig) -> list[Message]:
    """The Alpaca row as a conversation: user = instruction (+ blank line + input), assistant = output."""
    prompt = _text(fields, cfg.instruction_field)
    extra = fields.get(cfg.input_field)
    if extra is not None and not isinstance(extra, str):
        raise BadRecord("wrong type", f"field {cfg.input_field!r} must be a string, got {type(extra).__name__}")
    if extra and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    messages = [{"role": "user", "content": prompt},
                {"role": "assistant", "content": _text(fields, cfg.output_field)}]
    if cfg.system_prompt:
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return messages


def parse_chat(fields: Mapping[str, Any], cfg: DataConfig) -> list[Message]:
    value = _field(fields, cfg.messages_field)
    if not isinstance(value, list) or not value:
        raise BadRecord("wrong type", f"field {cfg.messages_field!r} must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise BadRecord("wrong type", f"message {i} must have string 'role' and 'content'")
        if message["role"] == "assistant" and not message["content"].strip():
            raise BadRecord("empty text", f"message {i} (assistant) is empty")
        messages.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant turn", "no assistant message, so nothing to learn")
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return messages


def parse_classification(fields: Mapping[str, Any], cfg: DataConfig) -> tuple[str, Union[str, int]]:
    label = _field(fields, cfg.label_field)
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise BadRecord("wrong type", f"field {cfg.label_field!r} must be a string or an integer, "
                        f"got {type(label).__name__}")
    if isinstance(label, str) and not label.strip():
        raise BadRecord("empty text", f"field {cfg.label_field!r} is empty")
    return _text(fields, cfg.text_field), label


def _integer_label(label: Union[str, int]) -> Optional[int]:
    if isinstance(label, int):
        return label
    return int(label) if label.isascii() and label.isdigit() else None


def infer_labels(raw: list[Union[str, int]]) -> list[str]:
    """Class names from the train labels: ``"0".."max"`` when all are integers, else the sorted set."""
    ids = [_integer_label(label) for label in raw]
    if ids and all(i is not None for i in ids):
        return [str(i) for i in range(max(ids) + 1)]
    return sorted({str(label) for label in raw})


def label_id(label: Union[str, int], names: list[str], explicit: bool) -> int:
    """Id of `label`: its position in `names`, or the integer itself when `names` was given explicitly."""
    key = str(label)
    if key in names:
        return names.index(key)
    number = _integer_label(label)
    if explicit and number is not None and 0 <= number < len(names):
        return number
    raise BadRecord("unknown label", f"unknown label {label!r}; expected one of {names}")


def _causal(ids: list[int], labels: list[int], ctx: Context) -> Union[Example, BadRecord]:
    """Truncate to max_length; refuse an example left without a predicted token.

    Position 0 is never predicted (nothing comes before it), so it does not count as a target.
    """
    limit = ctx.cfg.max_length
    cut = len(ids) > limit
    ids, labels = ids[:limit], labels[:limit]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        reason = f"no target tokens within max_length={limit}" if cut else "no target tokens"
        return BadRecord("no target tokens", reason)
    ctx.report.truncated += cut
    return {"input_ids": ids, "labels": labels}


def _with_eos(ids: list[int], ctx: Context) -> list[int]:
    eos = ctx.tokenizer.eos_token_id
    if ctx.cfg.add_eos and eos is not None and (not ids or ids[-1] != eos):
        return ids + [eos]
    return ids


def encode_texts(texts: list[str], ctx: Context) -> list[Union[Example, BadRecord]]:
    """Every token is a target; the tokenizer's own BOS (if any) and EOS (`add_eos`) included."""
    results: list[Union[Example, BadRecord]] = []
    for ids in ctx.tokenizer(texts, add_special_tokens=True)["input_ids"]:
        ids = _with_eos(ids, ctx)
        results.append(_causal(ids, ids, ctx))
    return results


def encode_conversations(conversations: list[list[Message]], ctx: Context) -> list[Union[Example, BadRecord]]:
    """Chat-template conversations (see `lorafit.data.chat`), or the plain instruction template."""
    results: list[Union[Example, BadRecord]] = []
    for messages in conversations:
        try:
            if ctx.plain_template is not None:
                ids, labels = _plain_instruction(messages, ctx)
            else:
                ids, labels, exact = encode_conversation(ctx.tokenizer, messages)
                ctx.report.template_fallbacks += not exact
        except BadRecord as bad:
            results.append(bad)
            continue
        results.append(_causal(ids, labels, ctx))
    return results


def _plain_instruction(messages: list[Message], ctx: Context) -> tuple[list[int], list[int]]:
    """``[system + blank line] + template(prompt)`` then ``output + EOS``; only the latter is a target.

    Prompt and response are tokenized separately, as at inference, where the prompt is encoded
    alone and the model continues it.
    """
    *head, user, answer = messages
    system = "".join(f"{m['content']}\n\n" for m in head)
    prompt = ctx.tokenizer(system + ctx.plain_template.format(prompt=user["content"]),
                           add_special_tokens=True)["input_ids"]
    response = _with_eos(tokens(ctx.tokenizer, answer["content"]), ctx)
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


def encode_classification(items: list[tuple[str, Union[str, int]]], ctx: Context) -> list[Union[Example, BadRecord]]:
    """Text (with the tokenizer's special tokens, e.g. [CLS] ... [SEP]) and a label id."""
    tokenizer, limit = ctx.tokenizer, ctx.cfg.max_length
    texts = [text for text, _ in items]
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    # Over-long texts are encoded again with truncation, so the tokenizer keeps its closing
    # special token inside the limit.
    cut = [i for i, ids in enumerate(encoded) if len(ids) > limit]
    if cut:
        shorter = tokenizer([texts[i] for i in cut], add_special_tokens=True, truncation=True, max_length=limit)
        for i, ids in zip(cut, shorter["input_ids"]):
            encoded[i] = ids
    cut_set = set(cut)
    results: list[Union[Example, BadRecord]] = []
    for i, ((_, label), ids) in enumerate(zip(items, encoded)):
        try:
            target = label_id(label, ctx.labels, explicit=ctx.cfg.labels is not None)
        except BadRecord as bad:
            results.append(bad)
            continue
        ctx.report.truncated += i in cut_set
        results.append({"input_ids": ids, "label": target})
    return results


FORMATS = {
    "text": Format(parse_text, encode_texts),
    "instruction": Format(parse_instruction, encode_conversations),
    "chat": Format(parse_chat, encode_conversations),
    "classification": Format(parse_classification, encode_classification),
}
