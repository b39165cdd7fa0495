"""`lorafit.dtypes`: one table of dtype names, short and torch's, for every command and config."""

import pytest
import torch

from lorafit.dtypes import dtype_choice, torch_dtype
from lorafit.errors import ConfigError
from lorafit.train.config import run_config


def test_both_spellings_name_the_same_dtype():
    assert [torch_dtype(name) for name in ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")] == [
        torch.float32, torch.float32, torch.bfloat16, torch.bfloat16, torch.float16, torch.float16]
    assert [dtype_choice(name) for name in ("auto", "float32", "bfloat16", "fp16")] == ["auto", "fp32", "bf16", "fp16"]


@pytest.mark.parametrize("name", ["half", "float64", 16, None])
def test_other_names_are_refused_with_the_field(name):
    with pytest.raises(ConfigError, match=f"model.dtype: {name!r} is not a dtype; expected one of auto, fp32"):
        dtype_choice(name, "model.dtype")
    with pytest.raises(ConfigError, match="'auto' has no torch dtype"):
        torch_dtype("auto")


def test_a_run_config_takes_both_spellings_and_keeps_the_short_one():
    assert run_config({"model": {"dtype": "bfloat16"}}).model.dtype == "bf16"
    assert run_config({}, ["model.dtype=float16"]).model.dtype == "fp16"
    with pytest.raises(ConfigError, match="model.dtype: 'double' is not a dtype"):
        run_config({}, ["model.dtype=double"])
