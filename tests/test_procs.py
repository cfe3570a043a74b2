"""megadiff.utils.procs.kill_marked on real processes: it stops exactly those whose command line names the marker."""

from __future__ import annotations

import subprocess
import sys
import uuid

from megadiff.utils.procs import kill_marked


def test_kill_marked_stops_only_the_marked_processes():
    marker = f"/tmp/mdray-{uuid.uuid4().hex}"
    sleep = "import time; time.sleep(120)"
    marked = [subprocess.Popen([sys.executable, "-c", sleep, marker]) for _ in range(2)]
    other = subprocess.Popen([sys.executable, "-c", sleep, "/tmp/someone-elses-ray"])
    try:
        assert kill_marked(marker) == 2
        assert [p.wait(timeout=30) for p in marked] == [-9, -9]
        assert other.poll() is None  # unmarked: still running
        assert kill_marked(marker) == 0
    finally:
        for p in (*marked, other):
            p.kill()
            p.wait(timeout=30)
