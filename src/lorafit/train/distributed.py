"""Training on several processes under torchrun: the process group, gradient sync, FSDP sharding
of the frozen base, and the few collectives the trainer needs.

``torchrun --nproc_per_node N -m lorafit train CONFIG.yaml`` starts N processes (ranks); each reads
its rank from the environment torchrun sets, joins the process group (gloo on CPU, nccl on
``cuda:LOCAL_RANK``) and trains on its shard of every global batch (`lorafit.data.batch_plan`).

Gradient sync. The loss of a step is the summed loss of every micro-batch of every rank, divided
by the number of targets in all of them: each rank adds its target count to one all-reduce before
the forward passes, so every rank divides by the same global count. The gradient is then the sum
of the ranks' gradients, which `sync_gradients` forms with one all-reduce of all trainable
gradients (and the step's loss) after the last micro-batch. The update equals that of one
process running the whole global batch, up to float summation order.

``ddp`` is that explicit all-reduce, not torch's DistributedDataParallel: a LoRA gradient is a few
megabytes, so overlapping its all-reduce with the backward pass (what DDP's reducer buys) saves
little, while the explicit sum needs no ``no_sync()`` bookkeeping across accumulation, has no
unused-parameter failure modes, and lets a rank whose micro-batch is empty (the last global batch
of an epoch) simply skip it.

``fsdp`` shards every frozen base weight with FSDP2 ``fully_shard``: one unit per block named in
the model's ``_no_split_modules`` and the backbone as the root, so a process holds 1/N of the
base (the output head stays whole) plus one block at a time. The trainable parameters are left out (``ignored_params``): they
stay whole on every rank and are summed as under ``ddp``. So the adapter and its optimizer state
are complete on every rank by construction: rank 0 saves them as a single process does (no
gather, no empty adapter) and a checkpoint resumes with any number of processes. The one sharded
tensor a save reads is a targeted base weight, which the adapter's fingerprint samples:
`whole_base_weights` gathers those to rank 0 around a save. Each FSDP forward all-gathers, so
every rank runs the same number of passes: a rank with an empty micro-batch runs a zero-weighted
one (`Trainer` does this).

Failures. Each collective waits at most ``train.dist_timeout_s``; a dead peer usually fails the
next collective at once (its sockets close). Either way the survivor raises `PeerLost`, a
`TrainingError`, and torchrun stops the job. Work only rank 0 does that the others wait for
(writing checkpoints) goes through `Group.from_main`, which hands rank 0's result or error to
every rank.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import re
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError, TrainingError
from .config import TrainConfig
from .modeling import default_device

T = TypeVar("T")

# Words in the RuntimeError of a collective whose peer is gone or silent (gloo and nccl).
_LOST_PEER_SIGNS = ("Connection closed", "Connection reset", "Timed out", "timed out", "NCCL", "gloo", "Broken pipe")


class PeerLost(TrainingError):
    """A collective failed: another process of the job died or stopped answering."""


class RankZeroFailed(TrainingError):
    """Raised on the other ranks when rank 0 stops the run with an error (which rank 0 reports)."""


@dataclass(frozen=True)
class Group:
    """This process's place in the job and the collectives the trainer uses. With one process
    (``mode`` ``none``) every collective is the identity."""

    mode: str
    """``none``, ``ddp`` or ``fsdp``."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False
    """Whether `init` created the process group (and `close` destroys it)."""
    timeout_s: Optional[float] = None
    """How long a collective waits for the other ranks (``train.dist_timeout_s``)."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def sum(self, values: Tensor) -> Tensor:
        """`values` summed over the ranks, in place."""
        if self.active:
            with self._collective("all-reduce"):
                torch.distributed.all_reduce(values)
        return values

    def broadcast(self, tensors: Sequence[Tensor]) -> None:
        """Give every rank rank 0's values of `tensors`, in place."""
        if self.active:
            with self._collective("broadcast"), torch.no_grad():
                for tensor in tensors:
                    torch.distributed.broadcast(tensor, src=0)

    def share(self, obj: T) -> T:
        """Rank 0's `obj` (any picklable value), on every rank."""
        if not self.active:
            return obj
        box = [obj]
        with self._collective("broadcast"):
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> Optional[list[Any]]:
        """Every rank's `obj`, by rank, on rank 0; None elsewhere."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size if self.main else None
        with self._collective("gather"):
            torch.distributed.gather_object(obj, out, dst=0)
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 while the others wait; every rank returns its result, or raises its
        error (rank 0 the error itself, the others `RankZeroFailed`). Doubles as a barrier."""
        result, failure = None, None
        if self.main:
            try:
                result = fn()
            except BaseException as exc:
                if not self.active:
                    raise
                failure = exc
        shared = self.share((result, None if failure is None else f"{type(failure).__name__}: {failure}"))
        if failure is not None:
            raise failure
        if shared[1] is not None:
            raise RankZeroFailed(f"rank {self.rank}: rank 0 stopped the run ({shared[1]})")
        return shared[0]

    def lost(self, exc: BaseException) -> Optional[PeerLost]:
        """`exc` as a `PeerLost` when it is the failure of a collective (one run inside the model by
        FSDP, say), else None."""
        if not self.active or not isinstance(exc, RuntimeError):
            return None
        text = str(exc).strip()
        if not (isinstance(exc, torch.distributed.DistError) or any(s in text for s in _LOST_PEER_SIGNS)):
            return None
        # "[.../pair.cc:553] Connection closed by peer [addr]:port. This is typically ..." -> its first sentence
        detail = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else "").split(". ")[0][:300]
        waited = f" = {self.timeout_s:g} s" if self.timeout_s is not None else ""
        return PeerLost(f"rank {self.rank} of {self.world_size} lost contact with the other processes "
                        f"({detail}): one of them died, or did not answer within train.dist_timeout_s{waited}")

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as exc:
            raise self.lost(exc) or PeerLost(f"rank {self.rank}: {what} failed ({exc})") from None


