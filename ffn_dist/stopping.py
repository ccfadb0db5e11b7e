"""A cooperative stop: a signal handler only raises a flag; training loops check it at step
boundaries, agree on it within their process group, checkpoint, and stop.

This is how stage 1 honours SLURM's pre-emption / time-limit warning (USR2): saving from
inside a signal handler would race the collectives a sharded checkpoint needs.
"""

from __future__ import annotations

import signal
import threading

_requested = threading.Event()


class StopRequested(Exception):
    """Raised once a stage has checkpointed after a stop request."""


def request_stop(signum=None, frame=None) -> None:
    _requested.set()


def stop_requested() -> bool:
    return _requested.is_set()


def stop_on(signum: int):
    """Route `signum` to `request_stop`; returns the handler it replaces."""
    return signal.signal(signum, request_stop)
