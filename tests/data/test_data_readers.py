"""Readers: every file kind, line numbers, and each malformed-record case under both policies."""

import json

import pytest

from lorafit.data import DataConfig, DataReport, load_dataset_splits, read_records
from lorafit.errors import DataError


def records(name, policy="error", **cfg):
    report = DataReport(on_bad_record=policy)
    return list(read_records(name, DataConfig(**cfg), "train", report)), report


def test_jsonl_keeps_file_and_line_and_skips_blank_lines(write):
    path = write("a.jsonl", '{"text": "one"}\n\n{"text": "two"}\n')
    rows, report = records(path)
    assert [(r.fields["text"], r.line) for r in rows] == [("one", 1), ("two", 3)]
    assert rows[1].where == f"{path}:3"
    assert report.records_read == 2


def test_json_list_reports_the_line_where_each_object_starts(write):
    path = write("a.json", '[\n  {"text": "one"},\n  {\n    "text": "two"\n  }\n]\n')
    rows, _ = records(path)
    assert [(r.fields["text"], r.line) for r in rows] == [("one", 2), ("two", 3)]


def test_json_file_without_a_list_is_read_as_json_lines(write):
    rows, _ = records(write("a.json", '{"text": "x"}\n{"text": "y"}\n'))
    assert [r.fields["text"] for r in rows] == ["x", "y"]


def test_empty_json_list_has_no_records(write):
    assert records(write("a.json", " [ ] "))[0] == []


def test_broken_json_list_is_an_error_even_when_skipping(write):
    path = write("a.json", '[\n {"text": "one"},\n {"text": oops}\n]')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        records(path, policy="skip")


def test_csv_with_header_quotes_and_a_multiline_cell(write):
    path = write("a.csv", 'text,label\n"hello, world",pos\n"two\nlines",neg\n  padded  ,neg\n')
    rows, _ = records(path)
    assert [dict(r.fields) for r in rows] == [
        {"text": "hello, world", "label": "pos"},
        {"text": "two\nlines", "label": "neg"},
        {"text": "padded", "label": "neg"},
    ]
    assert [r.line for r in rows] == [2, 3, 5]


def test_tsv_strips_cells_and_keeps_quotes_literal(write):
    path = write("a.tsv", 'sentence\tlabel\n"quoted start \t1\nplain text \t0\n')
    rows, _ = records(path)
    assert [dict(r.fields) for r in rows] == [{"sentence": '"quoted start', "label": "1"},
                                               {"sentence": "plain text", "label": "0"}]


def test_headerless_file_with_named_columns_and_explicit_delimiter(write):
    rows, _ = records(write("a.csv", "good movie;1\nbad movie;0\n"), columns=["text", "label"], delimiter=";")
    assert [r.fields["label"] for r in rows] == ["1", "0"]
    assert rows[0].line == 1


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    import datasets
    folder = tmp_path / "ds"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a", "b"]}),
        "test": datasets.Dataset.from_dict({"text": ["c"]}),
    }).save_to_disk(str(folder))
    report = DataReport()
    rows = list(read_records(str(folder), DataConfig(), "test", report))
    assert [(r.fields["text"], r.where) for r in rows] == [("c", f"{folder}[test]:1")]
    with pytest.raises(DataError, match="no split 'dev'"):
        list(read_records(str(folder), DataConfig(), "dev", report))


def test_missing_file_and_unknown_source(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        (tmp_path / "a.txt").write_text("x")
        records(str(tmp_path / "a.txt"))
    import datasets  # noqa: F401
    with pytest.raises(DataError, match="neither a local file nor a loadable data set"):
        records(str(tmp_path / "not-a-dataset-dir"))


# Each malformed-record case: the error names file and line; skipping counts it with the reason.
BAD_CASES = {
    "malformed JSON": ("text", ['{"text": "ok"}', '{"text": "broken"']),
    "not an object": ("text", ['{"text": "ok"}', '["a", "list"]']),
    "missing field": ("text", ['{"text": "ok"}', '{"body": "no text field"}']),
    "empty text": ("text", ['{"text": "ok"}', '{"text": "   "}']),
    "wrong type": ("text", ['{"text": "ok"}', '{"text": 42}']),
    "unknown label": ("classification", ['{"text": "ok", "label": "pos"}', '{"text": "hm", "label": "meh"}']),
    "no assistant turn": ("chat", ['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
                                   '{"messages": [{"role": "user", "content": "q"}]}']),
}


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_record_raises_with_file_and_line(kind, write, tok):
    fmt, lines = BAD_CASES[kind]
    path = write("bad.jsonl", "\n".join(lines) + "\n")
    labels = ["neg", "pos"] if fmt == "classification" else None
    with pytest.raises(DataError) as info:
        load_dataset_splits(DataConfig(train_file=path, format=fmt, labels=labels), tok)
    assert str(info.value).startswith(f"{path}:2: ")


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_record_is_skipped_and_counted(kind, write, tok):
    fmt, lines = BAD_CASES[kind]
    path = write("bad.jsonl", "\n".join(lines) + "\n")
    labels = ["neg", "pos"] if fmt == "classification" else None
    train, _, report = load_dataset_splits(
        DataConfig(train_file=path, format=fmt, labels=labels, on_bad_record="skip"), tok)
    assert len(train) == 1
    assert report.skipped == 1 and report.skip_counts == {kind: 1}
    assert report.skip_reasons[0].startswith(f"{path}:2: ")
    assert f"skipped 1 bad records ({kind}: 1)" in report.summary()


def test_wrong_column_count_names_the_row(write, tok):
    path = write("bad.tsv", "text\tlabel\nfine\t1\nno label here\n")
    cfg = dict(train_file=path, format="classification")
    with pytest.raises(DataError, match=rf"{path}:3: expected 2 columns \(text, label\), found 1"):
        load_dataset_splits(DataConfig(**cfg), tok)
    _, _, report = load_dataset_splits(DataConfig(**cfg, on_bad_record="skip"), tok)
    assert report.skip_counts == {"wrong column count": 1}


def test_skip_reasons_keep_only_the_first_few(write, tok):
    path = write("many.jsonl", [{"text": "ok"}] + [{"body": i} for i in range(30)])
    _, _, report = load_dataset_splits(DataConfig(train_file=path, on_bad_record="skip"), tok)
    assert report.skipped == 30 and len(report.skip_reasons) == 10
    assert json.loads(json.dumps(report.to_dict()))["skipped"] == 30
