"""`load_dataset_splits`: config + tokenizer -> tokenized train/eval sets and a `DataReport`.

Order of work: read and parse the train records (bad ones raise or are counted, `max_records`
good ones kept) -> for classification, fix the label list (given, or inferred from all train
records) -> hold out the eval records (`eval_file`, a data set's `eval_split`, or
`eval_fraction`) -> tokenize -> pack (optional).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterator, Optional

import torch

from ..errors import ConfigError, DataError
from .batching import pack
from .chat import has_chat_template
from .config import DEFAULT_PROMPT_TEMPLATE, DataConfig
from .formats import FORMATS, Context, Example, example_tokens, infer_labels
from .readers import is_local_file, read_records
from .report import BadRecord, DataReport


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenized examples (lists of ints) with what batching needs: lengths and the pad id."""

    def __init__(self, examples: list[Example], pad_id: int, labels: Optional[list[str]] = None,
                 packed: bool = False) -> None:
        self.examples = examples
        self.pad_id = pad_id
        self.labels = labels
        self.packed = packed

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    @property
    def lengths(self) -> list[int]:
        """Tokens per example (per row when packed; both rows of a preference pair), the input of
        `batch_plan`."""
        return [example_tokens(example) for example in self.examples]


@dataclass(frozen=True)
class _Parsed:
    where: str
    value: Any


def load_dataset_splits(cfg: DataConfig, tokenizer: Any) -> tuple[TokenizedDataset, Optional[TokenizedDataset], DataReport]:
    """Read, check, split and tokenize the data described by `cfg`.

    Returns ``(train, eval or None, report)``. Raises `DataError` for an unreadable source or, with
    ``on_bad_record: error``, the first bad record (naming file and line); `ConfigError` when the
    config and the tokenizer do not fit together.
    """
    if cfg.train_file is None:
        raise ConfigError("data.train_file is required to train: a JSONL/JSON/CSV/TSV file or a data set name")
    fmt = FORMATS[cfg.format]
    plain_template = _plain_template(cfg, tokenizer)
    report = DataReport(on_bad_record=cfg.on_bad_record)

    train = _parse(read_records(cfg.train_file, cfg, cfg.train_split, report), cfg, report, cfg.max_records)
    labels = None
    if cfg.format == "classification":
        labels = cfg.labels or infer_labels([p.value[1] for p in train])
        report.labels = labels
    train, held_out = _eval_records(cfg, train, report)

    context = Context(tokenizer, cfg, report, labels, plain_template)
    pad_id = _pad_id(tokenizer)
    train_set = TokenizedDataset(_encode(train, fmt.encode, context), pad_id, labels)
    eval_set = None if held_out is None else TokenizedDataset(_encode(held_out, fmt.encode, context), pad_id, labels)
    report.train_examples = len(train_set)
    report.eval_examples = 0 if eval_set is None else len(eval_set)
    if not train_set.examples:
        raise DataError(f"{cfg.train_file}: no usable training examples\n{report.summary()}")
    if cfg.packing:
        train_set = TokenizedDataset(pack(train_set.examples, cfg.max_length), pad_id, packed=True)
        report.packed_rows = len(train_set)
        if eval_set is not None:
            eval_set = TokenizedDataset(pack(eval_set.examples, cfg.max_length), pad_id, packed=True)
    return train_set, eval_set, report


def _plain_template(cfg: DataConfig, tokenizer: Any) -> Optional[str]:
    """The instruction prompt template to use instead of the chat template, if any."""
    if cfg.format == "chat" and not has_chat_template(tokenizer):
        raise ConfigError("data.format = 'chat' needs a tokenizer with a chat template; "
                          "this tokenizer has none (use format 'instruction' with a prompt_template)")
    if cfg.format not in ("instruction", "preference"):
        return None
    if cfg.prompt_template is not None:
        return cfg.prompt_template
    return None if has_chat_template(tokenizer) else DEFAULT_PROMPT_TEMPLATE


def _pad_id(tokenizer: Any) -> int:
    # Padding is masked (attention mask, IGNORE_INDEX labels), so EOS serves when there is no pad token.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def _parse(records: Iterator[Any], cfg: DataConfig, report: DataReport, limit: Optional[int]) -> list[_Parsed]:
    parse = FORMATS[cfg.format].parse

    def good() -> Iterator[_Parsed]:
        for record in records:
            try:
                yield _Parsed(record.where, parse(record.fields, cfg))
            except BadRecord as bad:
                report.reject(record.where, bad.kind, bad.detail)

    return list(islice(good(), limit))


def _eval_records(cfg: DataConfig, train: list[_Parsed],
                  report: DataReport) -> tuple[list[_Parsed], Optional[list[_Parsed]]]:
    """(train, eval) records: from `eval_file`, an `eval_split` of the train data set, or a fraction."""
    if cfg.eval_file is not None:
        split = cfg.eval_split or cfg.train_split
        return train, _parse(read_records(cfg.eval_file, cfg, split, report), cfg, report, cfg.max_eval_records)
    if cfg.eval_split is not None:
        if is_local_file(cfg.train_file):
            raise ConfigError(f"data.eval_split = {cfg.eval_split!r} applies to data sets; "
                              f"{cfg.train_file} is a local file (set eval_file or eval_fraction)")
        records = read_records(cfg.train_file, cfg, cfg.eval_split, report)
        return train, _parse(records, cfg, report, cfg.max_eval_records)
    if cfg.eval_fraction == 0.0:
        return train, None
    count = round(len(train) * cfg.eval_fraction)
    if not 0 < count < len(train):
        raise DataError(f"{cfg.train_file}: {len(train)} records cannot be split with "
                        f"eval_fraction={cfg.eval_fraction} (the eval or the train part would be empty)")
    count = min(count, cfg.max_eval_records or count)
    chosen = set(random.Random(f"lorafit.eval_split:{cfg.shuffle_seed}").sample(range(len(train)), count))
    return [p for i, p in enumerate(train) if i not in chosen], [p for i, p in enumerate(train) if i in chosen]


def _encode(parsed: list[_Parsed], encode: Callable[[list[Any], Context], list[Any]],
            context: Context) -> list[Example]:
    examples = []
    for item, result in zip(parsed, encode([p.value for p in parsed], context)):
        if isinstance(result, BadRecord):
            context.report.reject(item.where, result.kind, result.detail)
        else:
            examples.append(result)
    return examples
