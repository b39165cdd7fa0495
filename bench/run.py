"""lorafit vs PEFT (and TRL), side by side on one machine: `make bench` (or `python bench/run.py`).

Every measurement runs in a fresh worker process (so peak memory is that measurement's alone),
forked from a server that has imported the libraries once; the sides of a case alternate (their
order is reversed every other repeat), each case is repeated and the median of every figure is
kept. Results go to bench/results.json and the table to bench/results.md; the README's benchmark
table (between the bench markers) is regenerated from them. Each row with a goal says whether
lorafit meets it.

    python bench/run.py [--size tiny|default|large] [--repeats N] [--cases train,infer,...]
                        [--out results.json] [--no-readme]

Cases (each worker's docstring has the details):

* ``train``: one training step, lorafit's loss path (`summed_loss`) vs PEFT's ``.loss``;
* ``infer``: base vs unmerged single adapter vs merged; a mixed batch of 8 adapters;
* ``merge``: merge_and_unload, adapter save and adapter load;
* ``qlora``: the train step on an NF4 base;
* ``sft``: end-to-end supervised fine-tuning, ``lorafit.train`` vs TRL's SFTTrainer + PEFT
  (skipped when the data file is absent);
* ``dpo``: one DPO epoch end to end, ``lorafit.train`` vs TRL's DPOTrainer + PEFT (bench/dpo.py;
  skipped when the data file is absent);
* ``moe``: a train step of a Mixtral with LoRA on its 3-D expert weights (``target_parameters``).

The model is a randomly initialised Llama (`lorafit.testing.tiny_llama`) whose shape `--size`
picks; it runs on CUDA when a GPU is present, else on the CPU, in fp32. "base" is always the plain
PyTorch model: on x86 CPUs lorafit's layers run their fp32 products through oneDNN
(`lorafit.functional.mm_t`), so lorafit's ratios to the base can be below 1.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from lorafit.hardware import cpu_bf16_units, cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results.json"
README = ROOT / "README.md"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MOE_TARGETS = ["experts.gate_up_proj", "experts.down_proj"]

SIZES = {
    # the tiny-but-real Llama: 6 layers, hidden 512, vocab 8000, batch 4 x 256
    "default": dict(layers=6, hidden=512, heads=8, intermediate=1376, vocab=8000, batch=4, seq=256, steps=8,
                    infer_batch=8, infer_seq=128, infer_iters=5, file_iters=3,
                    sft_model="default", sft_train=200, sft_eval=50, sft_repeats=1,
                    dpo_train=256, dpo_eval=44),
    "tiny": dict(layers=2, hidden=64, heads=4, intermediate=128, vocab=512, batch=2, seq=32, steps=2,
                 infer_batch=8, infer_seq=16, infer_iters=2, file_iters=1,
                 sft_model="tiny", sft_train=16, sft_eval=8, sft_repeats=1, dpo_train=8, dpo_eval=4),
    "large": dict(layers=12, hidden=1024, heads=16, intermediate=2816, vocab=32000, batch=4, seq=512, steps=4,
                  infer_batch=8, infer_seq=256, infer_iters=5, file_iters=3,
                  sft_model="default", sft_train=900, sft_eval=99, sft_repeats=1, dpo_train=256, dpo_eval=44),
}


# ---------------------------------------------------------------------------------------------
# worker side: one measurement in this process, returned as a dict of figures


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Memory of this process: resident set size sampled every 2 ms by a thread on CPU, the
    allocator's figures on CUDA. Made before the model, so that ``above_start`` counts the model
    too; ``above_window`` counts only what the ``with`` block added (activations, gradients,
    optimizer state)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.start = self._now()
        self.window_start = self.peak = self.start

    def _now(self) -> int:
        import torch

        return torch.cuda.memory_allocated() if self.cuda else _rss_bytes()

    def __enter__(self):
        import threading

        import torch

        self.window_start = self.peak = self._now()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    @property
    def above_window_mb(self) -> float:
        return (self.peak - self.window_start) / 2**20

    @property
    def above_start_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _model(size, device):
    import torch

    from lorafit.testing import tiny_llama

    s = SIZES[size]
    model = tiny_llama(vocab_size=s["vocab"], hidden=s["hidden"], layers=s["layers"], heads=s["heads"],
                       intermediate=s["intermediate"], seed=0)
    return model.to(device=device, dtype=torch.float32)


def _lora_config(side):
    """LoRA r=16, alpha=32, no dropout on every linear layer of the blocks, in `side`'s library."""
    if side == "peft":
        import peft

        return peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    import lorafit

    return lorafit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)


