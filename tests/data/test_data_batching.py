"""batch_plan (determinism, sharding coverage, length grouping), pack and collate."""

import random

import pytest
import torch

from lorafit.data import GROUP_WINDOW, IGNORE_INDEX, batch_plan, collate, pack
from lorafit.errors import ConfigError


def random_lengths(n, seed=0):
    rng = random.Random(seed)
    return [rng.randint(1, 200) for _ in range(n)]


def test_plan_is_a_pure_function_of_its_inputs():
    lengths = random_lengths(101)
    for grouped in (False, True):
        first = batch_plan(lengths, 8, seed=3, epoch=2, group_by_length=grouped)
        assert first == batch_plan(list(lengths), 8, seed=3, epoch=2, group_by_length=grouped)
        assert first != batch_plan(lengths, 8, seed=3, epoch=3, group_by_length=grouped)
        assert first != batch_plan(lengths, 8, seed=4, epoch=2, group_by_length=grouped)


def test_single_rank_plan_shuffles_and_keeps_order_of_batch_sizes():
    plan = batch_plan(range(10), 4, seed=0, epoch=0)
    assert [len(b) for b in plan] == [4, 4, 2]
    assert sorted(i for b in plan for i in b) == list(range(10))
    assert [i for b in plan for i in b] != list(range(10))


@pytest.mark.parametrize("n", [0, 1, 5, 37, 64, 250])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("grouped", [False, True])
def test_every_example_once_per_epoch_across_ranks(n, world_size, grouped):
    lengths = random_lengths(n, seed=n)
    plans = [batch_plan(lengths, 4, seed=1, epoch=0, rank=r, world_size=world_size, group_by_length=grouped)
             for r in range(world_size)]
    seen = [i for plan in plans for batch in plan for i in batch]
    assert sorted(seen) == list(range(n))
    steps = -(-n // (4 * world_size))
    assert all(len(plan) == steps for plan in plans)
    for step in range(steps):
        sizes = [len(plan[step]) for plan in plans]
        assert max(sizes) - min(sizes) <= 1 and max(sizes) <= 4
        if step < steps - 1:
            assert sizes == [4] * world_size


def test_empty_batches_only_at_the_end_of_the_epoch():
    plans = [batch_plan(range(9), 2, seed=0, epoch=0, rank=r, world_size=4) for r in range(4)]
    assert [[len(b) for b in plan] for plan in plans] == [[2, 0], [2, 0], [2, 0], [2, 1]]


def padding(plan, lengths):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in plan if b)


def test_length_grouping_cuts_padding_and_keeps_coverage():
    lengths = random_lengths(2000)
    plain = batch_plan(lengths, 16, seed=0, epoch=0)
    grouped = batch_plan(lengths, 16, seed=0, epoch=0, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(2000))
    assert padding(grouped, lengths) < padding(plain, lengths) / 5
    # the batches still come in a random order of lengths, not sorted
    firsts = [lengths[b[0]] for b in grouped]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


def test_length_grouping_balances_ranks():
    lengths = random_lengths(16 * 4 * GROUP_WINDOW)
    plans = [batch_plan(lengths, 16, seed=0, epoch=0, rank=r, world_size=4, group_by_length=True) for r in range(4)]
    for step in range(len(plans[0])):
        longest = [max(lengths[i] for i in plan[step]) for plan in plans]
        assert max(longest) - min(longest) <= 10


@pytest.mark.parametrize("kwargs", [dict(batch_size=0), dict(rank=2, world_size=2), dict(epoch=-1)])
def test_plan_arguments_are_checked(kwargs):
    args = dict(batch_size=2, seed=0, epoch=0) | kwargs
    with pytest.raises(ConfigError, match="batch_plan: "):
        batch_plan([1, 2, 3], **args)


def test_collate_right_pads_causal_examples():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_classification_and_pad_multiple():
    batch = collate([{"input_ids": [1, 2], "label": 1}, {"input_ids": [3], "label": 0}], pad_id=9, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[1, 2, 9, 9], [3, 9, 9, 9]]
    assert batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


def test_collate_packed_rows_get_position_ids_and_no_attention_mask():
    rows = pack([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]},
                 {"input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]}], max_length=5)
    batch = collate(rows, pad_id=0)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[6, 7, 8, 9, 0], [1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 7, 8, 9, -100], [-100, 2, 3, -100, 5]]


def test_collate_refuses_empty_and_mixed_batches():
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_id=0)
    with pytest.raises(ValueError, match="same fields"):
        collate([{"input_ids": [1], "labels": [1]}, {"input_ids": [1], "label": 0}], pad_id=0)


def test_pack_places_every_example_once_within_max_length():
    rng = random.Random(0)
    examples = [{"input_ids": [k] * n, "labels": [k] * n} for k, n in enumerate(rng.randint(1, 64) for _ in range(300))]
    rows = pack(examples, max_length=64)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    assert sorted(t for r in rows for t in r["input_ids"]) == sorted(t for e in examples for t in e["input_ids"])
    total = sum(len(e["input_ids"]) for e in examples)
    assert len(rows) <= total / 64 * 1.1 + 1  # best-fit decreasing wastes little room
    assert rows == pack(examples, max_length=64)


def test_pack_refuses_long_or_classification_examples():
    with pytest.raises(ValueError, match="at most 2 tokens"):
        pack([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], max_length=2)
    with pytest.raises(ValueError, match="not a causal-LM example"):
        pack([{"input_ids": [1], "label": 0}], max_length=2)
