"""`khmon top` driven as a person would, in a real terminal (tmux at 160x50), on this kernel.

A workload named `[/]` (a comm that crashes markup) faults in PMDS fully populated PMDs and
hands them to khugepaged, which collapses every one: smaps and the kernel's
khugepaged/pages_collapsed say so. The screen must show the comm drawn literally, its
collapse count equal to the kernel's pages_collapsed delta, the header's check mark (khmon's
collapses equal the kernel's since the capture began) and, on a kernel whose tracepoints
carry `order` (7.2), the order rows of a userfaultfd workload's cascade with khmon's attempts
equal to the kernel's per-size collapse_alloc. Then q: exit status 0, the terminal as it was
(no alternate screen, cursor shown, no mouse or keypad mode, stty cooked), no BPF program of
khmon top's left loaded, THP settings as before.

Once with a capture of its own (--local: a child process compiles and attaches), once
against a running `khmon daemon` (tests/support/daemon.py), where `-b -n 3 --json` is
checked too. Runs on the host and in both guests (tests/vm/suite.sh).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from khmon.kernel import sysfs
from khmon.outputs.top.rates import counters
from khmon.workload import Workloads
from tests.support.daemon import KHMON, bpf_programs_of, running_daemon
from tests.support.live import UNDER_TCG
from tests.support.thp import mthp_knobs
from tests.support.tmux import TopPane

PMDS = 8
COMM = "[/]"
ATTACH_S = 300.0 if UNDER_TCG else 60.0  # a bcc compile: ~0.5 s on the host, 30-75 s under TCG
WORK_S = 180.0 if UNDER_TCG else 60.0
FAST = {"enabled": "madvise", "khugepaged/scan_sleep_millisecs": "100"}
UFFD_ORDERS = range(4, 10)
FORMAT = Path("/sys/kernel/tracing/events/huge_memory/mm_collapse_huge_page/format")


def has_order() -> bool:
    """The mTHP collapse series' `order` field in the collapse tracepoint (Linux 7.2)."""
    try:
        return "unsigned int order" in FORMAT.read_text()
    except OSError:
        return False


def pages_collapsed() -> int:
    return sysfs.read_counters()["khugepaged/pages_collapsed"]


QUIET_S = 2.0


def quiet_pages_collapsed(timeout: float = 60.0) -> int:
    """pages_collapsed once it has not changed for QUIET_S (or after `timeout`). Not a
    full scan's end: with nothing registered for khugepaged, full_scans never moves."""
    value, since = pages_collapsed(), time.monotonic()
    deadline = since + timeout
    while time.monotonic() - since < QUIET_S and time.monotonic() < deadline:
        time.sleep(0.1)
        now = pages_collapsed()
        if now != value:
            value, since = now, time.monotonic()
    return value


def loaded_programs() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return {p["id"] for p in json.loads(out or "[]")}


def process_row(screen: str, comm: str) -> list[str] | None:
    """The process table's row of `comm`: PID COMM SCANS/s ATT/s SCANS ATTEMPTS COLLAPSES UFFD."""
    for line in screen.splitlines():
        cols = line.split()
        if len(cols) >= 8 and cols[1] == comm and cols[0].isdigit():
            return [c.replace(",", "") for c in cols[:8]]
    return None


def order_rows(screen: str) -> dict[int, list[str]]:
    """The collapse-by-order table's rows by order (left half of the screen)."""
    rows = {}
    for line in screen.splitlines():
        m = re.match(r"\s+(\d)\*?\s+(\d+[KM])\s+(.*)", line[:100])
        if m:
            rows[int(m.group(1))] = [c.replace(",", "") for c in m.group(3).split()]
    return rows


def agrees(screen: str, delta: int) -> bool:
    row = process_row(screen, COMM)
    return row is not None and row[6] == str(delta) and "✓" in screen


def orders_agree(screen: str) -> bool:
    """Order rows 9..4 shown, each with khmon's attempts (column ATTEMPTS) equal to the
    kernel's collapse_alloc for that size (KERNEL ALLOC)."""
    rows = order_rows(screen)
    return set(UFFD_ORDERS) <= set(rows) and all(rows[o][2] == rows[o][4] for o in UFFD_ORDERS)


@pytest.fixture
def settings() -> Iterator[dict[str, str]]:
    """THP settings before the test, checked unchanged after it."""
    before = sysfs.read_settings()
    yield before
    assert sysfs.read_settings() == before