def _wrap(side, model):
    if side == "peft":
        import peft

        return peft.get_peft_model(model, _lora_config(side))
    import lorafit

    return lorafit.wrap(model, _lora_config(side))


def _timed(fn, iters, device):
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _token_batch(s, rows, cols, device):
    import torch

    return torch.randint(3, s["vocab"], (rows, cols), generator=torch.Generator().manual_seed(0)).to(device)


def worker_train(side, size, workdir, quantize=None, precision="fp32", loss="trainer"):
    """Case 1: a training step (forward, backward, AdamW) on a fixed batch, LoRA r=16 on every
    linear layer of the blocks; its ratio to two no-grad forwards of the plain base (the floor: a
    LoRA step is one forward plus one backward through frozen weights, about two forwards) and to
    two no-grad forwards of the wrapped model (the same kernels). With `quantize` (case 4) the base
    is quantised first. `precision`: ``fp32``; ``bf16`` (a bf16 base, fp32 adapters, forwards
    under bf16 autocast: what `lorafit train` does under ``dtype: auto`` on a bf16 machine, and
    PEFT's best CPU setting there); ``autocast`` (an fp32 base under bf16 autocast, as HF
    ``Trainer(bf16=True)`` runs). `loss`: ``trainer`` (lorafit through its trainer's loss) or
    ``labels`` (both through ``model(input_ids, labels=...)``). In low precision also the step's
    bound (`_lora_products_time`): the frozen base's step with the side's own loss plus the LoRA
    products alone."""
    import torch

    s, device = SIZES[size], _device()
    memory = PeakMemory(device)
    model = _model(size, device)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    facts = _quantize(model, quantize) if quantize else {}
    ids = _token_batch(s, s["batch"], s["seq"], device)
    forward = _forward_time(model, ids, s["steps"], device)
    products = _lora_products_time(model, ids.numel(), s["steps"], device, dtype) if dtype != torch.float32 else None
    floor = _frozen_step_time(model, ids, s["steps"], device, dtype)
    trainer = side == "lorafit" and loss == "trainer"
    own_floor = floor
    if products and side == "lorafit":
        own_floor = _frozen_step_time(model, ids, s["steps"], device, dtype, trainer, lean=True)
    wrapped = _wrap(side, model).train()
    for param in wrapped.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    wrapped_forward = _forward_time(wrapped, ids, s["steps"], device)
    step = _train_step(side, wrapped, ids, device, dtype, loss)
    with memory:
        step()  # warm-up (allocator, optimizer state)
        faults = _minor_faults()
        seconds = _timed(step, s["steps"], device)
        faults = (_minor_faults() - faults) / s["steps"]
    tokens = s["batch"] * s["seq"]
    bound = {"bound_s": own_floor + products, "step_over_bound": seconds / (own_floor + products)} if products else {}
    return {"step_s": seconds, "forward_s": forward, "step_over_2fwd": seconds / (2 * forward),
            "step_over_frozen": seconds / floor,
            "step_over_2fwd_wrapped": seconds / (2 * wrapped_forward), "tokens_per_s": tokens / seconds,
            "peak_mem_mb": memory.above_window_mb, "peak_total_mb": memory.above_start_mb,
            "page_faults_per_step": faults, **bound, **facts}


