"""lorafit vs PEFT, side by side on one machine: `make bench` (or `python bench/run.py`).

Every measurement runs in a fresh worker process (so peak memory is that case's alone); the two
libraries alternate, each case is repeated and the median is kept. Results go to
bench/results.json, and the README's benchmark table is regenerated from it.

    python bench/run.py [--size tiny|default|large] [--repeats N] [--cases train,infer,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results.json"
README = ROOT / "README.md"
TABLE_START, TABLE_END = "<!-- bench:start -->", "<!-- bench:end -->"

SIZES = {
    # the tiny-but-real Llama: 6 layers, hidden 512, vocab 8000, batch 4 x 256
    "default": dict(layers=6, hidden=512, heads=8, intermediate=1376, vocab=8000, batch=4, seq=256, steps=4,
                    infer_batch=8, infer_seq=128, infer_iters=5),
    "tiny": dict(layers=2, hidden=64, heads=4, intermediate=128, vocab=512, batch=2, seq=32, steps=2,
                 infer_batch=8, infer_seq=16, infer_iters=2),
    "large": dict(layers=12, hidden=1024, heads=16, intermediate=2816, vocab=32000, batch=4, seq=512, steps=4,
                  infer_batch=8, infer_seq=256, infer_iters=5),
}


# ---------------------------------------------------------------------------------------------
# worker side: one measurement in this process, printed as JSON on the last line


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above a baseline, sampled by a thread (and the CUDA peak on GPU)."""

    def __init__(self, device):
        import threading

        self.device, self.base, self.peak = device, _rss_bytes(), _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated()

    @property
    def above_base_mb(self) -> float:
        return (self.peak - self.base) / 2**20


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


def _wrap(side, model, r=16, alpha=32, dropout=0.0, adapter_name="default"):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if side == "peft":
        import peft

        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
        return peft.get_peft_model(model, cfg, adapter_name=adapter_name)
    import lorafit

    return lorafit.wrap(model, lorafit.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                  target_modules=targets), adapter_name=adapter_name)


def _timed(fn, iters, device):
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker_train(side, size):
    """Case 1: a training step on a fixed batch; ratio step / (2 x no-grad base forward)."""
    import torch

    s, device = SIZES[size], _device()
    model = _model(size, device)
    ids = torch.randint(3, s["vocab"], (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        model(input_ids=ids)
        forward = _timed(lambda: model(input_ids=ids), s["steps"], device)
    peft_model = _wrap(side, model)
    peft_model.train()
    step = _train_step(side, peft_model, ids)
    with PeakRSS(device) as mem:
        step()  # warm-up (allocator, optimizer state)
        seconds = _timed(step, s["steps"], device)
    tokens = s["batch"] * s["seq"]
    return {"step_s": seconds, "forward_s": forward, "step_over_2fwd": seconds / (2 * forward),
            "tokens_per_s": tokens / seconds, "peak_mem_mb": mem.above_base_mb}


def _train_step(side, model, ids):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def worker_infer(side, size):
    """Case 2: base vs unmerged single adapter vs merged; mixed batch of 8 adapters."""
    import torch

    s, device = SIZES[size], _device()
    model = _model(size, device).eval()
    ids = torch.randint(3, s["vocab"], (s["infer_batch"], s["infer_seq"]),
                        generator=torch.Generator().manual_seed(0)).to(device)
    iters = s["infer_iters"]
    run = lambda m, **kw: m(input_ids=ids, **kw)  # noqa: E731
    with torch.inference_mode():
        run(model)
        base = _timed(lambda: run(model), iters, device)
        wrapped = _wrap(side, model).eval()
        names = ["default"] + [f"a{i}" for i in range(1, 8)]
        for name in names[1:]:
            _add_adapter(side, wrapped, name)
        _randomise(wrapped)
        _set_adapter(side, wrapped, "default")
        run(wrapped)
        unmerged = _timed(lambda: run(wrapped), iters, device)
        mixed = _timed(lambda: run(wrapped, adapter_names=names[: s["infer_batch"]]), iters, device)
        if side == "peft":
            wrapped.merge_adapter(["default"])
        else:
            wrapped.merge(["default"])
        merged = _timed(lambda: run(wrapped), iters, device)
    return {"base_s": base, "unmerged_over_base": unmerged / base, "merged_over_base": merged / base,
            "mixed8_over_base": mixed / base}


def _add_adapter(side, wrapped, name):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if side == "peft":
        import peft

        wrapped.add_adapter(name, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    else:
        import lorafit

        wrapped.add_adapter(name, lorafit.LoraConfig(r=16, lora_alpha=32, target_modules=targets))


def _set_adapter(side, wrapped, name):
    wrapped.set_adapter(name)


def _randomise(wrapped):
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


WORKERS = {"train": worker_train, "infer": worker_infer}


# ---------------------------------------------------------------------------------------------
# driver side


def run_worker(case, side, size) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, "--side", side, "--size", size]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"worker {case}/{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_dicts(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(WORKERS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.side, args.size)))
        return 0

    results = {"size": args.size, "repeats": args.repeats, "machine": _machine(), "cases": {}}
    for case in args.cases.split(","):
        runs = {"peft": [], "lorafit": []}
        for i in range(args.repeats):
            order = ("peft", "lorafit") if i % 2 == 0 else ("lorafit", "peft")
            for side in order:
                runs[side].append(run_worker(case, side, args.size))
        results["cases"][case] = {side: median_dicts(r) for side, r in runs.items()}
        print(f"{case}: {json.dumps(results['cases'][case])}", flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    table = render_table(results)
    print(table)
    if not args.no_readme:
        update_readme(table)
    return 0


def _machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


ROWS = [
    # (case, metric, label, lower is better)
    ("train", "step_s", "train step (s)", True),
    ("train", "tokens_per_s", "train tokens/s", False),
    ("train", "peak_mem_mb", "train peak memory above model (MB)", True),
    ("train", "step_over_2fwd", "train step / (2 x base forward)", True),
    ("infer", "unmerged_over_base", "unmerged single adapter / base forward", True),
    ("infer", "merged_over_base", "merged adapter / base forward", True),
    ("infer", "mixed8_over_base", "mixed batch, 8 adapters / base forward", True),
]


def render_table(results: dict) -> str:
    lines = ["| case | PEFT | lorafit | lorafit / PEFT |", "|---|---:|---:|---:|"]
    for case, metric, label, _ in ROWS:
        if case not in results["cases"]:
            continue
        peft_v = results["cases"][case]["peft"].get(metric)
        ours = results["cases"][case]["lorafit"].get(metric)
        if peft_v is None or ours is None:
            continue
        lines.append(f"| {label} | {peft_v:.3g} | {ours:.3g} | {ours / peft_v:.2f} |")
    m = results["machine"]
    lines.append("")
    lines.append(f"size `{results['size']}`, median of {results['repeats']} alternating runs; "
                 f"{m['device']}, {m['cpus']} CPUs, torch {m['torch']}, Python {m['python']}.")
    return "\n".join(lines)


def update_readme(table: str) -> None:
    if not README.exists():
        return
    text = README.read_text()
    if TABLE_START not in text:
        return
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    README.write_text(f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}")


if __name__ == "__main__":
    sys.exit(main())