def watch_workload(pane: TopPane) -> str:
    """Run the `[/]` workload (and on 7.2 the uffd cascade) with khugepaged fast; the screen
    once it agrees with the kernel."""
    order = has_order()
    knobs = {**FAST, **(mthp_knobs(UFFD_ORDERS) if order else {})}
    runs = [["--pmds", str(PMDS), "--pattern", "full", "--comm", COMM,
             "--timeout", str(WORK_S)]]
    if order:
        runs.append(["--pmds", "1", "--pattern", "every4th-empty", "--uffd",
                     "--timeout", str(WORK_S)])
    with sysfs.override(knobs):
        # A collapse khugepaged began under the old settings (THP always in the guests: the
        # daemon's or an earlier test's heap) may still end after they changed (one landed
        # inside the window once): start it once pages_collapsed has held for QUIET_S.
        before = quiet_pages_collapsed()
        work = Workloads(runs)
        try:
            work()
            deadline = time.monotonic() + WORK_S + 30
            while not work() and time.monotonic() < deadline:
                time.sleep(0.2)
            results = work.results()
        finally:
            work.kill()
        delta = pages_collapsed() - before
    assert results[0]["collapsed_pmds"] == PMDS == delta, (results, delta)
    # the next refreshes bring the workload's last events (and its exit)
    screen = pane.wait_for(lambda s: agrees(s, delta), 30,
                           f"{COMM} with {delta} collapses and the check mark")
    if order:
        screen = pane.wait_for(orders_agree, 30, "order rows 9..4 with attempts = collapse_alloc")
    else:
        assert set(order_rows(screen)) == {9}, screen  # the one PMD-sized row, 9*
    return screen


def test_top_local_capture(tmp_path: Path, settings: dict[str, str]) -> None:
    with TopPane(["--local"], tmp_path) as pane:
        first = pane.wait_for(lambda s: "compiling" in s or "attached to" in s, ATTACH_S,
                              "the first screen")
        print(f"\nfirst paint: {time.monotonic() - pane.started:.1f} s ({first.splitlines()[0]})")
        pane.wait_for(lambda s: re.search(r"attached to \d+ tracepoints", s) is not None,
                      ATTACH_S, "attached")
        progs = set().union(*(bpf_programs_of(p) for p in pane.pids()))
        assert progs, "the capture child holds no BPF programs"
        screen = watch_workload(pane)
        print(f"\n--- khmon top --local at 160x50 ({os.uname().release}):\n{screen}")
        t0 = time.monotonic()
        pane.keys("q")
        assert pane.exit_status(ATTACH_S) == 0
        print(f"quit to exit status: {time.monotonic() - t0:.2f} s")
        assert pane.terminal_restored() == []
    assert not progs & loaded_programs(), "khmon top left BPF programs loaded"


def test_top_against_a_running_daemon(tmp_path: Path, settings: dict[str, str]) -> None:
    with running_daemon() as d:
        with TopPane(["--socket", str(d.socket)], tmp_path) as pane:
            pane.wait_for(lambda s: "live" in s and "/s" in s, ATTACH_S,
                          "live rates from the daemon")
            assert not set().union(*(bpf_programs_of(p) for p in pane.pids())), \
                "khmon top loaded BPF programs of its own with a daemon running"
            screen = watch_workload(pane)
            assert f"daemon {d.socket} (pid {d.pid})" in screen
            print(f"\n--- khmon top --socket at 160x50 ({os.uname().release}):\n{screen}")
            pane.keys("q")
            assert pane.exit_status(30) == 0
            assert pane.terminal_restored() == []
        p = subprocess.run([str(KHMON), "top", "--socket", str(d.socket), "-b", "-n", "3",
                            "--json"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and p.stderr == "", p.stderr
        snaps = [json.loads(line) for line in p.stdout.splitlines()]
        assert len(snaps) == 3 and len({s["stream"] for s in snaps}) == 1
        assert [s["seq"] for s in snaps] == sorted({s["seq"] for s in snaps})
        for a, b in itertools.pairwise(snaps):
            ca, cb = counters(a["report"]), counters(b["report"])
            assert all(cb[k] >= v for k, v in ca.items() if not k.startswith("proc/") and k in cb)
        assert snaps[-1]["rates"]["scans"] is not None
        assert d.proc.poll() is None  # khmon top's clients never stop the daemon
