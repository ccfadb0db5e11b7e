"""Where ranks run and how their groups communicate: the GPU layout logic, checked on the CPU."""

import pytest
import torch

from ffn_dist.distributed import rank_device
from ffn_dist.errors import FFNError
from ffn_dist.layout import (
    Placement,
    branch_ranks,
    gpu_for,
    group_backend,
    plan_groups,
    planned_placements,
    split_batches,
)


@pytest.mark.parametrize("gpus", [1, 2, 8])
@pytest.mark.parametrize("nproc", range(1, 17))
def test_any_number_of_processes_on_any_number_of_gpus(gpus, nproc):
    placements = planned_placements(1, nproc, gpus)
    assert [p.gpu for p in placements] == [r % gpus for r in range(nproc)]  # shared round-robin
    plans = plan_groups(placements, PAIR, "ddp")
    for name, plan in plans.items():
        members = [placements[r] for r in plan.ranks]
        distinct = len(set(members)) == len(members)
        # NCCL exactly where no two ranks of the group hold one GPU, which NCCL would refuse,
        # and the group has something to carry (one rank: no DDP, a few flags)
        assert plan.backend == ("nccl" if distinct and len(members) > 1 else "gloo"), (name, plan)
    if nproc == 1:  # one process trains both branches
        assert plans["ce"].ranks == plans["kps"].ranks == (0,)
    else:
        assert sorted(plans["ce"].ranks + plans["kps"].ranks) == list(range(nproc))


PAIR = {"ce": None, "kps": None}  # the paper's branches, the processes shared evenly


def test_the_one_gpu_demo_layout_trains_both_branches_side_by_side_without_nccl():
    plans = plan_groups(planned_placements(1, 2, 1), PAIR, "ddp")
    assert plans["ce"].ranks == (0,) and plans["kps"].ranks == (1,)
    assert plans["ce"].placements == plans["kps"].placements == (Placement("node0", 0),)
    # a group of one rank carries a few flags: gloo, with no NCCL communicator's GPU memory
    assert plans["ce"].backend == plans["kps"].backend == "gloo"
    ds = plan_groups(planned_placements(1, 2, 1), PAIR, "deepspeed")
    assert ds["ce"].backend == ds["kps"].backend == "nccl"  # DeepSpeed's communication needs it


@pytest.mark.parametrize(
    "nproc, gpus, kps, backends",
    [
        (4, 1, None, ("gloo", "gloo")),
        (4, 2, None, ("nccl", "nccl")),
        (3, 2, None, ("nccl", "gloo")),  # CE ranks on GPUs 0, 1; KPS one rank on GPU 0
        (10, 4, 4, ("gloo", "nccl")),  # CE: 6 ranks on 4 GPUs; KPS: ranks 6-9 on GPUs 2, 3, 0, 1
    ],
)
def test_groups_on_shared_gpus_fall_back_to_gloo(nproc, gpus, kps, backends):
    plans = plan_groups(planned_placements(1, nproc, gpus), {"ce": None, "kps": kps}, "ddp")
    assert (plans["ce"].backend, plans["kps"].backend) == backends


def test_several_nodes():
    # 4 nodes x 8 GPUs, one process per GPU: each branch owns two whole nodes, all NCCL
    placements = planned_placements(4, 8, 8)
    plans = plan_groups(placements, PAIR, "deepspeed")
    assert {p.host for p in plans["ce"].placements} == {"node0", "node1"}
    assert {p.host for p in plans["kps"].placements} == {"node2", "node3"}
    assert plans["ce"].backend == plans["kps"].backend == "nccl"
    # the same GPU index on two nodes is two GPUs
    assert group_backend([Placement("node0", 0), Placement("node1", 0)]) == "nccl"
    # 2 nodes x 1 GPU x 2 processes: each group's two ranks share one node's GPU
    plans = plan_groups(planned_placements(2, 2, 1), PAIR, "ddp")
    assert plans["ce"].placements == (Placement("node0", 0),) * 2 and plans["ce"].backend == "gloo"
    # unless the groups are cut across the nodes: KPS takes rank 3 only
    plans = plan_groups(planned_placements(2, 2, 1), {"ce": None, "kps": 1}, "ddp")
    assert plans["ce"].backend == "gloo" and plans["kps"].backend == "gloo"  # KPS: one rank


def test_cpu_ranks_are_on_gloo():
    plans = plan_groups(planned_placements(2, 3, 0), PAIR, "deepspeed")
    assert all(p.gpu is None for p in plans["ce"].placements)
    assert plans["ce"].backend == plans["kps"].backend == "gloo"


