"""The logic behind runs on several hosts, without hosts: how a lost peer is named, how the
threads are chosen, which host names are refused, what `ffn status` says of placements, and
how `ffn submit` asks for a range of nodes and shrinks a requeued job to it. The same paths
run for real on a cluster of namespaces in test_cluster.py."""

import datetime
import socket

import pytest
import torch

from ffn_dist import distributed
from ffn_dist.config import ConfigError, load_config
from ffn_dist.distributed import PeerLost, World, check_own_address, cpu_threads, describe_ranks, lost_peer
from ffn_dist.errors import FFNError
from ffn_dist.layout import Placement
from ffn_dist.run.history import log_event, placements
from tests.conftest import CONFIG

GLOO = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
    "[198.18.197.11]:20670. This is typically caused by a remote worker crashing."
)


def world_of_two_hosts(rank=0) -> World:
    hosts = ["ffn-h0", "ffn-h0", "ffn-h1", "ffn-h1"]
    return World(
        rank,
        4,
        rank % 2,
        torch.device("cpu"),
        datetime.timedelta(seconds=60),
        1,
        tuple(Placement(h, None) for h in hosts),
        ("198.18.197.10", "198.18.197.10", "198.18.197.11", "198.18.197.11"),
    )


def test_a_lost_peer_is_named_by_the_host_its_address_belongs_to():
    lost = lost_peer(world_of_two_hosts(rank=1), GLOO)
    assert (lost.host, lost.ranks) == ("ffn-h1", (2, 3))
    assert str(lost).startswith("lost host ffn-h1 (ranks 2-3) seen from rank 1 on ffn-h0: [/__w/")
    unknown = lost_peer(world_of_two_hosts(), "Timed out waiting 10000ms for recv operation to complete")
    assert unknown.host is None and "lost a peer of rank 0" in str(unknown)


def test_only_a_peer_error_becomes_peer_lost():
    world = world_of_two_hosts()
    with pytest.raises(PeerLost):
        with distributed.naming_lost_peers(world):
            raise RuntimeError(GLOO)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # an error of the code stays as it is
        with distributed.naming_lost_peers(world):
            raise RuntimeError("shape mismatch")
    assert issubclass(PeerLost, FFNError)  # printed in one line by the CLI


def test_ranks_and_the_world_are_described_per_host():
    assert describe_ranks((3,)) == "rank 3"
    assert describe_ranks((0, 1, 2)) == "ranks 0-2"
    assert describe_ranks((0, 2)) == "ranks 0, 2"
    assert (
        world_of_two_hosts()
        .describe()
        .startswith(
            "4 process(es) on 2 host(s): ffn-h0 ranks 0-1, ffn-h1 ranks 2-3; 1 thread(s) a process "
            "(a CPU world"
        )
    )


def test_a_cpu_world_of_several_processes_runs_one_thread_each():
    assert cpu_threads(torch.device("cpu"), 4) == 1
    assert cpu_threads(torch.device("cpu"), 1) is None  # a lone process uses every core
    assert cpu_threads(torch.device("cuda", 0), 8) is None  # the GPU computes; threads only feed it


@pytest.mark.parametrize(
    ("address", "refused"), [("127.0.1.1", "a loopback address"), ("", "does not resolve")]
)
def test_a_host_name_the_others_cannot_reach_is_refused(monkeypatch, address, refused):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setattr(socket, "gethostname", lambda: "node7")
    monkeypatch.setattr(distributed, "own_address", lambda: address)
    with pytest.raises(FFNError, match=f"node7 .*{refused}.*GLOO_SOCKET_IFNAME"):
        check_own_address()
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth1")  # the user chose the interface
    check_own_address()


def test_status_names_the_placements_and_the_hosts_lost(tmp_path):
    cfg = load_config(CONFIG, [f"output_dir={tmp_path}"])
    log_event(cfg, "stage1", "started")
    log_event(cfg, "stage1", "placed", hosts={"a": [0, 1], "b": [2, 3], "c": [4, 5]})
    log_event(cfg, "stage1", "failed", error="lost host b", lost_host="b", lost_ranks=[2, 3])
    log_event(
        cfg, "stage1", "failed", error="lost host b", lost_host="b", lost_ranks=[2, 3]
    )  # another survivor
    log_event(cfg, "stage1", "started")
    log_event(cfg, "stage1", "placed", hosts={"a": [0, 1]})  # c went too, unseen by a collective
    hosts, lost = placements(cfg, "stage1")
    assert hosts == {"a": [0, 1]}
    assert len(lost) == 2 and lost[0].startswith("host b lost at ") and lost[0].endswith("(ranks 2, 3)")
    assert lost[1].startswith("host c lost: in the attempt placed at ")


def test_min_nodes_asks_slurm_for_a_range():
    from launchers.slurm import chain, slurm_parameters

    cfg = load_config(CONFIG, ["launch.nodes=4", "launch.min_nodes=2"])
    stage1 = next(job for job in chain() if job[0].name == "stage1")
    assert slurm_parameters(cfg, stage1, None)["additional_parameters"]["nodes"] == "2-4"
    data = chain()[0]  # a one-task job: one node
    assert "nodes" not in slurm_parameters(cfg, data, None).get("additional_parameters", {})
    with pytest.raises(ConfigError, match="launch.min_nodes: at most launch.nodes \\(4\\), got 5"):
        load_config(CONFIG, ["launch.nodes=4", "launch.min_nodes=5"])


def test_a_requeued_job_waiting_for_a_lost_node_is_shrunk_to_the_range(monkeypatch):
    from launchers import slurm

    cfg = load_config(CONFIG, ["launch.nodes=2", "launch.min_nodes=1", "dist.nproc=2"])
    shown = {
        "JobState": "PENDING",
        "Restarts": "1",
        "Reason": "ReqNodeNotAvail,_UnavailableNodes:ffn-h1",
        "NumNodes": "2",
    }
    calls = []
    monkeypatch.setattr(slurm, "_scontrol_job", lambda job_id: dict(shown))
    monkeypatch.setattr("subprocess.run", lambda cmd, **kw: calls.append(cmd))
    watch = slurm._slurm_watch(cfg)
    assert watch("15") is True  # still queued
    assert calls == [["scontrol", "update", "JobId=15", "NumNodes=1-2", "NumTasks=2"]]
    shown.update(JobState="COMPLETED", Restarts="1", Reason="None", NumNodes="1")
    assert watch("15") is False
    shown.update(JobState="NODE_FAIL")  # SLURM may still requeue it: seen for a while first
    assert watch("16") is True
    shown.update(JobState="FAILED")
    assert watch("17") is False


def test_the_first_requeue_of_a_job_of_all_its_nodes_is_not_shrunk(monkeypatch):
    from launchers import slurm

    cfg = load_config(CONFIG, ["launch.nodes=2", "dist.nproc=2"])  # no min_nodes: all of them
    calls = []
    monkeypatch.setattr(
        slurm,
        "_scontrol_job",
        lambda job_id: {"JobState": "PENDING", "Restarts": "1", "Reason": "ReqNodeNotAvail", "NumNodes": "2"},
    )
    monkeypatch.setattr("subprocess.run", lambda cmd, **kw: calls.append(cmd))
    assert slurm._slurm_watch(cfg)("15") is True and calls == []  # it waits for its node, as SLURM left it


def test_the_timeout_is_a_setting_with_a_floor():
    assert load_config(CONFIG, ["dist.timeout_s=42"]).dist.timeout_s == 42
    with pytest.raises(ConfigError, match="dist.timeout_s"):
        load_config(CONFIG, ["dist.timeout_s=1"])
