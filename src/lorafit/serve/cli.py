"""``lorafit serve``: load a base model and an adapter directory, then serve them over HTTP."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from ..errors import ConfigError
from .adapters import AdapterPool, discover
from .app import BASE_ALIAS, ServeSettings, create_app
from .engine import Engine

LOOPBACK = ("127.0.0.1", "::1", "localhost")


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
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads; 1 avoids stalls on a busy machine; torch's default when unset")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def build_engine(args: argparse.Namespace) -> tuple[Engine, ServeSettings]:
    """Load the base model and tokenizer, find the adapters, and build the engine."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..model import LoraModel

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    hf_model = AutoModelForCausalLM.from_pretrained(args.base, dtype=args.dtype).to(device).eval()
    name = args.name or Path(args.base.rstrip("/")).name
    reserved = (BASE_ALIAS, name)
    found = discover(args.adapters, reserved) if args.adapters else {}
    model = LoraModel(hf_model)
    pool = AdapterPool(model, found, args.max_adapters, reserved)
    engine = Engine(model, tokenizer, pool, max_batch=args.max_batch, max_model_len=args.max_model_len)
    settings = ServeSettings(base_name=name, api_key=args.api_key,
                             default_max_tokens=args.default_max_tokens)
    return engine, settings


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one (read it back with ``getsockname``)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def run(args: argparse.Namespace) -> int:
    import uvicorn

    args.api_key = args.api_key or os.environ.get("LORAFIT_API_KEY")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.host not in LOOPBACK and not args.api_key:
        print(f"lorafit serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    sock = bind(args.host, args.port)
    engine, settings = build_engine(args)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"lorafit serve: {settings.base_name} with {len(engine.adapters.names())} adapters, "
          f"listening on http://{shown}:{port}", flush=True)
    config = uvicorn.Config(create_app(engine, settings), log_level=args.log_level,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