def _minor_faults() -> int:
    """Minor page faults of this process so far: memory the kernel had to map in (for a train
    step, mostly what glibc returned to it at the end of the previous step)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _forward_time(model, ids, iters, device, **kwargs):
    """Median seconds of a forward pass in inference mode, after one untimed warm-up."""
    import torch

    with torch.inference_mode():
        model(input_ids=ids, **kwargs)
        return _timed(lambda: model(input_ids=ids, **kwargs), iters, device)


def _frozen_step_time(model, ids, iters, device, dtype, trainer=False, lean=False):
    """Median seconds of forward and backward on the plain base with every weight frozen (the
    input embeddings take the gradient), with `_mean_loss` (``model(labels=)``, or lorafit's
    trainer loss with `trainer`), under autocast when `dtype` is not fp32: what any LoRA step on
    this base costs before its adapters, the floor of its time. With `lean`, ``model(labels=)``
    computes its loss with `lorafit.functional.causal_lm_loss`, as once lorafit wraps the model."""
    from lorafit.functional import causal_lm_loss

    model.requires_grad_(False)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    if lean:
        model.loss_function = causal_lm_loss

    def run():
        _mean_loss(model, {"inputs_embeds": embeds}, ids, device, dtype, trainer).backward()

    run()
    seconds = _timed(run, iters, device)
    if lean:
        del model._loss_function
    del embeds
    _release_freed_memory()  # so that the train step's memory window does not reuse what this freed
    return seconds


def _lora_products_time(model, rows, iters, device, dtype, r=16):
    """Median seconds of the LoRA products of one training step alone, in `dtype`, through
    lorafit's kernels for them (`mm_t`, `mm_tn`): for every targeted linear layer (in -> out),
    forward ``h = x Aᵀ`` and ``y += h Bᵀ``, backward ``g_h = g B``, ``g_x += g_h A``,
    ``g_A = g_hᵀ x`` and ``g_B = gᵀ h``, with x [rows, in] and rank `r`. Added to the frozen step
    (`_frozen_step_time`) this bounds an adapter library's step from below, where the base runs
    through the same kernels in both (not fp32: there lorafit's own kernels run the base too).
    Random operands, one set per layer shape."""
    import torch

    from lorafit.functional import mm_t, mm_tn

    shapes = [(m.in_features, m.out_features) for name, m in model.model.layers.named_modules()
              if name.rsplit(".", 1)[-1] in TARGETS]

    def randn(*shape):
        return torch.randn(shape, dtype=dtype, device=device) * 0.02

    operands = {(n_in, n_out): (randn(rows, n_in), randn(rows, n_out), randn(r, n_in), randn(n_out, r),
                                randn(rows, n_out), randn(rows, n_in)) for n_in, n_out in set(shapes)}

    def run():
        for shape in shapes:
            x, g, A, B, y, g_x = operands[shape]
            h = mm_t(x, A)
            y.addmm_(h, B.T)
            g_h = mm_t(g, B.T)
            g_x.addmm_(g_h, A)
            mm_tn(g_h, x)
            mm_tn(g, h)

    run()
    seconds = _timed(run, iters, device)
    del operands
    _release_freed_memory()
    return seconds


def _mean_loss(model, inputs, ids, device, dtype, trainer):
    """The mean causal-LM loss on `ids` of `model` fed `inputs` (``input_ids`` or
    ``inputs_embeds``), as each library is used: ``model(labels=)`` (full logits), or lorafit's
    trainer loss with `trainer` (`summed_loss`: hidden states and a chunked cross-entropy); under
    autocast when `dtype` is not fp32."""
    import torch

    from lorafit.train.evaluation import summed_loss
    from lorafit.train.losses import causal_lm_targets

    if not trainer:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(**inputs, labels=ids).loss
    return summed_loss(model, {**inputs, "labels": ids}, "causal_lm", device, dtype)[0] / causal_lm_targets(ids)


def _train_step(side, model, ids, device, dtype, loss_path="trainer"):
    """One optimizer step as each library is used for causal-LM training: PEFT through the model's
    own ``labels=`` loss and torch's AdamW, lorafit through its trainer's loss and optimizer
    (`build_optimizer`: fused AdamW) or, with ``loss_path="labels"``, the same loop as PEFT's
    (`_mean_loss`)."""
    import torch

    from lorafit.train.config import TrainConfig
    from lorafit.train.optim import build_optimizer

    trainer = side == "lorafit" and loss_path == "trainer"
    if trainer:
        opt = build_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.01))
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        _mean_loss(model, {"input_ids": ids}, ids, device, dtype, trainer).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def worker_infer(side, size, workdir):
    """Case 2: forward passes of a batch, no grad: the base, the base with one unmerged adapter,
    with that adapter merged, and a mixed batch where every row has its own adapter (8 adapters
    on 8 rows), each relative to the base in the same process."""
    s, device = SIZES[size], _device()
    model = _model(size, device).eval()
    ids = _token_batch(s, s["infer_batch"], s["infer_seq"], device)
    iters = s["infer_iters"]
    base = _forward_time(model, ids, iters, device)
    wrapped = _wrap(side, model).eval()
    names = ["default"] + [f"a{i}" for i in range(1, 8)]
    for name in names[1:]:
        wrapped.add_adapter(name, _lora_config(side))
    _randomise(wrapped)
    wrapped.set_adapter("default")
    unmerged = _forward_time(wrapped, ids, iters, device)
    rows = [names[i % len(names)] for i in range(s["infer_batch"])]
    mixed = _forward_time(wrapped, ids, iters, device, adapter_names=rows)
    if side == "peft":
        wrapped.merge_adapter(["default"])
    else:
        wrapped.merge(["default"])
    merged = _forward_time(wrapped, ids, iters, device)
    return {"base_s": base, "unmerged_over_base": unmerged / base, "merged_over_base": merged / base,
            "mixed8_over_base": mixed / base, "mixed8_over_unmerged": mixed / unmerged, "mixed8_s": mixed}


def _randomise(wrapped):
    """Non-zero adapters (B starts at zero), the same values on both sides."""
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def worker_merge(side, size, workdir):
    """Case 5: adapter files and merging: saving an adapter to disk,
    loading it onto a fresh copy of the base, and merge_and_unload of a loaded adapter (medians;
    copying the base is not timed)."""
    import copy

    s, device = SIZES[size], _device()
    base = _model(size, device)
    wrapped = _wrap(side, copy.deepcopy(base))
    _randomise(wrapped)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = iter(Path(tmp, f"save{i}") for i in range(s["file_iters"]))
        save = _timed(lambda: _save(side, wrapped, next(dirs)), s["file_iters"], device)
        adapter = Path(tmp, "save0")
        load = statistics.median(_time_on_copy(base, lambda m: _load(side, m, adapter), device)
                                 for _ in range(s["file_iters"]))
        merge = statistics.median(_time_on_copy(_load(side, copy.deepcopy(base), adapter),
                                                lambda m: m.merge_and_unload(), device)
                                  for _ in range(s["file_iters"]))
    return {"save_s": save, "load_s": load, "merge_s": merge}


def _save(side, wrapped, path):
    if side == "peft":
        wrapped.save_pretrained(path)
    else:
        wrapped.save_adapter(path)


def _load(side, base, path):
    if side == "peft":
        import peft

        return peft.PeftModel.from_pretrained(base, path)
    import lorafit

    return lorafit.load(base, path)


def _time_on_copy(model, fn, device):
    """Seconds of ``fn(copy of model)``."""
    import copy

    fresh = copy.deepcopy(model)
    _sync(device)
    t0 = time.perf_counter()
    fn(fresh)
    _sync(device)
    return time.perf_counter() - t0


def worker_qlora(side, size, workdir):
    """Case 4: case 1 on an NF4 base (`_quantize`)."""
    return worker_train(side, size, workdir, quantize="nf4")


def _quantize(model, mode):
    """Quantise `model` in place as `lorafit train` does (`quantize_model`: the blocks' linear
    layers in bitsandbytes 4-bit, embeddings and output head kept in fp32); the frozen base's
    bytes (`base_memory_bytes`), and those of the blocks' linear layers, over their fp32 bytes."""
    from lorafit.quant import base_memory_bytes, quantize_model

    fp32_bytes, fp32_linear = base_memory_bytes(model), _linear_bytes(model)
    quantize_model(model, mode)
    _release_freed_memory()
    return {"base_bytes_ratio": base_memory_bytes(model) / fp32_bytes,
            "linear_bytes_ratio": _linear_bytes(model) / fp32_linear}


def _linear_bytes(model):
    """`base_memory_bytes` of the blocks' linear layers (plain or quantised) of an unwrapped model."""
    from lorafit.quant import base_memory_bytes

    return sum(base_memory_bytes(m) for m in model.model.layers.modules()
               if hasattr(m, "in_features") and not list(m.children()))


def _release_freed_memory():
    """Hand the freed fp32 weights back to the OS (glibc keeps them otherwise), so the NF4
    model's resident memory is its own."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def worker_sft(side, size, workdir):
    """Case 3: end-to-end SFT on the rows and model `sft.prepare` wrote (see bench/sft.py); the
    peak memory covers the whole run."""
    import sft

    memory = PeakMemory(_device())
    with memory:
        facts = sft.run(side, Path(workdir))
    return {**facts, "peak_total_mb": memory.above_start_mb}


def worker_dpo(side, size, workdir):
    """Case 6: one DPO epoch end to end on the pairs and model `dpo.prepare` wrote (see
    bench/dpo.py); the peak memory covers the whole run."""
    import dpo

    memory = PeakMemory(_device())
    with memory:
        facts = dpo.run(side, Path(workdir))
    return {**facts, "peak_total_mb": memory.above_start_mb}


def worker_moe(side, size, workdir):
    """Case moe: a training step (forward, ``model(labels=)`` loss, backward, AdamW) on a
    randomly initialised Mixtral of the size's shape (4 experts, top 2) with LoRA r=16, alpha=32
    on its 3-D expert weights (``target_parameters``: ``experts.gate_up_proj`` and
    ``experts.down_proj``), in each library; both through the same loss call."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    s, device = SIZES[size], _device()
    memory = PeakMemory(device)
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"] // 4,
                           num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                           num_key_value_heads=s["heads"], num_local_experts=4, num_experts_per_tok=2)
    model = MixtralForCausalLM(config).to(device=device, dtype=torch.float32)
    kwargs = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_parameters=MOE_TARGETS)
    if side == "peft":
        import peft

        wrapped = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    else:
        import lorafit

        wrapped = lorafit.wrap(model, lorafit.LoraConfig(**kwargs))
    wrapped.train()
    ids = _token_batch(s, s["batch"], s["seq"], device)
    step = _train_step(side, wrapped, ids, device, torch.float32, loss_path="labels")
    with memory:
        step()  # warm-up (allocator, optimizer state)
        seconds = _timed(step, s["steps"], device)
    return {"step_s": seconds, "tokens_per_s": s["batch"] * s["seq"] / seconds,
            "peak_mem_mb": memory.above_window_mb}


