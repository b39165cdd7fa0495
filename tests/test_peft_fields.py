"""PEFT 0.21.2's LoraConfig fields: a real PEFT file with its written defaults loads silently, a
field lorafit does not implement set to a non-default value is refused by name, and the
README's table lists every PEFT field once with the status the code gives it."""

import dataclasses
import json
import re
import warnings
from pathlib import Path

import pytest
import torch

import lorafit
from lorafit.config import FEATURES
from lorafit.errors import AdapterFileError
from lorafit.registry import claimed_fields
from lorafit.testing import tiny_llama

import peft

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
UNCLAIMED = sorted(set(FEATURES) - claimed_fields())


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(path)
    return path


def test_peft_written_defaults_load_without_a_warning(peft_dir):
    written = json.loads((peft_dir / "adapter_config.json").read_text())
    assert {f.name for f in dataclasses.fields(peft.LoraConfig)} - set(written) == {"runtime_config"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorafit.load(tiny_llama(), peft_dir)


@pytest.mark.parametrize("field", UNCLAIMED)
def test_an_unimplemented_field_set_in_a_peft_file_is_refused_by_name(tmp_path, peft_dir, field):
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    config[field] = True if isinstance(getattr(peft.LoraConfig(), field), bool) else {"set": 1}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").write_bytes((peft_dir / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterFileError, match=rf"adapter_config.json.*{field} = "):
        lorafit.load(tiny_llama(), tmp_path)


def test_readme_table_lists_every_peft_field_with_its_status():
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", README.split("<!-- peft_fields:start -->")[1]
                           .split("<!-- peft_fields:end -->")[0], re.M))
    assert set(rows) == {f.name for f in dataclasses.fields(peft.LoraConfig)} and len(rows) == 42
    assert {name for name, status in rows.items() if status.startswith("refused")} == set(UNCLAIMED)
    assert rows["target_parameters"].startswith("supported") and rows["trainable_token_indices"].startswith("supported")
