"""Helpers of the command-line tests: a fresh interpreter, offline, in the repository root."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    """``python -c CODE`` from the repository root; output captured as text."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=REPO,
                          timeout=300, **kwargs)