@dataclass(frozen=True)
class Case:
    worker: Callable[[str, str, Optional[str]], dict]
    repeats_key: Optional[str] = None  # a SIZES entry that caps --repeats (for long cases)


CASES = {
    "train": Case(worker_train),
    "train_bf16": Case(functools.partial(worker_train, precision="bf16")),
    "step_labels": Case(functools.partial(worker_train, loss="labels")),
    "step_labels_autocast": Case(functools.partial(worker_train, precision="autocast", loss="labels")),
    "infer": Case(worker_infer),
    "merge": Case(worker_merge),
    "qlora": Case(worker_qlora),
    "sft": Case(worker_sft, repeats_key="sft_repeats"),
    "dpo": Case(worker_dpo, repeats_key="sft_repeats"),
    "moe": Case(worker_moe),
}
SIDES = ("peft", "lorafit")


# ---------------------------------------------------------------------------------------------
# driver side


# Imported once by the fork server, so that a worker starts in a fraction of a second instead of
# importing them again (about 5 s); no library state is created before the fork.
PRELOAD = ["torch", "transformers", "peft", "lorafit", "lorafit.train"]


def run_worker(case, side, size, workdir=None) -> dict:
    """One measurement in a fresh process forked from the fork server (see `PRELOAD`); its
    output goes to a log whose end is shown if it fails."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    receive, send = ctx.Pipe(duplex=False)
    with tempfile.NamedTemporaryFile("w+", prefix="lorafit-bench-", suffix=".log") as log:
        process = ctx.Process(target=_worker, args=(case, side, size, workdir, send, log.name))
        process.start()
        send.close()
        try:
            result = receive.recv()
        except EOFError:  # the worker died before sending
            result = None
        process.join()
        if process.exitcode != 0 or result is None:
            raise RuntimeError(f"worker {case}/{side} failed (exit code {process.exitcode}):\n"
                               f"{Path(log.name).read_text()[-3000:]}")
    return result


def _worker(case, side, size, workdir, send, log_path):
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        send.send(CASES[case].worker(side, size, workdir))


def median_dicts(runs: list[dict]) -> dict:
    """Per key: the median of numbers, the value itself when every run agrees (flags, notes)."""
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = statistics.median(values) if all(map(_is_number, values)) else values[0]
    return out


def _is_number(value) -> bool:
    """A measured figure (a flag is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def measure(case: str, size: str, repeats: int, workdir) -> dict:
    """Medians per side of `repeats` alternating runs of `case`, lorafit / PEFT of each figure in
    each pair of runs (``pairs``: how far a ratio moves between runs), and the highest 1-minute
    load average seen after a run (a sign of other work on the machine)."""
    cap = CASES[case].repeats_key
    repeats = min(repeats, SIZES[size][cap]) if cap else repeats
    runs = {side: [] for side in SIDES}
    load = 0.0
    for i in range(repeats):
        for side in SIDES if i % 2 == 0 else SIDES[::-1]:
            runs[side].append(run_worker(case, side, size, workdir))
            load = max(load, os.getloadavg()[0])
    return {"repeats": repeats, "load_avg_max": load, "pairs": pair_ratios(runs["peft"], runs["lorafit"]),
            **{side: median_dicts(r) for side, r in runs.items()}}


def pair_ratios(peft_runs: list[dict], lorafit_runs: list[dict]) -> dict:
    """Per numeric figure both sides report: lorafit / PEFT of the i-th run of each side, for every i."""
    numeric = [key for key, value in peft_runs[0].items() if key in lorafit_runs[0] and _is_number(value)]
    return {key: [ours[key] / theirs[key] for theirs, ours in zip(peft_runs, lorafit_runs)]
            for key in numeric if all(theirs[key] for theirs in peft_runs)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON; the table goes next to it (.md)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: write the table of the results in --out again (.md, README)")
    args = parser.parse_args(argv)
    if args.render:
        publish(json.loads(args.out.read_text()), args.out, readme=not args.no_readme)
        return 0
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")  # before the fork server starts
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")

    results = {"size": args.size, "repeats": args.repeats, "machine": _machine(), "cases": {}, "skipped": {}}
    with tempfile.TemporaryDirectory(prefix="lorafit-bench-") as tmp:
        for case in cases:
            workdir = None
            if case in ("sft", "dpo"):
                module = importlib.import_module(case)  # bench/sft.py or bench/dpo.py
                s = SIZES[args.size]
                workdir = module.prepare(Path(tmp), s, SIZES[s["sft_model"]])
                if workdir is None:
                    results["skipped"][case] = f"{module.DATA} not found"
                    print(f"{case}: skipped ({results['skipped'][case]})", flush=True)
                    continue
            started = time.perf_counter()
            results["cases"][case] = measure(case, args.size, args.repeats, workdir)
            print(f"{case} ({time.perf_counter() - started:.0f} s): {json.dumps(results['cases'][case])}", flush=True)
    results["rows"] = table_rows(results)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    publish(results, args.out, readme=not args.no_readme)
    return 0


def publish(results: dict, out: Path, readme: bool) -> None:
    """Print the table of `results` and write it next to `out` (.md) and, with `readme`, into the
    README between the markers of `out` (`readme_markers`)."""
    table = render_table(results)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    if readme:
        update_readme(table, *readme_markers(out))


def _machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "cpu_bf16": ", ".join(cpu_bf16_units()) or "none",
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "load_avg_1min": os.getloadavg()[0]}


# ---------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Target:
    """A goal on the lorafit column (``of="lorafit"``) or on lorafit / PEFT (``of="ratio"``)."""

    of: str
    limit: float

    def describe(self) -> str:
        return f"≤ {self.limit:g} x PEFT" if self.of == "ratio" else f"≤ {self.limit:g}"


@dataclass(frozen=True)
class Row:
    label: str
    value: Callable[[dict, str], float]  # (results["cases"], side) -> the figure
    target: Optional[Target] = None


@dataclass(frozen=True)
class _get:
    """A row's figure read as it was measured: ``cases[case][side][metric]``."""

    case: str
    metric: str

    def __call__(self, cases: dict, side: str) -> float:
        return cases[self.case][side][self.metric]


ROWS = [
    Row("train step (s)", _get("train", "step_s"), Target("ratio", 0.85)),
    Row("train tokens/s", _get("train", "tokens_per_s")),
    Row("train peak memory above the model (MB)", _get("train", "peak_mem_mb"), Target("ratio", 0.85)),
    Row("train step / (2 x base forward)", _get("train", "step_over_2fwd"), Target("lorafit", 1.15)),
    Row("train step, bf16 base + fp32 adapters (s)", _get("train_bf16", "step_s"), Target("ratio", 0.85)),
    Row("model(labels=) step, fp32 (s)", _get("step_labels", "step_s"), Target("ratio", 0.9)),
    Row("model(labels=) step, bf16 autocast (s)", _get("step_labels_autocast", "step_s"), Target("ratio", 0.9)),
    Row("train step, bf16 base / the frozen base's forward + backward", _get("train_bf16", "step_over_frozen")),
    Row("model(labels=) step, bf16 autocast / the frozen base's forward + backward",
        _get("step_labels_autocast", "step_over_frozen")),
    Row("train step, bf16 base / its bound (frozen base with the same loss + LoRA products alone)",
        _get("train_bf16", "step_over_bound")),
    Row("model(labels=) step, bf16 autocast / its bound (as above)", _get("step_labels_autocast", "step_over_bound")),
    Row("train step, bf16 base: page faults per step", _get("train_bf16", "page_faults_per_step")),
    Row("train step, bf16 base: peak memory above the model (MB)", _get("train_bf16", "peak_mem_mb")),
    Row("model(labels=) step, bf16 autocast: peak memory above the model (MB)",
        _get("step_labels_autocast", "peak_mem_mb")),
    Row("train step / (2 x no-grad forward of the wrapped model)", _get("train", "step_over_2fwd_wrapped")),
    Row("inference: unmerged single adapter / base", _get("infer", "unmerged_over_base"), Target("lorafit", 1.05)),
    Row("inference: merged adapter / base", _get("infer", "merged_over_base"), Target("lorafit", 1.03)),
    Row("inference: mixed batch, 8 adapters / base", _get("infer", "mixed8_over_base"), Target("lorafit", 1.15)),
    Row("inference: mixed batch, 8 adapters / one adapter", _get("infer", "mixed8_over_unmerged"),
        Target("lorafit", 1.15)),
    Row("inference: mixed batch, 8 adapters (s)", _get("infer", "mixed8_s"), Target("ratio", 0.85)),
    Row("SFT end to end: wall time (s)", _get("sft", "wall_s"), Target("ratio", 0.5)),
    Row("SFT end to end: eval loss", _get("sft", "eval_loss"), Target("ratio", 1.02)),
    Row("SFT end to end: optimizer steps", _get("sft", "steps")),
    Row("SFT end to end: peak memory (MB)", _get("sft", "peak_total_mb")),
    Row("DPO epoch end to end: wall time (s)", _get("dpo", "wall_s"), Target("ratio", 0.5)),
    Row("DPO epoch end to end: peak memory (MB)", _get("dpo", "peak_total_mb"), Target("ratio", 0.7)),
    Row("DPO: held-out reward accuracy", _get("dpo", "reward_accuracy")),
    Row("DPO: held-out reward margin", _get("dpo", "reward_margin")),
    Row("DPO: optimizer steps", _get("dpo", "steps")),
    Row("QLoRA nf4: frozen base bytes / fp32", _get("qlora", "base_bytes_ratio"), Target("lorafit", 0.3)),
    Row("QLoRA nf4: blocks' linear layer bytes / fp32", _get("qlora", "linear_bytes_ratio")),
    Row("QLoRA nf4: train step (s)", _get("qlora", "step_s")),
    Row("QLoRA nf4: train step / fp32 train step",
        lambda c, side: c["qlora"][side]["step_s"] / c["train"][side]["step_s"]),
    Row("QLoRA nf4: peak memory, model + training (MB)", _get("qlora", "peak_total_mb")),
    Row("QLoRA nf4: peak memory / fp32 base",
        lambda c, side: c["qlora"][side]["peak_total_mb"] / c["train"][side]["peak_total_mb"]),
    Row("MoE (Mixtral, LoRA on the expert weights) train step (s)", _get("moe", "step_s")),
    Row("MoE train step: peak memory above the model (MB)", _get("moe", "peak_mem_mb")),
    Row("adapter save (s)", _get("merge", "save_s")),
    Row("adapter load (s)", _get("merge", "load_s")),
    Row("merge_and_unload (s)", _get("merge", "merge_s")),
]


def _figure(row: Row, cases: dict, side: str) -> Optional[float]:
    try:
        return row.value(cases, side)
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def table_rows(results: dict) -> list[dict]:
    """Every row with figures: PEFT, lorafit, their ratio, the target and whether it is met."""
    rows = []
    for row in ROWS:
        peft_v, ours = (_figure(row, results["cases"], side) for side in SIDES)
        if ours is None:
            continue
        ratio = ours / peft_v if peft_v else None
        met = None
        if row.target is not None:
            checked = ratio if row.target.of == "ratio" else ours
            met = checked is not None and checked <= row.target.limit
        rows.append({"label": row.label, "peft": peft_v, "lorafit": ours, "ratio": ratio,
                     "target": row.target.describe() if row.target else None, "met": met})
    return rows


def render_table(results: dict) -> str:
    def num(v):
        if v is None:
            return "n/a"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"

    lines = ["| case | PEFT | lorafit | lorafit / PEFT | target | met |", "|---|---:|---:|---:|---|---|"]
    for r in results["rows"]:
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['label']} | {num(r['peft'])} | {num(r['lorafit'])} | {ratio} | {r['target'] or ''} | {met} |")
    m = results["machine"]
    repeats = ", ".join(f"{case} {c['repeats']}" for case, c in results["cases"].items())
    lines += ["", f"size `{results['size']}`; medians of alternating runs in fresh processes ({repeats}); "
                  f"{m['device']} ({m['cpu_model']}, bf16 matrix units: {m.get('cpu_bf16', 'not recorded')}), "
                  f"{m['cpus']} CPUs, torch {m['torch']}, Python {m['python']}; "
                  f"1-min load average {m['load_avg_1min']:.2f} at the start{_load_peak(results)}.", ""]
    lines += [f"- {note}" for note in _notes(results)]
    return "\n".join(lines)


