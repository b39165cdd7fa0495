"""The training loop in process: losses, schedule, LoRA+, accumulation, checkpoints, exact resume,
early stopping, precision and gradient checkpointing, classification heads."""

import io
import json
import math
import re
import shutil
import time

import pytest
import torch
import yaml

import lorafit
from lorafit.data import IGNORE_INDEX
from lorafit.errors import ConfigError, TrainingError
from lorafit.testing import tiny_llama
from lorafit.train import objectives as objectives_module
from lorafit.train.checkpoints import list_checkpoints
from lorafit.train.config import TrainConfig, run_config
from lorafit.train.losses import causal_lm_loss, causal_lm_targets, classification_loss
from lorafit.train.modeling import head_modules, read_labels, resolve_dtype
from lorafit.train.optim import build_optimizer, lr_factor, param_groups
from lorafit.train.progress import Progress
from lorafit.train.trainer import resume, train


def test_causal_lm_loss_is_the_models_own_mean_loss_times_the_targets():
    model = tiny_llama()
    ids = torch.randint(3, 500, (2, 9))
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    labels[1, 7:] = IGNORE_INDEX
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    assert causal_lm_targets(labels) == 5 + 6
    torch.testing.assert_close(causal_lm_loss(out.logits, labels) / causal_lm_targets(labels), out.loss)


def test_classification_loss_is_summed_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    expected = math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))
    assert classification_loss(logits, torch.tensor([0, 0])).item() == pytest.approx(expected)


def test_lr_schedule():
    assert [lr_factor(s, 4, 20, "cosine") for s in range(4)] == [0, 0.25, 0.5, 0.75]
    assert lr_factor(4, 4, 20, "cosine") == 1.0
    assert lr_factor(12, 4, 20, "cosine") == pytest.approx(0.5)
    assert lr_factor(12, 4, 20, "linear") == pytest.approx(0.5)
    assert lr_factor(19, 4, 20, "linear") == pytest.approx(1 / 16)
    assert lr_factor(19, 4, 20, "constant") == 1.0
    assert TrainConfig(warmup_ratio=0.1).warmup_for(25) == 3


def test_loraplus_puts_the_b_factors_in_their_own_group():
    model = lorafit.wrap(tiny_llama(), lorafit.LoraConfig(target_modules=["q_proj", "v_proj"]))
    plain = param_groups(model, TrainConfig(lr=1e-3))
    assert len(plain) == 1 and len(plain[0]["params"]) == 8
    groups = param_groups(model, TrainConfig(lr=1e-3, loraplus_lr_ratio=16))
    b_factors = {id(w.B) for _, layer in model.lora_layers() for w in layer.lora.values()}
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    assert {id(p) for p in groups[1]["params"]} == b_factors
    assert all(id(p) not in b_factors for p in groups[0]["params"])
    assert all(name.endswith(".B") for name in groups[1]["names"])


def test_the_optimizer_is_fused_adamw_and_steps_as_the_plain_one():
    """On CPU the trainer's AdamW is torch's fused kernel; three steps of it land where three steps
    of the per-parameter loop do (same update, different kernel: within float rounding)."""
    torch.manual_seed(0)
    model = lorafit.wrap(tiny_llama(), lorafit.LoraConfig(target_modules=["q_proj", "v_proj"]))
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(model, cfg)
    assert all(group["fused"] for group in fused.param_groups)
    params = [p for group in fused.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in params]
    copies = [p.detach().clone().requires_grad_() for p in params]
    plain = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        for p, q in zip(params, copies):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    for p, q, start in zip(params, copies, before):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert not torch.equal(p, start)


def _trained(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, tiny_config):
    """The loss of a window is normalised by all its target tokens, not per micro-batch. (fp32: on
    a CPU with bf16 units model.dtype auto is bf16, whose rounding differs between batch shapes.)"""
    lora, model = {"lora_dropout": 0.0}, {"dtype": "fp32"}
    big = train(run_config(tiny_config(tmp_path / "big", lora=lora, model=model,
                                       train={"batch_size": 4, "grad_accum": 1})))
    small = train(run_config(tiny_config(tmp_path / "small", lora=lora, model=model,
                                         train={"batch_size": 2, "grad_accum": 2})))
    assert big["tokens_seen"] == small["tokens_seen"]
    a, b = _trained(tmp_path / "big"), _trained(tmp_path / "small")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stop", [1, 4, 7])
