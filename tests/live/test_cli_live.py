"""The khmon command line on the live kernel: doctor, record -p, report FILE, simulate FILE,
and a recorder killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.live
KHMON = [sys.executable, "-m", "khmon"]


def _wait_attached(proc: subprocess.Popen[str], timeout: float = 300) -> None:
    """Read the recorder's stderr until it says it is attached."""
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "attached to" in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"recorder exited with {proc.returncode}")
    raise AssertionError("recorder did not attach")


def test_doctor_exits_zero_and_shows_the_tiers() -> None:
    out = subprocess.run([*KHMON, "doctor", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    checks = doc["checks"]
    tps = {c["item"] for c in checks if c["area"] == "tracepoint" and c["state"] == "ok"}
    assert "mm_khugepaged_scan_pmd" in tps
    assert "mm_collapse_huge_page" in tps
    assert doc["live_capture"] is True
    assert doc["tiers"]["tracepoints"] is True
    # The order field is there exactly when the format files say so.
    formats = Path("/sys/kernel/tracing/events/huge_memory/mm_collapse_huge_page/format")
    assert doc["tiers"]["order"] == ("order;" in formats.read_text())
    # What the machine running the suite is known to offer (set by tests/vm/suite.sh for
    # the guest kernels and by .ci/run for CI's locked-down host).
    expected = [t for t in os.environ.get("KHMON_EXPECT_TIERS", "").split(",") if t]
    for tier in expected:
        if tier == "tracepoints_only":
            assert not doc["tiers"].get("kfunc") and not doc["tiers"].get("kprobe"), doc["tiers"]
        else:
            assert doc["tiers"].get(tier) is True, (tier, doc["tiers"])


def _report(path: Path) -> tuple[dict, str]:
    out = subprocess.run([*KHMON, "report", str(path), "--json"], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout), out.stderr


def test_record_with_pid_filter_then_report(tmp_path: Path, fast_khugepaged: dict) -> None:
    rec = tmp_path / "run.khrec"
    work = subprocess.Popen([sys.executable, "-m", "khmon.workload", "--pmds", "8",
                             "--pattern", "full", "--wait-signal"], stdout=subprocess.PIPE,
                            text=True)
    assert work.stdout is not None
    assert json.loads(work.stdout.readline())["waiting"]  # its signal mask is set
    recorder = subprocess.Popen([*KHMON, "record", "-o", str(rec), "-p", str(work.pid)],
                                stderr=subprocess.PIPE, text=True)
    try:
        _wait_attached(recorder)
        work.send_signal(signal.SIGUSR1)
        out, _ = work.communicate(timeout=300)
        recorder.send_signal(signal.SIGINT)
        assert recorder.wait(timeout=60) == 0
    finally:
        for p in (work, recorder):
            if p.poll() is None:
                p.kill()
    done = json.loads(out.splitlines()[-1])
    report, stderr = _report(rec)
    assert "warning" not in stderr
    assert report["window"]["complete"] is True
    assert report["filter"]["pid"] == work.pid
    # Only the workload's mm (and isolate events, which carry no mm) pass the filter.
    assert {p["pid"] for p in report["processes"]} <= {work.pid, None}
    mine = next(p for p in report["processes"] if p["pid"] == work.pid)
    assert mine["comm"] == "khmon-workload"
    assert mine["collapses"] == done["collapsed_pmds"] == 8
    # `khmon simulate` on that recording, with its own settings: where function probes saw
    # the attempts, the v19 model reproduces every pass and the 8 PMD collapses; without
    # them (pagemap bitmaps alone) it can only predict, and where pagemap read no PMD (each
    # was collapsed before its read) there is nothing to replay: exit 2, said in one line.
    sim = subprocess.run([*KHMON, "simulate", str(rec), "--json"], capture_output=True,
                         text=True)
    if not report["pmds"]:
        assert sim.returncode == 2 and "has nothing to replay" in sim.stderr, sim.stderr
        assert len(sim.stderr.splitlines()) == 1
        return
    assert sim.returncode == 0, sim.stderr
    r = json.loads(sim.stdout)
    if r["attempts_seen"]:
        assert r["passes"] >= 8 and r["mismatched"] == 0, r["mismatches"][:2]
        assert r["kernel"]["collapses_by_order"] == r["predicted"]["collapses_by_order"] == {
            "9": 8}
    else:
        assert r["kernel"] is None and r["mismatched"] is None


def test_recorder_killed_still_reads(tmp_path: Path, fast_khugepaged: dict) -> None:
    rec = tmp_path / "killed.khrec"
    recorder = subprocess.Popen([*KHMON, "record", "-o", str(rec)], stderr=subprocess.PIPE,
                                text=True)
    try:
        _wait_attached(recorder)
        subprocess.run([sys.executable, "-m", "khmon.workload", "--pmds", "4"], check=True,
                       capture_output=True, timeout=120)
        time.sleep(1.5)  # a stats part after the workload's collapses
    finally:
        recorder.send_signal(signal.SIGKILL)
        recorder.wait()
    report, stderr = _report(rec)
    assert "warning:" in stderr and ("no end part" in stderr or "cut short" in stderr)
    assert report["window"]["complete"] is False
    assert report["collapse"]["succeeded"] >= 4
