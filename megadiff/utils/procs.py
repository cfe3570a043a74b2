"""Stopping the processes a job started when it has no handle on them (a private Ray's daemons and workers)."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def _marked(pid: str, markers: tuple[bytes, ...], paths: tuple[str, ...]) -> bool:
    """The process's command line names a marker, or (for a marker that is a directory) it holds a file
    under it open: Ray's agents and workers rename themselves (``ray::DashboardAgent``) but keep their
    log files in the session's temp dir open."""
    if any(m in Path(f"/proc/{pid}/cmdline").read_bytes() for m in markers):
        return True
    if not paths:
        return False
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            if os.readlink(f"{fd_dir}/{fd}").startswith(paths):
                return True
    return False


def kill_marked(*markers: str) -> int:
    """SIGKILL every process (but this one) whose command line contains one of ``markers``, or that holds
    a file open under a marker that is a directory — e.g. the private temp dir a Ray cluster was started
    with, so that other users' Ray is never touched. Returns how many."""
    raw = tuple(m.encode() for m in markers)
    paths = tuple(os.path.realpath(m).rstrip("/") + "/" for m in markers if os.path.isdir(m))
    killed = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if _marked(pid, raw, paths):
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
    return killed
