"""``lorafit serve``: load a base model and an adapter directory, then serve them over HTTP."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .support import add_dtype_option, requires


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a base model and its adapters over an OpenAI-compatible HTTP API",
        description="Serve a base model and every adapter in a directory over an OpenAI-compatible "
                    "HTTP API (completions, chat, streaming), batching requests for different "
                    "adapters into shared forward passes. A comparison page is served at '/'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--base", required=True, help="base model: a Hugging Face model directory or id")
    p.add_argument("--adapters", type=Path, metavar="DIR",
                   help="directory whose subfolders are adapters (PEFT format)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/; $LORAFIT_API_KEY when unset")
    p.add_argument("--name", help="the base model's id in /v1/models; the --base folder name when unset")
    p.add_argument("--max-adapters", type=int, default=8, help="adapters kept in memory at once (LRU)")
    p.add_argument("--max-batch", type=int, default=16, help="most requests decoded together")
    p.add_argument("--max-model-len", type=int, help="context limit in tokens; the model's when unset")
    p.add_argument("--default-max-tokens", type=int, default=256,
                   help="answer length for chat requests that set no max_tokens")
    p.add_argument("--device", help="torch device; cuda if available, else cpu, when unset")
    add_dtype_option(p, "weights' dtype; auto keeps the checkpoint's")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads; 1 avoids stalls on a busy machine; torch's default when unset")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="serve adapters whose saved base-model fingerprint differs from --base (refused otherwise)")
    p.set_defaults(func=run)


@requires("serve")
def run(args: argparse.Namespace) -> int:
    from ..serve.launch import LaunchConfig, serve

    options = {name: value for name, value in vars(args).items() if name not in ("command", "func")}
    serve(LaunchConfig(**{**options, "api_key": args.api_key or os.environ.get("LORAFIT_API_KEY")}))
    return 0
