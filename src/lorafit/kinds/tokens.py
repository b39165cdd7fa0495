"""Trainable token rows (PEFT's ``trainable_token_indices``): new special tokens learn their own
embedding rows while the rest of the vocabulary stays frozen.

For an embedding E [vocab, dim] and chosen indices t_1..t_n an adapter holds the rows V [n, dim]
(initialised to E[t_k], PEFT's ``trainable_tokens_delta``, which holds values, not differences)
and the layer computes with E' = E except ``E'[t_k] = V[k]``:

* `nn.Embedding`: ``y = E'[ids]`` (times the module's ``embed_scale`` where it has one);
* `nn.Linear` output head with weight H [vocab, dim]: ``logits = x H'ᵀ (+ b)``, so only the
  columns t_k change: ``logits[..., t_k] = x V[k]ᵀ (+ b[t_k])``.

A list in the config selects the model's input embeddings; a dict maps module names to their
indices. When the output head shares the input embedding's weight (tied embeddings), the head
gets a layer that uses the embedding's rows V itself, so both stay tied while training and only
the embedding's rows are saved (PEFT's layout: ``<embedding>.token_adapter.trainable_tokens_delta``).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError, MergeError, TargetError
from ..layers import LoraLayer
from ..registry import SourceTarget, TargetSource
from ..surgery import has_suffix, module_target_paths, walk
from .tying import input_embedding_path, tied_heads


class TokenRows(nn.Module):
    """One adapter's rows V [n, dim] for the token `indices`, and the base rows they replace;
    a tied head's `TokenRows` reads another's V (`source`) and owns no parameter."""

    fusable = False
    gatherable = False
    dropping = False
    file_keys = {"values": "token_adapter.trainable_tokens_delta"}

    def __init__(self, indices: list[int], original: Tensor, source: Optional["TokenRows"] = None):
        super().__init__()
        self.indices = list(indices)
        self.register_buffer("original", original.detach().clone(), persistent=False)
        if source is None:
            self.values = nn.Parameter(original.detach().clone())
        self.__dict__["source"] = source  # not a submodule: its V is saved and trained once

    def rows(self) -> Tensor:
        return self.source.rows() if self.source is not None else self.values

    def delta(self) -> Tensor:
        """V − E[t] [n, dim]: how far the rows moved."""
        return self.rows().float() - self.original.float()

    def apply(self, layer: "LoraTokens", x: Tensor, result: Tensor, result_is_base: bool) -> Tensor:
        return layer.replace_rows(x, result, self)

    def merge(self, layer: "LoraTokens", safe: bool) -> None:
        """``E[t_k] ← V[k]``; with `safe`, non-finite rows raise and E is left untouched."""
        rows = self.rows().detach()
        if safe and not bool(torch.isfinite(rows).all()):
            raise MergeError("the adapter's token rows hold NaN/Inf; the base weight was left untouched")
        self._write(layer, rows)

    def unmerge(self, layer: "LoraTokens") -> None:
        self._write(layer, self.original)

    def merged_with(self, layer: "LoraTokens") -> "TokenRows":
        return self  # a tied head's rows are written again, to the same values

    def _write(self, layer: "LoraTokens", rows: Tensor) -> None:
        weight = layer.base_layer.weight
        with torch.no_grad():
            weight[torch.tensor(self.indices, device=weight.device)] = rows.to(weight.dtype)


class LoraTokens(LoraLayer):
    """An `nn.Embedding` or `nn.Linear` head whose chosen token rows each adapter replaces."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.out_features, self.in_features = base_layer.weight.shape  # [vocab, dim]

    def add_rows(self, name: str, indices: list[int], source: Optional[TokenRows] = None) -> None:
        weight = self.base_layer.weight
        original = weight.detach()[torch.tensor(indices, device=weight.device)]
        self.add(name, TokenRows(indices, original, source))

    def replace_rows(self, x: Tensor, result: Tensor, rows: TokenRows) -> Tensor:
        """The base output `result` with the chosen tokens' rows (or logit columns) replaced."""
        idx = torch.tensor(rows.indices, device=result.device)
        values = rows.rows().to(result.dtype)  # (n, dim)
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            slot = torch.full((base.num_embeddings,), -1, device=x.device)
            slot[idx] = torch.arange(len(rows.indices), device=x.device)
            pos = slot[x]  # (...,) position among the chosen tokens, -1 for the others
            new = values[pos.clamp(min=0)]  # (..., dim)
            scale = getattr(base, "embed_scale", None)
            if scale is not None:
                new = new * scale.to(new.dtype)
            return torch.where((pos >= 0)[..., None], new, result)
        columns = x.to(values.dtype) @ values.T  # (..., n)
        if base.bias is not None:
            columns = columns + base.bias[idx].to(columns.dtype)
        return result.index_copy(result.dim() - 1, idx, columns)


