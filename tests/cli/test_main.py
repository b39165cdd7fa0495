"""The ``lorafit`` entry point: commands found by listing the package, one dtype vocabulary, quiet
ends on a closed pipe."""

import subprocess
import sys
from argparse import Namespace

import pytest

from lorafit import cli
from lorafit.cli import support

from cli_support import ENV, REPO

COMMANDS = {"eval", "generate", "inspect", "merge", "serve", "train"}


def test_every_module_with_register_is_a_command_and_only_those():
    names = {module.__name__.rsplit(".", 1)[-1] for module in cli.command_modules()}
    assert COMMANDS <= names and "support" not in names
    subcommands = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    assert set(subcommands) == names


@pytest.fixture(scope="module")
def parser():
    return cli.build_parser()


@pytest.mark.parametrize("command", ["merge", "generate", "serve"])
@pytest.mark.parametrize("spelling, short", [("bf16", "bf16"), ("bfloat16", "bf16"), ("float16", "fp16"),
                                             ("fp32", "fp32"), ("auto", "auto")])
def test_dtype_takes_both_spellings_in_every_command(parser, command, spelling, short, capsys):
    required = {"merge": ["--base", "b", "--adapter", "a", "--out", "o"], "generate": ["--base", "b", "--prompt", "p"],
                "serve": ["--base", "b"]}[command]
    args = parser.parse_args([command, *required, "--dtype", spelling])
    assert args.dtype == short
    with pytest.raises(SystemExit):
        parser.parse_args([command, *required, "--dtype", "float64"])
    assert "--dtype: 'float64' is not a dtype; expected one of auto, fp32, bf16, fp16" in capsys.readouterr().err


def test_help_shows_the_short_dtype_names(capsys):
    for command in ("merge", "generate", "serve"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "--dtype {auto,fp32,bf16,fp16}" in capsys.readouterr().out


def test_the_extras_table_matches_pyproject():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(support.EXTRAS) == set(extras) - {"all", "dev"}
    for extra, modules in support.EXTRAS.items():
        listed = {requirement.split(">")[0].split("=")[0].split("[")[0].strip().lower()
                  for requirement in extras[extra]}
        assert set(modules) == listed, extra


def test_requires_names_the_extra_of_a_module_missing_at_run_time(monkeypatch, capsys):
    @support.requires(None)
    def run(args):
        import bitsandbytes  # noqa: F401

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    assert run(Namespace(command="cmd")) == 1
    assert capsys.readouterr().err == "lorafit cmd needs: pip install 'lorafit[quant]' (missing: bitsandbytes)\n"


def test_requires_refuses_an_unknown_extra():
    with pytest.raises(ValueError, match="requires\\('trian'\\): not an extra"):
        support.requires("trian")


def test_requires_lets_other_import_errors_through():
    @support.requires("train")
    def run(args):
        import transformers.no_such_module  # noqa: F401  (transformers is installed: a real bug)

    with pytest.raises(ModuleNotFoundError, match="transformers.no_such_module"):
        run(Namespace(command="cmd"))


def closed_pipe_run(*args):
    """Run ``lorafit ARGS`` with stdout a pipe whose reader is already gone: ``lorafit ... | head``
    once head has exited."""
    proc = subprocess.Popen([sys.executable, "-m", "lorafit", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV, cwd=REPO)
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err.decode()


def test_a_closed_pipe_ends_inspect_quietly(llama_dirs):
    status, err = closed_pipe_run("inspect", "--json", llama_dirs[1])
    assert (status, err) == (support.SIGPIPE_STATUS, "")


@pytest.mark.slow
def test_a_closed_pipe_ends_generate_quietly(llama_dirs):
    base, adapter, _ = llama_dirs
    status, err = closed_pipe_run("generate", "--base", base, "--adapter", adapter, "--prompt", "hello",
                                  "--max-new-tokens", 4)
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert status == support.SIGPIPE_STATUS
