"""Stopping the processes a job started when it has no handle on them (a private Ray's daemons and workers)."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def kill_marked(*markers: str) -> int:
    """SIGKILL every process (but this one) whose command line contains one of ``markers`` — e.g. the private
    temp dir a Ray cluster was started with, so that other users' Ray is never touched. Returns how many."""
    killed = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if any(m.encode() in cmd for m in markers):
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
    return killed
