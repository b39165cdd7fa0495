"""``lorafit train`` with initialisations computed from data: EVA / CorDA / LoRA-GA run on the
first micro-batches of the training data (the config's ``lora:`` keys select them), LoftQ on
the weights alone. A run whose init rewrites the base saves that base once, to RUN_DIR/base, and
its adapters are plain LoRA over it, naming it as their base (issue #15)."""

import json
import warnings

import pytest
import torch
import transformers

import lorafit
from lorafit.adapter_files import AdapterFileWarning
from lorafit.inits import prepare
from lorafit.train.config import run_config
from lorafit.train.evaluation import evaluate_config
from lorafit.train.trainer import INIT_BATCHES, Trainer, format_summary


@pytest.mark.parametrize("lora", [{"init_lora_weights": True},
                                  {"init_lora_weights": "eva", "eva_config": {"rho": 1.5}},
                                  {"init_lora_weights": "lora_ga", "lora_ga_config": {"scale": "unit"}}])
def test_train_initialises_from_the_training_batches(tmp_path, tiny_config, lora):
    """The run starts from what `prepare` gives on its first batches; only LoRA-GA, which rewrites
    the base, writes RUN_DIR/base (a plain init or EVA leaves the base as it is)."""
    cfg = run_config(tiny_config(tmp_path / "run", lora={**lora, "lora_dropout": 0.0}, model={"dtype": "fp32"}))
    trainer = Trainer(cfg, resume=False)
    batches = [trainer.objective.collate([trainer.train_set[i] for i in ids], trainer.train_set.pad_id)
               for ids in trainer._plan(0)[:INIT_BATCHES]]
    base = transformers.AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32)
    torch.manual_seed(cfg.train.seed)
    reference = lorafit.wrap(base, prepare(base, cfg.lora, batches))
    ours = dict(trainer.model.lora_layers())
    assert sorted(ours) == sorted(dict(reference.lora_layers()))
    for path, layer in reference.lora_layers():
        want, got = layer.lora["default"], ours[path].lora["default"]
        torch.testing.assert_close(got.scaling * got.B @ got.A, want.scaling * want.B @ want.A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours[path].base_layer.weight, layer.base_layer.weight, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "run" / "base").is_dir() == (lora["init_lora_weights"] == "lora_ga")


def _start_batches(trainer):
    """The micro-batches the run's initialisation read: the first INIT_BATCHES of epoch 0."""
    return [trainer.objective.collate([trainer.train_set[i] for i in ids], trainer.train_set.pad_id)
            for ids in trainer._plan(0)[:INIT_BATCHES]]


def _adapter_config(adapter):
    return json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))


