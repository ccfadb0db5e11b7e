"""One run directory, one job: the hold a job takes on its `output_dir` before writing into it.

The hold is `output_dir/.hold.json`: who holds it (host, pid, SLURM job, command, since), a
random token, and a heartbeat the holder refreshes every HEARTBEAT_S seconds. A second job
that finds the directory held stops at once (exit status 1), naming the holder. The parts of
one job share its hold through the token: `ffn run` passes it to the torchrun processes it
starts (FFN_RUN_HOLD), `ffn submit` to the chain's SLURM jobs (a requeued job keeps it), and
in a torchrun job rank 0 takes the hold and tells the other ranks whether it got it.

A holder that died leaves its hold behind; it is taken over, saying so, when its process is
gone (same host), when every SLURM job of its chain has ended, or, seen from another host
(a shared file system), when its heartbeat is older than STALE_AFTER_S.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ffn_dist.errors import FFNError
from ffn_dist.files import write_json
from ffn_dist.locks import exclusive

HOLD_FILE = ".hold.json"
TOKEN_ENV = "FFN_RUN_HOLD"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
ACTIVE_SLURM_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
}


class RunDirHeld(FFNError):
    """Another job holds the run directory."""

    exit_status = 1


def _stamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def _process_start(pid: int) -> str | None:
    """The start time of a process (Linux), to tell a live holder from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def hold_path(directory: str | Path) -> Path:
    return Path(directory) / HOLD_FILE


def read_hold(directory: str | Path) -> dict | None:
    try:
        return json.loads(hold_path(directory).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, OSError):
        return {"unreadable": True, "heartbeat": 0.0, "since": 0.0, "token": None}


def describe_holder(holder: dict) -> str:
    """'`ffn train-backbones` (pid 123 on host h, SLURM job 45) since 2026-11-28T09:01:02+00:00'."""
    if holder.get("unreadable"):
        return "a hold file that cannot be read"
    where = [f"pid {holder['pid']} on host {holder['host']}"]
    if holder.get("slurm_job_id"):
        where.append(f"SLURM job {holder['slurm_job_id']}")
    if holder.get("slurm_jobs"):
        where.append(f"SLURM chain {', '.join(holder['slurm_jobs'])}")
    return f"`{holder['command']}` ({', '.join(where)}) since {_stamp(holder['since'])}"


def _slurm_active(job_ids: list[str]) -> bool | None:
    """Whether any of the jobs is queued or running; None where SLURM cannot be asked."""
    if not shutil.which("squeue"):
        return None
    result = subprocess.run(
        ["squeue", "-h", "-t", "all", "-o", "%T", "-j", ",".join(job_ids)], capture_output=True, text=True
    )
    if result.returncode != 0:
        return None
    return any(state.strip() in ACTIVE_SLURM_STATES for state in result.stdout.splitlines())


def holder_gone(holder: dict) -> str | None:
    """Why the holder no longer holds the directory, or None while it (may) still run."""
    if holder.get("unreadable"):
        return "its hold file cannot be read"
    if holder.get("slurm_jobs"):
        active = _slurm_active(holder["slurm_jobs"])
        if active is not None:
            return None if active else f"its SLURM jobs {', '.join(holder['slurm_jobs'])} have ended"
    elif holder["host"] == socket.gethostname():
        start = _process_start(holder["pid"])
        if start is None or (holder.get("pid_start") and start != holder["pid_start"]):
            return f"process {holder['pid']} is gone"
        return None
    age = time.time() - holder["heartbeat"]
    return (
        f"no heartbeat for {age:.0f} s (the limit is {STALE_AFTER_S:.0f} s)" if age > STALE_AFTER_S else None
    )