def find_token_targets(config, root: nn.Module) -> list[SourceTarget]:
    """The layers `config.trainable_token_indices` selects, then any output head tied to a
    selected input embedding (ConfigError/TargetError name what is refused)."""
    spec = config.trainable_token_indices
    embedding_path = input_embedding_path(root)
    by_name = dict(spec) if isinstance(spec, dict) else {embedding_path or "embed_tokens": list(spec)}
    modules = dict(walk(root))
    targeted = module_target_paths(root, config)
    targets, chosen = [], {}
    for name, indices in by_name.items():
        paths = [p for p in modules if has_suffix(p, [name])]
        if len(paths) != 1:
            raise TargetError(f"LoraConfig.trainable_token_indices: {name!r} matches {len(paths)} modules of "
                              f"{type(root).__name__}; expected exactly one embedding or output head")
        path = paths[0]
        module = modules[path]
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if path in targeted or isinstance(module, LoraLayer) and not isinstance(module, LoraTokens):
            raise ConfigError(f"LoraConfig.trainable_token_indices selects {path!r}, which target_modules also "
                              "targets; choose one")
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise ConfigError(f"LoraConfig.trainable_token_indices selects {path!r} ({type(base).__name__}); "
                              "expected an nn.Embedding or an nn.Linear output head")
        vocab = base.weight.shape[0]
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab]
        if bad or not indices or len(set(indices)) != len(indices):
            raise ConfigError(f"LoraConfig.trainable_token_indices[{name!r}] = {indices!r}: expected distinct "
                              f"token ids in [0, {vocab})")
        chosen[path] = (module, base, list(indices))
    tied = tied_heads(root, embedding_path, modules)
    if config.ensure_weight_tying and embedding_path in chosen:
        clash = [p for p in tied if p in chosen and chosen[p][2] != chosen[embedding_path][2]]
        if clash:
            raise ConfigError(f"LoraConfig.ensure_weight_tying = True, but trainable_token_indices gives the tied "
                              f"modules {embedding_path!r} and {clash[0]!r} different indices; use the same ones")
    for path, (module, base, indices) in chosen.items():
        if path in tied and embedding_path in chosen and chosen[embedding_path][2] == indices:
            continue  # tied to the embedding's rows below
        make = None if isinstance(module, LoraTokens) else LoraTokens
        targets.append(SourceTarget(path, path, make, functools.partial(_add, indices=indices),
                                    {"values": (len(indices), base.weight.shape[1])}, TokenRows.file_keys))
    if embedding_path in chosen:
        indices = chosen[embedding_path][2]
        for path in tied:
            if path not in chosen or chosen[path][2] == indices:
                make = None if isinstance(modules[path], LoraTokens) else LoraTokens
                add = functools.partial(_add_tied, indices=indices, root=root, source_path=embedding_path)
                targets.append(SourceTarget(path, path, make, add, {}, {}))
    return targets


def _add(layer: LoraTokens, name: str, indices: list[int]) -> None:
    layer.add_rows(name, indices)


def _add_tied(layer: LoraTokens, name: str, indices: list[int], root: nn.Module, source_path: str) -> None:
    layer.add_rows(name, indices, source=root.get_submodule(source_path).lora[name])


TOKENS = TargetSource("trainable_token_indices", find_token_targets)
