"""torchrun worker: two process groups, each reading the demo splits with group-aware loaders.

argv: DATA_ROOT OUT_JSON BACKEND ON_BAD_IMAGE. Group "a" holds the first half of the ranks.
Each group's first rank writes, per split and epoch, the indices every rank of the group read.
"""

import json
import sys

import torch
import torch.distributed as dist

from ffn_dist.config import load_config
from ffn_dist.data.dataset import open_dataset
from ffn_dist.data.loader import build_loader


def main(root, out, backend, on_bad_image):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    half = max(world // 2, 1)
    members = {"a": list(range(half)), "b": list(range(half, world))}
    groups = {name: dist.new_group(ranks) for name, ranks in members.items()}  # same order everywhere
    name = "a" if rank < half else "b"
    group, ranks = groups[name], members[name]
    cfg = load_config(
        None,
        [
            f"data.root={root}",
            f"data.backend={backend}",
            "data.num_threads=1",
            "data.batch_size=16",
            f"data.on_bad_image={on_bad_image}",
        ],
    )
    dataset = open_dataset(cfg.data)
    report = {}
    for split_name, split in (("train", dataset.train), ("test", dataset.test)):
        loader = build_loader(
            cfg.data,
            split,
            train=split_name == "train",
            rank=ranks.index(rank),
            size=len(ranks),
            seed=11,
            group=group,
        )
        for epoch in range(2):
            loader.set_epoch(epoch)
            mine = torch.cat([b.indices for b in loader]).tolist()
            gathered = [None] * len(ranks)
            dist.all_gather_object(
                gathered, {"indices": mine, "steps": len(loader), "kept": len(loader.split)}, group=group
            )
            report[f"{split_name}/{epoch}"] = gathered
    if rank == ranks[0]:
        with open(f"{out}.{name}", "w") as handle:
            json.dump(report, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