class Hold:
    """This process's hold on a run directory (taken, or joined as part of the holding job)."""

    def __init__(self, directory: Path, record: dict, owner: bool):
        self.directory, self.record, self.owner = directory, record, owner
        self._stop = threading.Event()
        self._beat = None
        if owner:
            self._beat = threading.Thread(target=self._heartbeat, name="ffn-run-hold", daemon=True)
            self._beat.start()

    @property
    def token(self) -> str:
        return self.record["token"]

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.update()

    def update(self, **fields) -> None:
        """Refresh the heartbeat (and set `fields`), if the hold is still ours."""
        with exclusive(self.directory / ".hold.lock"):
            current = read_hold(self.directory)
            if current is None or current.get("token") != self.token:
                return
            self.record.update(fields, heartbeat=time.time())
            write_json(hold_path(self.directory), self.record)

    def release(self) -> None:
        """The owner ends the hold; a process that joined it leaves it to the owner."""
        if self.owner:
            end_hold(self.directory, self.token)
            self._forget()

    def hand_over(self, **fields) -> None:
        """Leave the hold to the jobs that carry its token (a SLURM chain), recording `fields`."""
        self.update(**fields)
        self._forget()

    def _forget(self) -> None:
        """Stop the heartbeat, and stop passing the token to the processes this one starts."""
        self._stop.set()
        self.owner = False
        if os.environ.get(TOKEN_ENV) == self.token:
            del os.environ[TOKEN_ENV]


def end_hold(directory: str | Path, token: str) -> None:
    """Remove the hold if it is still the one `token` names (the last job of a chain ends it)."""
    with exclusive(Path(directory) / ".hold.lock"):
        current = read_hold(directory)
        if current is not None and current.get("token") == token:
            hold_path(directory).unlink()


def take_hold(directory: str | Path, command: str, token: str | None = None) -> Hold:
    """Take the run directory, join the hold of the job this process belongs to (its token
    is `token` or $FFN_RUN_HOLD), or raise RunDirHeld naming the holder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    token = token or os.environ.get(TOKEN_ENV)
    with exclusive(directory / ".hold.lock"):
        current = read_hold(directory)
        if current is not None and token and current.get("token") == token:
            return Hold(directory, current, owner=False)
        if current is not None:
            gone = holder_gone(current)
            if gone is None:
                raise RunDirHeld(
                    f"{directory}: in use by {describe_holder(current)}; wait for it to end or stop it, "
                    "or give this job another output_dir"
                )
            print(f"{directory}: taking over from {describe_holder(current)}: {gone}", flush=True)
        now = time.time()
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "command": command,
            "since": now,
            "heartbeat": now,
            "token": token or secrets.token_hex(8),
        }
        write_json(hold_path(directory), record)
    # Where another host took it in the same instant (flock may not reach across hosts), the
    # later rename wins and the other job finds out here.
    time.sleep(0.05)
    current = read_hold(directory)
    if current is None or current.get("token") != record["token"]:
        raise RunDirHeld(f"{directory}: taken by {describe_holder(current or record)} at the same moment")
    os.environ[TOKEN_ENV] = record["token"]  # the processes this one starts share the hold
    return Hold(directory, record, owner=True)


def command_line() -> str:
    """How this process was started, as a user would type it (`ffn run demo`)."""
    args = sys.argv[1:] if Path(sys.argv[0]).name in ("cli.py", "__main__.py", "ffn") else sys.argv
    return " ".join(["ffn", *args]) if args else "ffn"


def holds_run_dir(stage):
    """A stage function of one process, run with its config's output_dir held."""

    @functools.wraps(stage)
    def held(cfg, *args, **kwargs):
        with holding(cfg.output_dir):
            return stage(cfg, *args, **kwargs)

    return held


@contextmanager
def holding(directory: str | Path, world=None):
    """The run directory held for the duration of the block. In a world of several ranks
    rank 0 takes (or joins) the hold and every rank learns the outcome, so that no rank
    writes when the job was refused."""
    taken = []

    def take() -> str:
        taken.append(take_hold(directory, command_line()))
        return taken[0].token

    if world is None or world.size == 1:
        take()
    else:
        from ffn_dist.distributed import rank0_decides  # torch: only a job of several processes

        rank0_decides(world, take)  # raises the refusal on every rank
    try:
        yield taken[0] if taken else None
    finally:
        if taken:
            taken[0].release()
