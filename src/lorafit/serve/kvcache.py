"""Batch surgery on a Hugging Face `DynamicCache`: add, drop and re-pad rows between steps.

Rows are left-padded: every row's newest token sits in the last column, and its padding columns
are masked out. Joining two batches pads the shorter one on the left; dropping finished rows may
leave columns that are padding in every remaining row, which are cut off.

Only plain `DynamicLayer`s (full attention) can be re-padded; `mergeable` tells whether a cache
is made of them. Other caches (sliding windows) can only lose rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer


def mergeable(cache: DynamicCache) -> bool:
    """Whether rows can be joined into and cut out of `cache` with the functions below."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def left_pad(cache: DynamicCache, mask: torch.Tensor, columns: int) -> torch.Tensor:
    """Add `columns` masked-out columns on the left of every row; return the widened mask."""
    if columns == 0:
        return mask
    for layer in cache.layers:  # keys, values: (B, heads, T, head_dim)
        layer.keys = F.pad(layer.keys, (0, 0, columns, 0))
        layer.values = F.pad(layer.values, (0, 0, columns, 0))
    return F.pad(mask, (columns, 0))


def concat(first: DynamicCache, first_mask: torch.Tensor,
           second: DynamicCache, second_mask: torch.Tensor) -> torch.Tensor:
    """Append the rows of `second` to `first` (in place); return the joined attention mask."""
    width = max(first_mask.shape[1], second_mask.shape[1])
    first_mask = left_pad(first, first_mask, width - first_mask.shape[1])
    second_mask = left_pad(second, second_mask, width - second_mask.shape[1])
    for mine, theirs in zip(first.layers, second.layers):
        mine.keys = torch.cat([mine.keys, theirs.keys])
        mine.values = torch.cat([mine.values, theirs.values])
    return torch.cat([first_mask, second_mask])


def select_rows(cache: DynamicCache, mask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Keep only `rows` (in place); return their mask.

    In a mergeable cache, the columns no kept row attends to are cut off as well.
    """
    index = torch.tensor(rows, device=mask.device)
    cache.batch_select_indices(index)
    mask = mask[index]
    if not mergeable(cache):
        return mask
    first_used = int(mask.any(dim=0).int().argmax())  # all-padding columns are on the left
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, first_used:]
        layer.values = layer.values[:, :, first_used:]
    return mask[:, first_used:]
