"""Packed rows are exact: each example's logits and loss equal those of the example run alone."""

import pytest
import torch
import torch.nn.functional as F

from lorafit.data import IGNORE_INDEX, collate, pack
from lorafit.testing import tiny_llama

LENGTHS = [7, 3, 12, 5, 9, 1, 4]


@pytest.fixture(scope="module")
def examples():
    generator = torch.Generator().manual_seed(0)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, 500, (n,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def packed_batch(examples):
    rows = pack(examples, max_length=16)
    assert len(rows) < len(examples)
    return rows, collate(rows, pad_id=0)


def segments(row):
    """(start, end) of each example inside a packed row, from its position ids."""
    starts = [t for t, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return list(zip(starts, starts[1:]))


def find(examples, ids):
    return next(e for e in examples if e["input_ids"] == ids)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logits_equal_each_example_alone(examples, attention):
    model = tiny_llama(attn_implementation=attention)
    rows, batch = packed_batch(examples)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
        checked = 0
        for r, row in enumerate(rows):
            for start, end in segments(row):
                alone = find(examples, row["input_ids"][start:end])
                solo = model(torch.tensor([alone["input_ids"]]), use_cache=False).logits[0]
                torch.testing.assert_close(logits[r, start:end], solo, atol=1e-5, rtol=0)
                checked += 1
    assert checked == len(examples)


def test_packed_loss_is_the_loss_of_the_examples_alone(examples):
    model = tiny_llama()
    _, batch = packed_batch(examples)
    with torch.no_grad():
        packed = model(**batch, use_cache=False)
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        total, count = 0.0, 0
        for example in examples:
            ids = torch.tensor([example["input_ids"]])
            logits = model(ids, use_cache=False).logits[0, :-1]
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum")
            count += len(example["input_ids"]) - 1
    assert tokens == count
    torch.testing.assert_close(packed.loss, total / count, atol=1e-5, rtol=0)


def test_boundary_tokens_are_not_predicted_from_the_previous_example(examples):
    rows, _ = packed_batch(examples)
    for row in rows:
        for start, _ in segments(row):
            assert row["labels"][start] == IGNORE_INDEX


def test_why_the_trainer_must_disable_the_cache(examples):
    """With a cache (Llama's default) transformers skips packed-sequence detection: examples mix."""
    model = tiny_llama()
    _, batch = packed_batch(examples)
    with torch.no_grad():
        isolated = model(**batch, use_cache=False).logits
        cached = model(**batch).logits
    assert not torch.allclose(isolated, cached, atol=1e-3)