def test_resume_from_any_checkpoint_is_bit_exact(tmp_path, tiny_config, run_files, stop):
    """9 steps of 4 per epoch (the last window of an epoch is one micro-batch), dropout on."""
    full = tmp_path / "full"
    train(run_config(tiny_config(full, train={"max_steps": 9, "save_every": 1, "keep_last": 20,
                                              "eval_every": 3, "log_every": 2})))
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for step, path in list_checkpoints(part):
        if step > stop:
            shutil.rmtree(path)
    shutil.rmtree(part / "adapter")
    (part / "summary.json").unlink()
    resume(part)
    a, b = _trained(full), _trained(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run_files.metrics(full) == run_files.metrics(part)
    assert json.loads((part / "summary.json").read_text())["steps"] == 9


def test_checkpoints_keep_the_last_k_and_hold_the_data_position(tmp_path, tiny_config):
    run = tmp_path / "run"
    train(run_config(tiny_config(run, train={"max_steps": 6, "save_every": 2, "keep_last": 2})))
    assert [step for step, _ in list_checkpoints(run)] == [4, 6]
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]
    state = json.loads((run / "checkpoints" / "step-6" / "state.json").read_text())
    # 27 train examples, batch 4: 7 micro-batches per epoch, 4 steps of 2; step 6 = epoch 1, batch 4
    assert (state["train"]["step"], state["train"]["epoch"], state["train"]["batch"]) == (6, 1, 4)
    assert (run / "checkpoints" / "step-6" / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((run / "checkpoints" / "step-6").glob("*.pt"))  # nothing to unpickle


def test_a_run_directory_with_files_of_its_own_is_refused(tmp_path, tiny_config):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(lorafit.ConfigError, match=r"is not empty \(it holds notes.txt\): choose another output.dir"):
        train(run_config(tiny_config(run)))


def test_a_failed_start_leaves_nothing_in_the_way_of_the_rerun(tmp_path, tiny_config):
    run = tmp_path / "run"
    for broken, error in (({"data": {"train_file": str(tmp_path / "missing.jsonl")}}, "missing.jsonl"),
                          ({"lora": {"target_modules": ["nope_proj"]}}, "nope_proj")):
        with pytest.raises(lorafit.errors.LorafitError, match=error):
            train(run_config(tiny_config(run, **broken)))
        assert not any(run.iterdir())  # created (a path that cannot be one fails early), never claimed
    assert train(run_config(tiny_config(run, train={"max_steps": 1})))["steps"] == 1


def test_a_run_without_checkpoints_is_replaced_and_one_with_checkpoints_needs_resume(tmp_path, tiny_config):
    run = tmp_path / "run"
    diverging = {"lr": 1e37, "warmup_steps": 0, "max_steps": 3}
    with pytest.raises(TrainingError, match="diverged"):
        train(run_config(tiny_config(run, train=diverging)))
    assert (run / "config.yaml").is_file() and not list_checkpoints(run)
    summary = train(run_config(tiny_config(run, train={"max_steps": 2, "save_every": 1})))
    assert summary["steps"] == 2
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 1e-2  # the new run's config
    (run / "adapter").rename(tmp_path / "moved")  # checkpoints alone still hold the run
    with pytest.raises(lorafit.ConfigError, match=rf"holds a run with checkpoints \(the latest: step 2\): continue "
                                                  rf"it with `lorafit train --resume {run}`"):
        train(run_config(tiny_config(run)))


def test_a_resumed_run_names_the_base_model_as_the_user_gave_it(tmp_path, tiny_config, tiny_dir, monkeypatch):
    monkeypatch.chdir(tiny_dir.parent)
    run = tmp_path / "run"
    train(run_config(tiny_config(run, model={"name_or_path": tiny_dir.name}, train={"max_steps": 2, "save_every": 1})))
    first = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints" / "step-2")
    resume(run)
    again = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert first == again == tiny_dir.name


def test_early_stopping_counts_evaluations_without_improvement_and_keeps_the_best_adapter(tmp_path, tiny_config,
                                                                                          monkeypatch, capsys):
    losses = iter([3.0, 2.0, 2.5, 2.1, 2.2, 1.0, 0.5])
    monkeypatch.setattr(objectives_module, "evaluate", lambda *a, **k: {"loss": next(losses), "perplexity": 1.0})
    run = tmp_path / "run"
    summary = train(run_config(tiny_config(run, train={
        "max_steps": 12, "eval_every": 1, "early_stopping_patience": 3, "save_every": 1, "keep_last": 10})))
    assert summary["status"] == "early_stopped" and summary["steps"] == 5
    assert summary["best"] == {"metric": "loss", "value": 2.0, "step": 2} and summary["adapter_step"] == 2
    assert "best eval loss 2.0 at step 2: the adapter is that step's" in capsys.readouterr().out
    final, at_best, last = (_trained(d) for d in (run, run / "checkpoints" / "step-2", run / "checkpoints" / "step-5"))
    assert all(torch.equal(final[k], at_best[k]) for k in final)
    assert not all(torch.equal(final[k], last[k]) for k in final)
    assert not list((run / "checkpoints").glob("best-step-*"))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_base_trains_fp32_adapters(tmp_path, tiny_config, dtype):
    summary = train(run_config(tiny_config(tmp_path / "run", model={"dtype": dtype}, train={"max_steps": 2})))
    assert summary["dtype"] == dtype and math.isfinite(summary["train_loss"])
    assert all(t.dtype == torch.float32 for t in _trained(tmp_path / "run").values())


@pytest.mark.parametrize("mode", [True, "mlp"])
def test_gradient_checkpointing_gives_the_same_update(tmp_path, tiny_config, mode):
    lora = {"lora_dropout": 0.1, "target_modules": "all-linear"}  # the recomputation replays the dropout masks
    plain = train(run_config(tiny_config(tmp_path / "plain", lora=lora, train={"max_steps": 2})))
    ckpt = train(run_config(tiny_config(tmp_path / "ckpt", lora=lora, model={"gradient_checkpointing": mode},
                                        train={"max_steps": 2})))
    assert ckpt["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)
    a, b = _trained(tmp_path / "plain"), _trained(tmp_path / "ckpt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_classification_trains_the_head_and_saves_the_labels(tmp_path, tiny_config, tiny_dir):
    texts = ["The quick brown fox jumps over the lazy dog.", "Write a short poem about the sea.",
             "List three prime numbers: 2, 3, 5.", "Explain why the sky is blue in one sentence."]
    data = tmp_path / "cls.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{t}\t{'yes' if i % 2 else 'no'}\n" for i, t in enumerate(texts * 5)))
    run = tmp_path / "run"
    summary = train(run_config(tiny_config(run, data={"train_file": str(data), "format": "classification"},
                                           lora={"target_modules": ["q_proj"]}, train={"max_steps": 2})))
    assert set(summary["eval"]) == {"loss", "accuracy"}
    assert read_labels(run / "adapter") == ["no", "yes"]
    assert any(key.startswith("base_model.model.score.") for key in _trained(run))


def test_task_heads_are_found_by_model():
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=100))
    llama = LlamaForSequenceClassification(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=64, vocab_size=100))
    assert head_modules(bert) == ["classifier"]
    assert head_modules(llama) == ["score"]
    assert head_modules(tiny_llama()) == ["lm_head"]


