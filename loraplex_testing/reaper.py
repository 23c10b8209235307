"""Stopping the process groups the test/demo services run in, and a guard that
stops them when the Python process that started them dies.

Why a guard process: a fixture's `finally` does not run when the test process is
killed (SIGKILL, an OOM kill, a CI timeout), and TorchServe's processes are not
our children anyway (launcher -> Java frontend -> Python workers), so
`PR_SET_PDEATHSIG` on the launcher would not reach them. The guard is a small
`python -m loraplex_testing.reaper PGID` child in its own session that blocks
reading a pipe whose only writer is the owner; when the owner exits for any
reason the kernel closes the pipe, the read returns, and the guard stops the
group (SIGTERM, then SIGKILL). A normal `stop()` stops the group itself and then
closes the pipe, and the guard finds nothing left to do.

Limit: a child forked with the pipe inherited (`os.fork`, multiprocessing's
"fork" start method) keeps the pipe open, so the guard then waits for that child
too. `subprocess` closes it in children (close_fds).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(pgid: int, timeout: float = 30, leader: subprocess.Popen | None = None) -> None:
    """SIGTERM every process of group `pgid`, wait up to `timeout` s for all of them, then SIGKILL.
    `leader`: the group's leader where it is our child, reaped here (a zombie still counts as a member)."""
    if pgid <= 1 or not group_alive(pgid):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if leader is not None:
            leader.poll()
        if not group_alive(pgid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class Guard:
    """Stops process group `pgid` when this process dies or `release()` is called."""

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.proc: subprocess.Popen | None = subprocess.Popen(
            [sys.executable, "-m", "loraplex_testing.reaper", str(pgid)], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def release(self) -> None:
        """Close the pipe (the guard stops whatever is left of the group) and reap the guard."""
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=60)
        self.proc = None


def _guard_main(pgid: int) -> None:
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        sys.stdin.buffer.read()  # returns at EOF: the owner released us or died
    kill_group(pgid)


if __name__ == "__main__":
    _guard_main(int(sys.argv[1]))
