"""Parity with TRL 1.16: on a tiny Llama with the same non-zero adapter and the same pairs, the
step-0 loss, the adapter gradients and the logged figures equal those of TRL's DPOTrainer
(``sigmoid`` and ``ipo``; reference = the base, or a trained adapter frozen) and of
``trl.experimental.orpo.ORPOTrainer``."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

import lorafit
from lorafit.data import DataConfig, load_dataset_splits
from lorafit.train.preference import PreferenceObjective, add_reference_adapter

CPU = torch.device("cpu")
QUESTIONS = ["Write a short poem about the sea.", "Explain why the sky is blue in one sentence.",
             "List three prime numbers.", "Translate 'good morning' into French."]
ANSWERS = ["The quick brown fox jumps over the lazy dog.", "Low-rank adaptation trains two small matrices.",
           "2, 3, 5.", "bonjour."]
TRL_ARGS = dict(per_device_train_batch_size=4, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                dataloader_drop_last=False, remove_unused_columns=False)


def chat_records():
    return [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
             "rejected": [{"role": "assistant", "content": ANSWERS[(i + 1) % 4]}]}
            for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))]


def string_records(tok):
    # The prompt starts with BOS, so TRL's ORPO (which adds BOS when it is missing) and lorafit
    # (which tokenizes as TRL's DPO does, adding none with this tokenizer) see the same tokens.
    return [{"prompt": f"{tok.bos_token}{q}\n", "chosen": a, "rejected": ANSWERS[(i + 2) % 4]}
            for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))]


def peft_config():
    return PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM")


def random_adapter(peft_model, seed):
    """Fill the 'default' adapter's A and B with non-zero values (B = 0 would make π = π_ref)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".default." in name and "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def copy_adapter(peft_model, model, adapter="default"):
    """Copy PEFT's 'default' factors into lorafit's `adapter` (module paths are the same)."""
    peft_params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for path, layer in model.lora_layers():
            prefix = f"base_model.model.{path}"
            layer.lora[adapter].A.copy_(peft_params[f"{prefix}.lora_A.default.weight"])
            layer.lora[adapter].B.copy_(peft_params[f"{prefix}.lora_B.default.weight"])


def trl_step(trainer):
    """TRL's loss and the adapter gradients for one batch of the whole (4-pair) train set."""
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def lorafit_step(model, examples, objective, pad_id):
    model.train()
    batch = objective.collate(examples, pad_id)
    targets = objective.targets(batch)
    loss, sums = objective.loss(model, batch, targets, CPU, torch.float32)
    loss.backward()
    return loss.item(), objective.metrics(sums, targets)


def assert_same_gradients(trl_grads, model):
    checked = 0
    for path, layer in model.lora_layers():
        prefix = f"base_model.model.{path}"
        for factor, key in (("A", "lora_A"), ("B", "lora_B")):
            ours = getattr(layer.lora["default"], factor).grad
            theirs = trl_grads[f"{prefix}.{key}.default.weight"]
            assert ours.abs().max() > 0
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
            checked += 1
    assert checked == 8  # q_proj and v_proj of 2 layers, A and B


def lorafit_examples(tmp_path, tok, records):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in records), encoding="utf-8")
    train, _, _ = load_dataset_splits(DataConfig(train_file=str(path), format="preference", max_length=1024), tok)
    return train.examples


def assert_same_tokens(examples, trl_dataset):
    for ours, theirs in zip(examples, trl_dataset):
        assert ours == {k: theirs[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("from_adapter", [False, True], ids=["reference-base", "reference-init-adapter"])
def test_dpo_matches_trl(tiny_dir, tmp_path, loss_type, from_adapter):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    records = chat_records()
    beta = 0.5
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], **TRL_ARGS)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    if from_adapter:
        # A trained adapter: TRL keeps a frozen copy of it ("ref") as the reference.
        init = get_peft_model(base, peft_config())
        random_adapter(init, seed=1)
        init.save_pretrained(tmp_path / "init")
        trainer = DPOTrainer(model=PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                                             tmp_path / "init", is_trainable=True),
                             args=args, train_dataset=Dataset.from_list(records), processing_class=tok)
        assert "ref" in trainer.model.peft_config
    else:
        trainer = DPOTrainer(model=base, args=args, train_dataset=Dataset.from_list(records), processing_class=tok,
                             peft_config=peft_config())
    random_adapter(trainer.model, seed=2)  # after TRL built its model: the policy differs from the reference
    trl_loss, trl_grads = trl_step(trainer)

    model = lorafit.wrap(AutoModelForCausalLM.from_pretrained(tiny_dir),
                         lorafit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    objective = PreferenceObjective("dpo", beta, loss_type, reference_adapter="ref" if from_adapter else None)
    if from_adapter:
        add_reference_adapter(model, str(tmp_path / "init"))
    copy_adapter(trainer.model, model)
    examples = lorafit_examples(tmp_path, tok, records)
    assert_same_tokens(examples, trainer.train_dataset)
    loss, metrics = lorafit_step(model, examples, objective, tok.pad_token_id)

    assert abs(trl_loss - (0.6931 if loss_type == "sigmoid" else 1 / beta ** 2 / 4)) > 1e-2  # not trivial
    assert loss == pytest.approx(trl_loss, rel=1e-4)
    assert_same_gradients(trl_grads, model)
    logged = trainer._metrics["train"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert metrics[name] == pytest.approx(logged[name][-1], rel=1e-4, abs=1e-5), name


def test_orpo_matches_trl(tiny_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    records = string_records(tok)
    beta = 0.3
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, max_length=1024, **TRL_ARGS)
    trainer = ORPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir), args=args,
                          train_dataset=Dataset.from_list(records), processing_class=tok, peft_config=peft_config())
    random_adapter(trainer.model, seed=3)
    trl_loss, trl_grads = trl_step(trainer)

    model = lorafit.wrap(AutoModelForCausalLM.from_pretrained(tiny_dir),
                         lorafit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    copy_adapter(trainer.model, model)
    examples = lorafit_examples(tmp_path, tok, records)
    for ours, theirs in zip(examples, trainer.train_dataset):
        assert ours["prompt_ids"] + ours["chosen_ids"] == theirs["chosen_input_ids"]
        assert ours["prompt_ids"] + ours["rejected_ids"] == theirs["rejected_input_ids"]
    loss, metrics = lorafit_step(model, examples, PreferenceObjective("orpo", beta), tok.pad_token_id)

    assert loss == pytest.approx(trl_loss, rel=1e-4)
    assert_same_gradients(trl_grads, model)
    logged = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert metrics[name] == pytest.approx(logged[name], rel=1e-4, abs=1e-5), name
