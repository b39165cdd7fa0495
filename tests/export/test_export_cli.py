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


@pytest.mark.slow
def test_export_merged_and_adapter_only(dirs, tmp_path, capsys):
    base, adapter = dirs
    out = tmp_path / "model.gguf"
    assert cli.main(["export", "--base", str(base), "--adapter", str(adapter), "--format", "gguf",
                     "--out", str(out), "--outtype", "f32"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"model written to {out}\n"
    assert "gguf: blk.1 done (3/5 groups" in captured.err
    assert (tmp_path / "Modelfile").read_text().splitlines()[1] == "FROM ./model.gguf"

    merged = lorafit.load(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    ids = AutoTokenizer.from_pretrained(base).encode(SAMPLE_TEXT)
    with torch.no_grad():
        expected = merged(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(out), logits_all=True, n_ctx=64, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    assert np.abs(np.array(llm.scores[:len(ids)]) - expected).max() < 1e-3 * np.abs(expected).max()

    lora = tmp_path / "adapter.gguf"
    assert cli.main(["export", "--base", str(base), "--adapter", str(adapter), "--out", str(lora),
                     "--adapter-only"]) == 0
    reader = gguf.GGUFReader(lora)
    assert reader.fields["general.type"].contents() == "adapter"
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}
    assert len(reader.tensors) == 2 * 7 * 2  # A and B for seven linear layers in two blocks


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
