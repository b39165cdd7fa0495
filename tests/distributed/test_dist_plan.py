"""Multi-process training without processes: how data is sharded and re-sharded, which mode a
launch gets, the config fields, and a distributed mode run by one process."""

import pytest

from lorafit.data import batch_plan
from lorafit.errors import ConfigError
from lorafit.train import run_config, train
from lorafit.train.config import TrainConfig
from lorafit.train.distributed import Group, resolve_mode, rescale_position, sync_gradients


@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize("examples", [1, 7, 25, 64])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_every_example_is_seen_once_per_epoch_whatever_the_world_size(examples, world_size, batch_size,
                                                                       group_by_length):
    lengths = [(7 * i) % 11 + 1 for i in range(examples)]
    for epoch in range(2):
        plans = [batch_plan(lengths, batch_size, 5, epoch, rank, world_size, group_by_length)
                 for rank in range(world_size)]
        assert len({len(plan) for plan in plans}) == 1  # every rank takes part in every step
        seen = [i for plan in plans for batch in plan for i in batch]
        assert sorted(seen) == list(range(examples))
        for k in range(len(plans[0]) - 1):  # uneven or empty shares only in the last global batch
            assert all(len(plan[k]) == batch_size for plan in plans)


def _seen(lengths, batch_size, world_size, batches):
    """Examples the first `batches` global batches of epoch 0 cover, over all ranks."""
    return [i for rank in range(world_size)
            for batch in batch_plan(lengths, batch_size, 3, 0, rank, world_size)[:batches] for i in batch]


@pytest.mark.parametrize("old_world, new_world", [(2, 1), (1, 2), (2, 4), (4, 3)])
def test_a_resumed_position_moves_to_another_world_size_without_skipping(old_world, new_world):
    lengths, batch_size = [5] * 50, 2
    for batch in range(len(batch_plan(lengths, batch_size, 3, 0, 0, old_world)) + 1):
        before = set(_seen(lengths, batch_size, old_world, batch))
        moved = rescale_position(batch, old_world, new_world, batch_size, len(lengths))
        again = set(_seen(lengths, batch_size, new_world, moved))
        assert again <= before  # what the new world skips was seen
        assert len(before - again) < batch_size * new_world  # and little is seen twice
        if len(before) % (batch_size * new_world) == 0:
            assert again == before
    assert rescale_position(3, 2, 2, 4, 100) == 3


def test_the_mode_of_a_launch():
    assert resolve_mode("ddp", 1) == resolve_mode("fsdp", 1) == resolve_mode("auto", 1) == "none"
    assert resolve_mode("auto", 2) == resolve_mode("ddp", 2) == "ddp"
    assert resolve_mode("fsdp", 8) == "fsdp"
    with pytest.raises(ConfigError, match="train.distributed = 'none', but the launcher started 2 processes"):
        resolve_mode("none", 2)


def test_distributed_config_fields():
    assert TrainConfig().distributed == "auto" and TrainConfig().dist_timeout_s == 60
    with pytest.raises(ConfigError, match="train.dist_timeout_s = 0 is invalid"):
        TrainConfig(dist_timeout_s=0)
    with pytest.raises(ConfigError, match="train.distributed = 'zero' is invalid"):
        TrainConfig(distributed="zero")
    with pytest.raises(ConfigError, match="model.quantize = 'nf4' cannot be combined with train.distributed = 'fsdp'"):
        run_config({"model": {"quantize": "nf4"}, "train": {"distributed": "fsdp"}})


def test_one_process_sums_nothing():
    import torch

    group = Group("none", torch.device("cpu"))
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 2.0)
    extra = torch.tensor([1.5])
    assert sync_gradients([param], extra, group) is extra and param.grad.tolist() == [2.0, 2.0, 2.0]
    assert group.from_main(lambda: 7) == 7 and group.gather("x") == ["x"]


def test_a_distributed_mode_outside_torchrun_trains_one_process(tmp_path, dist_config):
    summary = train(run_config(dist_config(tmp_path / "run", train={"distributed": "fsdp", "max_steps": 2,
                                                                   "eval_every": None, "save_every": None})))
    assert (summary["processes"], summary["distributed"], summary["global_batch"]) == (1, "none", 4)
