"""The real server over HTTP with the official OpenAI client: answers, streaming, adapters, refusals, auth."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

import lorafit

from serve_setup import ADAPTERS, API_KEY, BASE

PROMPTS = ["The quick brown fox", "Write a short poem about the sea."]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def reference(base_dir, adapters_dir, tokenizer):
    """Greedy answers computed in process, one adapter at a time, one unpadded prompt at a time."""
    models = {}

    def answer(model: str, prompt_ids: list[int], max_tokens: int) -> str:
        if model not in models:
            base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
            models[model] = base if model == BASE else lorafit.load(base, adapters_dir / model)
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = models[model].generate(ids, max_new_tokens=max_tokens, do_sample=False,
                                         eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return answer


def post(server, path, body=None, content=None, headers=AUTH):
    return httpx.post(f"{server.base_url}{path}", json=body, content=content, headers=headers, timeout=60)


def test_models_lists_the_base_and_every_adapter_folder(client):
    models = {m.id: m for m in client.models.list().data}
    assert sorted(models) == sorted([BASE, *ADAPTERS])  # "notes" has no adapter_config.json
    assert all(models[a].parent == BASE for a in ADAPTERS)
    assert client.models.retrieve("beta").id == "beta"
    assert client.models.retrieve("base").id == BASE
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("notes")


def test_concurrent_greedy_answers_equal_each_adapter_run_alone(client, tokenizer, reference):
    jobs = [(model, prompt) for model in [BASE, *ADAPTERS] for prompt in PROMPTS]

    def ask(job):
        model, prompt = job
        return client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)

    with ThreadPoolExecutor(len(jobs)) as pool:  # all in flight together: mixed batches
        answers = list(pool.map(ask, jobs))
    texts = {}
    for (model, prompt), answer in zip(jobs, answers):
        ids = tokenizer(prompt)["input_ids"]
        assert answer.choices[0].text == reference(model, ids, 12), (model, prompt)
        assert answer.usage.prompt_tokens == len(ids)
        assert answer.usage.total_tokens == len(ids) + answer.usage.completion_tokens
        texts[model, prompt] = answer.choices[0].text
    assert len({texts[m, PROMPTS[1]] for m in [BASE, *ADAPTERS]}) == 4  # the adapters do change answers


def test_base_alias_and_base_name_are_the_same_model(client):
    a, b = (client.completions.create(model=m, prompt="Hi", max_tokens=6, temperature=0) for m in ("base", BASE))
    assert a.choices[0].text == b.choices[0].text


def test_chat_uses_the_chat_template(client, tokenizer, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Explain LoRA."}]
    answer = client.chat.completions.create(model="beta", messages=messages, max_tokens=10, temperature=0)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert answer.choices[0].message.content == reference("beta", ids, 10)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == len(ids)


def test_streamed_chat_joins_to_the_whole_answer(client):
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    whole = client.chat.completions.create(model="alpha", messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="alpha", messages=messages, max_tokens=16,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_streamed_completion_is_server_sent_events_ending_in_done(server, client):
    whole = client.completions.create(model="gamma", prompt="Hi", max_tokens=8, temperature=0)
    body = {"model": "gamma", "prompt": "Hi", "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole.choices[0].text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_strings_several_prompts_and_n(client):
    full = client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=20, temperature=0)
    text = full.choices[0].text
    stop = text[5:8]
    cut = client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    many = client.completions.create(model="alpha", prompt=PROMPTS, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text  # greedy: both answers to prompt 0 agree
    assert many.usage.completion_tokens == 20


def test_seeded_sampling_repeats(client):
    def sample():
        return client.completions.create(model="beta", prompt="Hi", max_tokens=10, temperature=1.0,
                                         top_p=0.9, seed=3).choices[0].text
    assert sample() == sample()


def test_adapters_load_and_unload_at_run_time(server, client, adapters_dir):
    added = post(server, "/adapters", {"name": "delta", "path": str(adapters_dir / "alpha")})
    assert added.status_code == 200, added.text
    assert "delta" in {m.id for m in client.models.list().data}
    same = [client.completions.create(model=m, prompt="Hi", max_tokens=8, temperature=0).choices[0].text
            for m in ("alpha", "delta")]
    assert same[0] == same[1]
    assert post(server, "/adapters", {"name": "delta", "path": str(adapters_dir / "beta")}).status_code == 409
    gone = httpx.delete(f"{server.base_url}/adapters/delta", headers=AUTH)
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert "delta" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="delta", prompt="Hi", max_tokens=2)
    assert httpx.delete(f"{server.base_url}/adapters/delta", headers=AUTH).status_code == 404


@pytest.mark.parametrize("body,status,param", [
    ({"name": "../evil", "path": "/tmp"}, 400, None),
    ({"name": "a/b", "path": "/tmp"}, 400, None),
    ({"name": "base", "path": "/tmp"}, 400, None),
    ({"name": "nowhere", "path": "/nonexistent/adapter"}, 400, None),
    ({"name": "nameless"}, 400, "path"),
])
def test_bad_adapter_registrations_are_refused(server, body, status, param):
    answer = post(server, "/adapters", body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["param"] == param


def test_adapter_with_broken_files_fails_its_request_only(server, client, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    answer = post(server, "/adapters", {"name": "broken", "path": str(broken)})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "adapter_load_failed"
    assert "broken" not in {m.id for m in client.models.list().data}


COMPLETION = {"model": BASE, "prompt": "Hi", "max_tokens": 4}
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 40  # far over the 256-token limit


@pytest.mark.parametrize("path,body,status,param", [
    ("/completions", {"prompt": "Hi"}, 400, "model"),
    ("/completions", {"model": BASE}, 400, "prompt"),
    ("/completions", {**COMPLETION, "model": "nobody"}, 404, "model"),
    ("/completions", {**COMPLETION, "model": "../alpha"}, 400, None),
    ("/completions", {**COMPLETION, "model": "alpha/../../etc"}, 400, None),
    ("/completions", {**COMPLETION, "max_tokens": -3}, 400, "max_tokens"),
    ("/completions", {**COMPLETION, "max_tokens": "many"}, 400, "max_tokens"),
    ("/completions", {**COMPLETION, "temperature": -0.5}, 400, "temperature"),
    ("/completions", {**COMPLETION, "top_p": 0}, 400, "top_p"),
    ("/completions", {**COMPLETION, "top_p": 1.5}, 400, "top_p"),
    ("/completions", {**COMPLETION, "n": 0}, 400, "n"),
    ("/completions", {**COMPLETION, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/completions", {**COMPLETION, "logprobs": 3}, 400, "logprobs"),
    ("/completions", {**COMPLETION, "prompt": []}, 400, "prompt"),
    ("/completions", {**COMPLETION, "prompt": [10**9]}, 400, "prompt"),
    ("/completions", {**COMPLETION, "prompt": ["Hi"] * 33, "n": 2}, 400, "prompt"),
    ("/completions", {**COMPLETION, "prompt": LONG_PROMPT}, 400, "max_tokens"),
    ("/completions", {**COMPLETION, "max_tokens": 250, "prompt": "Hi there, how are you"}, 400, "max_tokens"),
    ("/chat/completions", {"model": BASE, "messages": []}, 400, "messages"),
    ("/chat/completions", {"model": BASE, "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("/chat/completions", {"model": BASE, "messages": "hello"}, 400, "messages"),
    ("/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": LONG_PROMPT}]},
     400, "max_tokens"),
])
def test_bad_requests_get_openai_shaped_errors(server, path, body, status, param):
    answer = post(server, path, body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b"\xff\xfe"])
def test_malformed_bodies_are_refused(server, content):
    answer = post(server, "/completions", content=content, headers={**AUTH, "Content-Type": "application/json"})
    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_oversized_bodies_are_refused(server):
    answer = post(server, "/completions", {**COMPLETION, "prompt": "x" * (2 << 20)})
    assert answer.status_code == 413


def test_refusals_leave_the_server_serving(server, client):
    for _ in range(3):
        post(server, "/chat/completions", content=b"\x00garbage")
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert client.completions.create(model=BASE, prompt="Hi", max_tokens=3).usage.completion_tokens == 3


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_api_key_is_required(server, headers):
    for answer in (httpx.get(f"{server.base_url}/models", headers=headers),
                   post(server, "/completions", COMPLETION, headers=headers)):
        assert answer.status_code == 401
        assert answer.json()["error"]["type"] == "authentication_error"


def test_the_openai_client_reports_a_wrong_key(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()


def test_server_listens_on_loopback_and_serves_the_page_without_a_key(server):
    assert server.url.startswith("http://127.0.0.1:")
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "<textarea" in page.text
    assert httpx.get(f"{server.url}/static/app.js").status_code == 200
