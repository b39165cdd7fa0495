"""``lorafit combine``: a new adapter directory from several, recording how it was made."""

import pytest
import torch

import lorafit
from lorafit.adapter_files.report import describe_adapter, format_report
from lorafit.cli import main
from lorafit.errors import AdapterError
from lorafit.export import export_combined
from lorafit.export.combined import adapter_names
from lorafit.testing import tiny_llama

from test_model import IDS


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A saved tiny Llama base and two rank-4 adapters on it (math: q/v, code: q/o)."""
    root = tmp_path_factory.mktemp("combine_cli")
    tiny_llama().save_pretrained(root / "base")
    for name, targets, seed in (("math", ["q_proj", "v_proj"], 1), ("code", ["q_proj", "o_proj"], 2)):
        torch.manual_seed(seed)
        model = lorafit.wrap(tiny_llama(), lorafit.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                              init_lora_weights=False))
        model.save_adapter(root / name)
    return root


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_combine_command_writes_the_combination_and_inspect_shows_it(dirs, capsys):
    out = dirs / "ties"
    status = main(["combine", "--base", str(dirs / "base"), "--adapter", str(dirs / "math"), "--adapter",
                   str(dirs / "code"), "--weights", "0.7", "-1.3", "--method", "ties", "--density", "0.5",
                   "--out", str(out)])
    assert status == 0 and f"combined adapter written to {out} (ties of 2 adapters, rank 4)" in capsys.readouterr().out

    reference = lorafit.load(tiny_llama(), dirs / "math", adapter_name="math")
    reference.load_adapter(dirs / "code", adapter_name="code")
    reference.combine({"math": 0.7, "code": -1.3}, name="ties", method="ties", density=0.5)
    reference.set_adapter("ties")
    assert (_logits(lorafit.load(tiny_llama(), out)) - _logits(reference)).abs().max() <= 1e-6

    report = describe_adapter(out)
    assert report["ok"] and report["combined"] == {
        "method": "ties", "weights": {"math": 0.7, "code": -1.3}, "density": 0.5, "majority_sign_method": "total",
        "ranks": [4, 4], "sources": {"math": str(dirs / "math"), "code": str(dirs / "code")}}
    line = next(line for line in format_report(report).splitlines() if line.startswith("combined "))
    assert line.split(None, 1)[1] == (  # the saved metadata's keys are sorted
        f'ties of -1.3·code + 0.7·math (density 0.5, majority_sign_method total, ranks [4, 4], sources '
        f'{{"code": "{dirs / "code"}", "math": "{dirs / "math"}"}})')


@pytest.mark.parametrize("args,message", [
    (["--weights", "1"], "--weights has 1 values for 2 --adapter directories"),
    (["--method", "dare_ties"], "method 'dare_ties' needs density"),
    (["--method", "svd"], "method 'svd' needs a positive integer rank"),
])
def test_combine_command_refusals_are_one_line(dirs, capsys, args, message):
    status = main(["combine", "--base", str(dirs / "base"), "--adapter", str(dirs / "math"), "--adapter",
                   str(dirs / "code"), "--out", str(dirs / "refused"), *args])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith("lorafit combine: error: ") and message in err and err.count("\n") == 1
    assert not (dirs / "refused").exists()


def test_export_combined_is_the_library_call_behind_the_command(dirs):
    """The work of ``lorafit combine`` without the CLI: the weighted cat of the two adapters, saved
    with its sources, and the report it returns."""
    out = dirs / "library_cat"
    report = export_combined(str(dirs / "base"), [str(dirs / "math"), str(dirs / "code")], out, weights=[0.5, 2.0])
    assert report.method == "cat" and report.weights == {"math": 0.5, "code": 2.0} and max(report.ranks.values()) == 8
    reference = lorafit.load(tiny_llama(), dirs / "math", adapter_name="math")
    reference.load_adapter(dirs / "code", adapter_name="code")
    reference.combine({"math": 0.5, "code": 2.0}, name="cat", method="cat")
    reference.set_adapter("cat")
    assert (_logits(lorafit.load(tiny_llama(), out)) - _logits(reference)).abs().max() <= 1e-6
    assert describe_adapter(out)["combined"]["sources"] == {"math": str(dirs / "math"), "code": str(dirs / "code")}
    with pytest.raises(AdapterError, match="needs density"):
        export_combined(str(dirs / "base"), [str(dirs / "math")], dirs / "refused", method="ties")
    assert not (dirs / "refused").exists()


def test_adapter_names_are_folder_names_when_usable():
    assert adapter_names(["a/math", "b/math", "c/combined", "d/x y", "e/code/"], reserved="combined") == [
        "math", "adapter2", "adapter3", "adapter4", "code"]
