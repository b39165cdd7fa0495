"""``data.format: preference``: plain and conversational pairs, truncation, bad records, the real file."""

import re

import pytest

from lorafit.data import DataConfig, load_dataset_splits
from lorafit.errors import ConfigError, DataError

USER = [{"role": "user", "content": "Write a short poem about the sea."}]
GOOD = {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."}
BAD = {"role": "assistant", "content": "List three prime numbers: 2, 3, 5."}


def load(tok, path, **kw):
    return load_dataset_splits(DataConfig(train_file=path, format="preference", **kw), tok)


def test_plain_strings_are_tokenized_as_trl_does(write, tok):
    """P = tok(prompt), F = tok(prompt + answer + EOS text), answer = F[len(common prefix):]."""
    row = {"prompt": "Explain why the sky is blue.", "chosen": " Light scatters.", "rejected": " It is paint."}
    train, _, report = load(tok, write("p.jsonl", [row]))
    example = train[0]
    prompt = tok(row["prompt"])["input_ids"]
    chosen = tok(row["prompt"] + row["chosen"] + tok.eos_token)["input_ids"]
    rejected = tok(row["prompt"] + row["rejected"] + tok.eos_token)["input_ids"]
    n = len(prompt)
    assert chosen[:n] == prompt and rejected[:n] == prompt
    assert example == {"prompt_ids": prompt, "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]}
    assert example["chosen_ids"][-1] == tok.eos_token_id
    assert train.lengths == [2 * n + len(chosen[n:]) + len(rejected[n:])]
    assert report.train_examples == 1


def test_conversational_pairs_use_the_chat_template(write, tok):
    train, _, _ = load(tok, write("c.jsonl", [{"prompt": USER, "chosen": [GOOD], "rejected": [BAD]}]))
    example = train[0]
    prompt = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(USER + [GOOD], tokenize=False)
    assert tok.decode(example["prompt_ids"]) == prompt
    assert tok.decode(example["prompt_ids"] + example["chosen_ids"]) == full
    assert tok.decode(example["rejected_ids"]) == BAD["content"] + "<|end|>\n"


def test_prompt_template_renders_chat_prompts_and_wraps_plain_ones(write, tok):
    rows = [{"prompt": USER, "chosen": [GOOD], "rejected": [BAD]},
            {"prompt": "Say hi.", "chosen": "hi", "rejected": "no"}]
    train, _, _ = load(tok, write("t.jsonl", rows), prompt_template="Q: {prompt}\nA: ")
    assert tok.decode(train[0]["prompt_ids"]) == f"Q: {USER[0]['content']}\nA: "
    assert tok.decode(train[0]["chosen_ids"]) == GOOD["content"] + tok.eos_token
    assert tok.decode(train[1]["prompt_ids"] + train[1]["rejected_ids"]) == "Q: Say hi.\nA: no" + tok.eos_token


def test_truncation_keeps_the_start_and_a_prompt_filling_max_length_is_a_bad_record(write, tok):
    long = "The quick brown fox jumps over the lazy dog. " * 4
    rows = [{"prompt": "Say", "chosen": long, "rejected": " no"}, {"prompt": long, "chosen": "a", "rejected": "b"}]
    train, _, report = load(tok, write("l.jsonl", rows), max_length=8, on_bad_record="skip")
    example = train[0]
    assert len(example["prompt_ids"]) + len(example["chosen_ids"]) == 8
    full = tok("Say" + long + tok.eos_token)["input_ids"]
    assert example["prompt_ids"] + example["chosen_ids"] == full[:8]
    assert example["rejected_ids"] == tok("Say no" + tok.eos_token)["input_ids"][len(example["prompt_ids"]):]
    assert report.truncated == 1 and report.skip_counts == {"prompt too long": 1}
    assert re.search(r"l\.jsonl:2: the prompt alone has \d\d tokens, so max_length=8 leaves no answer token$",
                     report.skip_reasons[0])


@pytest.mark.parametrize("row, kind, words", [
    ({"prompt": "x", "rejected": "b"}, "missing field", "missing field 'chosen'"),
    ({"prompt": "x", "chosen": "a", "rejected": "  "}, "empty text", "field 'rejected' is empty"),
    ({"prompt": USER + [GOOD], "chosen": [GOOD], "rejected": [BAD]}, "prompt not ending on a user turn",
     "must end on a user message, it ends on assistant"),
    ({"prompt": USER, "chosen": [GOOD], "rejected": [GOOD]}, "chosen equals rejected", "are identical"),
    ({"prompt": USER, "chosen": [GOOD], "rejected": [{"role": "assistant", "content": ""}]}, "empty text",
     "field 'rejected' is empty"),
    ({"prompt": USER, "chosen": GOOD["content"], "rejected": [BAD]}, "wrong type", "one assistant message"),
    ({"prompt": USER, "chosen": [USER[0]], "rejected": [BAD]}, "wrong type", "role 'assistant'"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "wrong type", "string or a list of messages"),
])
def test_bad_records_are_named_by_file_and_line(write, tok, row, kind, words):
    good = {"prompt": "Say", "chosen": " yes", "rejected": " no"}
    path = write("bad.jsonl", [good, row, good])
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: .*{words}"):
        load(tok, path)
    train, _, report = load(tok, path, on_bad_record="skip")
    assert len(train) == 2 and report.skip_counts == {kind: 1}


def test_system_prompt_joins_chat_prompts(write, tok):
    train, _, _ = load(tok, write("s.jsonl", [{"prompt": USER, "chosen": [GOOD], "rejected": [BAD]}]),
                       system_prompt="Be brief.")
    assert tok.decode(train[0]["prompt_ids"]).startswith("<|system|>\nBe brief.<|end|>\n<|user|>")


@pytest.mark.parametrize("kw, field", [({"packing": True}, "packing"), ({"prompt_field": ""}, "prompt_field")])
def test_config_refuses(kw, field):
    with pytest.raises(ConfigError, match=rf"data\.{field} = "):
        DataConfig(format="preference", **kw)


def test_the_real_preference_file_reads_as_it_is(shared_data, tok):
    """All 300 pairs of dpo_en_demo.jsonl parse; with room enough none is dropped or cut."""
    cfg = DataConfig(train_file=str(shared_data / "preference" / "dpo_en_demo.jsonl"), format="preference",
                     max_length=100_000, max_records=300)
    train, _, report = load_dataset_splits(cfg, tok)
    assert (report.records_read, len(train), report.skipped, report.truncated) == (300, 300, 0, 0)
    first = train[0]
    assert tok.decode(first["prompt_ids"]).startswith("<|user|>\nHi! I'd like to create a new language game")
    assert tok.decode(first["chosen_ids"]).endswith("<|end|>\n")
