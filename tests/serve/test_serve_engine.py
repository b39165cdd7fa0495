"""The engine in process: batched answers equal solo answers, stops, sampling, cache surgery."""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, MistralConfig, MistralForCausalLM

import lorafit
from lorafit import LoraModel
from lorafit.errors import AdapterFileError
from lorafit.serve import kvcache
from lorafit.serve.adapters import AdapterPool, discover
from lorafit.serve.engine import ContextError, Delta, Engine, Failed, Finished, Request
from lorafit.serve.sampling import ParamError, SamplingParams, TextTracker
from serve_setup import ADAPTERS

PROMPTS = [
    "The quick brown fox",
    "Write a short poem about the sea. Then explain",
    "Hi",
    "List three prime numbers: 2, 3,",
    "Low-rank adaptation trains two small matrices per layer, so",
]


class Answer:
    """Collects one request's events; `wait` blocks until it has finished or failed."""

    def __init__(self):
        self.text = ""
        self.end = None
        self.done = threading.Event()
        self.first = threading.Event()

    def __call__(self, event):
        if isinstance(event, Delta):
            self.text += event.text
            self.first.set()
        else:
            self.end = event
            self.first.set()
            self.done.set()

    def wait(self):
        assert self.done.wait(60), "the engine did not finish the request"
        return self


@pytest.fixture
def engine(base_model, tokenizer):
    engine = Engine(base_model, tokenizer, max_batch=3)
    engine.start()
    yield engine
    engine.stop()
    assert not engine.alive


def ids(tokenizer, text):
    return tokenizer(text)["input_ids"]


def solo(model, tokenizer, text, max_tokens):
    """The reference: Hugging Face's own greedy generate, one prompt, no padding."""
    prompt = torch.tensor([ids(tokenizer, text)])
    out = model.generate(prompt, max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)


def submit(engine, tokenizer, text, **params):
    answer = Answer()
    params.setdefault("temperature", 0.0)
    engine.submit(Request(ids(tokenizer, text), SamplingParams(**params), answer))
    return answer


def test_batched_greedy_equals_solo_with_rows_joining_midway(engine, base_model, tokenizer):
    lengths = [24, 9, 17, 30, 5]
    expected = [solo(base_model, tokenizer, p, n) for p, n in zip(PROMPTS, lengths)]
    first = submit(engine, tokenizer, PROMPTS[0], max_tokens=lengths[0])
    assert first.first.wait(30)  # the others join a batch already decoding (and queue: max_batch 3)
    rest = [submit(engine, tokenizer, p, max_tokens=n) for p, n in zip(PROMPTS[1:], lengths[1:])]
    answers = [a.wait() for a in [first, *rest]]
    for answer, want, n, prompt in zip(answers, expected, lengths, PROMPTS):
        assert answer.text == want
        assert answer.end == Finished("length", len(ids(tokenizer, prompt)), n)


def test_stop_string_cuts_the_answer(engine, base_model, tokenizer):
    full = solo(base_model, tokenizer, PROMPTS[1], 20)
    stop = full[6:9]
    answer = submit(engine, tokenizer, PROMPTS[1], max_tokens=20, stop=(stop,)).wait()
    assert answer.text == full[: full.index(stop)]
    assert answer.end.reason == "stop"
    assert answer.end.completion_tokens < 20


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(engine, tokenizer):
    params = dict(max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    alone = submit(engine, tokenizer, PROMPTS[3], **params).wait().text
    crowd = [submit(engine, tokenizer, p, max_tokens=12, temperature=1.0) for p in PROMPTS[:2]]
    again = submit(engine, tokenizer, PROMPTS[3], **params).wait().text
    [a.wait() for a in crowd]
    assert again == alone


def test_refuses_what_cannot_fit_and_survives_a_failing_listener(engine, tokenizer):
    with pytest.raises(ContextError, match="context is 1024"):
        engine.submit(Request([5] * 1000, SamplingParams(max_tokens=100), Answer()))
    with pytest.raises(ParamError, match="prompt"):
        engine.submit(Request([], SamplingParams(max_tokens=1), Answer()))

    def broken(event):
        raise RuntimeError("client went away")

    engine.submit(Request(ids(tokenizer, "Hi"), SamplingParams(max_tokens=50), broken))
    assert submit(engine, tokenizer, "Hi", max_tokens=3).wait().end.reason == "length"


def test_cancel_ends_a_request_without_more_events(engine, tokenizer):
    answer = Answer()
    request = Request(ids(tokenizer, "Hi"), SamplingParams(max_tokens=500, temperature=0.0), answer)
    engine.submit(request)
    assert answer.first.wait(30)
    request.cancel()
    assert submit(engine, tokenizer, "Hi", max_tokens=2).wait().end.reason == "length"
    assert answer.end is None


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -0.1), ("temperature", 2.5),
                                         ("top_p", 0.0), ("top_p", 1.5)])
