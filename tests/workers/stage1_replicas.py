"""torchrun worker: stage 1 as `ffn train-backbones` runs it, then every rank writes a digest
of its own weights, so the test can compare replicas inside and across groups, and each
group's first rank saves its weights.

argv: OUT_DIR then config overrides.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ffn_dist.config import load_config
from ffn_dist.data.dataset import open_dataset
from ffn_dist.distributed import init_world, make_branches
from ffn_dist.stages.backbones import BranchTrainer


def digest(module) -> str:
    sha = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def main(out_dir, *overrides):
    cfg = load_config(None, list(overrides))
    world = init_world(60)
    dataset = open_dataset(cfg.data)
    result = {}
    for branch in make_branches(world, cfg):
        trainer = BranchTrainer(cfg, world, branch, dataset)
        trainer.run()
        result[branch.name] = {
            "trunk": digest(trainer.engine.module.backbone),
            "all": digest(trainer.engine.module),
            "group_rank": branch.rank,
        }
        if branch.is_first:
            torch.save(trainer.engine.module.state_dict(), Path(out_dir, f"{branch.name}.pt"))
    Path(out_dir, f"rank{world.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
