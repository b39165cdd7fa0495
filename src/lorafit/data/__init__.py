"""The data pipeline of ``lorafit train``: files -> checked records -> tokens -> batches.

Design, stage by stage:

1. **Read** (`readers`). JSONL, JSON lists, CSV/TSV and Hugging Face data sets become `Record`s
   that keep their file and line, so every complaint can say ``train.jsonl:17: ...``.
2. **Parse** (`formats`). The `DataConfig.format` picks the fields a record must have. A bad
   record (malformed JSON, missing field, empty text, unknown label, ...) either raises
   `DataError` naming file and line (``on_bad_record: error``, the default) or is skipped and
   counted in the `DataReport`, with the first reasons kept verbatim (``skip``).
3. **Tokenize** (`formats`, `chat`). Causal-LM examples carry ``labels`` equal to ``input_ids``
   where the loss applies and -100 elsewhere: everywhere for ``text``, the response for
   ``instruction``, assistant turns for ``chat`` (spans found by rendering prefixes of the
   conversation and checked token by token). Classification examples carry a label id; the label
   list comes back in the report for saving with the adapter. Over-long examples are cut to
   ``max_length`` and counted.
4. **Batch** (`batching`). `batch_plan` is a pure function of (lengths, batch size, seed, epoch,
   rank, world size), so a resumed run skips the first K batches of the very same plan; `pack`
   fills rows up to ``max_length`` and `collate` turns a batch into padded tensors.

Typical use by a trainer::

    train, evaluation, report = load_dataset_splits(cfg.data, tokenizer)
    for epoch in range(epochs):
        for batch_ids in batch_plan(train.lengths, batch_size, seed, epoch, rank, world_size,
                                    cfg.data.group_by_length)[skip:]:
            # batch_ids is empty only on some ranks, at the last step of an epoch (see batch_plan)
            batch = collate([train[i] for i in batch_ids], train.pad_id)
            loss = model(**batch, use_cache=False).loss
"""

from .batching import GROUP_WINDOW, batch_plan, collate, pack
from .chat import IGNORE_INDEX, encode_conversation
from .config import DEFAULT_PROMPT_TEMPLATE, FORMAT_NAMES, DataConfig
from .pipeline import TokenizedDataset, load_dataset_splits
from .readers import Record, read_records
from .report import DataReport

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "FORMAT_NAMES",
    "GROUP_WINDOW",
    "IGNORE_INDEX",
    "DataConfig",
    "DataReport",
    "Record",
    "TokenizedDataset",
    "batch_plan",
    "collate",
    "encode_conversation",
    "load_dataset_splits",
    "pack",
    "read_records",
]
