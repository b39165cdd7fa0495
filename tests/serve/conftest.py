"""Shared fixtures for the server tests: a tiny local base model, three adapters, a running server."""

import openai
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafit.serve.harness import ServerProcess, write_demo_adapters
from lorafit.testing import tiny_causal_lm_dir
from serve_setup import ADAPTERS, API_KEY, BASE


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """A tiny random Llama with a chat-template tokenizer, saved as a model directory."""
    return tiny_causal_lm_dir(tmp_path_factory.mktemp("serve") / BASE)


@pytest.fixture(scope="session")
def adapters_dir(base_dir, tmp_path_factory):
    """A directory with three random adapters for the tiny base, plus a folder that is no adapter."""
    root = tmp_path_factory.mktemp("adapters")
    write_demo_adapters(base_dir, root, ADAPTERS)
    (root / "notes").mkdir()
    return root


@pytest.fixture(scope="session")
def tokenizer(base_dir):
    return AutoTokenizer.from_pretrained(base_dir)


@pytest.fixture(scope="session")
def base_model(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


@pytest.fixture(scope="session")
def server(base_dir, adapters_dir, tmp_path_factory):
    """One real ``lorafit serve`` process for the session, on a free loopback port, with an API key."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--base", str(base_dir), "--adapters", str(adapters_dir), "--api-key", API_KEY,
            "--max-adapters", "4", "--max-batch", "16", "--max-model-len", "256", "--threads", "1",
            "--log-level", "warning"]
    with ServerProcess(args, log) as running:
        yield running


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)
