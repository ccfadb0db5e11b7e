from pathlib import Path

import pytest
import yaml

from ffn_dist.config import ConfigError, describe_settings, load_config, save_config
from ffn_dist.fusion import equal_weights

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIGS_DIR.glob("*.yaml"))


def write(tmp_path, text) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_cover_the_three_paper_settings_the_fields_benchmarks_and_the_demo():
    names = {p.stem for p in CONFIGS}
    paper = {"demo", "cifar10_lt_r32", "cifar100_lt_r32", "imagenet_lt_r50"}
    assert paper | {"imagenet_lt_x50", "inat2018_r50", "places_lt_r152"} == names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    saved = save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(saved) == cfg


def test_paper_recipes_match_the_spec():
    c10 = load_config(CONFIGS[[p.name for p in CONFIGS].index("cifar10_lt_r32.yaml")])
    c100 = load_config(CONFIGS[[p.name for p in CONFIGS].index("cifar100_lt_r32.yaml")])
    inet = load_config(CONFIGS[[p.name for p in CONFIGS].index("imagenet_lt_r50.yaml")])
    assert (c10.stage1.kps_max_m, c100.stage1.kps_max_m, inet.stage1.kps_max_m) == (0.2, 0.5, 0.35)
    assert (c10.stage2.fusion, c100.stage2.fusion) == ({"kps": 0.5, "ce": 0.5}, {"kps": 0.9, "ce": 0.1})
    assert inet.stage2.fusion == {"kps": 0.9, "ce": 0.1}
    assert (c10.model.arch, inet.model.arch) == ("resnet32", "resnet50")
    assert c10.stage1.lr_milestones == [160, 180] and c10.stage1.lr_factors == [0.1, 0.01]
    assert inet.stage1.warmup_epochs == 0 and inet.stage1.lr_milestones == [120, 160]
    assert inet.stage1.weight_decay == 1e-4 and c10.stage1.weight_decay == 2e-4
    assert inet.data.num_classes == 1000 and c100.data.num_classes == 100


def test_overrides_are_typed_and_applied():
    cfg = load_config(
        None,
        [
            "stage1.lr=0.05",
            "data.batch_size=16",
            "stage1.weight_decay=5e-4",
            "data.val_split=val.txt",
            "stage1.lr_milestones=[3, 7]",
            "stage1.lr_factors=[0.1, 0.01]",
        ],
    )
    assert cfg.stage1.lr == 0.05 and cfg.data.batch_size == 16
    assert cfg.stage1.weight_decay == 5e-4 and cfg.data.val_split == "val.txt"
    assert cfg.stage1.lr_milestones == [3, 7]


