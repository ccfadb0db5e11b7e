"""The recipe is global: each shipped config's batch and lr hold on any process count, and a
run moves between process counts at its checkpoints with the same steps, batch and lr."""

import re
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ffn_dist.config import load_config
from ffn_dist.engines import DDPEngine
from ffn_dist.errors import FFNError
from ffn_dist.layout import branch_ranks, branch_shares, split_batches
from ffn_dist.stages.backbones import base_lr
from ffn_dist.stages.pipeline import stage1_layout
from tests.conftest import CONFIG, REPO, run_ffn, tiny_overrides

TABLE_ROW = re.compile(r"^\| `(\w+\.yaml)` \| (\d+) \| ([\d.]+) \| (\d+) \|", re.M)


def recipe_table() -> dict[str, tuple[int, float, int]]:
    text = (REPO / "docs" / "method.md").read_text()
    return {name: (int(b), float(lr), int(e)) for name, b, lr, e in TABLE_ROW.findall(text)}


def test_the_table_lists_every_shipped_config():
    assert sorted(recipe_table()) == sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_each_config_implements_its_recipe_on_1_2_8_and_16_processes(name):
    batch, lr, epochs = recipe_table()[name]
    path = REPO / "configs" / name
    header = path.read_text().split("\nname:")[0]
    assert f"global batch {batch} a branch, lr {lr:g}" in header  # the comment states it
    for nproc in (1, 2, 8, 16):
        cfg = load_config(path, [f"dist.nproc={nproc}"])
        assert (cfg.stage1.epochs, base_lr(cfg)) == (epochs, lr)
        splits = split_batches(cfg, nproc)
        for branch, ranks in branch_ranks(nproc, branch_shares(cfg)).items():
            split = splits[branch]
            assert split.ranks == len(ranks) and split.ranks * split.per_process == batch
            assert split.accumulation * split.micro_batch == split.per_process


@pytest.mark.parametrize("nproc", range(1, 18))
def test_imagenet_lt_trains_each_branch_at_batch_64_or_is_refused_up_front(nproc):
    cfg = load_config(REPO / "configs" / "imagenet_lt_r50.yaml", [f"dist.nproc={nproc}"])
    ranks = {len(r) for r in branch_ranks(nproc, branch_shares(cfg)).values()}
    if all(64 % r == 0 for r in ranks):
        layout = stage1_layout(cfg)
        for r in ranks:
            assert f"global batch 64 = {r} x {64 // r}" in layout
    else:
        with pytest.raises(FFNError, match=r"that keep it: 1, 2, 3, 4, 8, 16, 32, 64, 128"):
            stage1_layout(cfg)


def test_ffn_run_refuses_a_layout_that_changes_the_recipe_before_writing_anything(tmp_path):
    out = tmp_path / "run"
    result = run_ffn("run", REPO / "configs" / "imagenet_lt_r50.yaml", "dist.nproc=6", f"output_dir={out}")
    assert result.returncode != 0
    assert "data.batch_size: the recipe's global batch of 64 a branch does not split evenly" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_accumulated_micro_batches_step_as_the_whole_batch():
    """Two micro-batches of 4, each loss a mean, then one step: the step of the batch of 8
    (compared within 1e-6: the gradient's sum runs in another order)."""
    data = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    target = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    branch, world = types.SimpleNamespace(size=1), types.SimpleNamespace(device=torch.device("cpu"))

    def stepped(accumulation: int) -> torch.Tensor:
        model = torch.nn.Linear(4, 2)
        with torch.no_grad():
            model.weight.copy_(torch.arange(8.0).reshape(2, 4) / 8)
            model.bias.zero_()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
        engine = DDPEngine(model, optimizer, branch, world, accumulation)
        for _ in range(2):  # two steps: the second uses the momentum of the first
            for i, (x, y) in enumerate(
                zip(data.chunk(accumulation), target.chunk(accumulation), strict=True)
            ):
                last = i == accumulation - 1
                with engine.micro_batch(last):
                    engine.backward(torch.nn.functional.mse_loss(engine.forward(x), y), last)
        return model.weight.detach()

    whole, accumulated = stepped(1), stepped(2)
    assert not torch.equal(whole, torch.arange(8.0).reshape(2, 4) / 8)  # it did step
    assert torch.allclose(whole, accumulated, rtol=0, atol=1e-6)


def scalars(out, branch: str) -> dict[str, dict[int, float]]:
    """Every step's logged scalars of a branch, from its TensorBoard event files."""
    events = EventAccumulator(str(out / "tensorboard" / branch), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag.split("/", 1)[1]: {e.step: e.value for e in events.Scalars(tag)}
        for tag in events.Tags()["scalars"]
        if tag.split("/", 1)[1] in ("lr", "global_batch")
    }


def test_a_run_stopped_on_2_processes_resumes_on_4_with_the_same_steps_batch_and_lr(tiny_root, tmp_path):
    """Stopped after epoch 10 of 20 on 2 processes (1 a branch), resumed on 4 (2 a branch) and
    finished: the logs hold the optimizer steps, global batch and lr of an uninterrupted run."""
    common = ["stage1.epochs=20", "stage1.log_every=1", "stage1.checkpoint_every=10", "stage1.eval_every=10"]
    common += ["cache.train_views=1", "stage2.epochs=1"]
    whole = tmp_path / "whole"
    done = run_ffn("run", CONFIG, *tiny_overrides(tiny_root, whole, *common), "dist.nproc=2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    moved = tmp_path / "moved"
    args = tiny_overrides(tiny_root, moved, *common)
    cmd = [sys.executable, "-m", "ffn_dist.cli", "run", str(CONFIG), *args, "dist.nproc=2"]
    with open(tmp_path / "first.log", "w") as log:
        job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        checkpoints = [moved / "stage1" / b / "epoch_0010.pt" for b in ("ce", "kps")]
        try:
            while not all(p.is_file() for p in checkpoints):
                assert job.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                time.sleep(0.1)
            job.send_signal(signal.SIGTERM)
            assert job.wait(timeout=120) == 128 + signal.SIGTERM
        finally:
            job.kill()
    assert "stop requested: checkpointed at epoch" in (tmp_path / "first.log").read_text()
    # on 4 processes, each accumulating 2 micro-batches (DDP reduces after the second only)
    resumed = run_ffn("run", CONFIG, *args, "dist.nproc=4", "stage1.accumulation=2")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "[kps] resuming from" in resumed.stdout
    assert "global batch 16 = 2 x 8 (2 x 4 accumulated)" in resumed.stdout

    for branch in ("ce", "kps"):
        expected, actual = scalars(whole, branch), scalars(moved, branch)
        steps = sorted(expected["lr"])
        assert steps == list(range(1, 20 * 5 + 1))  # 75 images, 16 a step: 5 steps an epoch
        assert sorted(actual["lr"]) == steps and sorted(actual["global_batch"]) == steps
        assert actual["lr"] == expected["lr"]
        assert set(actual["global_batch"].values()) == set(expected["global_batch"].values()) == {16}