def test_auto_dtype_follows_the_cpu_s_bf16_units():
    from lorafit.hardware import cpu_bf16_units

    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if cpu_bf16_units() else torch.float32)
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_a_diverging_run_raises_and_keeps_its_checkpoint(tmp_path, tiny_config):
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"diverged at step \d+.*the last good checkpoint is .*step-\d+"):
        train(run_config(tiny_config(run, train={"lr": 1e37, "warmup_steps": 0, "save_every": 1,
                                                 "max_steps": 6})))
    assert list_checkpoints(run) and not (run / "adapter").exists()


def test_a_quantized_base_trains_and_its_description_is_saved(tmp_path, tiny_config):
    import bitsandbytes  # noqa: F401  (a dev dependency: a missing anchor fails)
    from lorafit.adapter_files import read_adapter_dir

    run = tmp_path / "run"
    summary = train(run_config(tiny_config(run, model={"quantize": "nf4"}, train={"max_steps": 2})))
    assert math.isfinite(summary["train_loss"])
    assert read_adapter_dir(run / "adapter").user_metadata["quantization"]["mode"] == "nf4"


def test_tensorboard_is_optional(tmp_path, tiny_config, capsys):
    try:
        import torch.utils.tensorboard  # noqa: F401
        available = True
    except ImportError:
        available = False
    train(run_config(tiny_config(tmp_path / "run", output={"tensorboard": True}, train={"max_steps": 1})))
    if available:
        assert list((tmp_path / "run" / "tensorboard").glob("events.*"))
    else:
        assert "the tensorboard package is not installed" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_and_log_lines_elsewhere():
    terminal = _Terminal()
    bar = Progress(10, stream=terminal, log_every=2)
    bar.update(3, 1.25, 2e-4, 1000.0)
    bar.close()
    assert "3/10" in terminal.getvalue() and "loss 1.2500" in terminal.getvalue()
    assert "step 3/10" not in terminal.getvalue()

    plain = io.StringIO()
    lines = Progress(5, stream=plain, log_every=2)
    for step in range(1, 6):
        lines.update(step, 1.0 / step, 2e-4, 1000.0)
    lines.close()
    out = plain.getvalue().splitlines()
    assert [line.split(" (")[0] for line in out] == ["step 2/5", "step 4/5", "step 5/5"]  # every 2 steps, and the last
    assert re.fullmatch(r"step 2/5 \(40%\): loss 0\.5000, lr 2\.00e-04, 1,000 tok/s, elapsed \d+s, ETA \d+s", out[0])
    assert out[2].endswith("ETA 0s")


