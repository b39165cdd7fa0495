"""DataConfig: defaults, building from YAML-like dicts, and validation messages naming the field."""

import pytest

from lorafit.data import DataConfig, load_dataset_splits
from lorafit.errors import ConfigError
from lorafit.schema import from_dict


def test_defaults_are_valid_and_alpaca_field_names():
    cfg = DataConfig()
    assert (cfg.format, cfg.on_bad_record, cfg.packing) == ("text", "error", False)
    assert (cfg.instruction_field, cfg.input_field, cfg.output_field) == ("instruction", "input", "output")


def test_from_dict_converts_cli_strings():
    cfg = from_dict(DataConfig, {"train_file": "a.jsonl", "max_length": "128", "packing": "true",
                                 "labels": "neg,pos", "eval_fraction": "0.1"}, "data")
    assert (cfg.max_length, cfg.packing, cfg.labels, cfg.eval_fraction) == (128, True, ["neg", "pos"], 0.1)


def test_unknown_key_suggests_the_closest_field():
    with pytest.raises(ConfigError, match=r"data: unknown key 'max_len'.*did you mean 'max_length'"):
        from_dict(DataConfig, {"max_len": 5}, "data")


@pytest.mark.parametrize("fields, name", [
    ({"format": "csv"}, "format"),
    ({"max_length": 1}, "max_length"),
    ({"eval_fraction": 1.0}, "eval_fraction"),
    ({"eval_file": "e.jsonl", "eval_fraction": 0.1}, "eval_fraction"),
    ({"eval_split": "test", "eval_fraction": 0.1}, "eval_split"),
    ({"max_records": 0}, "max_records"),
    ({"on_bad_record": "ignore"}, "on_bad_record"),
    ({"format": "classification", "packing": True}, "packing"),
    ({"labels": ["pos", "pos"]}, "labels"),
    ({"labels": ["only"]}, "labels"),
    ({"columns": ["a", "a"]}, "columns"),
    ({"delimiter": "::"}, "delimiter"),
    ({"text_field": ""}, "text_field"),
    ({"format": "instruction", "prompt_template": "Q: {question}\nA: "}, "prompt_template"),
    ({"format": "instruction", "prompt_template": "Q: {prompt"}, "prompt_template"),
    ({"format": "chat", "prompt_template": "{prompt}"}, "prompt_template"),
])
def test_invalid_values_name_the_field(fields, name):
    with pytest.raises(ConfigError, match=rf"^data\.{name} = "):
        DataConfig(**fields)


def test_prompt_template_with_escaped_braces_is_accepted():
    assert DataConfig(format="instruction", prompt_template="{{json}} {prompt}").prompt_template


def test_loading_without_train_file_names_the_field(tok):
    with pytest.raises(ConfigError, match="data.train_file is required"):
        load_dataset_splits(DataConfig(), tok)
