"""Per-call routing: contexts restore what was there before (so they nest) and are per thread."""

import threading

import torch

import lorafit
from lorafit import LoraConfig
from lorafit.testing import tiny_llama

IDS = torch.tensor([[5, 17, 42, 99, 7, 3], [8, 64, 128, 300, 2, 19]])


def two_adapters():
    model = lorafit.wrap(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj", "o_proj"], init_lora_weights=False))
    model.eval()
    return model


def logits(model, **kw):
    with torch.no_grad():
        return model(input_ids=IDS, **kw).logits


def test_nested_disable_keeps_the_outer_block_disabled():
    model = two_adapters()
    with model.disable_adapter():
        base = logits(model)
    adapted = logits(model)
    assert (adapted - base).abs().max() > 1e-3
    with model.disable_adapter():
        with model.disable_adapter():
            pass
        torch.testing.assert_close(logits(model), base)  # PEFT turns the adapters back on here
    torch.testing.assert_close(logits(model), adapted)


def test_rows_and_active_changes_inside_disable_restore_it():
    model = two_adapters()
    with model.disable_adapter():
        base = logits(model)
    alone = {name: None for name in ("default", "other")}
    for name in alone:
        with model.using_adapter(name):
            alone[name] = logits(model)
    with model.disable_adapter():
        mixed = logits(model, adapter_names=["other", "default"])
        with model.using_adapter("other"):
            other = logits(model)
        torch.testing.assert_close(logits(model), base)
    torch.testing.assert_close(mixed[0], alone["other"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], alone["default"][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other, alone["other"])
    assert model.active_adapters == ["default"]  # using_adapter never changed the configured set


def test_two_threads_route_independently():
    """One thread runs the base (disable_adapter) while another runs the adapter, interleaved
    step by step on the same model: each gets its own result every time."""
    model = two_adapters()
    with model.disable_adapter():
        base = logits(model)
    adapted = logits(model)
    barrier = threading.Barrier(2)
    failures = []

    def run(disabled: bool):
        for _ in range(5):
            barrier.wait()
            if disabled:
                with model.disable_adapter():
                    barrier.wait()
                    got, want = logits(model), base
            else:
                barrier.wait()
                got, want = logits(model), adapted
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
                failures.append(disabled)

    threads = [threading.Thread(target=run, args=(flag,)) for flag in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
