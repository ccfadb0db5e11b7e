"""Stage 1 as `ffn train-backbones` runs it, in this process; then it prints, as JSON, the
DeepSpeed engines and the branch objects that are still alive after the stage has returned and
every garbage cycle is collected (objects that would be torn down only at interpreter exit).

argv: config overrides.
"""

import gc
import json
import sys

from ffn_dist.config import load_config
from ffn_dist.stages.backbones import train_backbones


def main(*overrides):
    train_backbones(load_config(None, list(overrides)))
    gc.collect()
    kinds = ("DeepSpeedEngine", "DeepSpeedZeroOptimizer", "Branch", "_BranchMPU")
    alive = sorted(type(o).__name__ for o in gc.get_objects() if type(o).__name__ in kinds)
    print(json.dumps(alive))


if __name__ == "__main__":
    main(*sys.argv[1:])