def test_a_layout_that_cannot_work_is_refused_saying_why_and_what_would():
    with pytest.raises(FFNError) as info:
        plan_groups(planned_placements(1, 4, 1), PAIR, "deepspeed")
    message = str(info.value)
    assert "dist.engine=deepspeed: in the ce group ranks 0 and 1 share node0 cuda:0" in message
    assert "use dist.engine=ddp" in message and "at most 1 process(es) per node" in message
    plan_groups(planned_placements(1, 2, 1), PAIR, "deepspeed")  # one rank per group: fine
    with pytest.raises(
        FFNError, match=r"branches.kps.processes=4: with 4 processes, 0 left \(1 more for ce\)"
    ):
        branch_ranks(4, {"ce": None, "kps": 4})
    with pytest.raises(FFNError, match=r"dist.nproc: 2 processes for 3 branches \(ce, kps, bs\)"):
        branch_ranks(2, {"ce": None, "kps": None, "bs": None})
    with pytest.raises(
        FFNError, match=r"branches.ce.processes=1, branches.kps.processes=1: with 3 processes"
    ):
        branch_ranks(3, {"ce": 1, "kps": 1})


def test_each_process_takes_its_gpu_round_robin():
    assert [gpu_for(r, 2) for r in range(5)] == [0, 1, 0, 1, 0]
    assert gpu_for(3, 0) is None
    assert rank_device(3, 2) == torch.device("cuda", 1)
    assert rank_device(3, 0) == torch.device("cpu")


def test_branches_take_consecutive_ranks_set_counts_first_the_rest_shared_evenly():
    shares = {"ce": None, "kps": None}
    assert branch_ranks(1, shares) == {"ce": (0,), "kps": (0,)}  # one process trains both in turn
    assert branch_ranks(5, shares) == {"ce": (0, 1, 2), "kps": (3, 4)}  # the earlier one more
    assert branch_ranks(5, {"ce": None, "kps": 4}) == {"ce": (0,), "kps": (1, 2, 3, 4)}
    three = {"ce": None, "kps": 2, "bs": None}
    assert branch_ranks(7, three) == {"ce": (0, 1, 2), "kps": (3, 4), "bs": (5, 6)}


def _recipe(batch=64, kps_ranks=None, accumulation=1, max_micro=256):
    from ffn_dist.config import load_config

    return load_config(
        "configs/demo.yaml",
        [
            f"data.batch_size={batch}",
            f"branches.kps.processes={'null' if kps_ranks is None else kps_ranks}",
            f"stage1.accumulation={'null' if accumulation is None else accumulation}",
            f"stage1.max_micro_batch={max_micro}",
        ],
    )


@pytest.mark.parametrize("nproc", [1, 2, 3, 4, 8, 16, 32, 64, 128])
def test_the_global_batch_is_the_recipes_on_every_layout_that_keeps_it(nproc):
    splits = split_batches(_recipe(64), nproc)
    for name, ranks in branch_ranks(nproc, {"ce": None, "kps": None}).items():
        split = splits[name]
        assert split.ranks == len(ranks)
        assert split.per_process * split.ranks == split.micro_batch * split.accumulation * split.ranks == 64


@pytest.mark.parametrize("nproc", [5, 6, 7, 12, 256])
def test_a_layout_that_would_change_the_recipe_is_refused_naming_those_that_keep_it(nproc):
    with pytest.raises(FFNError) as refused:
        split_batches(_recipe(64), nproc)
    message = str(refused.value)
    assert message.startswith("data.batch_size: the recipe's global batch of 64")
    assert f"over {nproc} process(es)" in message
    assert message.endswith("that keep it: 1, 2, 3, 4, 8, 16, 32, 64, 128")


def test_accumulation_splits_each_share_and_is_chosen_to_fit_when_asked():
    fixed = split_batches(_recipe(256, accumulation=4), 2)["kps"]
    assert (fixed.per_process, fixed.accumulation, fixed.micro_batch) == (256, 4, 64)
    assert str(fixed) == "global batch 256 = 1 x 256 (4 x 64 accumulated)"
    auto = split_batches(_recipe(256, accumulation=None, max_micro=48), 4)["ce"]
    assert (auto.per_process, auto.accumulation, auto.micro_batch) == (128, 4, 32)  # 64 > 48
    with pytest.raises(FFNError, match=r"2 CE and 2 KPS rank\(s\) x stage1.accumulation=3 micro-batches"):
        split_batches(_recipe(64, accumulation=3), 4)


def test_an_explicit_kps_share_is_kept_in_the_counts_offered():
    with pytest.raises(
        FFNError,
        match=r"\(3 CE and 2 KPS rank\(s\)\).*keep it with branches.kps.processes=2: "
        r"1, 3, 4, 6, 10, 18, 34, 66$",
    ):
        split_batches(_recipe(64, kps_ranks=2), 5)
