"""Many hosts for real: a cluster of 2 hosts made of namespaces (launchers/local_slurm.sh
start DIR --nodes 2), each with its own hostname, address in 198.18.0.0/15 and slurmd, on a
bridge with no uplink. The run directory is the machine's one file system, as NFS is.

The 2-host runs (SLURM, torchrun, DeepSpeed, and with 10 ms on every link) must compute what
the same config computes on one host, to the bit; a host lost in stage 1 or in the cache
ends the job within dist.timeout_s and the run resumes on the host left; a host that does
not resolve or a blocked port fails in one line naming both. Where namespaces cannot be made
the tests skip, saying why.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIG, REPO, cache_overrides, run_ffn

SCRIPT = REPO / "launchers" / "local_slurm.sh"
PYTHON = sys.executable
# ce spans both hosts (ranks 0-2 of 4), so its DDP all-reduce crosses the bridge.
SPANNING = ("branches.ce.processes=3", "data.batch_size=24", "stage2.epochs=2")


def script(*args, timeout=600, check=True):
    result = subprocess.run(
        ["bash", SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def cluster_names(directory: Path) -> tuple[set[str], set[str], set[str]]:
    """The namespaces, links and hosts-file folders of DIR's cluster that exist now."""
    tag = script("tag", directory).stdout.strip()
    namespaces = {
        line.split()[0]
        for line in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True
        ).stdout.splitlines()
    }
    links = set(
        re.findall(
            r"^\d+: ([^:@]+)",
            subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout,
            re.M,
        )
    )
    folders = {p.name for p in Path("/etc/netns").glob("*")} if Path("/etc/netns").is_dir() else set()
    mine = lambda names: {n for n in names if tag in n}  # noqa: E731
    return mine(namespaces), mine(links), mine(folders)


@pytest.fixture(scope="module")
def cluster():
    directory = Path(tempfile.mkdtemp(prefix="ffn-cluster-"))
    directory.chmod(0o711)  # munged (user munge) reaches its socket
    started = script("start", directory, "--nodes", 2, check=False)
    if started.returncode == 3:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.skip(f"a cluster of namespaces cannot be made here: {started.stderr.strip()}")
    assert started.returncode == 0, started.stdout + started.stderr
    env = dict(os.environ)
    env.update(line.split("=", 1) for line in started.stdout.splitlines() if "=" in line)
    pids = [int(p.read_text()) for p in directory.glob("slurm*.pid")]
    assert len(pids) == 3  # slurmctld and a slurmd a host
    yield directory, env
    script("stop", directory, timeout=180)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert cluster_names(directory) == (set(), set(), set())  # nothing left behind
    shutil.rmtree(directory, ignore_errors=True)


def on_host(directory, host: int, *cmd, **kwargs) -> subprocess.Popen:
    """A process on one host of the cluster (its network, hostname and hosts file)."""
    return subprocess.Popen(
        ["bash", SCRIPT, "exec", directory, str(host), *map(str, cmd)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        **kwargs,
    )


def start_on_hosts(
    directory, port: int, *ffn_args, launcher="torch.distributed.run"
) -> list[subprocess.Popen]:
    """`torchrun --nnodes 2 --node-rank R --master-addr ffn-h0` on each host, 2 processes a host
    (`launcher` ffn_dist.torchrun: the same, a worker's error in one line)."""
    return [
        on_host(
            directory,
            rank,
            PYTHON,
            "-m",
            launcher,
            "--nnodes=2",
            f"--node-rank={rank}",
            "--master-addr=ffn-h0",
            f"--master-port={port}",
            "--nproc-per-node=2",
            "-m",
            "ffn_dist.cli",
            *ffn_args,
        )
        for rank in (0, 1)
    ]


def torchrun_on_hosts(directory, port: int, *ffn_args, timeout=600) -> list[str]:
    """`start_on_hosts`, each host's output once every process succeeded."""
    procs = start_on_hosts(directory, port, *ffn_args)
    outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-4000:]
    return outputs


