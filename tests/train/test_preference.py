"""``lorafit train`` with ``train.objective: dpo | orpo``: logged figures, reference policies,
precomputed reference, exact resume, a quantised base, ``lorafit eval``; the loss functions
against hand-written formulas."""

import functools
import itertools
import json
import math
import shutil

import pytest
import torch

from lorafit.errors import ConfigError
from lorafit.testing import DEFAULT_TEXTS, tiny_causal_lm_dir
from lorafit.train import evaluate_config, run_config
from lorafit.train.checkpoints import list_checkpoints
from lorafit.train import preference
from lorafit.train.preference import answer_logps, collate_pairs, dpo_losses, log1mexp, orpo_log_odds
from lorafit.train.trainer import resume, train

LN2 = math.log(2)
DPO_FIGURES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """30 conversational pairs over the tiny tokenizer's texts (each answer pair distinct)."""
    texts = list(dict.fromkeys(DEFAULT_TEXTS))
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": a}],
             "rejected": [{"role": "assistant", "content": b}]}
            for p, (a, b) in zip(itertools.cycle(texts), itertools.permutations(texts, 2))]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def dpo_config(tiny_config, pairs_file):
    def make(out_dir, **sections):
        data = tiny_config(out_dir, data={"train_file": str(pairs_file), "format": "preference", "max_length": 128,
                                          "eval_fraction": 0.2},
                           train={"objective": "dpo", "max_steps": 4, "batch_size": 4, "grad_accum": 1,
                                  "warmup_steps": 0, "lr": 2e-2, "eval_every": 2})
        for section, values in sections.items():
            data[section] = {**data[section], **values}
        return run_config(data)

    return make


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_dpo_losses_follow_the_papers():
    pc, pr, rc, rr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0]), torch.tensor([-3.5, -4.0]), \
        torch.tensor([-3.0, -2.5])
    lc, lr = torch.tensor([3, 5]), torch.tensor([2, 4])
    beta = 0.2
    h = (pc - rc) - (pr - rr)
    torch.testing.assert_close(dpo_losses(pc, pr, rc, rr, beta, "sigmoid", lc, lr), torch.log1p(torch.exp(-beta * h)))
    ipo = ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * beta)) ** 2
    torch.testing.assert_close(dpo_losses(pc, pr, rc, rr, beta, "ipo", lc, lr), ipo)


