"""``lorafit train`` with initialisations computed from data: EVA / CorDA / LoRA-GA run on the
first micro-batches of the training data (the config's ``lora:`` keys select them), LoftQ on
the weights alone."""

import pytest
import torch
import transformers

import lorafit
from lorafit.adapter_files import AdapterFileWarning
from lorafit.inits import prepare
from lorafit.train.config import run_config
from lorafit.train.trainer import INIT_BATCHES, Trainer


@pytest.mark.parametrize("lora", [{"init_lora_weights": "eva", "eva_config": {"rho": 1.5}},
                                  {"init_lora_weights": "lora_ga", "lora_ga_config": {"scale": "unit"}}])
def test_train_initialises_from_the_training_batches(tmp_path, tiny_config, lora):
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


def _start_batches(trainer):
    """The micro-batches the run's initialisation read: the first INIT_BATCHES of epoch 0."""
    return [trainer.objective.collate([trainer.train_set[i] for i in ids], trainer.train_set.pad_id)
            for ids in trainer._plan(0)[:INIT_BATCHES]]


def test_train_corda_starts_from_prepare_and_ships_over_the_rewritten_base(tmp_path, tiny_config):
    """CorDA through ``lora:`` keys: the run starts from what `prepare` gives on the same batches
    (factors and rewritten base W − s·B A), and its saved adapter, loaded on the rewritten base
    saved beside it (``unload`` then ``save_pretrained``, as the README says), gives the trained
    model back, with the warning that it fits that base only (the original base gives another model)."""
    lora = {"init_lora_weights": "corda", "corda_config": {"corda_method": "kpm"}, "lora_dropout": 0.0}
    cfg = run_config(tiny_config(tmp_path / "run", lora=lora, model={"dtype": "fp32"},
                                 train={"max_steps": 2, "grad_accum": 1, "warmup_steps": 0}))
    (tmp_path / "run").mkdir()
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

    trainer.run()
    probe = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        trained = trainer.model.eval()(**probe).logits
    trainer.model.unload().save_pretrained(tmp_path / "rewritten")
    with pytest.warns(AdapterFileWarning, match="only fits that rewritten base"):
        shipped = lorafit.load(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rewritten"),
                               tmp_path / "run" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(shipped.eval()(**probe).logits, trained, rtol=1e-5, atol=1e-5)
        with pytest.warns(AdapterFileWarning):
            on_original = lorafit.load(transformers.AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path),
                                       tmp_path / "run" / "adapter")
        assert (on_original.eval()(**probe).logits - trained).abs().max() > 1e-3


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