def launch_environment() -> tuple[int, int, int]:
    """``(rank, local rank, world size)`` that torchrun (or any env:// launcher) set; ``(0, 0, 1)``
    when none did."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError as exc:
        raise ConfigError(f"RANK, LOCAL_RANK and WORLD_SIZE must be integers ({exc})") from None


def resolve_mode(requested: str, world_size: int) -> str:
    """The mode a run uses: ``none`` for a single process whatever was asked, ``ddp`` for ``auto``
    under a multi-process launch; ``none`` with several processes is refused (each would train
    the whole data set and write the same run directory)."""
    if world_size == 1:
        return "none"
    if requested == "none":
        raise ConfigError(f"train.distributed = 'none', but the launcher started {world_size} processes: "
                          f"set train.distributed to 'ddp' or 'fsdp' (or 'auto'), or launch one process")
    return "ddp" if requested == "auto" else requested


def init(cfg: TrainConfig) -> Group:
    """This process's `Group`: joins (or, when the caller already did, uses) the default process
    group of a multi-process launch; gloo on CPU, nccl on ``cuda:LOCAL_RANK``."""
    rank, local_rank, world_size = launch_environment()
    mode = resolve_mode(cfg.distributed, world_size)
    if mode == "none":
        return Group("none", default_device())
    dist = torch.distributed
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = not dist.is_initialized()
    if owns:
        bind_world_lazily()
        timeout = datetime.timedelta(seconds=cfg.dist_timeout_s)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                store=_attempt_store(rank, world_size, timeout), rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return Group(mode, device, dist.get_rank(), dist.get_world_size(), owns, cfg.dist_timeout_s)


def bind_world_lazily() -> None:
    """Import, before the process group exists, the torch modules whose functions take the default
    group (``group.WORLD``) as a default argument value, so that those defaults hold None.

    Imported afterwards (transformers imports FSDP, and FSDP ``torch.distributed.nn``, the first
    time it loads a model or tokenizer), each default is a reference to the group that nothing
    can drop: `close` then unregisters the group without freeing it, and its gloo threads (one
    event loop, two workers) keep running into interpreter shutdown, whose teardown of them now
    and then ends the process with SIGABRT, more often on a loaded machine.
    """
    import torch.distributed.fsdp.sharded_grad_scaler  # noqa: F401
    import torch.distributed.nn.functional  # noqa: F401
    import torch.distributed.optim.zero_redundancy_optimizer  # noqa: F401


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta):
    """The launcher's key-value store (MASTER_ADDR:MASTER_PORT) under a prefix naming this
    attempt of the job. After an elastic restart the store can still hold the addresses that the
    dead attempt's processes published; gloo would try to connect to those, so each attempt
    keeps its keys apart. The server is torchrun's agent, or else rank 0."""
    dist = torch.distributed
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")),
                          world_size, is_master=rank == 0 and not agent, timeout=timeout,
                          multi_tenant=not agent)
    return dist.PrefixStore(f"lorafit/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def close(group: Group) -> None:
    """Destroy the process group `init` created, once whatever is left of the session's objects is
    collected.

    Only freeing the group stops its gloo threads. A sharded model holds it (FSDP keeps the
    device mesh per unit, the mesh its groups), and so does DTensor's sharding-propagation cache,
    filled by FSDP's own DTensor parameters: `close` empties that cache. A group that outlives
    `close` keeps its threads running into interpreter shutdown: one that drops the last
    reference to a collective's tensor then needs the GIL, which a finalizing interpreter refuses
    by ending the thread, and unwinding a C++ destructor that way aborts the process (SIGABRT,
    after the run's work is done; more often on a loaded machine).
    """
    if group.owns_process_group and torch.distributed.is_initialized():
        if group.mode == "fsdp":
            from torch.distributed.tensor.debug import _clear_sharding_prop_cache

            _clear_sharding_prop_cache()
        gc.collect()
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def session(cfg: TrainConfig) -> Iterator[Group]:
    """`init` on entry, `close` on exit (also after an error). Drop the objects that hold the
    group (the model, under FSDP) before the block ends, so that `close` can free it."""
    group = init(cfg)
    failed = True
    try:
        yield group
        failed = False
    finally:
        with _stop_signals_held(drop=failed):
            close(group)


@contextlib.contextmanager
def _stop_signals_held(drop: bool) -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends: then they take effect, or, when `drop` (an
    error is on its way out), are dropped.

    A failed rank's error must reach its output before the process ends: when one worker dies,
    torchrun sends SIGTERM to the others, which arrives while the survivor closes its session,
    and the default handler would end it there without a word of why."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: held.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if held and not drop:
        signal.raise_signal(held[0])


# -- gradients ---------------------------------------------------------------------------------


def sync_gradients(params: Sequence[nn.Parameter], extra: Tensor, group: Group) -> Tensor:
    """Sum the gradients of `params` (fp32) and the 1-D fp32 tensor `extra` over the ranks in one
    all-reduce; returns the summed `extra`. A parameter without a gradient on some rank counts
    zero there, and keeps none only when no rank has one (so the optimizer skips it, as alone)."""
    if not group.active:
        return extra
    parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)
             for p in params]
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=extra.device)
    flat = group.sum(torch.cat([*parts, has_grad, extra]))
    offset = 0
    for p, used in zip(params, flat[-len(params) - len(extra):-len(extra)].tolist()):
        p.grad = flat[offset:offset + p.numel()].view_as(p) if used else None
        offset += p.numel()
    return flat[-len(extra):]


