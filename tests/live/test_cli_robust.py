"""A capture survives what happens around it (issue 10): a closed or full stderr (item 2),
SIGHUP from a closed terminal (item 3), -p naming no process (item 11) and Ctrl-C while it
compiles (item 15). Nothing already recorded is lost: every recording ends with its drain
and its end part."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.live import UNDER_TCG

pytestmark = pytest.mark.live
KHMON = [sys.executable, "-m", "khmon"]
# Every case here is a khmon process of its own, so a compile: 35 to 75 s in the QEMU/TCG
# guests. What is tested is user space (signals, stderr), so there each behaviour is proven
# once and its variants run on the host only (deselected in the guests, tests/support/live.py).
HOST_ONLY = pytest.mark.host_only


def _report(path: Path) -> dict:
    p = subprocess.run([*KHMON, "report", str(path), "--json"], capture_output=True,
                       text=True)
    assert p.returncode == 0 and p.stderr == "", p.stderr  # no warning: complete
    return json.loads(p.stdout)


def _until_attached(proc: subprocess.Popen[str], timeout: float = 300) -> list[str]:
    """The recorder's stderr lines up to 'attached to'."""
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "attached to" in line:
            return lines
        if not line and proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}: {lines}")
    raise AssertionError("did not attach")


@pytest.mark.parametrize("stderr", ["closed pipe", pytest.param("/dev/full", marks=HOST_ONLY)])
def test_a_broken_stderr_does_not_end_the_recording(tmp_path: Path, stderr: str) -> None:
    """`record ... 2>&1 >/dev/null | head -1` and `2>/dev/full` ended the capture at its
    first progress line: no end part, the kernel's counts never drained."""
    rec = tmp_path / "run.khrec"
    args = [*KHMON, "record", "-o", str(rec), "--duration", "7"]  # a progress line at 5 s
    if stderr == "closed pipe":
        r, w = os.pipe()
        os.close(r)
        try:
            p = subprocess.run(args, stderr=w, stdout=subprocess.DEVNULL, timeout=300)
        finally:
            os.close(w)
    else:
        with open("/dev/full", "w") as full:
            p = subprocess.run(args, stderr=full, stdout=subprocess.DEVNULL, timeout=300)
    assert p.returncode == 0
    report = _report(rec)
    assert report["window"]["complete"] is True and report["window"]["seconds"] >= 7


def test_sighup_ends_a_recording_cleanly(tmp_path: Path) -> None:
    rec = tmp_path / "hup.khrec"
    proc = subprocess.Popen([*KHMON, "record", "-o", str(rec)], stderr=subprocess.PIPE,
                            text=True)
    try:
        _until_attached(proc)
        time.sleep(1.5)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _report(rec)["window"]["complete"] is True


@HOST_ONLY
def test_sighup_ends_a_live_report_with_its_report() -> None:
    proc = subprocess.Popen([*KHMON, "report", "--live", "--duration", "120", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _until_attached(proc)
        time.sleep(1.5)
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["window"]["complete"] is True and report["window"]["seconds"] < 60


def _absent_pid() -> int:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    return next(p for p in range(pid_max - 1, 1, -1) if not Path(f"/proc/{p}").exists())


def test_pid_filter_naming_no_process(tmp_path: Path) -> None:
    """It recorded nothing and said nothing."""
    pid = _absent_pid()
    rec = tmp_path / "nobody.khrec"
    p = subprocess.run([*KHMON, "record", "-o", str(rec), "-p", str(pid), "--duration", "1"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert "Traceback" not in p.stderr
    assert lines[0] == (f"khmon: warning: no process {pid} is running: -p {pid} records only "
                        "events of a process with that id, should one start")
    assert any(ln.startswith(f"khmon: warning: process {pid} never appeared") for ln in lines)
    assert lines.index(next(ln for ln in lines if "attached to" in ln)) > 0  # warned first
    assert _report(rec)["filter"]["pid"] == pid


def test_ctrl_c_while_compiling(tmp_path: Path) -> None:
    """SIGINT at moments during start-up and the compile: exit 130 with one line before the
    capture is set up, else a clean (short) recording; never a traceback."""
    for delay in (1.0,) if UNDER_TCG else (0.3, 0.6, 1.0):
        rec = tmp_path / f"int{delay}.khrec"
        proc = subprocess.Popen([*KHMON, "record", "-o", str(rec), "--quiet"],
                                stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err, (delay, err)
        assert proc.returncode in (0, 130), (delay, proc.returncode, err)
        if proc.returncode == 0:
            assert _report(rec)["window"]["complete"] is True
        else:
            assert err.splitlines() == ["khmon: interrupted"] or err.startswith(
                "khmon: interrupted while starting"), err


def test_a_recording_through_a_pipe() -> None:
    """`khmon record -o - | khmon report -`: a recording is a stream both ways."""
    rec = subprocess.Popen([*KHMON, "record", "-o", "-", "--duration", "2", "--quiet"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rep = subprocess.run([*KHMON, "report", "-", "--json"], stdin=rec.stdout,
                         capture_output=True, text=True, timeout=300)
    assert rec.stdout is not None
    rec.stdout.close()
    assert rec.wait(timeout=60) == 0
    assert rep.returncode == 0 and rep.stderr == "", rep.stderr
    assert json.loads(rep.stdout)["window"]["complete"] is True