def test_unknown_key_names_full_path_and_suggests_nearest(tmp_path):
    path = write(tmp_path, "stage1:\n  epocs: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "stage1.epocs" in message
    assert "did you mean 'stage1.epochs'" in message


def test_unknown_override_suggests_nearest():
    with pytest.raises(ConfigError, match=r"data\.bach_size.*did you mean 'data\.batch_size'"):
        load_config(None, ["data.bach_size=3"])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("data.batch_size=abc", r"data\.batch_size: expected int, got 'abc'"),
        ("data.batch_size=1.5", r"data\.batch_size: expected int, got 1.5"),
        ("data.batch_size=0", r"data\.batch_size: got 0, expected a value >= 1"),
        ("stage1.lr=0", r"stage1\.lr: got 0.0, expected a value > 0"),
        ("stage1.momentum=1.5", r"stage1\.momentum: got 1.5, expected a value <= 1"),
        ("data.backend=pil", r"data\.backend: got 'pil', allowed values: dali, torch, memory"),
        (
            "model.arch=vgg",
            r"model\.arch: got 'vgg', allowed values: resnet32, resnet18, .*, wide_resnet50_2",
        ),
        ("data.mean=[0.5]", r"data\.mean: expected 3 values"),
        ("data.mean=fast", r"data\.mean: expected list of float"),
        ("stage1.lr_factors=[0.1]", r"stage1\.lr_factors: expected one factor per milestone"),
        ("stage1.lr_milestones=[180, 160]", r"strictly increasing"),
        ("data.resize_size=16", r"data\.resize_size: must be >= image_size"),
        ("dist.zero_stage=3", r"dist\.zero_stage: got 3, expected a value <= 2"),
        ("data=3", r"data: expected a mapping"),
        ("stage2.fusion={kps: 0.7, ce: 0.5}", r"stage2\.fusion: the fusion weights must sum to 1, got 0.7"),
        ("stage2.fusion.kps=-0.5", r"stage2\.fusion\.kps: got -0.5, expected a value >= 0.0"),
        (
            "stage2.fusion={kps: 0.5, ce: 0.5, bs: 0}",
            r"stage2\.fusion\.bs: not a branch; the fusion weighs each branch once",
        ),
        (
            "stage2.fusion={kps: 1.0}",
            r"stage2\.fusion\.ce: no weight for this branch; the fusion weighs each branch once",
        ),
        ("stage2.fusion={KPS: 1.0}", r"stage2\.fusion: names are lower-case letters, digits and _"),
        ("stage2.fusion=0.5", r"stage2\.fusion: expected a mapping of name: float"),
        ("stage2.w1=0.7", r"stage2\.w1: no longer a setting; it is now stage2\.fusion\.kps"),
        (
            "branches.kps.loss=arcface",
            r"branches\.kps\.loss: got 'arcface', allowed values: ce, kps, ldam, balanced_softmax, focal",
        ),
        ("branches.ce.head=mlp", r"branches\.ce\.head: got 'mlp', allowed values: linear, cosine"),
        ("branches.ce.loss=ldam", r"branches\.ce\.head: loss ldam puts its margin on cosine logits"),
        ("branches.kps.drw=true", r"branches\.kps\.drw: deferred re-weighting applies to .* not to kps"),
        ("branches.kps.sampler=uniform", r"branches\.kps\.sampler: got 'uniform', allowed values: instance"),
        ("branches.kps.processes=0", r"branches\.kps\.processes: got 0, expected a value >= 1"),
        ("branches={ce: {}}", r"branches: FFN fuses two branches or more .*; got ce$"),
        ("branches.Kps.loss=ce", r"branches: names are lower-case letters"),
        ("branches.ce=3", r"branches\.ce: expected a mapping"),
        ("branches.kps.margin=0.3", r"branches\.kps\.margin: unknown key"),
        ("dist.kps_ranks=3", r"dist\.kps_ranks: no longer a setting; it is now branches\.kps\.processes"),
        ("stage1.class_balanced_beta=1", r"stage1\.class_balanced_beta: got 1.0, expected a value < 1"),
    ],
)
def test_bad_values_are_refused_with_key_given_and_allowed(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_malformed_override_and_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="expected the form a.b.c=value"):
        load_config(None, ["stage1.lr"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))


def test_a_shipped_config_can_be_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: the name alone finds the file
    assert load_config("demo", ["seed=3"]) == load_config(CONFIGS_DIR / "demo.yaml", ["seed=3"])
    assert load_config("imagenet_lt_r50").model.arch == "resnet50"
    with pytest.raises(
        ConfigError,
        match=r"dem: config file not found \(the shipped configs can be named: "
        r"cifar100_lt_r32, cifar10_lt_r32, demo, imagenet_lt_r50, imagenet_lt_x50, inat2018_r50, "
        r"places_lt_r152\)",
    ):
        load_config("dem")


def test_saved_config_is_the_fully_resolved_one(tmp_path):
    cfg = load_config(write(tmp_path, "seed: 7\n"), ["stage2.fusion.kps=0.9", "stage2.fusion.ce=0.1"])
    saved = yaml.safe_load(save_config(cfg, tmp_path / "run" / "config.yaml").read_text())
    assert saved["seed"] == 7 and saved["stage2"]["fusion"] == {"kps": 0.9, "ce": 0.1}
    assert saved["data"]["batch_size"] == 64  # defaults are written out too


