"""`DataConfig`: the ``data:`` section of a training run.

Build it from plain data with ``lorafit.schema.from_dict(DataConfig, mapping, "data")``; the
checks below run on every construction and name the offending field as ``data.<field>``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Literal, Optional

from ..schema import is_int, is_number, require

FORMAT_NAMES = ("text", "instruction", "chat", "classification", "preference")
# Rendered around the user message when the tokenizer has no chat template (or `prompt_template`
# asks for a plain prompt); the response and EOS follow it directly.
DEFAULT_PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass
class DataConfig:
    """Where the training data lives, what shape its records have, and how they become tokens.

    A record is one JSONL line, one element of a JSON list, one CSV/TSV row or one row of a
    Hugging Face dataset. Its `format` decides which fields it must have and where the loss goes:

    * ``text``: ``text_field``; the loss covers every token.
    * ``instruction``: Alpaca fields; the loss covers the response (and EOS) only.
    * ``chat``: ``messages_field``, a list of ``{"role", "content"}``; the loss covers the
      assistant turns (with the template's end-of-turn marker) only.
    * ``classification``: ``text_field`` and ``label_field``; one label id per example.
    * ``preference``: ``prompt_field``, ``chosen_field`` and ``rejected_field``, plain strings or
      TRL's conversational form (the prompt a list of messages ending on a user turn, chosen and
      rejected a list with one assistant message); one (prompt, chosen, rejected) triple per
      example, for ``train.objective`` ``dpo`` or ``orpo``.
    """

    train_file: Optional[str] = None
    """JSONL, JSON (a list of objects), CSV or TSV file; or a Hugging Face dataset name or
    ``save_to_disk`` directory when no such file exists. Required to train."""
    eval_file: Optional[str] = None
    """Held-out data in the same format; when absent, `eval_fraction` of the train records."""
    eval_fraction: float = 0.0
    """Share of the train records held out for evaluation when `eval_file` is not given (0 = no eval)."""
    train_split: str = "train"
    """Split read from a Hugging Face dataset given as `train_file`."""
    eval_split: Optional[str] = None
    """Split read from a Hugging Face dataset given as `eval_file` (default: `train_split`), or
    from the `train_file` dataset when `eval_file` is not given."""
    dataset_config: Optional[str] = None
    """Configuration name passed to ``datasets.load_dataset`` (e.g. ``"sst2"`` for ``"glue"``)."""
    format: Literal["text", "instruction", "chat", "classification", "preference"] = "text"
    """How a record becomes a training example: ``text`` (loss on every token of `text_field`),
    ``instruction`` (`instruction_field` + optional `input_field` as the prompt, loss on
    `output_field` only), ``chat`` (`messages_field`, loss on assistant turns), ``classification``
    (`text_field` and `label_field`), ``preference`` (`prompt_field`, `chosen_field`,
    `rejected_field` pairs for DPO / ORPO)."""
    text_field: str = "text"
    """The record key holding the text (``text`` and ``classification`` formats)."""
    label_field: str = "label"
    """The record key holding the class label, a name or an integer id (``classification``)."""
    messages_field: str = "messages"
    """The record key holding the conversation, a list of ``{"role", "content"}`` (``chat``)."""
    instruction_field: str = "instruction"
    """The record key holding the instruction, the prompt's main part (``instruction``)."""
    input_field: str = "input"
    """Optional in each record: an absent or empty input leaves the prompt as the instruction alone."""
    output_field: str = "output"
    """The record key holding the answer the loss is taken on (``instruction``)."""
    prompt_field: str = "prompt"
    """Preference records: the prompt (a string, or messages ending on a user turn)."""
    chosen_field: str = "chosen"
    """Preference records: the preferred answer (a string, or a list with one assistant message)."""
    rejected_field: str = "rejected"
    """Preference records: the dispreferred answer, in the same form as the chosen one."""
    labels: Optional[list[str]] = None
    """Class names in id order. When absent: the sorted set of train labels, or ``"0".."N"``
    when every train label is an integer (integer labels are then used as ids)."""
    system_prompt: Optional[str] = None
    """System message for instruction and chat records (chat records that carry their own system
    message keep it)."""
    prompt_template: Optional[str] = None
    """Plain-text instruction prompt with a ``{prompt}`` placeholder. When set it replaces the
    tokenizer's chat template; when absent a tokenizer without a chat template gets
    `DEFAULT_PROMPT_TEMPLATE`. Preference records: chat prompts are rendered with it (or the chat
    template); plain-string prompts are used as they are unless it is set."""
    max_length: int = 512
    """Examples with more tokens are cut to this length (from the right) and counted."""
    add_eos: bool = True
    """Append EOS to ``text`` examples and to plain-template instruction responses."""
    packing: bool = False
    """Concatenate examples into rows of at most `max_length` tokens (causal formats only)."""
    group_by_length: bool = False
    """Batch examples of similar length together to cut padding (see `batch_plan`)."""
    on_bad_record: Literal["error", "skip"] = "error"
    """``error``: the first bad record raises `DataError` naming file and line.
    ``skip``: bad records are dropped and counted in the `DataReport`."""
    max_records: Optional[int] = None
    """Read at most this many good records from `train_file` (the first ones, in file order)."""
    max_eval_records: Optional[int] = None
    """Keep at most this many evaluation records: the first ones of an eval file or split, or a
    smaller held-out part with `eval_fraction` (the rest stays in train)."""
    shuffle_seed: int = 0
    """Seeds the `eval_fraction` split; trainers pass it to `batch_plan` too."""
    delimiter: Optional[str] = None
    """CSV/TSV column separator; by default ``","`` for ``.csv`` and a tab for ``.tsv``/``.tab``."""
    columns: Optional[list[str]] = None
    """Column names of a CSV/TSV file without a header row; absent means the first row is the header."""

    def __post_init__(self) -> None:
        require(self.format in FORMAT_NAMES, "data.format", self.format, f"one of {list(FORMAT_NAMES)}")
        require(is_number(self.eval_fraction) and 0.0 <= self.eval_fraction < 1.0,
                "data.eval_fraction", self.eval_fraction, "a number in [0, 1)")
        require(self.eval_file is None or self.eval_fraction == 0.0, "data.eval_fraction", self.eval_fraction,
                "0 when eval_file is given (the eval set comes from one place)")
        require(is_int(self.max_length) and self.max_length >= 2, "data.max_length", self.max_length,
                "an integer >= 2")
        for name in ("max_records", "max_eval_records"):
            value = getattr(self, name)
            require(value is None or (is_int(value) and value > 0), f"data.{name}", value, "a positive integer or null")
        require(is_int(self.shuffle_seed), "data.shuffle_seed", self.shuffle_seed, "an integer")
        require(self.on_bad_record in ("error", "skip"), "data.on_bad_record", self.on_bad_record,
                "'error' or 'skip'")
        for name in ("text_field", "label_field", "messages_field", "instruction_field", "input_field",
                     "output_field", "prompt_field", "chosen_field", "rejected_field", "train_split"):
            value = getattr(self, name)
            require(isinstance(value, str) and value != "", f"data.{name}", value, "a non-empty string")
        require(not (self.packing and self.format in ("classification", "preference")), "data.packing", self.packing,
                f"false for format {self.format!r} (packing concatenates causal-LM examples)")
        if self.labels is not None:
            require(isinstance(self.labels, (list, tuple)) and len(self.labels) >= 2
                    and all(isinstance(x, str) and x for x in self.labels)
                    and len(set(self.labels)) == len(self.labels),
                    "data.labels", self.labels, "a list of at least two distinct non-empty names")
            self.labels = list(self.labels)
        if self.columns is not None:
            require(isinstance(self.columns, (list, tuple)) and all(isinstance(x, str) and x for x in self.columns)
                    and len(set(self.columns)) == len(self.columns),
                    "data.columns", self.columns, "a list of distinct non-empty column names")
            self.columns = list(self.columns)
        require(self.delimiter is None or (isinstance(self.delimiter, str) and len(self.delimiter) == 1),
                "data.delimiter", self.delimiter, "a single character")
        require(self.eval_split is None or self.eval_fraction == 0.0, "data.eval_split", self.eval_split,
                "null when eval_fraction is set (the eval set comes from one place)")
        if self.prompt_template is not None:
            require(self.format in ("instruction", "preference"), "data.prompt_template", self.prompt_template,
                    "null unless format is 'instruction' or 'preference'")
            require(_placeholders(self.prompt_template) == {"prompt"}, "data.prompt_template", self.prompt_template,
                    "a template whose only placeholder is {prompt} (write literal braces as {{ }})")


def _placeholders(template: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError:  # unbalanced braces
        return set()