def ffn(env, *args, timeout=900):
    return subprocess.run(
        [PYTHON, "-m", "ffn_dist.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def weights(run: Path) -> dict[str, dict]:
    return {
        b: torch.load(
            sorted((run / "stage1" / b).glob("epoch_*.pt"))[-1], map_location="cpu", weights_only=False
        )["model"]
        for b in ("ce", "kps")
    }


def assert_same_weights(a: Path, b: Path) -> None:
    for branch, (wa, wb) in zip(
        ("ce", "kps"), zip(weights(a).values(), weights(b).values(), strict=True), strict=True
    ):
        assert wa.keys() == wb.keys()
        differing = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not differing, f"{branch}: {differing[:5]} differ"


def report_figures(run: Path) -> dict:
    return json.loads((run / "report" / "report.json").read_text())["methods"]


@pytest.fixture(scope="module")
def one_host_run(tiny_root, tmp_path_factory) -> Path:
    """The reference: the same config by `ffn run` with 4 processes on this one host."""
    out = tmp_path_factory.mktemp("one-host") / "run"
    result = run_ffn("run", CONFIG, *cache_overrides(tiny_root, out, *SPANNING), "dist.nproc=4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[stage1] 4 process(es) on 1 host(s)" in result.stdout
    return out


def test_slurm_chain_on_two_hosts_equals_one_host(cluster, one_host_run, tiny_root, tmp_path):
    directory, env = cluster
    out = tmp_path / "run"
    args = cache_overrides(tiny_root, out, *SPANNING)
    result = ffn(env, "submit", CONFIG, *args, "dist.nproc=2", "--nodes", 2, "--wait")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logs = "".join(p.read_text() for p in (out / "slurm").rglob("*_log.out"))  # every task's
    # stage 1 and the cache ran with ranks on both hosts, one thread a process
    assert "[stage1] 4 process(es) on 2 host(s): ffn-h0 ranks 0-1, ffn-h1 ranks 2-3; 1 thread(s)" in logs
    assert "[cache] 4 process(es) on 2 host(s)" in logs
    wrote = re.findall(r"\[cache rank (\d)\] wrote (\d+) shard", logs)
    assert {rank for rank, n in wrote if int(n) > 0} >= {"0", "2"}  # shards from both hosts
    assert report_figures(out) == report_figures(one_host_run)  # to the digit
    assert_same_weights(out, one_host_run)
    status = ffn(env, "status", CONFIG, *args)
    assert re.search(r"stage1 .*\n\s+ran on ffn-h0 ranks 0,1, ffn-h1 ranks 2,3", status.stdout), status.stdout


def test_torchrun_on_two_hosts_equals_one_host(cluster, one_host_run, tiny_root, tmp_path):
    directory, _ = cluster
    out = tmp_path / "run"
    args = [CONFIG, *cache_overrides(tiny_root, out, *SPANNING)]
    first = torchrun_on_hosts(directory, 29611, "train-backbones", *args)
    assert "[stage1] 4 process(es) on 2 host(s)" in first[0]
    torchrun_on_hosts(directory, 29612, "cache-features", *args)
    finished = run_ffn("run", *args, "dist.nproc=4")  # the rest, here: stage 1 and the cache are current
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "stage1: complete, skipped" in finished.stdout and "cache: complete, skipped" in finished.stdout
    assert report_figures(out) == report_figures(one_host_run)
    assert_same_weights(out, one_host_run)


def netem(directory, delay: str | None) -> None:
    """Add (or remove) a delay on every host's link; skip where the kernel has no netem."""
    for link in script("links", directory).stdout.split():
        action = (
            ["add", "dev", link, "root", "netem", "delay", delay] if delay else ["del", "dev", link, "root"]
        )
        done = subprocess.run(["tc", "qdisc", *action], capture_output=True, text=True)
        if done.returncode != 0 and delay:
            netem(directory, None)
            pytest.skip(f"tc netem is not available in this kernel: {done.stderr.strip()}")


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_deepspeed_on_two_hosts_equals_one_host(cluster, zero_stage, tiny_root, tmp_path):
    directory, _ = cluster
    extra = (*SPANNING, "dist.engine=deepspeed", f"dist.zero_stage={zero_stage}")
    one, two = tmp_path / "one", tmp_path / "two"
    here = subprocess.run(
        [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=4",
            "-m",
            "ffn_dist.cli",
            "train-backbones",
            CONFIG,
            *cache_overrides(tiny_root, one, *extra),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert here.returncode == 0, here.stdout[-3000:] + here.stderr[-3000:]
    torchrun_on_hosts(
        directory, 29620 + zero_stage, "train-backbones", CONFIG, *cache_overrides(tiny_root, two, *extra)
    )
    assert_same_weights(one, two)


def test_stage1_across_links_of_10_ms_completes_and_equals_one_host(
    cluster, one_host_run, tiny_root, tmp_path
):
    directory, _ = cluster
    out = tmp_path / "run"
    netem(directory, "10ms")
    try:
        torchrun_on_hosts(
            directory, 29625, "train-backbones", CONFIG, *cache_overrides(tiny_root, out, *SPANNING)
        )
    finally:
        netem(directory, None)
    assert_same_weights(out, one_host_run)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_host_lost_in_stage1_under_slurm_requeues_and_finishes(cluster, tiny_root, tmp_path):
    directory, env = cluster
    out = tmp_path / "run"
    args = [
        *cache_overrides(tiny_root, out, "stage1.epochs=8", "stage2.epochs=2"),
        "dist.nproc=2",
        "launch.min_nodes=1",
    ]
    chain = subprocess.Popen(
        [PYTHON, "-m", "ffn_dist.cli", "submit", CONFIG, *args, "--nodes", "2", "--wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        wait_for(
            lambda: (out / "stage1" / "kps" / "epoch_0002.pt").exists() or chain.poll() is not None,
            300,
            "a checkpoint",
        )
        assert chain.poll() is None, chain.communicate()
        lost_at = time.time()
        script("kill-host", directory, 1)  # ffn-h1 dies: its slurmd, step daemons and ranks 2-3
        stdout, stderr = chain.communicate(timeout=600)
    finally:
        script("start-host", directory, 1)  # back for the tests after this one
    assert chain.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "requeued after a node was lost; may now resume on 1 to 2 node(s)" in stdout
    logs = "".join(p.read_text() for p in sorted((out / "slurm" / "stage1").glob("*_log.out")))
    assert "[stage1] 2 process(es) on 1 host(s): ffn-h0 ranks 0-1" in logs  # resumed on the host left
    assert re.search(r"\[kps\] resuming from .*epoch_000[2-7]\.pt", logs), logs
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    failed = next(h for h in history if h["stage"] == "stage1" and h["event"] == "failed")
    assert failed["lost_host"] == "ffn-h1" and failed["lost_ranks"] == [2, 3]
    # the survivors saw it within dist.timeout_s of the loss
    from datetime import datetime

    assert datetime.fromisoformat(failed["time"]).timestamp() - lost_at < 300
    status = ffn(env, "status", CONFIG, *args, "--verify")  # every checkpoint and shard verifies
    assert status.returncode == 0, status.stdout + status.stderr
    assert re.search(r"host ffn-h1 lost at \S+ \(ranks 2, 3\)", status.stdout), status.stdout
    assert status.stdout.count("COMPLETED") == 4 and (out / "report" / "report.json").is_file()


def cut_link(directory, host: int, up: bool) -> None:
    link = script("links", directory).stdout.split()[host]
    subprocess.run(["ip", "link", "set", link, "up" if up else "down"], check=True)


def test_a_host_cut_off_under_torchrun_ends_every_process_in_time_and_resumes(cluster, tiny_root, tmp_path):
    directory, _ = cluster
    out, timeout_s = tmp_path / "run", 20
    # ce spans the hosts (its all-reduce stops at the cut); kps, on ffn-h1 alone, goes on to the
    # next world-wide collective.
    settings = cache_overrides(tiny_root, out, *SPANNING, "stage1.epochs=8")
    args = ["train-backbones", CONFIG, *settings, f"dist.timeout_s={timeout_s}"]
    procs = start_on_hosts(directory, 29631, *args, launcher="ffn_dist.torchrun")
    try:
        wait_for(lambda: (out / "stage1" / "ce" / "epoch_0002.pt").exists(), 300, "a checkpoint")
        cut_link(directory, 1, up=False)  # no RST, no FIN: only the timeout tells
        cut = time.time()
        outputs = [proc.communicate(timeout=timeout_s * 6)[0] for proc in procs]
        ended = time.time() - cut
    finally:
        cut_link(directory, 1, up=True)
        for proc in procs:
            proc.kill()
    assert all(proc.returncode != 0 for proc in procs)
    # every process on every host gone within the timeout, plus torchrun's own grace to stop its workers
    assert ended < timeout_s + 45, (ended, outputs)
    assert re.search(r"error: lost (host ffn-h\d|a peer)", "".join(outputs)), outputs
    resumed = subprocess.run(  # stage 1 again, on the host left
        [
            "bash",
            SCRIPT,
            "exec",
            directory,
            "0",
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "ffn_dist.cli",
            *args,
            "branches.ce.processes=1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert re.search(r"\[ce\] resuming from .*epoch_000[2-7]\.pt", resumed.stdout), resumed.stdout
    assert "[stage1] 2 process(es) on 1 host(s): ffn-h0 ranks 0-1" in resumed.stdout


def test_a_host_lost_in_the_cache_keeps_its_shards(cluster, stage1_run, tiny_root, tmp_path):
    directory, _ = cluster
    out = Path(shutil.copytree(stage1_run, tmp_path / "run"))
    args = [
        CONFIG,
        *cache_overrides(tiny_root, out, "cache.train_views=40", "cache.shard_rows=8"),
        "dist.timeout_s=10",
    ]
    procs = start_on_hosts(directory, 29641, "cache-features", *args, launcher="ffn_dist.torchrun")
    shards = lambda: sorted((out / "cache").rglob("part*.safetensors"))  # noqa: E731
    # Each rank writes its own shards with no collective until the end: a host cut off would go
    # on writing to the shared file system, so this host dies instead.
    try:
        wait_for(lambda: len(shards()) >= 16, 300, "some shards")
        script("kill-host", directory, 1)
        started = time.time()
        output = procs[0].communicate(timeout=120)[0]
        assert time.time() - started < 10 + 30, output
    finally:
        script("start-host", directory, 1)
    kept = {p: p.stat().st_mtime_ns for p in shards()}
    assert kept and procs[0].returncode != 0
    again = run_ffn("cache-features", *args[:-1])  # here, one process: only what is missing
    assert again.returncode == 0, again.stderr[-3000:]
    written = int(re.search(r"\[cache rank 0\] wrote (\d+) shard", again.stdout).group(1))
    total = len(shards())
    # the shards of the lost ranks, and at most one of each that was being written when it died
    assert 0 < total - len(kept) <= written <= total - len(kept) + 2, (written, total, len(kept))
    unchanged = [p for p, t in kept.items() if p.stat().st_mtime_ns == t]
    assert len(unchanged) >= len(kept) - 2
    status = run_ffn("status", *args[:-1], "--verify")
    assert re.search(r"cache\s+complete", status.stdout), status.stdout


def test_an_unresolvable_host_and_a_blocked_port_fail_in_one_line(cluster, stage1_run, tiny_root, tmp_path):
    directory, _ = cluster
    args = ["cache-features", CONFIG, *cache_overrides(tiny_root, tmp_path / "run"), "dist.timeout_s=10"]
    env = ("env", "RANK=1", "WORLD_SIZE=2", "LOCAL_RANK=0", "LOCAL_WORLD_SIZE=1")
    started = time.time()
    lost = on_host(
        directory, 1, *env, "MASTER_ADDR=ffn-h9", "MASTER_PORT=29651", PYTHON, "-m", "ffn_dist.cli", *args
    )
    output = lost.communicate(timeout=60)[0]
    assert lost.returncode != 0 and time.time() - started < 30
    last = output.strip().splitlines()[-1]
    assert last.startswith(
        "error: dist: the rendezvous host ffn-h9 (MASTER_ADDR, port 29651) does not resolve"
    ), output
    assert "on rank 1 on ffn-h1" in last
    # The port dropped on ffn-h0 (a firewall inside that host): rank 1 fails within the timeout.
    script("block-port", directory, 0, 29652)
    started = time.time()
    blocked = on_host(
        directory, 1, *env, "MASTER_ADDR=ffn-h0", "MASTER_PORT=29652", PYTHON, "-m", "ffn_dist.cli", *args
    )
    output = blocked.communicate(timeout=120)[0]
    took = time.time() - started
    assert blocked.returncode != 0 and took < 10 + 30, took
    last = output.strip().splitlines()[-1]
    assert "could not reach the rendezvous at ffn-h0:29652 within dist.timeout_s=10 s" in last, output
    assert last.startswith("error: dist: rank 1 on ffn-h1")


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_stop_removes_a_crashed_cluster():
    """`stop` after a crash (pid files gone): every namespace, link, hosts file and daemon of
    that cluster is removed, by name and by the files it was started with."""
    directory = Path(tempfile.mkdtemp(prefix="ffn-crashed-"))
    directory.chmod(0o711)
    started = script("start", directory, "--nodes", 2, check=False)
    if started.returncode == 3:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.skip(f"a cluster of namespaces cannot be made here: {started.stderr.strip()}")
    assert started.returncode == 0, started.stderr
    pids = [int(p.read_text()) for p in directory.glob("*.pid")] + [
        int((directory / "munge" / "munged.pid").read_text())
    ]
    for pid_file in [*directory.glob("*.pid"), directory / "munge" / "munged.pid"]:
        pid_file.unlink()  # as a crash of the tests leaves it: no pid files to go by
    assert all(cluster_names(directory))
    script("stop", directory)
    assert cluster_names(directory) == (set(), set(), set())
    wait_for(lambda: not [pid for pid in pids if running(pid)], 10, f"the daemons {pids} to end")
    shutil.rmtree(directory, ignore_errors=True)
