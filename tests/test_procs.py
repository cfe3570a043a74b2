"""megadiff.utils.procs.kill_marked on real processes: it stops exactly those whose command line names the marker,
or that hold a file open under a marker directory (what Ray's renamed agents and workers do)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

from megadiff.utils.procs import kill_marked

SLEEP = "import time; time.sleep(120)"


def started(p: subprocess.Popen, marker: str) -> subprocess.Popen:
    """``p`` once its exec is done: right after fork, /proc/<pid>/cmdline still shows this test's command line."""
    deadline = time.monotonic() + 30
    while marker.encode() not in open(f"/proc/{p.pid}/cmdline", "rb").read():
        assert time.monotonic() < deadline, f"process {p.pid} did not start"
        time.sleep(0.01)
    return p


def test_kill_marked_stops_only_the_marked_processes():
    marker = f"/tmp/mdray-{uuid.uuid4().hex}"
    marked = [started(subprocess.Popen([sys.executable, "-c", SLEEP, marker]), marker) for _ in range(2)]
    other = started(subprocess.Popen([sys.executable, "-c", SLEEP, "/tmp/someone-elses-ray"]), "someone-elses-ray")
    try:
        assert kill_marked(marker) == 2
        assert [p.wait(timeout=30) for p in marked] == [-9, -9]
        assert other.poll() is None  # unmarked: still running
        assert kill_marked(marker) == 0
    finally:
        for p in (*marked, other):
            p.kill()
            p.wait(timeout=30)


def test_kill_marked_finds_a_renamed_process_by_its_open_file(tmp_path):
    """A process whose command line no longer names the dir (like ``ray::DashboardAgent``) but that keeps
    a log file under it open is stopped; one with a file open elsewhere is not."""
    mine, elsewhere = tmp_path / "mdray-x", tmp_path / "other"
    mine.mkdir(), elsewhere.mkdir()
    code = "import sys, time; f = open(sys.stdin.readline().strip(), 'w'); print('open', flush=True); time.sleep(120)"
    procs = []
    for d in (mine, elsewhere):
        p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        p.stdin.write(f"{d / 'logs.out'}\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "open"  # the file is open: the command line never named the dir
        procs.append(p)
    try:
        assert kill_marked(str(mine)) == 1
        assert procs[0].wait(timeout=30) == -9
        assert procs[1].poll() is None
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
