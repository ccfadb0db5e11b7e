"""torchrun as `ffn run` starts it: the same launcher and arguments, quiet where the workers spoke.

A worker that stops on a user-facing error (a full disk, a diverged loss) prints one line
and exits non-zero; torchrun would add, for that same failure, its agent's log lines and a
traceback and failure table of its own. Here the exit status is passed on, and only a
worker that died without a word (killed by a signal) gets a line, naming its rank.
"""

from __future__ import annotations

import os
import sys


def command(nproc: int, *ffn_args: str) -> list[str]:
    """The argument list that runs `ffn FFN_ARGS...` on `nproc` processes of this machine
    through `main` (no shell: nothing is interpolated)."""
    launcher = [sys.executable, "-m", "ffn_dist.torchrun", "--standalone", f"--nproc-per-node={nproc}"]
    return [*launcher, "-m", "ffn_dist.cli", *ffn_args]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # read when torch's elastic loggers are made
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode < 0:
            print(f"error: rank {rank} was killed by {failure.signal_name()}", file=sys.stderr, flush=True)
            return 128 - failure.exitcode
        return failure.exitcode
    return 0


if __name__ == "__main__":
    sys.exit(main())