def test_progress_lines_keep_coming_while_a_step_takes_long():
    plain = io.StringIO()
    progress = Progress(10, stream=plain, log_every=5, interval_s=0.05)
    progress.update(1, 2.0, 1e-3, 10.0)  # no line: not a multiple of log_every
    time.sleep(0.5)  # ~10 intervals
    progress.close()
    lines = plain.getvalue().splitlines()
    assert len(lines) >= 2 and all(line.startswith("step 1/10 (10%): loss 2.0000, lr 1.00e-03") for line in lines)
    time.sleep(0.1)
    assert plain.getvalue().splitlines() == lines  # closed: the thread is gone


def test_a_run_without_a_terminal_logs_progress_lines(tmp_path, tiny_config, capsys):
    train(run_config(tiny_config(tmp_path / "run", train={"max_steps": 4, "log_every": 2})))
    out = capsys.readouterr().out
    assert re.search(r"^step 2/4 \(50%\): loss \d\.\d{4}, lr ", out, re.MULTILINE)
    assert re.search(r"^step 4/4 \(100%\): loss .* ETA 0s$", out, re.MULTILINE)
    assert "step 1/4" not in out and "step 3/4" not in out


def test_hidden_state_loss_equals_the_logits_loss_in_value_and_gradient():
    import lorafit
    from lorafit.train.evaluation import logits_of, summed_loss
    from lorafit.train.losses import output_head

    model = lorafit.wrap(tiny_llama(), lorafit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert output_head(model) is not None
    ids = torch.randint(3, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    cpu = torch.device("cpu")
    fused, logits = summed_loss(model, batch, "causal_lm", cpu, torch.float32)
    assert logits is None
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(fused, params)
    plain = causal_lm_loss(logits_of(model, batch, "causal_lm", cpu, torch.float32), labels)
    want = torch.autograd.grad(plain, params)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_mlp_checkpointing_keeps_no_intermediate_sized_activation():
    """Without it a Llama block keeps tensors of the MLP's intermediate width (gate, up, their
    activation and product); with it only the MLP's input, and the weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorafit.train.modeling import checkpoint_mlps

    def kept_widths(model):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        widths = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                widths.append(t.shape[-1] if t.dim() else 0)
            return t

        ids = torch.randint(0, 64, (2, 8))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return widths

    intermediate = 48  # no other width of the model
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    plain = lorafit.wrap(LlamaForCausalLM(config), lorafit.LoraConfig(r=2, target_modules="all-linear"))
    assert kept_widths(plain).count(intermediate) >= 4 * config.num_hidden_layers
    base = LlamaForCausalLM(config)
    checkpoint_mlps(base)
    recomputed = lorafit.wrap(base, lorafit.LoraConfig(r=2, target_modules="all-linear"))
    assert intermediate not in kept_widths(recomputed)


def test_mlp_checkpointing_names_a_model_without_mlp_blocks():
    from transformers import BertConfig, BertModel

    from lorafit.train.modeling import checkpoint_mlps

    model = BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32))
    with pytest.raises(ConfigError, match=r"gradient_checkpointing = 'mlp': BertModel has no decoder blocks .*BertLayer"):
        checkpoint_mlps(model)
