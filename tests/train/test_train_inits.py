"""``lorafit train`` with initialisations computed from data: EVA / CorDA / LoRA-GA run on the
first micro-batches of the training data (the config's ``lora:`` keys select them), LoftQ on
the weights alone."""

import pytest
import torch
import transformers

import lorafit
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
