import pytest

from lorafit import ConfigError, LoraConfig


def test_defaults_match_peft():
    cfg = LoraConfig()
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias, cfg.init_lora_weights) == (8, 8, 0.0, "none", True)


@pytest.mark.parametrize("field,value,fragment", [
    ("r", 0, "r = 0"),
    ("r", 2.5, "positive integer"),
    ("r", True, "positive integer"),
    ("lora_alpha", -1, "positive number"),
    ("lora_dropout", 1.0, "[0, 1)"),
    ("bias", "some", "'none', 'all', 'lora_only'"),
    ("init_lora_weights", "kaiming", "pissa_niter_K"),
    ("target_modules", [], "non-empty list"),
    ("target_modules", "q_proj(", "not a valid regular expression"),
    ("modules_to_save", "classifier", "list of module names"),
    ("layers_to_transform", [-1], "indices >= 0"),
    ("rank_pattern", {"q_proj": 0}, "positive integer ranks"),
    ("alpha_pattern", {"(": 2}, "not a valid regular expression"),
])
def test_invalid_values_name_field_and_allowed(field, value, fragment):
    with pytest.raises(ConfigError) as err:
        LoraConfig(**{field: value})
    assert field in str(err.value) and fragment in str(err.value)


def test_layers_pattern_needs_layers_to_transform():
    with pytest.raises(ConfigError, match="layers_pattern"):
        LoraConfig(target_modules=["q"], layers_pattern="layers")


def test_layers_to_transform_refuses_regex_targets():
    with pytest.raises(ConfigError, match="layers_to_transform"):
        LoraConfig(target_modules=".*q", layers_to_transform=[0])


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'lora_alpha'"):
        LoraConfig.from_dict({"r": 4, "lora_alhpa": 8})


def test_pattern_lookup_uses_suffix_regex():
    cfg = LoraConfig(r=8, lora_alpha=16, rank_pattern={"q_proj": 4, r"layers\.1\.mlp\..*": 2},
                     alpha_pattern={"v_proj": 3}, target_modules=["q_proj"])
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert cfg.rank_for("model.layers.1.mlp.up_proj") == 2
    assert cfg.rank_for("model.layers.0.self_attn.xq_proj") == 8  # suffix must start at a dot
    assert cfg.scaling_for("model.layers.0.self_attn.v_proj") == 3 / 8
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == 16 / 4


def test_rslora_scaling():
    cfg = LoraConfig(r=16, lora_alpha=8, use_rslora=True)
    assert cfg.scaling_for("x") == pytest.approx(8 / 4)


def test_caller_config_is_not_mutated():
    from lorafit import wrap
    from lorafit.testing import tiny_llama

    cfg = LoraConfig(r=2)
    wrap(tiny_llama(), cfg)
    assert cfg.target_modules is None
