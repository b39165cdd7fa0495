"""Adapters and base models by Hugging Face Hub id, offline, from a cache laid out by the test
(``models--org--name/snapshots/<sha>/`` + ``refs/main``), as huggingface_hub leaves it."""

import os
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
import torch

import lorafit
from lorafit import AdapterFileError
from lorafit.adapter_files.report import describe_adapter
from adapter_models import logits, perturb_trainable, small_llama

SHA = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache, repo_id, source):
    """Copy the files of directory `source` into `cache` as the main revision of `repo_id`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / SHA)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)


def trained_adapter(directory, seed):
    model = lorafit.wrap(small_llama(), lorafit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    perturb_trainable(model, seed=seed)
    model.save_adapter(directory)
    return logits(model.eval())


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline hub cache holding adapter "org/ad"; returns (cache, the adapter's logits)."""
    cache = tmp_path / "hub"
    expected = trained_adapter(tmp_path / "ad", seed=1)
    put_in_cache(cache, "org/ad", tmp_path / "ad")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return cache, expected


def test_load_and_inspect_by_hub_id(hub):
    cache, expected = hub
    model = lorafit.load(small_llama(), "org/ad")
    assert (logits(model) - expected).abs().max() <= 1e-6
    report = describe_adapter("org/ad")
    assert report["path"].startswith(str(cache)) and SHA in report["path"] and report["ok"]


def test_a_local_directory_of_that_name_wins(hub, tmp_path):
    _, from_hub = hub
    local = trained_adapter(tmp_path / "org" / "ad", seed=2)
    assert (local - from_hub).abs().max() > 1e-3
    assert (logits(lorafit.load(small_llama(), "org/ad")) - local).abs().max() <= 1e-6


def test_an_id_missing_from_the_offline_cache_is_one_error(hub):
    with pytest.raises(AdapterFileError, match="org/nope: no such local directory, and the Hugging Face Hub repo "
                                               "could not be fetched"):
        lorafit.load(small_llama(), "org/nope")


def test_without_huggingface_hub_the_error_names_the_extra(hub, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(AdapterFileError, match=r"needs huggingface_hub: pip install 'lorafit\[train\]'"):
        lorafit.load(small_llama(), "org/ad")


@pytest.mark.slow
def test_merge_command_takes_base_and_adapter_by_hub_id(hub, tmp_path):
    cache, expected = hub
    small_llama().save_pretrained(tmp_path / "base")
    put_in_cache(cache, "org/base", tmp_path / "base")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "lorafit", "merge", "--base", "org/base", "--adapter", "org/ad",
                             "--out", str(tmp_path / "merged")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert (logits(merged) - expected).abs().max() <= 1e-4
