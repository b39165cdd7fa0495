"""RunConfig: one schema for YAML, overrides and --help; refusals that name the field."""

import pytest
import yaml

from lorafit.cli import build_parser
from lorafit.errors import ConfigError
from lorafit.train.config import (RunConfig, config_reference, load_run_config, resolved, run_config,
                                  save_run_config)


def test_overrides_are_typed_by_the_schema():
    cfg = run_config({"train": {"lr": 1e-3}}, [
        "train.lr=2e-4", "train.max_steps=7", "train.max_grad_norm=null", "lora.r=16",
        "lora.target_modules=q_proj,v_proj", "model.gradient_checkpointing=true", "data.labels=neg,pos",
        "data.format=classification",
    ])
    assert cfg.train.lr == 2e-4 and cfg.train.max_steps == 7 and cfg.train.max_grad_norm is None
    assert cfg.lora.r == 16 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.gradient_checkpointing is True
    assert cfg.data.labels == ["neg", "pos"] and cfg.task == "classification"


def test_gradient_checkpointing_is_a_flag_or_mlp():
    assert run_config({}, ["model.gradient_checkpointing=mlp"]).model.gradient_checkpointing == "mlp"
    assert run_config({"model": {"gradient_checkpointing": False}}).model.gradient_checkpointing is False
    with pytest.raises(ConfigError, match="model.gradient_checkpointing"):
        run_config({}, ["model.gradient_checkpointing=attention"])


def test_a_plain_string_stays_a_string_in_a_list_or_string_field():
    assert run_config({"lora": {"target_modules": "all-linear"}}).lora.target_modules == "all-linear"
    assert run_config({}, ["lora.target_modules=all-linear"]).lora.target_modules == "all-linear"
    assert run_config({}, ["lora.init_lora_weights=false"]).lora.init_lora_weights is False


@pytest.mark.parametrize("data, overrides, expected", [
    ({"train": {"epoch": 2}}, [], "config.train: unknown key 'epoch' (did you mean 'epochs'?)"),
    ({}, ["lora.lora_alfa=4"], "config.lora: unknown key 'lora_alfa' (did you mean 'lora_alpha'?)"),
    ({"modle": {}}, [], "unknown key 'modle' (did you mean 'model'?)"),
    ({}, ["train.lr=fast"], "config.train.lr: expected a number, got 'fast'"),
    ({}, ["train.scheduler=cosin"], "config.train.scheduler: 'cosin' is not allowed"),
    ({}, ["train.batch_size=0"], "train.batch_size = 0 is invalid"),
    ({}, ["train.warmup_steps=3", "train.warmup_ratio=0.1"], "train.warmup_ratio = 0.1 is invalid"),
    ({}, ["trainlr=3"], "unknown key 'trainlr'"),
    ({}, ["train.lr"], "expected KEY=VALUE"),
    ({"model": {"task": "causal_lm"}, "data": {"format": "classification"}}, [], "needs model.task"),
    ({"train": {"early_stopping_patience": 2, "eval_every": 5, "early_stopping_metric": "accuracy"},
      "data": {"eval_fraction": 0.1}}, [], "'accuracy' is not measured for causal_lm"),
    ({"train": {"early_stopping_patience": 2}, "data": {"eval_fraction": 0.1}}, [], "needs evaluations"),
    ({"train": {"early_stopping_patience": 2, "eval_every": 5}}, [], "needs evaluations"),
])
def test_bad_configs_name_the_field(data, overrides, expected):
    with pytest.raises(ConfigError) as err:
        run_config(data, overrides)
    assert expected in str(err.value)


def test_yaml_round_trip_of_the_resolved_config(tmp_path, instruct_file):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "some/model"},
                                    "data": {"train_file": str(instruct_file), "format": "instruction"},
                                    "output": {"dir": "runs/x"}}))
    cfg = resolved(load_run_config(path, ["train.lr=5e-4"]))
    assert cfg.model.task == "causal_lm" and cfg.output.dir == str((tmp_path.cwd() / "runs/x").resolve())
    save_run_config(cfg, tmp_path / "saved.yaml")
    assert load_run_config(tmp_path / "saved.yaml") == cfg


def test_load_run_config_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_run_config(path)
    path.write_text("train:\n  speed: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: config.train: unknown key 'speed'"):
        load_run_config(path)


def test_help_lists_every_option_and_config_field_with_its_default(capsys):
    parser = build_parser()
    for command in ("train", "eval", "generate"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = capsys.readouterr().out
        if command == "train":
            for key, default, _ in config_reference():
                assert f"{key}={default}" in text
        if command == "generate":
            assert "--temperature TEMPERATURE" in text and "(default: 0.0)" in text
    keys = [key for key, _, _ in config_reference(RunConfig)]
    assert {"model.dtype", "lora.r", "data.train_file", "train.loraplus_lr_ratio", "output.tensorboard"} <= set(keys)


def test_every_config_key_has_a_whole_meaning_and_enums_list_their_values():
    import typing

    from lorafit.train.config import DataConfig, ModelConfig, TrainConfig

    rows = {key: doc for key, _, doc in config_reference()}
    for key, doc in rows.items():
        assert len(doc) > 15 and doc.count("(") == doc.count(")") and doc.endswith((".", ")")), key
    for prefix, cls in (("model.", ModelConfig), ("data.", DataConfig), ("train.", TrainConfig)):
        for name, hint in typing.get_type_hints(cls).items():
            if typing.get_origin(hint) is typing.Literal:
                assert all(f"``{v}``" in rows[prefix + name] for v in typing.get_args(hint)), prefix + name