def test_train_corda_starts_from_prepare_and_ships_over_the_rewritten_base(tmp_path, tiny_config):
    """CorDA through ``lora:`` keys: the run starts from what `prepare` gives on the same batches
    (factors and rewritten base W − s·B A) and saves that base to RUN_DIR/base (with the
    tokenizer); its adapters (final and checkpoint) name RUN_DIR/base as their base and load on it
    with no warning, giving the trained model back (the original base warns and gives another
    model), and `evaluate_config` (``lorafit eval``) uses that base. A resumed run leaves RUN_DIR/base
    as it was and still names it."""
    lora = {"init_lora_weights": "corda", "corda_config": {"corda_method": "kpm"}, "lora_dropout": 0.0}
    run = tmp_path / "run"
    cfg = run_config(tiny_config(run, lora=lora, model={"dtype": "fp32"},
                                 train={"max_steps": 2, "grad_accum": 1, "warmup_steps": 0, "save_every": 2}))
    run.mkdir()
    trainer = Trainer(cfg, resume=False)
    batches = _start_batches(trainer)
    original = transformers.AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32)
    reference = lorafit.wrap(original, prepare(original, cfg.lora, batches))
    ours = dict(trainer.model.lora_layers())
    assert sorted(ours) == sorted(dict(reference.lora_layers()))
    for path, layer in reference.lora_layers():
        want, got = layer.lora["default"], ours[path].lora["default"]
        torch.testing.assert_close(got.B @ got.A, want.B @ want.A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours[path].base_layer.weight, layer.base_layer.weight, rtol=1e-5, atol=1e-6)
        assert (got.B @ got.A).abs().max() > 1e-3  # not a zero-B default init

    summary = trainer.run()
    base = run.resolve() / "base"
    assert summary["rewritten_base"] == {"path": str(base), "init_lora_weights": "corda"}
    assert f"  base: {base} (rewritten by init_lora_weights = 'corda')" in format_summary(summary)
    transformers.AutoTokenizer.from_pretrained(base)  # a complete model directory
    for adapter in (run / "adapter", run / "checkpoints" / "step-2" / "adapter"):
        assert _adapter_config(adapter)["base_model_name_or_path"] == str(base)
        assert _adapter_config(adapter)["init_lora_weights"] is True  # plain LoRA over that base (PEFT's form)
    probe = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        trained = trainer.model.eval()(**probe).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error", AdapterFileWarning)
            shipped = lorafit.load(transformers.AutoModelForCausalLM.from_pretrained(base), run / "adapter")
        torch.testing.assert_close(shipped.eval()(**probe).logits, trained, rtol=1e-5, atol=1e-5)
        with pytest.warns(AdapterFileWarning, match="fingerprint does not match"):
            on_original = lorafit.load(transformers.AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path),
                                       run / "adapter")
        assert (on_original.eval()(**probe).logits - trained).abs().max() > 1e-3
    with warnings.catch_warnings():  # `lorafit eval` takes the base the adapter names, not model.name_or_path
        warnings.simplefilter("error", AdapterFileWarning)
        assert evaluate_config(cfg, run / "adapter")["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-5)

    written = {f.name: f.stat().st_mtime_ns for f in base.iterdir()}
    resumed = Trainer(cfg, resume=True)
    assert resumed.checkpoint is not None and resumed.model.peft_config["default"].base_model_name_or_path == str(base)
    resumed.run()
    assert {f.name: f.stat().st_mtime_ns for f in base.iterdir()} == written
    assert _adapter_config(run / "adapter")["base_model_name_or_path"] == str(base)


def test_train_loftq_initialises_from_the_weights(tmp_path, tiny_config):
    """LoftQ through ``lora:`` keys: A, B and the full-precision Q are those of `prepare` on the
    same model (no data), and Q + s·B A is closer to W than Q alone."""
    lora = {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 2}, "lora_dropout": 0.0}
    cfg = run_config(tiny_config(tmp_path / "run", lora=lora, model={"dtype": "fp32"}))
    trainer = Trainer(cfg, resume=False)
    original = transformers.AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32)
    weights = {name: module.weight.detach().clone() for name, module in original.named_modules()
               if isinstance(module, torch.nn.Linear)}
    reference = lorafit.wrap(original, prepare(original, cfg.lora))
    ours = dict(trainer.model.lora_layers())
    assert sorted(ours) == sorted(dict(reference.lora_layers()))
    for path, layer in reference.lora_layers():
        want, got = layer.lora["default"], ours[path].lora["default"]
        torch.testing.assert_close(got.A, want.A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.B, want.B, rtol=1e-5, atol=1e-6)
        q = ours[path].base_layer.weight
        torch.testing.assert_close(q, layer.base_layer.weight, rtol=0, atol=0)
        w = weights[path]
        assert (q + got.scaling * got.B @ got.A - w).norm() < 0.9 * (q - w).norm()


def test_train_refuses_loftq_on_a_quantised_base(tmp_path, tiny_config):
    data = tiny_config(tmp_path / "run", lora={"init_lora_weights": "loftq"}, model={"quantize": "nf4"})
    with pytest.raises(lorafit.ConfigError, match=r"lora\.init_lora_weights = 'loftq' cannot be combined with "
                                                  r"model\.quantize = 'nf4'"):
        run_config(data)
