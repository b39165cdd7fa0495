"""Starting a server (``lorafit serve``): load the base model and tokenizer, find the adapters,
build the engine, bind the socket and run uvicorn until interrupted."""

from __future__ import annotations

import json
import logging
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..adapter_files import inference_dtype, read_adapter_dir, trained_base
from ..dtypes import dtype_choice, torch_dtype
from ..errors import ConfigError
from ..model import LoraModel
from ..quant import quantize_like
from .adapters import AdapterPool, discover
from .app import BASE_ALIAS, ServeSettings, create_app
from .engine import Engine

LOOPBACK = ("127.0.0.1", "::1", "localhost")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchConfig:
    """Everything ``lorafit serve`` is told (see its --help for each field)."""

    base: str
    adapters: Optional[Path] = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    name: Optional[str] = None  # the base's id in /v1/models; the --base folder name when unset
    max_adapters: int = 8
    max_batch: int = 16
    max_model_len: Optional[int] = None
    default_max_tokens: int = 256
    device: Optional[str] = None  # cuda if available, else cpu, when unset
    dtype: str = "auto"  # fp32 / bf16 / fp16 (or torch's names) or auto: the checkpoint's
    threads: Optional[int] = None
    log_level: str = "info"
    allow_base_mismatch: bool = False  # serve adapters saved on another base model (a warning each)

    @property
    def base_name(self) -> str:
        return self.name or Path(self.base.rstrip("/")).name


def build_engine(config: LaunchConfig) -> tuple[Engine, ServeSettings]:
    """Load the base model and tokenizer, find the adapters, and build the engine."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    reserved = (BASE_ALIAS, config.base_name)
    found = discover(config.adapters, reserved) if config.adapters else {}
    dtype, quantization = trained_as(config, found)
    tokenizer = AutoTokenizer.from_pretrained(config.base)
    hf_model = AutoModelForCausalLM.from_pretrained(config.base, dtype="auto" if dtype == "auto" else torch_dtype(dtype))
    hf_model = quantize_like(hf_model, quantization).to(device).eval()
    model = LoraModel(hf_model)
    pool = AdapterPool(model, found, config.max_adapters, reserved, config.allow_base_mismatch)
    if not config.allow_base_mismatch:
        pool.refuse_other_bases()
    engine = Engine(model, tokenizer, pool, max_batch=config.max_batch, max_model_len=config.max_model_len)
    settings = ServeSettings(base_name=config.base_name, api_key=config.api_key,
                             default_max_tokens=config.default_max_tokens)
    return engine, settings


def trained_as(config: LaunchConfig, found: dict[str, Path]) -> tuple[str, Optional[dict]]:
    """The base dtype and quantisation to serve with: ``--dtype`` when given, else what every
    adapter recorded at training (when they agree; the checkpoint's dtype otherwise); the
    adapters' common quantisation record, or None (full precision) when they differ or have none."""
    adapters = [read_adapter_dir(path) for path in found.values()]
    dtype = inference_dtype(dtype_choice(config.dtype, "--dtype"), adapters)
    records = {json.dumps(trained_base(a).quantization, sort_keys=True) for a in adapters}
    if len(records) > 1:
        log.warning("the adapters were trained on differently quantised bases; serving a full-precision base")
    quantization = json.loads(records.pop()) if len(records) == 1 else None
    return dtype, quantization


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one (read it back with ``getsockname``)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def serve(config: LaunchConfig) -> None:
    """Bind, load, announce ``listening on http://HOST:PORT`` on stdout, and serve until stopped.

    The socket is bound before the model loads, so a taken port fails at once; a non-loopback
    host without an API key is served with a warning on stderr."""
    logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if config.host not in LOOPBACK and not config.api_key:
        print(f"lorafit serve: warning: listening on {config.host} without --api-key", file=sys.stderr)
    sock = bind(config.host, config.port)
    engine, settings = build_engine(config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"lorafit serve: {settings.base_name} with {len(engine.adapters.names())} adapters, "
          f"listening on http://{shown}:{port}", flush=True)
    server = uvicorn.Config(create_app(engine, settings), log_level=config.log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(server).run(sockets=[sock])
