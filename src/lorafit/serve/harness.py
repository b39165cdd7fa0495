"""Start a real ``lorafit serve`` process and stop it again: for tests, benchmarks and demos.

The server is asked for port 0 (any free loopback port) and announces the port it got on its
first output line, so two servers never race for a port. Its output goes to a log file that
is quoted when the server fails to come up.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ..errors import LorafitError

_LISTENING = re.compile(r"listening on (http://\S+)")


class ServerProcess:
    """``with ServerProcess(["--base", DIR, ...], log) as server:`` serves at ``server.url``.

    `args` are ``lorafit serve`` arguments; ``--host 127.0.0.1 --port 0`` are added unless given.
    """

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 startup_timeout: float = 120.0):
        defaults = [a for flag, value in (("--host", "127.0.0.1"), ("--port", "0"))
                    if flag not in args for a in (flag, value)]
        self.command = [sys.executable, "-m", "lorafit", "serve", *args, *defaults]
        self.log_path = Path(log_path)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.startup_timeout = startup_timeout
        self.url = ""
        self._process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI client's ``base_url``."""
        return f"{self.url}/v1"

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                             env=self.env)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise LorafitError(f"lorafit serve exited with {self._process.returncode}:\n{self.log()}")
            found = _LISTENING.search(self.log())
            if found:
                self.url = found.group(1)
                try:
                    if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        raise LorafitError(f"lorafit serve did not come up in {self.startup_timeout:.0f}s:\n{self.log()}")

    def log(self) -> str:
        """Everything the server has printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Ask the server to stop (SIGTERM), and kill it if it has not within 10 seconds."""
        if self._process is not None:
            terminate(self._process)


def terminate(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM `process` if it still runs, and SIGKILL it after `grace_s` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def write_demo_adapters(base_dir: Path, out_dir: Path, names: list[str], rank: int = 8) -> dict[str, Path]:
    """Save one random adapter per name under `out_dir` (``out_dir/NAME``) for `base_dir`.

    Both LoRA factors are random (B is zero after a normal init), so each adapter changes the
    base's answers, and each name gets its own seed.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .. import LoraConfig, wrap

    paths = {}
    for seed, name in enumerate(names, start=1):
        model = wrap(AutoModelForCausalLM.from_pretrained(base_dir),
                     LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "down_proj"]))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in model.lora_layers():
                weights = layer.lora["default"]
                weights.B.copy_(torch.randn(weights.B.shape, generator=generator) * 0.5)
        paths[name] = Path(out_dir) / name
        model.save_adapter(paths[name])
    return paths
