"""The generation engine: one thread owns the model and serves every request in shared batches.

Requests wait in a queue. Between decode steps the engine takes what is waiting (up to
`max_batch` rows in all), left-pads the new prompts, prefills them in one forward pass and joins
their KV cache to the running batch (continuous batching). Every decode step is one forward pass
for the whole batch, with one adapter name per row (``None`` for the plain base), so requests for
different adapters share the pass. Each row stops on its own (end-of-sequence token, stop string,
`max_tokens`) and leaves the batch at once.

Left padding keeps each row's result equal to running it alone: padded columns are masked out
and ``position_ids`` count only the row's real tokens, so greedy decoding picks the same tokens.

Results go back through each request's `emit` callback, called on the engine thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
from transformers.cache_utils import DynamicCache

from ..errors import LorafitError
from . import kvcache
from .adapters import AdapterPool, SlotsBusy
from .sampling import ParamError, SamplingParams, TextTracker, sample_token

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delta:
    """New text of a request's answer."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The request is done: ``reason`` is ``"stop"`` (end token or stop string) or ``"length"``."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The request could not be served; `error` says why."""

    error: Exception


Event = Union[Delta, Finished, Failed]


@dataclass
class Request:
    """One prompt to continue. `adapter` ``None`` means the plain base model."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    adapter: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating for this request at the next step (no further events)."""
        self.cancelled.set()


@dataclass
class _Row:
    request: Request
    tracker: TextTracker
    generator: torch.Generator | None  # None: greedy
    generated: int = 0


@dataclass
class _Batch:
    """The rows decoding together and their shared, left-padded state."""

    rows: list[_Row]
    cache: DynamicCache
    mask: torch.Tensor  # (B, T) 1 for real tokens, 0 for left padding
    positions: torch.Tensor  # (B,) position of each row's newest token
    tokens: torch.Tensor | None = None  # (B,) each row's newest token, the next step's input


_STOP = object()


class ContextError(ParamError):
    """The prompt plus the tokens to generate do not fit the model's context."""


