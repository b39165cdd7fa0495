"""``lorafit export``: files written from directories on disk, checked by llama.cpp; progress
lines; the missing-extra message."""

import sys

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorafit
from lorafit import cli
from lorafit.testing import tiny_causal_lm_dir

from gguf_models import SAMPLE_TEXT, trained_adapter


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = tiny_causal_lm_dir(root / "base")
    return base, trained_adapter(AutoModelForCausalLM.from_pretrained(base), root / "adapter")


def llama_logits(path, ids, lora=None) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), lora_path=lora and str(lora), logits_all=True, n_ctx=64,
                          n_threads=2, verbose=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


@pytest.mark.slow
def test_export_merged_base_and_adapter_only_run_in_llama_cpp(dirs, tmp_path, capsys):
    base, adapter = dirs
    merged = lorafit.load(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    ids = AutoTokenizer.from_pretrained(base).encode(SAMPLE_TEXT)
    with torch.no_grad():
        expected = merged(input_ids=torch.tensor([ids])).logits[0].numpy()
    tolerance = 1e-3 * np.abs(expected).max()

    out = tmp_path / "model.gguf"
    assert cli.main(["export", "--base", str(base), "--adapter", str(adapter), "--format", "gguf",
                     "--out", str(out), "--outtype", "f32"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"model written to {out}\n"
    assert "gguf: blk.1 done (3/5 groups" in captured.err
    assert (tmp_path / "Modelfile").read_text().splitlines()[1] == "FROM ./model.gguf"
    assert np.abs(llama_logits(out, ids) - expected).max() < tolerance

    lora, plain = tmp_path / "adapter.gguf", tmp_path / "base.gguf"
    assert cli.main(["export", "--base", str(base), "--adapter", str(adapter), "--out", str(lora),
                     "--adapter-only"]) == 0
    assert cli.main(["export", "--base", str(base), "--out", str(plain), "--outtype", "f32", "--no-modelfile"]) == 0
    assert capsys.readouterr().out == f"adapter written to {lora}\nbase model written to {plain}\n"
    reader = gguf.GGUFReader(lora)
    assert reader.fields["general.type"].contents() == "adapter"
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}
    assert len(reader.tensors) == 2 * 7 * 2  # A and B for seven linear layers in two blocks
    assert np.abs(llama_logits(plain, ids, lora=lora) - expected).max() < tolerance


def test_adapter_only_needs_the_adapter(tmp_path, capsys):
    assert cli.main(["export", "--base", "b", "--out", str(tmp_path / "a.gguf"), "--adapter-only"]) == 1
    assert "an adapter-only export needs the adapter directory (--adapter)" in capsys.readouterr().err


def test_missing_export_extra_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    assert cli.main(["export", "--base", "b", "--adapter", "a", "--out", str(tmp_path / "m.gguf")]) == 1
    assert capsys.readouterr().err == "lorafit export needs: pip install 'lorafit[export]' (missing: gguf)\n"


def test_unsupported_outtype_is_refused_before_writing(dirs, tmp_path, capsys):
    base, adapter = dirs
    out = tmp_path / "model.gguf"
    assert cli.main(["export", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
                     "--outtype", "q4_0"]) == 1
    assert "outtype 'q4_0' is not supported; choose one of f32, f16, bf16, q8_0" in capsys.readouterr().err
    assert not out.exists()