# -- fsdp --------------------------------------------------------------------------------------


def shard(model: nn.Module, group: Group) -> None:
    """Shard the frozen base of `model` (a `LoraModel` on the CPU) over the ranks with FSDP2 and
    move what stays whole to ``group.device``.

    Units: each module of the backbone whose class the model lists in ``_no_split_modules``
    (decoder blocks), then the backbone as the root. Trainable parameters, and parameters the
    backbone shares with modules outside it (a tied output head), are left whole.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    hf = model.model
    backbone = getattr(hf, "base_model", hf)
    prefix = f"{hf.base_model_prefix}." if backbone is not hf else ""
    # Used outside the units' forwards, so never sharded: trainable parameters (summed by
    # `sync_gradients`) and any parameter reachable by a name outside the backbone.
    kept = {p for name, p in hf.named_parameters(remove_duplicate=False)
            if p.requires_grad or not name.startswith(prefix)}
    mesh = init_device_mesh(group.device.type, (group.world_size,))
    blocks = set(getattr(hf, "_no_split_modules", None) or ())
    for module in list(backbone.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, ignored_params=kept)
    fully_shard(backbone, mesh=mesh, ignored_params=kept)
    _move_whole_states(model, group.device)


def _move_whole_states(model: nn.Module, device: torch.device) -> None:
    """Move the parameters and buffers FSDP left unsharded (and so unmoved) to `device`."""
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and not isinstance(param, DTensor) and param.device != device:
                param.data = param.data.to(device)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)


@contextlib.contextmanager
def whole_base_weights(model: nn.Module, group: Group) -> Iterator[None]:
    """Within the block, rank 0's LoRA layers hold whole CPU copies of their sharded base weights
    (the adapter fingerprint samples them); every rank takes part in the gathers, one weight at a
    time. Outside FSDP it does nothing."""
    if group.mode != "fsdp":
        yield
        return
    from torch.distributed.tensor import DTensor

    swapped = []
    try:
        with group._collective("all-gather"):
            for _, layer in model.lora_layers():
                base = layer.base_layer
                weight = base._parameters.get("weight")
                if isinstance(weight, DTensor):
                    whole = _gathered(weight)
                    if group.main:
                        swapped.append((base, weight))
                        base.register_parameter("weight", nn.Parameter(whole.cpu(), requires_grad=False))
                    del whole
        yield
    finally:
        for base, weight in swapped:
            base.register_parameter("weight", weight)


def _gathered(weight) -> Tensor:
    """The whole of `weight`, a DTensor FSDP shards along dim 0 (rank r holds rows
    [r*c, (r+1)*c) of the N rows, c = ceil(N / world); the last ranks fewer, or none): every
    shard padded to c rows, one all-gather, the padding cut off.

    A plain collective rather than ``full_tensor()``: DTensor's redistribution caches would keep
    the device mesh, and with it the process group, alive past `close`."""
    local = weight.to_local()
    rows, world = weight.shape[0], weight.device_mesh.size()
    chunk = -(-rows // world)
    padded = local.new_zeros((chunk, *local.shape[1:]))
    padded[:local.shape[0]] = local
    whole = local.new_empty((chunk * world, *local.shape[1:]))
    torch.distributed.all_gather_into_tensor(whole, padded)
    return whole[:rows]


# -- data position -----------------------------------------------------------------------------


def rescale_position(batch: int, old_world: int, new_world: int, batch_size: int, examples: int) -> int:
    """The batch index in an epoch's `batch_plan` for `new_world` ranks that resumes where batch
    index `batch` for `old_world` ranks stopped.

    Global batch k covers the epoch's shuffled order from ``k * batch_size * world`` on, so the
    position is a count of examples. It is rounded down: at most ``batch_size * new_world - 1``
    examples are seen again, none skipped. Exact without ``data.group_by_length`` when the count
    divides; with it, global batches are shuffled by world size and the rest of the epoch in
    progress is only close to the examples not yet seen.
    """
    if old_world == new_world:
        return batch
    seen = min(examples, batch * batch_size * old_world)
    return seen // (batch_size * new_world)
