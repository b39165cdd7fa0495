"""Per-call routing: which adapters a forward pass uses, kept in a context variable.

A `Router` belongs to one `LoraModel` and is shared by all of its LoRA layers. What a forward
pass should do beyond the layers' configured active adapters (run the plain base, give each row
of the batch its own adapter, use other adapters for a while) is a `Route` stored in the
router's `contextvars.ContextVar`. `Router.using` sets a route for a block and restores the
previous one on exit, so blocks nest: an inner ``disable_adapter()`` ends without turning the
adapters back on inside an outer one.

Context variables are per thread (and per asyncio task), so two threads may run forwards of
the same model with different routes at the same time. What is *not* per call: the adapters'
weights, the active set chosen with ``set_adapter`` and merged weights (``merge``, and
``disable_adapter`` on a merged model, which unmerges for the block) are shared by every thread.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor


class RowAdapters:
    """Which adapter serves each row of a mixed batch (``None`` = the plain base).

    Built once per forward call and shared by every layer, so the index tensors are made once
    per device.
    """

    def __init__(self, names: Sequence[Optional[str]]):
        self.names = list(names)
        self.present = list(dict.fromkeys(n for n in self.names if n is not None))
        self._by_device: dict[torch.device, tuple[Tensor, list[tuple[str, Tensor]]]] = {}

    def indices(self, device: torch.device) -> tuple[Tensor, list[tuple[str, Tensor]]]:
        """(slot per row [b] with ``len(present)`` for base rows, [(name, rows of that name)])."""
        if device not in self._by_device:
            slot_of = {n: i for i, n in enumerate(self.present)}
            slots = torch.tensor([slot_of.get(n, len(self.present)) for n in self.names], device=device)
            groups = [(n, torch.nonzero(slots == i).flatten()) for i, n in enumerate(self.present)]
            self._by_device[device] = (slots, groups)
        return self._by_device[device]


@dataclass(frozen=True)
class Route:
    """What the layers do in this call: `disabled` runs the base alone; `rows` gives row i of the
    batch ``rows.names[i]``; `active` (when set) replaces the layers' configured active adapters."""

    disabled: bool = False
    rows: Optional[RowAdapters] = None
    active: Optional[tuple[str, ...]] = None


class Router:
    """The route of one model's layers, per thread / task (see the module docstring)."""

    def __init__(self) -> None:
        self._route: contextvars.ContextVar[Route] = contextvars.ContextVar("lorafit_route", default=Route())

    def __deepcopy__(self, memo) -> "Router":
        return Router()  # a copied model starts with the default route

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    @property
    def route(self) -> Route:
        return self._route.get()

    @contextlib.contextmanager
    def using(self, **changes) -> Iterator[Route]:
        """Within the block, the current route with `changes` (fields of `Route`); the previous
        route is restored on exit."""
        route = dataclasses.replace(self._route.get(), **changes)
        token = self._route.set(route)
        try:
            yield route
        finally:
            self._route.reset(token)