class Engine:
    """Continuous-batching generation over `model` on a single thread.

    `model` is a `lorafit.LoraModel` (per-row adapters through `adapters`) or a plain Hugging
    Face causal LM (base only, `adapters` None).
    """

    def __init__(self, model, tokenizer, adapters: AdapterPool | None = None,
                 max_batch: int = 16, max_model_len: int | None = None):
        if max_batch < 1:
            raise ParamError("max_batch", f"must be at least 1, got {max_batch}")
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.max_batch = max_batch
        self._hf_config = getattr(model, "model", model).config
        context = getattr(self._hf_config, "max_position_embeddings", None)
        limits = [n for n in (max_model_len, context) if n]
        self.max_model_len = min(limits) if limits else None
        self._device = next(model.parameters()).device
        self._pad_id = next(
            (i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0
        )
        self._eos = _eos_ids(model, tokenizer)
        self._mergeable = kvcache.mergeable(DynamicCache(config=self._hf_config))
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[Request] = deque()
        self._batch: _Batch | None = None
        self._thread = threading.Thread(target=self._loop, name="lorafit-engine", daemon=True)

    # ---- called from other threads -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the current step, fail whatever is left, and end the engine thread."""
        self._inbox.put(_STOP)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: Request) -> None:
        """Queue `request`; raise `ParamError` at once if it cannot be served."""
        self.check(request.prompt_ids, request.params)
        self._inbox.put(request)

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise `ParamError` (`ContextError`) if this prompt cannot be served as asked."""
        if not prompt_ids:
            raise ParamError("prompt", "must hold at least one token")
        total = len(prompt_ids) + params.max_tokens
        if self.max_model_len is not None and total > self.max_model_len:
            raise ContextError(
                "max_tokens",
                f"this model's context is {self.max_model_len} tokens, but the prompt has "
                f"{len(prompt_ids)} and max_tokens is {params.max_tokens} ({total})",
            )

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between two steps; its result or error comes back in a Future."""
        future: Future = Future()
        self._inbox.put((fn, future))
        return future

    # ---- the engine thread ----------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while self._take_inbox(block=self._batch is None and not self._waiting):
                try:
                    self._admit()
                    if self._batch is not None:
                        self._decode()
                except Exception as exc:  # a bug must fail its requests, not the server
                    log.exception("generation step failed")
                    if self._batch is not None:
                        self._fail(self._batch.rows, exc)
                        self._batch = None
        self._shutdown()

    def _take_inbox(self, block: bool) -> bool:
        """Move new requests to the waiting line and run commands; False once told to stop."""
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is _STOP:
                    return False
                if isinstance(item, Request):
                    self._waiting.append(item)
                else:
                    _run_command(*item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _admit(self) -> None:
        """Prefill waiting requests that fit in the batch and whose adapter can be loaded."""
        room = self.max_batch - (len(self._batch.rows) if self._batch else 0)
        if room <= 0 or not self._waiting or (self._batch is not None and not self._mergeable):
            return
        chosen: list[Request] = []
        later: deque[Request] = deque()
        for request in self._waiting:
            if request.cancelled.is_set():
                continue
            if len(chosen) < room and self._acquire(request):
                chosen.append(request)
            elif not request.cancelled.is_set():
                later.append(request)
        self._waiting = later
        if chosen:
            self._prefill(chosen)

    def _acquire(self, request: Request) -> bool:
        """Load the request's adapter; False to retry later, or fail the request (cancelling it)."""
        if request.adapter is None:
            return True
        try:
            self.adapters.acquire(request.adapter)
            return True
        except SlotsBusy:
            return False
        except LorafitError as exc:  # unknown by now, or its files are broken
            _emit(request, Failed(exc))
            request.cancel()
            return False

    def _prefill(self, requests: list[Request]) -> None:
        rows = [
            _Row(r, TextTracker(self.tokenizer, r.params.stop),
                 None if r.params.greedy else r.params.generator())
            for r in requests
        ]
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.tensor(
            [[self._pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests],
            device=self._device,
        )
        mask = torch.tensor(
            [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests],
            device=self._device,
        )
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) padding repeats position 0
        batch = _Batch(rows, DynamicCache(config=self._hf_config), mask, positions[:, -1])
        try:
            logits = self._forward(ids, batch, positions)
        except Exception as exc:
            log.exception("prefill failed")
            self._fail(rows, exc)
            return
        joined = self._advance(batch, logits)
        if joined is not None:
            self._join(joined)

    def _decode(self) -> None:
        batch = self._batch
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        batch.positions = batch.positions + 1
        logits = self._forward(batch.tokens[:, None], batch, batch.positions[:, None])
        self._batch = self._advance(batch, logits)

    def _forward(self, ids: torch.Tensor, batch: _Batch, positions: torch.Tensor) -> torch.Tensor:
        """One forward pass; the last position's logits (B, V)."""
        adapter_kw = {}
        if self.adapters is not None:
            adapter_kw["adapter_names"] = [row.request.adapter for row in batch.rows]
        out = self.model(
            input_ids=ids, attention_mask=batch.mask, position_ids=positions,
            past_key_values=batch.cache, use_cache=True, logits_to_keep=1, **adapter_kw,
        )
        return out.logits[:, -1].float()

    def _advance(self, batch: _Batch, logits: torch.Tensor) -> _Batch | None:
        """Pick each row's next token, report it, and drop the rows that are done."""
        picks = logits.argmax(dim=-1).tolist()
        keep = []
        for i, row in enumerate(batch.rows):
            if row.generator is not None:
                picks[i] = sample_token(logits[i], row.request.params, row.generator)
            if row.request.cancelled.is_set():
                log.debug("dropped a cancelled request after %d tokens", row.generated)
                self._release(row)
                continue
            reason = self._append(row, picks[i])
            if reason is None:
                keep.append(i)
            else:
                self._finish(row, reason)
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            batch.mask = kvcache.select_rows(batch.cache, batch.mask, keep)
            batch.rows = [batch.rows[i] for i in keep]
            batch.positions = batch.positions[keep]
        batch.tokens = torch.tensor([picks[i] for i in keep], device=self._device)
        return batch

    def _append(self, row: _Row, token: int) -> str | None:
        """Add a token to the row's answer; the finish reason if the row is done."""
        row.generated += 1
        if token in self._eos:
            return "stop"
        delta = row.tracker.add(token)
        if delta:
            _emit(row.request, Delta(delta))
        if row.tracker.stopped:
            return "stop"
        if row.generated >= row.request.params.max_tokens:
            return "length"
        return None

    def _finish(self, row: _Row, reason: str) -> None:
        rest = row.tracker.flush()
        if rest:
            _emit(row.request, Delta(rest))
        _emit(row.request, Finished(reason, len(row.request.prompt_ids), row.generated))
        self._release(row)

    def _join(self, new: _Batch) -> None:
        """Add freshly prefilled rows to the running batch."""
        if self._batch is None:
            self._batch = new
            return
        old = self._batch
        old.mask = kvcache.concat(old.cache, old.mask, new.cache, new.mask)
        old.rows += new.rows
        old.positions = torch.cat([old.positions, new.positions])
        old.tokens = torch.cat([old.tokens, new.tokens])

    def _release(self, row: _Row) -> None:
        if row.request.adapter is not None:
            self.adapters.release(row.request.adapter)

    def _fail(self, rows: list[_Row], error: Exception) -> None:
        for row in rows:
            _emit(row.request, Failed(error))
            self._release(row)

    def _shutdown(self) -> None:
        stopped = LorafitError("the server is shutting down")
        if self._batch is not None:
            self._fail(self._batch.rows, stopped)
            self._batch = None
        for request in self._waiting:
            _emit(request, Failed(stopped))
        self._waiting.clear()


def _eos_ids(model, tokenizer) -> frozenset[int]:
    """Token ids that end an answer: the generation config's and the tokenizer's end token."""
    config = getattr(getattr(model, "model", model), "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(ids)


def _run_command(fn: Callable[[], Any], future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except Exception as exc:
        future.set_exception(exc)


def _emit(request: Request, event: Event) -> None:
    """Deliver an event; a listener that fails (its client went away) cancels its request."""
    try:
        request.emit(event)
    except Exception as exc:
        log.info("cancelling a request whose result could not be delivered: %s", exc)
        request.cancel()
