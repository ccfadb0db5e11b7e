"""torchrun worker: each branch resumes from its newest checkpoint, as stage 1 does, and the
group's first rank saves the state its engine then holds (gathered whole: a collective), so
the test can compare it with the checkpoint; then the branch trains on to the end.

argv: OUT_DIR then config overrides.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ffn_dist.config import load_config
from ffn_dist.data.dataset import open_dataset
from ffn_dist.distributed import init_world, make_branches
from ffn_dist.stages.backbones import BranchTrainer


def main(out_dir, *overrides):
    cfg = load_config(None, list(overrides))
    world = init_world(60)
    dataset = open_dataset(cfg.data)
    for branch in make_branches(world, cfg):
        trainer = BranchTrainer(cfg, world, branch, dataset)
        position = trainer._resume()
        state = trainer.engine.state()
        if branch.is_first:
            torch.save({"position": position, **state}, Path(out_dir, f"{branch.name}_resumed.pt"))
        trainer.run()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
