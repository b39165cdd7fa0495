"""target_parameters, trainable_token_indices (on a tiny Mixtral) and layer_replication (on the
tiny Llama) through `lorafit train` (config keys, resume bit-exact) and `lorafit inspect`."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from lorafit.testing import tiny_moe_dir
from lorafit.train.checkpoints import list_checkpoints
from lorafit.train.config import run_config
from lorafit.train.trainer import resume, train

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return tiny_moe_dir(tmp_path_factory.mktemp("mixtral"))


def moe_config(tiny_config, mixtral_dir, out_dir, **train_keys):
    data = tiny_config(out_dir, model={"name_or_path": str(mixtral_dir)},
                       lora={"r": 2, "lora_dropout": 0.0, "target_modules": ["q_proj"], "target_parameters": EXPERTS,
                             "trainable_token_indices": [3, 5]},
                       train={"max_steps": 4, "save_every": 1, "keep_last": 10, **train_keys})
    return run_config(data)


def resumed_equals_full(full, tmp_path):
    """Resume a copy of run `full` from its step-2 checkpoint; the final adapters are bit-equal."""
    tensors = load_file(full / "adapter" / "adapter_model.safetensors")
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for step, path in list_checkpoints(part):
        if step > 2:
            shutil.rmtree(path)
    shutil.rmtree(part / "adapter")
    (part / "summary.json").unlink()
    resume(part)
    resumed = load_file(part / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == tensors.keys() and all(torch.equal(resumed[k], tensors[k]) for k in tensors)
    return tensors


@pytest.mark.slow
def test_train_resume_and_inspect(tmp_path, tiny_config, mixtral_dir, cli):
    full = tmp_path / "full"
    train(moe_config(tiny_config, mixtral_dir, full))
    tensors = resumed_equals_full(full, tmp_path)
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in tensors
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in tensors
    shown = cli("inspect", str(full / "adapter")).stdout
    assert "experts.gate_up_proj" in shown and "trainable_token_indices" in shown


@pytest.mark.slow
def test_layer_replication_trains_and_resumes(tmp_path, tiny_config, cli):
    full = tmp_path / "full"
    train(run_config(tiny_config(full, lora={"layer_replication": [[0, 2], [1, 2]]},
                                 train={"max_steps": 4, "save_every": 1, "keep_last": 10})))
    tensors = resumed_equals_full(full, tmp_path)
    assert "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight" in tensors  # the third, repeated layer
    assert "layer_replication" in cli("inspect", str(full / "adapter")).stdout
