"""`lorafit.generation`: prompts encoded as training encodes them, and decoding that matches Hugging Face's."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafit.data import DEFAULT_PROMPT_TEMPLATE
from lorafit.errors import ConfigError
from lorafit.generation import Sampling, generate, prompt_ids
from lorafit.testing import tiny_causal_lm_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_causal_lm_dir(tmp_path_factory.mktemp("gen") / "model")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_prompt_ids_use_the_chat_template_without_doubled_special_tokens(tiny):
    _, tokenizer = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt_ids(tokenizer, messages) == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_ids_fall_back_to_the_instruction_template(tiny):
    _, tokenizer = tiny
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    expected = plain("Be brief.\n\n" + DEFAULT_PROMPT_TEMPLATE.format(prompt="hello"))["input_ids"]
    assert prompt_ids(plain, messages) == expected
    with pytest.raises(ConfigError, match="needs a tokenizer with a chat template"):
        prompt_ids(plain, messages + [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "again"}])


def test_greedy_generation_is_the_argmax_continuation(tiny):
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "hello"}])
    expected, current = [], torch.tensor([ids])
    with torch.no_grad():
        for _ in range(5):  # hand-written greedy decoding: append argmax of the last position's logits
            token = model(current).logits[0, -1].argmax()
            expected.append(int(token))
            current = torch.cat([current, token.view(1, 1)], dim=1)
    assert generate(model, tokenizer, ids, Sampling(max_new_tokens=5)) == tokenizer.decode(
        expected, skip_special_tokens=True)


def test_sampling_repeats_for_a_seed(tiny):
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "hello"}])
    sampling = Sampling(max_new_tokens=6, temperature=1.5, top_k=50, seed=3)
    assert generate(model, tokenizer, ids, sampling) == generate(model, tokenizer, ids, sampling)


@pytest.mark.parametrize("field, value, expected", [
    ("max_new_tokens", 0, "at least 1"), ("temperature", -0.1, "0 \\(greedy\\) or more"),
    ("top_p", 0.0, "in \\(0, 1\\]"), ("top_k", -1, "0 \\(all tokens\\) or more"),
])
def test_sampling_settings_are_checked(field, value, expected):
    with pytest.raises(ConfigError, match=f"{field} = {value!r}: expected {expected}"):
        Sampling(**{field: value})
