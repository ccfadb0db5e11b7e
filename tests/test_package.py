"""ffn-dist installs as a package, not only as a checkout: a wheel built from the repository
carries the configs and the SLURM helper script, under the project's own namespace."""

import json
import os
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import CONFIG, REPO, cache_overrides
from tests.test_run import SHORT


def test_the_wheel_runs_the_demo_from_an_empty_directory(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path, REPO],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = tmp_path.glob("ffn_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("demo", "cifar10_lt_r32", "cifar100_lt_r32", "imagenet_lt_r50"):
        assert f"ffn_dist/configs/{shipped}.yaml" in names
    assert "ffn_dist/configs/studies/branches.yaml" in names  # `ffn bench accuracy --study branches`
    assert {"ffn_dist/launchers/slurm.py", "ffn_dist/launchers/local_slurm.sh"} <= names
    assert not [n for n in names if n.split("/")[0] in ("launchers", "configs")]  # no generic top level

    # installed without its dependencies into a fresh target, beside the installed ones
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", site, wheel],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    empty = tmp_path / "empty"
    empty.mkdir()
    where = subprocess.run(
        [sys.executable, "-c", "import ffn_dist.launchers.slurm as s; print(s.__file__)"],
        capture_output=True,
        text=True,
        cwd=empty,
        env=env,
    )
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr

    run = subprocess.run(
        [sys.executable, "-m", "ffn_dist.cli", "run", "demo", *SHORT],
        capture_output=True,
        text=True,
        cwd=empty,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((empty / "runs" / "demo" / "report" / "report.json").read_text())
    assert list(report["methods"]) == ["CE", "KPS", "FFN (kps 0.5, ce 0.5)"]
    assert (empty / "data" / "demo" / "train.txt").is_file()  # the built-in data, written here


# The layers of docs/architecture.md ("Which way imports go"), bottom up: a module may import
# from its own layer and those below, never from above.
LAYERS = [
    {"errors", "files", "locks", "progress", "tables", "layout", "priors", "fusion", "registry"},
    {
        "data",
        "models",
        "losses",
        "metrics",
        "checkpoint",
        "cache",
        "distributed",
        "engines",
        "deepspeed_engine",
        "plots",
    },
    {"config"},
    {"run", "rundir", "stopping", "torchrun"},
    {"stages"},
    {"drivers", "plan", "probe", "predict", "bench", "cli", "launchers"},
]


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.startswith("ffn_dist.") else module
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_imports_flow_one_way():
    import ast

    found = []
    for path in [*(REPO / "ffn_dist").rglob("*.py"), *(REPO / "launchers").glob("*.py")]:
        parts = path.relative_to(REPO).with_suffix("").parts
        module = ".".join(["ffn_dist", *parts[1:]] if parts[0] == "ffn_dist" else ["ffn_dist", *parts])
        if module.endswith("__init__") or module == "ffn_dist":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ffn_dist."):
                target = node.module
            elif isinstance(node, ast.Import) and node.names[0].name.startswith("ffn_dist."):
                target = node.names[0].name
            else:
                continue
            if layer_of(target) > layer_of(module):
                found.append(f"{module} imports {target}")
    assert found == []


def test_no_module_but_the_config_names_a_branch():
    """The branches are the config's: no other module spells the paper's pair's names. They
    are also loss names, which the loss registry spells, and the rows of the paper's tables,
    which the CIFAR benchmark compares with (its reference figures)."""
    import ast

    from ffn_dist.config import paper_branches

    names = {case(name) for name in paper_branches() for case in (str.lower, str.upper)}
    spelled = []
    for path in [*(REPO / "ffn_dist").rglob("*.py"), *(REPO / "launchers").glob("*.py")]:
        if path.relative_to(REPO).as_posix() in (
            "ffn_dist/config.py",
            "ffn_dist/losses.py",
            "ffn_dist/registry.py",
            "ffn_dist/bench/accuracy.py",
        ):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                spelled.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}")
    assert not spelled, spelled


@pytest.mark.parametrize("command", ["--help", "show-config", "status", "status of a cached run"])
def test_a_command_that_reads_imports_no_torch(command, request, tmp_path):
    """`ffn --help`, `ffn show-config` and `ffn status` print a few lines: importing torch
    (and the training stack) would cost them seconds on a small machine. The status of a run
    with a cache runs the cache's completeness check."""
    config = [str(CONFIG), f"output_dir={tmp_path}"]
    if command == "status of a cached run":
        tiny, run = request.getfixturevalue("tiny_root"), request.getfixturevalue("cached_run")
        command, config = "status", [str(CONFIG), *cache_overrides(tiny, run)]
    args = [command] if command == "--help" else [command, *config]
    code = (
        "import sys\nfrom ffn_dist.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert "torch imported: False" in result.stderr, result.stderr[-2000:]
    assert "cache       complete" in result.stdout or "cached" not in request.node.name


def test_a_run_s_file_names_are_spelled_only_where_its_paths_are_built():
    """run/paths.py builds every path of a run (the cache's names: cache/); a module that
    spelled "report.json" itself would miss a rename there."""
    import ast

    names = {
        "report.json",
        "report.md",
        "model.json",
        "manifest.json",
        "result.json",
        "classifier.pt",
        "history.jsonl",
        "data_report.json",
        "plan.json",
    }
    homes = {"ffn_dist/run/paths.py", "ffn_dist/cache/store.py"}
    spelled = []
    for path in [*(REPO / "ffn_dist").rglob("*.py"), *(REPO / "launchers").glob("*.py")]:
        if path.relative_to(REPO).as_posix() in homes:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                spelled.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}")
    assert not spelled, spelled
