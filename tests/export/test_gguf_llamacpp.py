"""The exported GGUF files, run by llama.cpp itself (llama-cpp-python), against the merged
Hugging Face model: logits on the same ids, greedy generation, the embedded tokenizer, and the
adapter-only file applied by llama.cpp to the base model's GGUF.

Tolerances (max |diff| / max |logit|): f32 weights with an f32 KV cache 1e-3 (llama.cpp's default
f16 cache alone moves logits by ~5e-3), f16 weights 4e-2; q8_0 is reported.
"""

import copy

import llama_cpp
import numpy as np
import pytest
import torch

import lorafit
from lorafit.export import adapter_to_gguf, to_gguf

from gguf_models import SAMPLE_TEXT, sentencepiece_tokenizer, tiny_model, tokenizer_for, trained_adapter

pytestmark = pytest.mark.slow
KINDS = ["llama", "qwen2", "mistral", "llama3"]  # llama3: Llama 3.1 rope scaling, Llama 3 tokenizer
GREEDY_TOKENS = 20


@pytest.fixture(scope="module", params=KINDS)
def exported(request, tmp_path_factory):
    """One architecture: the tokenizer, the merged HF model, the ids of the sample text, and the
    GGUF files (merged in f32/f16/q8_0, the base in f32, the adapter alone)."""
    kind = request.param
    directory = tmp_path_factory.mktemp(kind)
    tokenizer = tokenizer_for(kind, directory)
    base = tiny_model(kind, len(tokenizer) + 3)  # three padding rows: [PAD] tokens in the file
    adapter = trained_adapter(base, directory / "adapter")
    merged = lorafit.load(copy.deepcopy(base), adapter).merge_and_unload()
    files = {outtype: to_gguf(merged, directory / outtype / "model.gguf", tokenizer, outtype=outtype)
             for outtype in ("f32", "f16", "q8_0")}
    files["base"] = to_gguf(base, directory / "base.gguf", tokenizer, outtype="f32", modelfile=False)
    files["adapter"] = adapter_to_gguf(lorafit.load(copy.deepcopy(base), adapter), directory / "adapter.gguf")
    ids = tokenizer.encode(SAMPLE_TEXT)
    return dict(kind=kind, tokenizer=tokenizer, merged=merged, ids=ids, files=files)


def run_llama(path, lora=None, f32_cache=True) -> llama_cpp.Llama:
    cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_cache else {}
    return llama_cpp.Llama(model_path=str(path), lora_path=None if lora is None else str(lora), logits_all=True,
                           n_ctx=128, n_threads=2, n_threads_batch=2, verbose=False, **cache)


def llama_logits(llm: llama_cpp.Llama, ids) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def relative_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("outtype, tolerance", [("f32", 1e-3), ("f16", 4e-2), ("q8_0", None)])
def test_logits_match_the_merged_hf_model(exported, outtype, tolerance, record_property):
    expected = hf_logits(exported["merged"], exported["ids"])
    actual = llama_logits(run_llama(exported["files"][outtype], f32_cache=outtype == "f32"), exported["ids"])
    rel = relative_diff(actual, expected)
    record_property(f"{exported['kind']}_{outtype}_rel_diff", rel)
    print(f"{exported['kind']} {outtype}: max|diff|/max|logit| = {rel:.2e}")
    assert tolerance is None or rel < tolerance
    assert np.isfinite(rel) and rel < 0.2  # q8_0 included: a broken layout gives ~1


def test_adapter_only_gguf_applied_by_llama_cpp_gives_the_merged_logits(exported, record_property):
    expected = hf_logits(exported["merged"], exported["ids"])
    with_lora = llama_logits(run_llama(exported["files"]["base"], lora=exported["files"]["adapter"]), exported["ids"])
    base_only = llama_logits(run_llama(exported["files"]["base"]), exported["ids"])
    rel = relative_diff(with_lora, expected)
    record_property(f"{exported['kind']}_adapter_rel_diff", rel)
    print(f"{exported['kind']} adapter-only on base f32: max|diff|/max|logit| = {rel:.2e}")
    assert rel < 1e-3
    assert relative_diff(base_only, expected) > 20 * rel  # the adapter matters: the base alone is far off


def test_greedy_generation_gives_the_same_tokens(exported):
    ids, merged = exported["ids"], exported["merged"]
    hf = list(ids)
    for _ in range(GREEDY_TOKENS):
        hf.append(int(hf_logits(merged, hf)[-1].argmax()))
    llm = run_llama(exported["files"]["f32"])
    llm.reset()
    llm.eval(ids)
    ours = list(ids)
    for _ in range(GREEDY_TOKENS):
        ours.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([ours[-1]])
    assert ours[len(ids):] == hf[len(ids):]


def test_embedded_tokenizer_encodes_like_hf(exported):
    tokenizer = exported["tokenizer"]
    vocab = llama_cpp.Llama(model_path=str(exported["files"]["f16"]), vocab_only=True, verbose=False)
    assert vocab.tokenize(SAMPLE_TEXT.encode(), add_bos=True) == tokenizer.encode(SAMPLE_TEXT)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": SAMPLE_TEXT}], tokenize=False,
                                         add_generation_prompt=True)
    assert vocab.tokenize(chat.encode(), add_bos=False, special=True) == \
        tokenizer.encode(chat, add_special_tokens=False)
    # llama-cpp-python joins the pieces as they are: SentencePiece's prefix space stays in front
    assert vocab.detokenize(tokenizer.encode(SAMPLE_TEXT, add_special_tokens=False)).decode().lstrip(" ") == \
        SAMPLE_TEXT


def test_llama2_style_tokenizer_json_encodes_like_hf(tmp_path):
    """Llama 2's published tokenizer.json spells the SentencePiece space handling as a normaliser
    (Prepend ▁, Replace ' ' -> ▁) with no pre-tokenizer; the GGUF tokenizer must follow it too."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(sentencepiece_tokenizer(tmp_path / "spm").backend_tokenizer.to_str())
    spec["pre_tokenizer"] = None
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    model = tiny_model("llama", len(tokenizer))
    vocab = llama_cpp.Llama(model_path=str(to_gguf(model, tmp_path / "m.gguf", tokenizer)), vocab_only=True,
                            verbose=False)
    assert vocab.tokenize(SAMPLE_TEXT.encode(), add_bos=True) == tokenizer.encode(SAMPLE_TEXT)
