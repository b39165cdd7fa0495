"""Record formats: the fields a record must have, and how it becomes a tokenized example.

Each format is a `Format` in the `FORMATS` table: ``parse`` checks one record's fields and
returns its payload (raising `BadRecord`), ``encode`` turns a list of payloads into examples
(tokenizing in one call where it can). Causal-LM examples are ``{"input_ids", "labels"}`` with
``labels[t] = input_ids[t]`` where the loss applies and `IGNORE_INDEX` elsewhere (the model
shifts labels itself); classification examples are ``{"input_ids", "label"}``; preference
examples are ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` (see `encode_preferences`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

from .chat import IGNORE_INDEX, Message, encode_conversation, render, tokens
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


@dataclass(frozen=True)
class PreferencePair:
    """A parsed preference record: `prompt` is a string or messages ending on a user turn; the
    answers are strings, or one assistant message each when the prompt is messages."""

    prompt: Union[str, list[Message]]
    chosen: Union[str, Message]
    rejected: Union[str, Message]


def parse_preference(fields: Mapping[str, Any], cfg: DataConfig) -> PreferencePair:
    """TRL's preference record, plain (three strings) or conversational (message lists)."""
    prompt = _field(fields, cfg.prompt_field)
    if isinstance(prompt, str):
        pair = PreferencePair(prompt, _text(fields, cfg.chosen_field), _text(fields, cfg.rejected_field))
    elif isinstance(prompt, list):
        messages = [_message(m, f"{cfg.prompt_field}[{i}]") for i, m in enumerate(prompt)]
        if not messages or messages[-1]["role"] != "user":
            last = messages[-1]["role"] if messages else "nothing"
            raise BadRecord("prompt not ending on a user turn",
                            f"field {cfg.prompt_field!r} must end on a user message, it ends on {last}")
        if cfg.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": cfg.system_prompt})
        pair = PreferencePair(messages, _answer(fields, cfg.chosen_field), _answer(fields, cfg.rejected_field))
    else:
        raise BadRecord("wrong type", f"field {cfg.prompt_field!r} must be a string or a list of messages, "
                        f"got {type(prompt).__name__}")
    if pair.chosen == pair.rejected:
        raise BadRecord("chosen equals rejected", f"fields {cfg.chosen_field!r} and {cfg.rejected_field!r} "
                        "are identical, so there is no preference to learn")
    return pair


def _message(value: Any, where: str) -> Message:
    if not isinstance(value, Mapping) or not isinstance(value.get("role"), str) \
            or not isinstance(value.get("content"), str):
        raise BadRecord("wrong type", f"{where} must be a message with string 'role' and 'content'")
    return {"role": value["role"], "content": value["content"]}


def _answer(fields: Mapping[str, Any], name: str) -> Message:
    """The single assistant message of a conversational answer field."""
    value = _field(fields, name)
    if not isinstance(value, list) or len(value) != 1:
        raise BadRecord("wrong type", f"field {name!r} must be a list with one assistant message "
                        "(the prompt is a list of messages)")
    message = _message(value[0], f"{name}[0]")
    if message["role"] != "assistant":
        raise BadRecord("wrong type", f"{name}[0] must have role 'assistant', got {message['role']!r}")
    if not message["content"].strip():
        raise BadRecord("empty text", f"field {name!r} is empty")
    return message


def encode_preferences(pairs: list[PreferencePair], ctx: Context) -> list[Union[Example, BadRecord]]:
    """Each pair as ``{"prompt_ids", "chosen_ids", "rejected_ids"}``, tokenized as TRL 1.16's DPOTrainer does.

    The prompt alone (P) and prompt + answer (F_c, F_r) are tokenized; the answer tokens start
    at ``n = min(common prefix(P, F_c), common prefix(P, F_r))`` (a template or a token merge can
    change the prompt's last tokens), so ``prompt_ids = P[:n]``, ``chosen_ids = F_c[n:]``. Chat
    records go through the chat template (generation prompt on P, no EOS added: the template
    ends the turn) or, with a plain template, become strings. Strings: P = tokenizer(prompt) with
    its special tokens, F = tokenizer(prompt + answer + EOS text) (EOS per `add_eos`).
    Truncation keeps the start: each of prompt + answer is cut to ``max_length`` tokens, and a
    pair whose prompt alone fills ``max_length`` is a bad record (TRL drops it).
    """
    results: list[Union[Example, BadRecord]] = []
    for pair in pairs:
        try:
            prompt, chosen, rejected = _pair_tokens(pair, ctx)
        except BadRecord as bad:
            results.append(bad)
            continue
        start = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
        limit = ctx.cfg.max_length
        if start >= limit:
            results.append(BadRecord("prompt too long", f"the prompt alone has {start} tokens, so "
                                     f"max_length={limit} leaves no answer token"))
            continue
        chosen, rejected = chosen[start:], rejected[start:]
        if not chosen or not rejected:
            results.append(BadRecord("no target tokens", "an answer adds no tokens to the prompt"))
            continue
        room = limit - start
        ctx.report.truncated += len(chosen) > room or len(rejected) > room
        results.append({"prompt_ids": prompt[:start], "chosen_ids": chosen[:room], "rejected_ids": rejected[:room]})
    return results


def _pair_tokens(pair: PreferencePair, ctx: Context) -> tuple[list[int], list[int], list[int]]:
    """(prompt, prompt + chosen, prompt + rejected) token ids before the common-prefix split."""
    tokenizer = ctx.tokenizer
    if isinstance(pair.prompt, list) and ctx.plain_template is None:
        try:
            return (tokens(tokenizer, render(tokenizer, pair.prompt, generation_prompt=True)),
                    tokens(tokenizer, render(tokenizer, pair.prompt + [pair.chosen], generation_prompt=False)),
                    tokens(tokenizer, render(tokenizer, pair.prompt + [pair.rejected], generation_prompt=False)))
        except Exception as exc:  # jinja raises whatever the template's author chose
            raise BadRecord("chat template", f"the chat template cannot render this pair ({exc})") from None
    if isinstance(pair.prompt, list):
        *head, user = pair.prompt
        prompt = "".join(f"{m['content']}\n\n" for m in head) + ctx.plain_template.format(prompt=user["content"])
        answers = pair.chosen["content"], pair.rejected["content"]
    else:
        template = ctx.cfg.prompt_template
        prompt = pair.prompt if template is None else template.format(prompt=pair.prompt)
        answers = pair.chosen, pair.rejected
    eos = tokenizer.eos_token if ctx.cfg.add_eos and tokenizer.eos_token else ""
    ids = tokenizer([prompt] + [prompt + a + ("" if a.endswith(eos) else eos) for a in answers])["input_ids"]
    return ids[0], ids[1], ids[2]


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def example_tokens(example: Example) -> int:
    """Tokens an example puts through the model: its row, or both rows of a preference pair."""
    if "prompt_ids" in example:
        return 2 * len(example["prompt_ids"]) + len(example["chosen_ids"]) + len(example["rejected_ids"])
    return len(example["input_ids"])


FORMATS = {
    "text": Format(parse_text, encode_texts),
    "instruction": Format(parse_instruction, encode_conversations),
    "chat": Format(parse_chat, encode_conversations),
    "classification": Format(parse_classification, encode_classification),
    "preference": Format(parse_preference, encode_preferences),
}
