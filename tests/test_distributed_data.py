"""Group-aware sharding under real torchrun processes over gloo."""

import json
from pathlib import Path

import pytest

from ffn_dist.data.splits import read_split
from tests.conftest import run_torchrun

WORKER = Path(__file__).parent / "workers" / "shard_coverage.py"


def read_reports(out):
    return {name: json.loads(Path(f"{out}.{name}").read_text()) for name in ("a", "b")}


@pytest.mark.parametrize("nproc, backend", [(2, "dali"), (4, "dali"), (4, "torch"), (4, "memory")])
def test_each_group_covers_each_split_exactly_once_per_epoch(demo_root, tmp_path, nproc, backend):
    out = tmp_path / "coverage.json"
    run_torchrun(nproc, WORKER, demo_root, out, backend, "error")
    sizes = {s: len(read_split(demo_root / f"{s}.txt", demo_root, 10)) for s in ("train", "test")}
    reports = read_reports(out)
    for group, report in reports.items():
        assert len(report["test/0"]) == nproc // 2, group
        for key, per_rank in report.items():
            split, epoch = key.split("/")
            n = sizes[split]
            lengths = {len(r["indices"]) for r in per_rank}
            steps = {r["steps"] for r in per_rank}
            assert len(lengths) == 1 and len(steps) == 1, f"{group} {key}: ranks differ {lengths} {steps}"
            every = [i for r in per_rank for i in r["indices"]]
            assert set(every) == set(range(n)), f"{group} {key}: split not covered"
            assert len(every) - n < len(per_rank), f"{group} {key}: more padding than one per rank"
            if len(per_rank) > 1:  # shards are disjoint but for the padding
                first = [set(r["indices"][: n // len(per_rank)]) for r in per_rank]
                assert not first[0] & first[1]
    # the same seed gives both groups the same order; epochs differ
    a, b = reports["a"], reports["b"]
    assert a["train/0"][0]["indices"] == b["train/0"][0]["indices"]
    assert a["train/0"][0]["indices"] != a["train/1"][0]["indices"]
    assert a["test/0"] == a["test/1"]


def test_skip_mode_excludes_the_same_files_on_every_rank(demo_copy, tmp_path):
    split = read_split(demo_copy / "train.txt", demo_copy, 10, is_train=True)
    for i in (3, 200):
        split.image_path(i).write_bytes(b"broken")
    out = tmp_path / "skip.json"
    result = run_torchrun(4, WORKER, demo_copy, out, "dali", "skip")
    for report in read_reports(out).values():
        kept = {r["kept"] for r in report["train/0"]}
        assert kept == {len(split) - 2}
        every = {i for r in report["train/0"] for i in r["indices"]}
        assert len(every) == len(split) - 2
    assert result.stdout.count(f"{split.path}:{split.lines[200]}") == 1  # listed once per job