def _load_peak(results: dict) -> str:
    """The highest load seen after a measurement (recorded since the results format has it)."""
    peaks = [c["load_avg_max"] for c in results["cases"].values() if "load_avg_max" in c]
    if not peaks:
        return ""
    return (f" and at most {max(peaks):.2f} after a measurement (the benchmark alone accounts for up to "
            f"{results['machine']['threads']})")


def _pairs_of(row: Row, cases: dict) -> list[float]:
    """lorafit / PEFT per pair of runs of a row with a ratio target (empty where not recorded)."""
    if row.target is None or row.target.of != "ratio" or not isinstance(row.value, _get):
        return []
    return cases.get(row.value.case, {}).get("pairs", {}).get(row.value.metric, [])


def _notes(results: dict) -> list[str]:
    """What a reader needs to read the table right."""
    cases, notes = results["cases"], []
    if results["machine"]["device"] == "cpu" and any("base" in r["label"] for r in results["rows"]):
        notes.append("\"base\" is the plain PyTorch model, whose fp32 `mm` calls MKL (AVX2 code on non-Intel "
                     "CPUs); on x86 lorafit's layers compute their fp32 products with oneDNN's AVX-512 kernels "
                     "(`lorafit.functional.mm_t`), hence lorafit / base below 1.")
    step_targets = [(row.value.case, row.target.limit) for row in ROWS if isinstance(row.value, _get)
                    and row.value.case in ("train_bf16", "step_labels_autocast") and row.value.metric == "step_s"]
    floors = [(case, cases[case], limit) for case, limit in step_targets
              if "step_over_frozen" in cases.get(case, {}).get("peft", {})]
    if floors:
        notes.append("\"the frozen base's forward + backward\" is `model(labels=)` on the plain base in the same "
                     "precision with every weight frozen (the input embeddings take the gradient): the cost of a "
                     "LoRA step before its adapters. " + "; ".join(
                         f"{case}: PEFT's step is {c['peft']['step_over_frozen']:.2f}x it, so ≤ {limit:g} x PEFT "
                         f"asks for lorafit's at {limit * c['peft']['step_over_frozen']:.2f}x"
                         for case, c, limit in floors) + ".")
    bounds = [(case, cases[case], limit) for case, limit in step_targets
              if "bound_s" in cases.get(case, {}).get("lorafit", {})]
    if bounds:
        notes.append("\"its bound\" adds to that frozen step, taken with the side's own loss (lorafit's trainer "
                     "computes the loss from hidden states in chunks; `model(labels=)` on a model lorafit wraps, "
                     "from the logits in chunks, `causal_lm_loss`), the LoRA products of the step timed alone "
                     "(6 per layer, rank 16, `_lora_products_time`): no adapter code runs below it, since the "
                     "base's products run in the same kernels for both. " + "; ".join(
                         f"{case}: lorafit's bound is {c['lorafit']['bound_s'] / c['peft']['step_s']:.2f} x PEFT's "
                         f"step (target {limit:g})" for case, c, limit in bounds) + ".")
    spread = [f"{row.label.split(' (')[0]} {min(ratios):.2f}-{max(ratios):.2f}"
              for row, ratios in ((row, _pairs_of(row, cases)) for row in ROWS) if len(ratios) > 1]
    if spread:
        notes.append("lorafit / PEFT of each pair of runs (one per side, back to back), lowest-highest: "
                     + "; ".join(spread) + ".")
    if "sft" in cases:
        notes.append("SFT: the PEFT column is TRL's SFTTrainer with PEFT (no packing, no gradient checkpointing); "
                     "lorafit batches by length, 8 examples per step as well; one evaluator computes both eval "
                     "losses on the same tokens (bench/sft.py).")
    if "dpo" in cases:
        notes.append(f"DPO: the PEFT column is TRL's DPOTrainer with PEFT; both take the reference from the "
                     f"disabled adapter, on the fly; reward accuracy and margin on "
                     f"{cases['dpo']['lorafit']['held_out_pairs']:.0f} held-out pairs by one evaluator (bench/dpo.py), "
                     f"too few pairs for a target.")
    if "qlora" in cases:
        q = cases["qlora"]["lorafit"]
        kept = 1 - (1 - q["base_bytes_ratio"]) / (1 - q["linear_bytes_ratio"])  # fp32 share left unquantised
        notes.append(f"QLoRA: embeddings, norms and output head stay fp32 (as `lorafit train` keeps them): "
                     f"{kept:.0%} of this model's fp32 bytes, so its base cannot go below {kept:.2f} of fp32; the "
                     f"quantised linear layers are at {q['linear_bytes_ratio']:.2f}.")
    notes += [f"Case `{case}` skipped: {why}." for case, why in results["skipped"].items()]
    return notes


def readme_markers(out: Path) -> tuple[str, str]:
    """The README comments around the table of results file `out`: ``<!-- bench:start -->`` for
    bench/results.json, ``<!-- bench:STEM:start -->`` for any other (a partial run's own table)."""
    tag = "bench" if out.resolve() == RESULTS.resolve() else f"bench:{out.stem}"
    return f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"


def update_readme(table: str, start: str, end: str) -> None:
    """Replace what the README holds between `start` and `end` with `table` (nothing without them)."""
    if not README.exists():
        return
    text = README.read_text()
    if start not in text:
        return
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    README.write_text(f"{head}{start}\n{table}\n{end}{tail}")


if __name__ == "__main__":
    sys.exit(main())