def test_overrides_may_follow_a_command_option(capsys):
    from ffn_dist.cli import parse

    args = parse(["train-classifier", "c.yaml", "seed=1", "--sweep", "kps=0:1:0.5", "stage2.epochs=2"])
    assert args.config == "c.yaml" and args.sweep == "kps=0:1:0.5"
    assert args.overrides == ["seed=1", "stage2.epochs=2"]
    args = parse(["train-backbones", "c.yaml", "--branch", "kps", "seed=2"])
    assert (args.overrides, args.branch) == (["seed=2"], "kps")
    for stray in ("oops", "--nope"):
        with pytest.raises(SystemExit):
            parse(["train-backbones", "c.yaml", "--branch", "kps", stray])
        assert f"unrecognized arguments: {stray}" in capsys.readouterr().err


def test_every_setting_is_explained_and_in_the_reference():
    from ffn_dist.config import describe_settings, settings_reference

    rows = describe_settings()
    assert rows and all(row["doc"] for row in rows), [row["key"] for row in rows if not row["doc"]]
    reference = settings_reference()
    assert all(f"| `{row['key']}` |" in reference for row in rows)
    row = "| `stage2.fusion` | `{ce: 0.5, kps: 0.5}` | mapping of name: float and >= 0.0 and <= 1.0 |"
    assert row in reference


def test_a_file_without_fusion_weighs_its_branches_equally_and_an_old_one_keeps_its_w1(tmp_path):
    listed = "branches:\n  ce: {}\n  kps: {loss: kps, head: cosine}\n"
    assert load_config(write(tmp_path, listed)).stage2.fusion == {"ce": 0.5, "kps": 0.5}
    old = write(tmp_path, "stage2:\n  w1: 0.8\n  w2: 0.2\n")  # a run's frozen config of an earlier release
    assert load_config(old).stage2.fusion == {"kps": 0.8, "ce": 0.2}
    w1_alone = write(tmp_path, "stage2:\n  w1: 0.9\n")  # w2 left out: 1 - w1
    assert load_config(w1_alone).stage2.fusion == {"kps": 0.9, "ce": 0.1}
    assert equal_weights(3) == [0.333333, 0.333333, 0.333334] and sum(equal_weights(3)) == pytest.approx(1.0)


def test_show_config_explain_and_version(tmp_path):
    from tests.conftest import run_ffn

    shown = run_ffn("show-config", "demo", "stage1.lr=0.05", "--explain")
    assert shown.returncode == 0, shown.stderr
    explained = "stage1.lr: 0.05  # the recipe's base learning rate, for the batch data.batch_size\n"
    assert explained + "    allowed: float and > 0.0" in shown.stdout
    version = run_ffn("--version")
    assert version.returncode == 0 and version.stdout.strip().startswith("ffn-dist ")


def test_branches_are_settings_each_and_a_file_without_them_trains_the_papers_pair(tmp_path):
    cfg = load_config("demo", ["branches.kps.loss=balanced_softmax", "branches.ce.sampler=sqrt"])
    assert list(cfg.branches) == ["ce", "kps"]
    assert (cfg.branches["kps"].loss, cfg.branches["kps"].head) == ("balanced_softmax", "cosine")
    assert (cfg.branches["ce"].loss, cfg.branches["ce"].sampler) == ("ce", "sqrt")
    bare = load_config(write(tmp_path, "stage1:\n  epochs: 3\n"), ["branches.kps.processes=3"])
    assert {n: (b.loss, b.head, b.processes) for n, b in bare.branches.items()} == {
        "ce": ("ce", "linear", None),
        "kps": ("kps", "cosine", 3),
    }
    rows = {row["key"]: row for row in describe_settings(cfg)}
    assert rows["branches.kps.loss"]["value"] == "balanced_softmax"
    assert "ldam" in rows["branches.kps.loss"]["allowed"]


def test_a_file_of_an_earlier_release_reads_its_kps_ranks_as_the_kps_branchs_processes(tmp_path):
    assert load_config(write(tmp_path, "dist:\n  kps_ranks: 3\n")).branches["kps"].processes == 3
    assert load_config(write(tmp_path, "dist:\n  kps_ranks: null\n")).branches["kps"].processes is None
