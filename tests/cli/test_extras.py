"""Each extra works alone: with the optional modules of the other extras blocked (``sys.modules[name] =
None`` in a fresh interpreter, as if never installed), ``lorafit --help`` and every command's
``--help`` work, the commands of the installed extra run, and the others end with one line naming
the install command, never a traceback."""

import json
import re

import pytest

from lorafit.cli.support import EXTRAS
from lorafit.testing import DEFAULT_TEXTS

from cli_support import run_python

ALL_OPTIONAL = {module for modules in EXTRAS.values() for module in modules.values()}
TRAIN_ALONE = {"fastapi", "uvicorn", "bitsandbytes"}  # blocked when only [train] is installed
SERVE_ALONE = {"matplotlib", "bitsandbytes"}  # transformers itself needs PyYAML and tqdm
# Run ``main(argv)`` for each entry of CALLS with optional modules blocked; print {key: [status, stdout, stderr]}.
SCRIPT = """
import contextlib, io, json, sys
for name in {blocked!r}:
    sys.modules[name] = None
{setup}
from lorafit import cli
calls = {calls!r}
calls.update({{"help " + m.__name__.rsplit(".", 1)[-1]: [m.__name__.rsplit(".", 1)[-1], "--help"]
              for m in cli.command_modules()}})
results = {{}}
for key, argv in calls.items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main(argv)
        except SystemExit as exc:
            status = exc.code
    results[key] = [status, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


def run_blocked(blocked, calls, setup=""):
    """``{key: (status, stdout, stderr)}`` of ``lorafit.cli.main(argv)`` for each ``key: argv`` of
    `calls` and for ``--help`` of every command, in one interpreter where `blocked` cannot be imported."""
    proc = run_python(SCRIPT.format(blocked=sorted(blocked), setup=setup, calls={"help": ["--help"], **calls}))
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1])
    for key, (status, out, err) in results.items():
        if key.startswith("help"):
            assert status == 0 and out.startswith("usage: lorafit") and err == "", key
    return results


def needs(command, extra, module):
    return [1, "", f"lorafit {command} needs: pip install 'lorafit[{extra}]' (missing: {module})\n"]


@pytest.fixture
def train_config(tmp_path, llama_dirs):
    """A one-step training config for the tiny Llama (as plain data, for KEY=VALUE overrides)."""
    data = tmp_path / "instruct.jsonl"
    data.write_text("".join(json.dumps({"instruction": text, "input": "", "output": text}) + "\n"
                            for text in DEFAULT_TEXTS))
    return [f"model.name_or_path={llama_dirs[0]}", f"data.train_file={data}", "data.format=instruction",
            "data.max_length=32", "train.max_steps=1", "train.batch_size=4", "output.plot=false"]


def test_the_core_alone_inspects_and_names_the_extra_of_every_other_command(tmp_path, llama_dirs):
    results = run_blocked(ALL_OPTIONAL, {
        "inspect": ["inspect", str(llama_dirs[1])],
        "train": ["train", "config.yaml"],
        "eval": ["eval", "config.yaml"],
        "generate": ["generate", "--base", "b", "--prompt", "p"],
        "merge": ["merge", "--base", "b", "--adapter", "a", "--out", str(tmp_path / "out")],
        "serve": ["serve", "--base", "b"],
    })
    status, out, _ = results["inspect"]
    assert status == 0 and re.match(rf"adapter +{re.escape(str(llama_dirs[1]))} \(PEFT LoRA", out) and "FAIL" not in out
    for command in ("train", "eval", "generate", "merge"):
        assert results[command] == needs(command, "train", "transformers")
    assert results["serve"] == needs("serve", "serve", "transformers")


@pytest.mark.slow
def test_the_train_extra_alone_trains_and_names_the_serve_and_quant_extras(tmp_path, train_config):
    run_dir = tmp_path / "run"
    results = run_blocked(TRAIN_ALONE, {
        "train": ["train", "/dev/null", *train_config, f"output.dir={run_dir}",
                  "lora.target_modules=[q_proj, v_proj]", "lora.rank_pattern={v_proj: 2}"],
        "quant": ["train", "/dev/null", *train_config, f"output.dir={tmp_path / 'q'}", "model.quantize=nf4"],
        "serve": ["serve", "--base", "b"],
    })
    assert results["train"][0] == 0, results["train"][2]
    saved = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"] and saved["rank_pattern"] == {"v_proj": 2}
    status, _, err = results["quant"]
    assert status == 1 and "Traceback" not in err  # above the message: transformers' loading progress bar
    assert err.splitlines()[-1].startswith("lorafit train") and "pip install 'lorafit[quant]'" in err.splitlines()[-1]
    assert results["serve"] == needs("serve", "serve", "fastapi")


@pytest.mark.slow
def test_the_serve_extra_alone_serves_and_names_the_train_extra(llama_dirs):
    results = run_blocked(SERVE_ALONE, {
        "serve": ["serve", "--base", str(llama_dirs[0]), "--port", "0"],
        "train": ["train", "config.yaml"],
    }, setup="import uvicorn\nuvicorn.Server.run = lambda self, sockets=None: None  # up to the serving loop")
    status, out, err = results["serve"]
    assert status == 0 and "listening on http://127.0.0.1:" in out, err
    assert results["train"] == needs("train", "train", "matplotlib")
