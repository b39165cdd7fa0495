"""A minimal headless-Chromium driver over the DevTools protocol on a pipe (no extra packages).

Chromium started with ``--remote-debugging-pipe`` reads protocol messages on file descriptor 3
and writes them on 4, each a JSON object ended by a NUL byte.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

from lorafit.serve.harness import terminate

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--remote-debugging-pipe",
]


def find_chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


class Chromium:
    """``with Chromium(binary, profile_dir) as browser: page = browser.open(url)``."""

    def __init__(self, binary: str, profile: Path):
        to_chrome, self._write = os.pipe()
        self._read, from_chrome = os.pipe()
        # bash moves Chromium's pipe ends onto 3 and 4 (from descriptors above 9, so that the two
        # redirections cannot overwrite each other), then becomes Chromium
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome, from_chrome)]
        for fd in (to_chrome, from_chrome):
            os.close(fd)
        self._log = open(Path(profile) / "chromium.log", "wb")
        self._process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{ends[0]} 4>&{ends[1]}', binary, *FLAGS,
             f"--user-data-dir={profile}", "about:blank"],
            pass_fds=ends, stdout=self._log, stderr=subprocess.STDOUT,
        )
        for fd in ends:
            os.close(fd)
        self._buffer = b""
        self._next_id = 0

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        terminate(self._process)
        for fd in (self._read, self._write):
            os.close(fd)
        self._log.close()

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")[-4000:]

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        """Call a protocol method and return its result (events in between are skipped)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        try:
            os.write(self._write, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise RuntimeError(f"Chromium has exited; its log:\n{self.log()}") from None
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium closed its DevTools pipe; its log:\n{self.log()}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def open(self, url: str) -> "Page":
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        return Page(self, session)


class Page:
    """One tab: evaluate JavaScript, type, click."""

    def __init__(self, browser: Chromium, session: str):
        self._browser = browser
        self._session = session

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")[-4000:]

    def send(self, method: str, params: dict | None = None) -> dict:
        return self._browser.send(method, params, self._session)

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression (promises are awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        """Poll `expression` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for: {expression}")

    def type(self, selector: str, text: str) -> None:
        """Focus the element and type `text` into it as keyboard input."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", {"text": text})

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element."""
        box = self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1],
                                                   "button": "left", "clickCount": 1})
