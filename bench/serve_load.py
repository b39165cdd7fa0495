"""Load-test ``lorafit serve`` on this machine and write bench/serve_load.json (numbers for the README).

Builds a tiny local Llama and three random adapters in a temporary directory, starts the real
server on a free loopback port (one torch thread by default: on a shared CPU, more threads stall
each other), and runs 32 concurrent OpenAI clients x 10 requests each, cycling through the three
adapters (every request greedy, 8 new tokens). Nothing is downloaded.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_load.py [--clients 32] [--requests 10] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from lorafit.serve.harness import ServerProcess, write_demo_adapters
from lorafit.serve.loadtest import run_load
from lorafit.testing import tiny_causal_lm_dir

ADAPTERS = ["alpha", "beta", "gamma"]
OUT = Path(__file__).with_name("serve_load.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch CPU threads")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = tiny_causal_lm_dir(root / "tiny")
        write_demo_adapters(base, root / "adapters", ADAPTERS)
        server_args = ["--base", str(base), "--adapters", str(root / "adapters"),
                       "--max-batch", str(args.max_batch), "--threads", str(args.threads),
                       "--log-level", "warning"]
        with ServerProcess(server_args, root / "server.log") as server:
            run_load(server.base_url, ADAPTERS, clients=2, requests_per_client=2, max_tokens=2)  # warm-up
            report = run_load(server.base_url, ADAPTERS, clients=args.clients,
                              requests_per_client=args.requests, max_tokens=args.max_tokens)

    result = {
        "setup": {"model": "tiny random Llama (2 layers, hidden 64)", "adapters": len(ADAPTERS),
                  "max_tokens": args.max_tokens, "max_batch": args.max_batch, "temperature": 0,
                  "server_torch_threads": args.threads,
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                  "torch": torch.__version__},
        "result": report.as_dict(),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"serve load: {report.summary()}\nwrote {args.out}")
    return 0 if report.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
