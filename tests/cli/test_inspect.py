"""``lorafit inspect``; the report itself is `lorafit.adapter_files.report`."""

import json
import re

from lorafit.cli import main


def test_inspect_describes_the_adapter(llama_dirs, capsys):
    base, adapter, _ = llama_dirs
    assert main(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    rows = dict(line.split(None, 1) if " " in line else (line, "") for line in out.splitlines()
                if line and not line.startswith(" ") and not line.startswith(("base model", "other adapters")))
    assert rows["r"].startswith("4   lora_alpha 8   scaling 2") and "   variant none   " in rows["r"]
    assert rows["targets"] == "6 modules: down_proj x2, q_proj x2, v_proj x2"
    assert rows["ranks"] == "r=2 on 2 modules, r=4 on 4 modules"
    # hidden 64, intermediate 128: q/v 2 layers x r4 x (64 + 64), down_proj 2 x r2 x (128 + 64)
    assert rows["parameters"].startswith("2,816 (2,816 in LoRA factors")
    assert re.search(rf"^base model +{re.escape(str(base))}; fingerprint: LlamaForCausalLM \(llama\), 6 targeted weights",
                     out, re.M)
    assert "adapter_model.safetensors" in out and "\nchecks\n  ok    " in out and "FAIL" not in out
    assert main(["inspect", "--json", str(adapter)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"]["total"] == 2816 and report["ok"]


def test_inspect_fails_on_a_broken_adapter(tmp_path, llama_dirs, capsys):
    (tmp_path / "adapter_config.json").write_text("{")
    (tmp_path / "adapter_model.safetensors").write_bytes((llama_dirs[1] / "adapter_model.safetensors").read_bytes())
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorafit inspect: error:") and "adapter_config.json: invalid JSON" in err