def test_sampling_params_refuse_out_of_range_values(field, value):
    with pytest.raises(ParamError) as info:
        SamplingParams(**{"max_tokens": 4, field: value})
    assert info.value.param == field


def test_text_tracker_holds_back_possible_stop_strings(tokenizer):
    tracker = TextTracker(tokenizer, stop=("fox jumps",))
    shown = "".join(tracker.add(t) for t in ids(tokenizer, "The quick brown fox"))
    assert shown == "The quick brown "  # 'fox' may begin the stop string
    rest = "".join(tracker.add(t) for t in ids(tokenizer, " jumps over"))
    assert (rest, tracker.stopped) == ("", True)
    assert tracker.text == "The quick brown "


def test_kvcache_join_and_select_keep_rows_and_trim_padding():
    def cache_of(rows, length):
        cache = DynamicCache()
        keys = torch.arange(rows * length, dtype=torch.float).view(rows, 1, length, 1)
        cache.update(keys, -keys, 0)
        return cache

    a, b = cache_of(1, 4), cache_of(2, 2)
    mask = kvcache.concat(a, torch.ones(1, 4, dtype=torch.long), b, torch.tensor([[1, 1], [0, 1]]))
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    assert a.layers[0].keys[1, 0, :, 0].tolist() == [0, 0, 0, 1]
    mask = kvcache.select_rows(a, mask, [1, 2])
    assert mask.tolist() == [[1, 1], [0, 1]]
    assert a.layers[0].keys[:, 0, :, 0].tolist() == [[0, 1], [2, 3]]
    assert kvcache.mergeable(a)


def test_mixed_adapter_batches_with_fewer_slots_than_adapters(base_dir, adapters_dir, tokenizer):
    """Four models in flight, two adapter slots: rows wait for a slot, and every answer is exact."""
    model = LoraModel(AutoModelForCausalLM.from_pretrained(base_dir).eval())
    pool = AdapterPool(model, discover(adapters_dir), capacity=2)
    engine = Engine(model, tokenizer, pool, max_batch=8)
    engine.start()
    try:
        jobs = [(name, prompt) for prompt in PROMPTS[:2] for name in [None, *ADAPTERS]]
        answers = []
        for name, prompt in jobs:
            answers.append(Answer())
            engine.submit(Request(ids(tokenizer, prompt), SamplingParams(max_tokens=10, temperature=0.0),
                                  answers[-1], name))
        for (name, prompt), answer in zip(jobs, answers):
            if name is None:
                reference = AutoModelForCausalLM.from_pretrained(base_dir).eval()
            else:
                reference = lorafit.load(AutoModelForCausalLM.from_pretrained(base_dir), adapters_dir / name)
            assert answer.wait().text == solo(reference, tokenizer, prompt, 10), (name, prompt)
    finally:
        engine.stop()
    assert len(pool.loaded) == 2 and sorted(model.adapter_names) == sorted(pool.loaded)


def test_a_missing_adapter_fails_only_its_request(base_dir, tokenizer, tmp_path):
    model = LoraModel(AutoModelForCausalLM.from_pretrained(base_dir).eval())
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "adapter_config.json").write_text("{}")
    engine = Engine(model, tokenizer, AdapterPool(model, discover(tmp_path), capacity=2))
    engine.start()
    try:
        bad = Answer()
        engine.submit(Request(ids(tokenizer, "Hi"), SamplingParams(max_tokens=3), bad, "gone"))
        good = submit(engine, tokenizer, "Hi", max_tokens=3)
        assert isinstance(bad.wait().end, Failed)
        assert isinstance(bad.end.error, AdapterFileError)
        assert good.wait().end.reason == "length"
    finally:
        engine.stop()


def test_sliding_window_models_batch_without_joining_midway(tokenizer):
    """A sliding-window cache cannot be re-padded: new rows wait for the batch, answers stay exact."""
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           sliding_window=6, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    model = MistralForCausalLM(config).eval()
    engine = Engine(model, tokenizer, max_batch=4)
    assert not kvcache.mergeable(DynamicCache(config=config))
    engine.start()
    try:
        lengths = [20, 5, 12, 16]
        first = submit(engine, tokenizer, PROMPTS[0], max_tokens=lengths[0])
        assert first.first.wait(30)
        rest = [submit(engine, tokenizer, p, max_tokens=n) for p, n in zip(PROMPTS[1:4], lengths[1:])]
        for answer, prompt, n in zip([first, *rest], PROMPTS, lengths):
            assert answer.wait().text == solo(model, tokenizer, prompt, n)
    finally:
        engine.stop()
