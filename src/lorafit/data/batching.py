"""Batches: which examples go together (`batch_plan`), packing (`pack`), and tensors (`collate`).

Sharding rule of `batch_plan`. An epoch's example order is a permutation drawn from
``(seed, epoch)``. It is cut into *global* batches of ``batch_size * world_size`` examples; global
batch k is split into ``world_size`` contiguous parts of sizes differing by at most one, and rank r
takes part r as its batch k. So every rank gets the same number of batches,
``ceil(n / (batch_size * world_size))`` (collective ops stay in step), every example is seen
exactly once per epoch across ranks, and only the last global batch can be short: its parts are
smaller, and a part is **empty** on some ranks when fewer than ``world_size`` examples remain.
A trainer must still take that step on such a rank (contributing zero loss and zero tokens) so
that gradients are all-reduced the same number of times on every rank.

Packing and attention isolation. `pack` concatenates examples into rows of at most
``max_length`` tokens with ``position_ids`` restarting at 0 for each example, and `collate`
returns packed rows *without* an ``attention_mask``. Transformers (5.x) then finds the example
boundaries from the position ids (``masking_utils.find_packed_sequence_indices``) and builds a
block-diagonal causal mask for sdpa, eager and flex attention (flash-attention uses the same
position ids for its variable-length kernel). Two conditions, both checked by the tests:

* no 2-D ``attention_mask`` may be passed (any mask, even all ones, turns detection off);
* the forward must run with ``use_cache=False``: with a cache (Llama's default ``use_cache=True``
  creates one) the detection is skipped and examples attend to their neighbours.

The first token of each packed example gets label `IGNORE_INDEX`, so no example is predicted from
the end of the one before it; the packed loss is then the per-token loss of the examples run alone.
"""

from __future__ import annotations

import bisect
import random
from typing import Any, Optional, Sequence

import torch

from ..errors import ConfigError
from .chat import IGNORE_INDEX

# Length grouping sorts inside windows of this many global batches, then shuffles the batches:
# padding falls almost as much as with a global sort while the order stays random.
GROUP_WINDOW = 50


def batch_plan(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, rank: int = 0,
               world_size: int = 1, group_by_length: bool = False) -> list[list[int]]:
    """The batches (lists of example indices) of `rank` in `epoch`; a pure function of its arguments.

    With `group_by_length`, the permutation is cut into windows of ``GROUP_WINDOW`` global batches,
    each window is sorted by length (longest first; ties keep the random order) and cut into global
    batches, and the full global batches are shuffled (a short one stays last). A resumed run skips
    the first K batches of the same plan. See the module docstring for the sharding rule.
    """
    for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("epoch", epoch, 0)):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"batch_plan: {name} = {value!r} is invalid: expected an integer >= {low}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(f"batch_plan: rank = {rank!r} is invalid: expected 0 <= rank < world_size ({world_size})")
    # A string seed goes through SHA-512 in `random.seed`: stable across runs and Python versions.
    rng = random.Random(f"lorafit.batch_plan:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    step = batch_size * world_size
    if group_by_length:
        window = step * GROUP_WINDOW
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lambda i: -lengths[i])]
    global_batches = [order[start:start + step] for start in range(0, len(order), step)]
    if group_by_length:
        # A short global batch stays last, so uneven (or empty) rank batches come only at the end.
        full = len(order) // step
        head = global_batches[:full]
        rng.shuffle(head)
        global_batches = head + global_batches[full:]
    return [batch[rank * len(batch) // world_size:(rank + 1) * len(batch) // world_size]
            for batch in global_batches]


def pack(examples: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, list[int]]]:
    """Causal-LM examples packed into rows of at most `max_length` tokens, by best-fit decreasing.

    Examples are placed longest first, each into the open row with the least room that still
    fits it (a new row when none does); every example lands in exactly one row, in index order
    within the row. Row: ``input_ids`` and ``labels`` concatenated (each example's first label set
    to `IGNORE_INDEX`) and ``position_ids`` = ``0..len-1`` per example.
    """
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row index), sorted: best fit = first that fits
    for i in sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i)):
        size = len(examples[i]["input_ids"])
        if "labels" not in examples[i] or size > max_length:
            raise ValueError(f"pack: example {i} is not a causal-LM example of at most {max_length} tokens")
        slot = bisect.bisect_left(room, (size, -1))
        if slot == len(room):
            rows.append([i])
            bisect.insort(room, (max_length - size, len(rows) - 1))
        else:
            free, row = room.pop(slot)
            rows[row].append(i)
            bisect.insort(room, (free - size, row))
    return [_join([examples[i] for i in sorted(row)]) for row in rows]


def _join(parts: list[dict[str, Any]]) -> dict[str, list[int]]:
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for part in parts:
        row["input_ids"] += part["input_ids"]
        row["labels"] += [IGNORE_INDEX] + part["labels"][1:]
        row["position_ids"] += range(len(part["input_ids"]))
    return row


def collate(examples: Sequence[dict[str, Any]], pad_id: int,
            pad_to_multiple_of: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Right-padded tensors for one batch of B examples, T = longest (rounded up to the multiple).

    * ``input_ids`` (B, T): padded with `pad_id`.
    * ``labels``: (B, T) padded with `IGNORE_INDEX` for causal LM; (B,) class ids for classification.
    * ``attention_mask`` (B, T), 1 on real tokens; for packed rows instead ``position_ids`` (B, T),
      the padding being one more segment ``0, 1, ...`` so it stays apart from the last example
      (see the module docstring: a packed batch must carry no attention mask).

    An empty batch (possible on some ranks at the end of an epoch, see `batch_plan`) is refused:
    the trainer handles it without calling `collate`.
    """
    if not examples:
        raise ValueError("collate: empty batch (the trainer must handle empty batches itself)")
    keys = set(examples[0])
    if any(set(example) != keys for example in examples):
        raise ValueError("collate: examples of one batch must have the same fields")
    width = max(len(example["input_ids"]) for example in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = {"input_ids": _pad([e["input_ids"] for e in examples], width, lambda n: [pad_id] * n)}
    if "labels" in keys:
        batch["labels"] = _pad([e["labels"] for e in examples], width, lambda n: [IGNORE_INDEX] * n)
    if "label" in keys:
        batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    if "position_ids" in keys:
        batch["position_ids"] = _pad([e["position_ids"] for e in examples], width, lambda n: list(range(n)))
    else:
        batch["attention_mask"] = _pad([[1] * len(e["input_ids"]) for e in examples], width, lambda n: [0] * n)
    return batch


def _pad(rows: list[list[int]], width: int, filler: Any) -> torch.Tensor:
    return torch.tensor([row + filler(width - len(row)) for row in rows], dtype=torch.long)
