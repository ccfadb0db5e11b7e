"""Stopping on a signal.

Stage 1 stops cooperatively: a signal (SLURM's pre-emption warning USR2, or SIGTERM) only
raises a flag; the training loops check it at step boundaries, agree on it within their
process group, checkpoint, and stop. Saving from inside a signal handler would race the
collectives a sharded checkpoint needs. Every other command turns SIGTERM and SIGINT into
`Terminated` in its main thread, so that its cleanup (the run directory's hold, child
processes) runs before it exits with 128 + the signal number.

Processes a command starts (torchrun and its workers) run in their own process group and
die with it: a signal to the command is passed on to the whole group, which has GRACE_S
seconds to stop before it is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

GRACE_S = 30.0
PR_SET_PDEATHSIG = 1

_requested = threading.Event()


class StopRequested(Exception):
    """Raised once a stage has checkpointed after a stop request."""


class Terminated(Exception):
    """The process was asked to stop by `signum`."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def request_stop(signum=None, frame=None) -> None:
    _requested.set()


def stop_requested() -> bool:
    return _requested.is_set()


def stop_on(signum: int):
    """Route `signum` to `request_stop`; returns the handler it replaces."""
    return signal.signal(signum, request_stop)


def _terminate(signum, frame):
    raise Terminated(signum)


def terminate_on(signals=(signal.SIGTERM, signal.SIGINT)) -> None:
    """Raise Terminated in the main thread when one of `signals` arrives."""
    for signum in signals:
        signal.signal(signum, _terminate)


# Started as `python -c DIE_WITH_PARENT PARENT_PID COMMAND...`: asks Linux for SIGTERM when its
# parent dies (even by SIGKILL), then becomes COMMAND. A preexec_fn would do it without the
# extra interpreter, but runs Python between fork and exec, unsafe beside the parent's threads.
DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    f"ctypes.CDLL(None).prctl({PR_SET_PDEATHSIG}, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(128 + signal.SIGTERM)  # it died already\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _signal_group(child: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(child.pid, signum)
    except ProcessLookupError:
        pass


def run_group(command: list[str], stdout=None) -> int:
    """Run `command` as its own process group and return its exit status (its output to
    `stdout`, a file, where given). If this process
    is stopped meanwhile (Terminated), the group gets SIGTERM (stage 1 then checkpoints),
    GRACE_S seconds, then SIGKILL; nothing of it outlives this call."""
    child = subprocess.Popen(
        [sys.executable, "-c", DIE_WITH_PARENT, str(os.getpid()), *command],
        start_new_session=True,
        stdout=stdout,
    )
    try:
        return child.wait()
    except Terminated:
        _signal_group(child, signal.SIGTERM)
        try:
            child.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            print(f"stopping: the job's processes did not end within {GRACE_S:g} s; killing them", flush=True)
        raise
    finally:
        _signal_group(child, signal.SIGKILL)  # workers left behind by a dead agent, if any
        child.wait()