def test_orpo_log_odds_is_the_odds_ratio_of_mean_probabilities():
    chosen, rejected = torch.tensor([-0.1, -2.0, -30.0]), torch.tensor([-0.5, -0.01, -1e-6])
    odds = lambda lp: math.exp(lp) / (1 - math.exp(lp))  # noqa: E731
    expected = [math.log(odds(c) / odds(r)) for c, r in zip(chosen.tolist(), rejected.tolist())]
    torch.testing.assert_close(orpo_log_odds(chosen, rejected), torch.tensor(expected), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(log1mexp(torch.tensor([-1e-6, -40.0])), torch.tensor([math.log(1e-6), -math.exp(-40)]),
                               rtol=1e-3, atol=1e-20)


def test_answer_logps_from_hidden_states_equal_those_from_full_logits(monkeypatch):
    """The chunked path (no (2B, T, V) logits) against log-softmax of the model's logits."""
    import lorafit
    from lorafit.testing import tiny_llama

    torch.manual_seed(0)
    model = lorafit.wrap(tiny_llama(), lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False))
    examples = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12, 13]},
                {"prompt_ids": [14], "chosen_ids": [15, 16, 17], "rejected_ids": [18]}]
    batch = collate_pairs(examples, pad_id=0)
    results = []
    for head in (preference.output_head, lambda model: None):
        monkeypatch.setattr(preference, "output_head", head)
        model.zero_grad()
        logps, nll = answer_logps(model, batch, torch.device("cpu"), torch.float32, prompt_nll=True)
        (logps.sum() + nll).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((logps.detach(), nll.detach(), grads))
    (logps, nll, grads), (ref_logps, ref_nll, ref_grads) = results
    torch.testing.assert_close(logps, ref_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    # hand check of one row: the chosen answer of pair 0 is scored at positions 2 and 3
    logprobs = torch.log_softmax(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, -1)
    assert logps[0].item() == pytest.approx((logprobs[0, 2, 8] + logprobs[0, 3, 9]).item(), rel=1e-5)
    assert batch["input_ids"].shape == (4, 7) and batch["labels"][3].tolist() == [-100, 18] + [-100] * 5


def test_dpo_run_logs_trls_figures_and_lorafit_eval_repeats_them(tmp_path, dpo_config):
    """A fresh adapter (B = 0) is its own reference: step 1 has loss ln 2 and zero rewards."""
    cfg = dpo_config(tmp_path / "run")
    summary = train(cfg)
    lines = records(tmp_path / "run")
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    assert steps[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert all(steps[0][name] == pytest.approx(0, abs=1e-6) for name in ("rewards/chosen", "rewards/margins"))
    assert all(set(DPO_FIGURES) <= set(r) for r in steps)
    assert all({f"eval_{name}" for name in DPO_FIGURES} <= set(r) for r in evals)
    assert steps[-1]["loss"] < LN2 and steps[-1]["rewards/margins"] > 0  # it learns to prefer the chosen answers
    assert summary["data"]["eval_examples"] == 6

    figures = evaluate_config(cfg, tmp_path / "run" / "adapter")
    assert figures["examples"] == 6
    for name in ("loss", *DPO_FIGURES):
        assert figures[name] == pytest.approx(evals[-1][f"eval_{name}"], rel=1e-5, abs=1e-6), name


def test_init_adapter_is_the_frozen_reference_and_precomputing_it_changes_nothing(tmp_path, dpo_config):
    """Started from a trained adapter, DPO's step 1 compares that adapter with itself (loss ln 2)
    whether its log-probs come on the fly (a frozen copy) or are precomputed once. (No LoRA
    dropout, as TRL's default ``disable_dropout``: the reference forward runs without it.)"""
    dpo_config = functools.partial(dpo_config, lora={"lora_dropout": 0.0})
    first = tmp_path / "first"
    train(dpo_config(first, train={"max_steps": 2, "eval_every": None}))
    runs = {}
    for precompute in (False, True):
        run = tmp_path / f"second-{precompute}"
        train(dpo_config(run, train={"init_adapter": str(first / "adapter"), "precompute_reference": precompute,
                                     "eval_on_start": True}))
        runs[precompute] = records(run)
        assert not (run / "adapter" / "ref").exists()  # the reference copy is not saved
    for lines in runs.values():
        assert lines[1]["step"] == 1 and lines[1]["loss"] == pytest.approx(LN2, abs=1e-6)
        assert lines[1]["logps/chosen"] != pytest.approx(0)
    on_the_fly, precomputed = runs[False], runs[True]
    assert [sorted(r) for r in on_the_fly] == [sorted(r) for r in precomputed]
    for a, b in zip(on_the_fly, precomputed):
        for key in a:
            if key not in ("tokens_per_s", "elapsed_s"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


@pytest.mark.slow
def test_dpo_offline_on_the_300_real_pairs(tmp_path, shared_data):
    """The real pairs as they are, a tiny Llama whose tokenizer was trained on them (so pairs are
    a few hundred tokens): all 300 read, those longer than max_length skipped and counted."""
    pairs = shared_data / "preference" / "dpo_en_demo.jsonl"
    texts = [m["content"] for line in pairs.read_text(encoding="utf-8").splitlines()
             for field in json.loads(line).values() for m in field]
    model = tiny_causal_lm_dir(tmp_path / "model", texts=texts, vocab_size=4096)
    run = tmp_path / "run"
    summary = train(run_config({
        "model": {"name_or_path": str(model)},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "data": {"train_file": str(pairs), "format": "preference", "max_length": 384, "on_bad_record": "skip",
                 "eval_fraction": 0.1},
        "train": {"objective": "dpo", "max_steps": 6, "batch_size": 8, "lr": 5e-3, "eval_every": 6},
        "output": {"dir": str(run), "plot": False},
    }))
    data = summary["data"]
    assert data["train_examples"] + data["eval_examples"] + data["skipped_records"] == 300
    assert data["train_examples"] >= 150 and data["eval_examples"] >= 15
    lines = records(run)
    assert lines[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert 0 <= summary["eval"]["rewards/accuracies"] <= 1 and math.isfinite(summary["eval"]["rewards/margins"])


def test_dpo_resume_is_bit_exact(tmp_path, dpo_config, run_files):
    full = tmp_path / "full"
    train(dpo_config(full, train={"save_every": 1, "keep_last": 10, "log_every": 3, "max_steps": 5,
                                  "dpo_loss": "ipo"}))
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for step, path in list_checkpoints(part):
        if step > 2:
            shutil.rmtree(path)
    shutil.rmtree(part / "adapter")
    (part / "summary.json").unlink()
    resume(part)
    a, b = run_files.adapter(full / "adapter"), run_files.adapter(part / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run_files.metrics(full) == run_files.metrics(part)
    logged = [r for r in run_files.metrics(part) if "loss" in r]
    assert [r["step"] for r in logged] == [3, 5] and all("rewards/margins" in r for r in logged)


def test_orpo_run_logs_its_figures(tmp_path, dpo_config):
    train(dpo_config(tmp_path / "run", train={"objective": "orpo", "max_steps": 2}))
    first = records(tmp_path / "run")[0]
    assert set(DPO_FIGURES) | {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= set(first)
    # loss = NLL - β · mean log σ(log-odds ratio)
    assert first["loss"] == pytest.approx(first["nll_loss"] - 0.1 * first["log_odds_ratio"], rel=1e-5)


def test_dpo_on_a_quantized_base(tmp_path, dpo_config):
    """fp32 compute: under bf16 autocast bitsandbytes takes another kernel for the no-grad
    reference forward than for the policy's, and step 1 is ln 2 only to about 2e-4."""
    summary = train(dpo_config(tmp_path / "run", model={"quantize": "nf4", "dtype": "fp32"}, train={"max_steps": 2}))
    first = records(tmp_path / "run")[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-5) and math.isfinite(summary["train_loss"])


PREFERENCE = {"format": "preference"}


@pytest.mark.parametrize("sections, words", [
    ({"train": {"objective": "dpo"}}, "need the 'preference' format"),
    ({"data": PREFERENCE}, "cannot train data.format = 'preference'"),
    ({"data": PREFERENCE, "train": {"objective": "orpo", "precompute_reference": True}}, "train.precompute_reference"),
    ({"data": PREFERENCE, "train": {"objective": "dpo", "beta": 0}}, "train.beta = 0.0 is invalid"),
    ({"data": PREFERENCE, "train": {"objective": "dpo", "dpo_loss": "hinge"}},
     r"train\.dpo_loss: 'hinge' is not allowed"),
    ({"data": PREFERENCE, "train": {"objective": "dpo", "distributed": "fsdp"}}, "use 'ddp'"),
])
def test_config_checks(tmp_path, tiny_config, sections, words):
    data = tiny_config(tmp_path / "run")
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    with pytest.raises(ConfigError, match=words):
        run_config(data)
