"""`lorafit.schema`: typed conversion of plain data, and KEY=VALUE overrides that read like the YAML file."""

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import pytest
import yaml

from lorafit.errors import ConfigError
from lorafit.schema import apply_overrides, coerce, from_dict


@dataclass
class Inner:
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    names: Union[list[str], str, None] = None
    sizes: dict[str, int] = field(default_factory=dict)
    count: int = 1
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    note: Optional[str] = None


@pytest.mark.parametrize("value, tp, expected", [
    ("2e-4", float, 2e-4), (3, float, 3.0), ("7", int, 7), (4.0, int, 4), ("yes", bool, True), ("0", bool, False),
    ("q,v", list[str], ["q", "v"]), ("all-linear", Union[list[str], str], "all-linear"),
    ("q,v", Union[list[str], str], ["q", "v"]), ("null", Optional[int], None), ("b", Literal["a", "b"], "b"),
    ({"x": "2"}, dict[str, int], {"x": 2}),
])
def test_coerce_converts_losslessly(value, tp, expected):
    result = coerce(value, tp, "f")
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize("value, tp, message", [
    (True, int, "f: expected an integer, got True"), (2.5, int, "f: expected an integer, got 2.5"),
    ("fast", float, "f: expected a number, got 'fast'"), (3, str, "f: expected a string, got 3"),
    ("maybe", bool, "f: expected true or false"), ("c", Literal["a", "b"], "f: 'c' is not allowed"),
    ([1], dict[str, int], "f: expected a mapping"), ({"x": "y"}, dict[str, int], "f.x: expected an integer"),
    (5, Union[list[str], str], "f: 5 fits none of"),
])
def test_coerce_refuses_with_the_field_name(value, tp, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        coerce(value, tp, "f")


def test_overrides_in_flow_syntax_mean_what_the_yaml_file_means():
    text = "names: [q_proj, v_proj]\nsizes: {q_proj: 8, v_proj: 2}\ncount: 3\ninner: {rate: 2e-3, mode: b}\n"
    from_file = from_dict(Outer, yaml.safe_load(text))
    overrides = ["names=[q_proj, v_proj]", "sizes={q_proj: 8, v_proj: 2}", "count=3", "inner={rate: 2e-3, mode: b}"]
    assert from_dict(Outer, apply_overrides({}, overrides)) == from_file
    assert from_file.names == ["q_proj", "v_proj"] and from_file.inner == Inner(0.002, "b")


def test_override_values_outside_flow_syntax_stay_strings_until_typed():
    data = apply_overrides({"inner": {"rate": 1.0}}, ["inner.rate=5e-1", "names=.*\\.(q|v)_proj", "note='[x]'"])
    assert data == {"inner": {"rate": "5e-1"}, "names": ".*\\.(q|v)_proj", "note": "[x]"}
    cfg = from_dict(Outer, data)
    assert cfg.inner.rate == 0.5 and cfg.names == ".*\\.(q|v)_proj" and cfg.note == "[x]"


def test_overrides_do_not_touch_the_callers_data():
    data = {"inner": {"rate": 1.0}}
    apply_overrides(data, ["inner.rate=2", "inner.mode=b"])
    assert data == {"inner": {"rate": 1.0}}


@pytest.mark.parametrize("override, message", [
    ("names=[q_proj, v_proj", "override 'names=[q_proj, v_proj': not valid YAML flow syntax"),
    ("count", "override 'count': expected KEY=VALUE"),
    ("count.x=1", "override 'count.x=1': 'count' is not a section"),
])
def test_bad_overrides_name_the_override(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        apply_overrides({"count": 1}, [override])
