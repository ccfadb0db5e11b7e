"""`ffn bench accuracy --study`: the study file checked, the run it makes, and its figures
over seeds (the training itself is the pipeline's, tested elsewhere)."""

import pytest

from ffn_dist.bench.accuracy import CONFIG, SCHEDULES
from ffn_dist.bench.study import read_study, study_overrides, summarise_study
from ffn_dist.config import load_config
from ffn_dist.errors import FFNError
from tests.conftest import run_ffn

STUDY = """branches:
  ce: {loss: ce, head: linear}
  kps: {loss: kps, head: cosine}
  bs: {loss: balanced_softmax, head: cosine}
fusions:
  pair: [kps, ce]
  other: [bs, ce]
  three: [kps, bs, ce]
"""


def test_the_shipped_study_makes_a_run_of_every_branch_fused_as_its_reference():
    study = read_study("branches")
    assert list(study.fusions) == [
        "CE + KPS (the paper's pair)",
        "CE + Balanced Softmax",
        "CE + LDAM-DRW",
        "CE + KPS + Balanced Softmax",
    ]
    cfg = load_config(CONFIG, study_overrides(study, SCHEDULES["cpu"]))
    assert list(cfg.branches) == ["ce", "kps", "bs", "ldam_drw"]
    assert (cfg.branches["ldam_drw"].loss, cfg.branches["ldam_drw"].drw) == ("ldam", True)
    assert cfg.stage2.fusion == {"ce": 0.5, "kps": 0.5, "bs": 0.0, "ldam_drw": 0.0}
    assert cfg.dist.nproc == 4 and cfg.stage1.epochs == 11  # a process a branch, on the schedule


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            STUDY.replace("fusions:", "fusion:"),
            r"expected the keys branches and fusions, got branches, fusion",
        ),
        (
            STUDY.replace("balanced_softmax", "balanced"),
            r"branches\.bs\.loss: got 'balanced', allowed values",
        ),
        (
            STUDY.replace("[bs, ce]", "[bs, lt]"),
            r"fusions\.other: lt is not a branch of the study \(ce, kps, bs\)",
        ),
        (STUDY.replace("[bs, ce]", "[bs]"), r"fusions\.other: expected two branches or more, each once"),
        (STUDY.replace("[bs, ce]", "[bs, bs]"), r"fusions\.other: expected two branches or more, each once"),
        ("branches: [\n", "not valid YAML"),
    ],
)
def test_a_bad_study_file_is_refused_naming_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(FFNError, match=rf"{path}: .*{message}"):
        read_study(str(path))


def test_an_unknown_study_names_the_shipped_ones():
    with pytest.raises(
        FFNError, match=r"--study nope: no such file, nor a shipped study \(shipped: branches\)"
    ):
        read_study("nope")


def _accuracies(top1):
    return {"top1": top1, "top5": 90.0, "many": top1, "medium": top1, "few": None, "head": top1, "tail": top1}


def _seed_run(seed, pair, other, three):
    """One seed's figures as `run_study_seed` records them (no training)."""

    def fusion(names, chosen, top1):
        return {
            "branches": names,
            "chosen": chosen,
            "test": _accuracies(top1),
            "sweep": [
                {
                    "fusion": {n: 1.0 if i == k else 0.0 for k, n in enumerate(names)},
                    "val": 50.0,
                    "top1": 40 + i,
                }
                for i in range(len(names))
            ],
        }

    return {
        "seed": seed,
        "branches": {
            b: {"settings": {}, "own_head": 30.0 + seed, "features_alone": 50.0} for b in ("ce", "kps", "bs")
        },
        "fusions": {
            "pair": fusion(["kps", "ce"], {"kps": 0.6, "ce": 0.4}, pair),
            "other": fusion(["bs", "ce"], {"bs": 0.5, "ce": 0.5}, other),
            "three": fusion(["kps", "bs", "ce"], {"kps": 0.4, "bs": 0.3, "ce": 0.3}, three),
        },
        "seconds": {"stage1": 10.0, "sweeps": 2.0},
    }


def test_the_study_compares_each_fusion_with_the_reference_seed_by_seed(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(STUDY)
    study = read_study(str(path))
    runs = [_seed_run(0, 60.0, 59.0, 61.0), _seed_run(1, 58.0, 60.0, 59.5), _seed_run(2, 59.0, 57.0, 60.5)]
    body, markdown = summarise_study(study, "cpu", runs)
    three = body["fusions"]["three"]
    assert three["vs_reference"]["values"] == [1.0, 1.5, 1.5] and three["better_seeds"] == 3
    assert body["fusions"]["other"]["vs_reference"]["values"] == [-1.0, 2.0, -2.0]
    assert body["fusions"]["pair"]["vs_reference"] is None  # the reference itself
    assert body["better_than_reference_on_every_seed"] == ["three"]
    assert body["branches"]["ce"]["own_head"]["values"] == [30.0, 31.0, 32.0]
    assert body["seconds"] == {"stage1": 30.0, "sweeps": 6.0}
    assert "| three | 60.33 ± 0.76 |" in markdown and "| +1.33 ± 0.29 |" in markdown
    assert "Better than pair on every seed: three (+1.33 ± 0.29 points)." in markdown
    assert "kps 0.4, bs 0.3, ce 0.3; kps 0.4, bs 0.3, ce 0.3" in markdown  # the weights val chose, per seed
    assert "## Sweep: pair (2 fusions)\n\n| kps | ce | test top-1 | per seed |" in markdown
    # three branches: a triangle, kps's weight a row, bs's a column, ce's the rest
    assert (
        "## Sweep: three (3 fusions)\n\n| kps \\ bs | 0.0 | 1.0 |\n|---|---|---|\n| 0.0 | 42.00 | 41.00 |"
        in markdown
    )
    assert "| 1.0 | 40.00 |  |\n\n(ce: 1 minus the other two" in markdown
    runs[2]["fusions"]["three"]["test"]["top1"] = 58.0  # worse than the pair on seed 2
    body, markdown = summarise_study(study, "cpu", runs)
    assert body["better_than_reference_on_every_seed"] == []
    closest = "None is better than pair on every seed; the closest, three, differs by +0.50 ± 1.32 points"
    assert closest in markdown
    assert "(better on 2 of 3 seeds)" in markdown


def test_the_study_without_the_archive_says_so_and_runs_nothing(tmp_path):
    result = run_ffn(
        "bench",
        "accuracy",
        "--study",
        "branches",
        "--archive",
        tmp_path / "none.tar.gz",
        "--work-dir",
        tmp_path,
    )
    assert result.returncode == 0 and "skipped:" in result.stdout and "none.tar.gz not found" in result.stdout
    assert list(tmp_path.iterdir()) == []
