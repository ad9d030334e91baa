"""khmon.service as `make install-service` installs it, under a real systemd (PID 1 in the
tests/vm guest), checked against what systemd itself reports (ActiveState, MainPID,
NRestarts, Result, the journal, systemd-analyze) and the kernel's own counters.

In order, on one service: started (active only once the probes are attached: Type=notify),
the endpoint shows a workload's collapses, SIGKILL is followed by a restart and the flight
recording from before it reads, SIGSTOP by a watchdog restart, the journal has the attach
line, the running unit's security score, and `systemctl stop` ends it cleanly with its BPF
programs unloaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from khmon.kernel import sysfs
from khmon.workload import COMM, Workloads
from tests.support.daemon import bpf_programs_of

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[2]
KHMON = ROOT / ".venv" / "bin" / "khmon"
UNIT = "khmon.service"
ENDPOINT = "http://127.0.0.1:10464/metrics"  # the installed defaults (systemd/khmon.env)
RECORD_DIR = Path("/var/lib/khmon")
# A start compiles the probes: 30-75 s under TCG, more with the rest of the suite around it.
START_TIMEOUT = 420.0
PMDS = 4
FAST = {"enabled": "madvise", "khugepaged/scan_sleep_millisecs": "100"}
SUCCEEDED = re.compile(r'^khmon_collapse_attempts_total\{kind="(?:anon|file)",order="\d+",'
                       r'status="succeeded"\} (\S+)$', re.M)


def systemctl(*args: str, check: bool = True) -> str:
    p = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"systemctl {' '.join(args)}: exit {p.returncode}: {p.stderr}"
                             f"\n{_status()}")
    return p.stdout


def prop(name: str) -> str:
    return systemctl("show", "-P", name, UNIT).strip()


def _status() -> str:
    st = subprocess.run(["systemctl", "status", "--no-pager", "-n", "30", UNIT],
                        capture_output=True, text=True)
    return st.stdout + st.stderr


def journal(*args: str) -> str:
    return subprocess.run(["journalctl", "--no-pager", "-u", UNIT, *args],
                          capture_output=True, text=True, check=True).stdout


def metrics() -> str:
    with urllib.request.urlopen(ENDPOINT, timeout=10) as r:
        return r.read().decode()


def value(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in the exposition"
    return float(m.group(1))


def succeeded(text: str) -> float:
    return sum(float(v) for v in SUCCEEDED.findall(text))


def wait_active(old_pid: str | None, timeout: float = START_TIMEOUT) -> tuple[str, float]:
    """Until the unit is active with a main process other than `old_pid`; (pid, seconds)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        pid = prop("MainPID")
        if prop("ActiveState") == "active" and pid not in ("0", old_pid):
            return pid, time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"{UNIT} not active again within {timeout:.0f} s\n{_status()}")


@pytest.fixture(scope="module")
def installed() -> Iterator[None]:
    p = subprocess.run(["make", "install-service"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "systemd reloaded" in p.stderr
    yield
    systemctl("stop", UNIT, check=False)


def test_start_is_active_only_after_ready(installed: None, timings: dict[str, float]) -> None:
    t0 = time.monotonic()
    systemctl("start", "--no-block", UNIT)
    seen_activating = answered_unattached = False
    while (state := prop("ActiveState")) != "active":
        assert state in ("activating", "inactive"), f"{state}\n{_status()}"
        seen_activating |= state == "activating"
        if state == "activating":  # bound before the compile: it answers, not yet attached
            with contextlib.suppress(OSError):
                answered_unattached |= "khmon_probe_attached" not in metrics()
        assert time.monotonic() - t0 < START_TIMEOUT, _status()
        time.sleep(0.2)
    timings["start: systemctl start to active (s)"] = time.monotonic() - t0
    assert seen_activating and answered_unattached
    text = metrics()
    attached = re.findall(r"^khmon_probe_attached\{(.*)\} (\S+)$", text, re.M)
    assert attached and all(v == "1.0" for _labels, v in attached), attached
    assert value(text, 'khmon_feature_enabled{feature="function_probes"}') == 1
    status = prop("StatusText")  # READY's "attached in ..." or a later "... events/s ..."
    assert status.startswith("attached in") or " lost;" in status, status
    # systemd logged "Started" when READY=1 came, after the daemon's attach line
    entries = [json.loads(line) for line in journal("-o", "json").splitlines()]
    attach = next(int(e["__MONOTONIC_TIMESTAMP"]) for e in entries
                  if "khmon: attached to" in str(e.get("MESSAGE")))
    started = next(int(e["__MONOTONIC_TIMESTAMP"]) for e in entries
                   if str(e.get("MESSAGE", "")).startswith("Started khmon.service"))
    assert attach <= started


def test_the_endpoint_shows_a_workloads_collapses(installed: None,
                                                  timings: dict[str, float]) -> None:
    before = metrics()
    k0, p0 = succeeded(before), value(before, "khmon_khugepaged_pages_collapsed_total")
    work = Workloads([["--pmds", str(PMDS), "--pattern", "full", "--timeout", "300"]])
    t0 = time.monotonic()
    try:
        with sysfs.override(FAST):
            work()
            while not work():
                assert time.monotonic() - t0 < 400, "the workload did not finish"
                time.sleep(0.5)
            result = work.results()[0]
            assert result["collapsed_pmds"] == PMDS  # smaps: every PMD is a huge page
            deadline = time.monotonic() + 120
            while True:  # khmon's counts lag the kernel's counter by a snapshot or two
                now = metrics()
                khmon = succeeded(now) - k0
                kernel = value(now, "khmon_khugepaged_pages_collapsed_total") - p0
                if khmon == kernel >= PMDS or time.monotonic() > deadline:
                    break
                time.sleep(1)
    finally:
        work.kill()
    timings["workload: its collapses in the endpoint (s)"] = time.monotonic() - t0
    assert khmon == kernel >= PMDS
    assert value(now, f'khmon_process_collapses_total{{comm="{COMM.decode()}"}}') == PMDS


def test_sigkill_restarts_and_the_recording_from_before_reads(
        installed: None, timings: dict[str, float]) -> None:
    old = prop("MainPID")
    recording = (RECORD_DIR / "current.khrec").resolve()
    assert prop("NRestarts") == "0"
    os.kill(int(old), signal.SIGKILL)
    _pid, secs = wait_active(old)
    timings["SIGKILL: to active again, with a compile (s)"] = secs
    assert prop("NRestarts") == "1"
    p = subprocess.run([str(KHMON), "report", str(recording), "--json"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert not r["window"]["complete"]
    assert any("no end part" in w or "cut short" in w for w in r["warnings"]), r["warnings"]
    assert r["collapse"]["succeeded"] >= PMDS  # the workload ran before the kill
    assert (RECORD_DIR / "current.khrec").resolve() != recording  # the new daemon's file


def test_sigstop_is_followed_by_a_watchdog_restart(installed: None,
                                                   timings: dict[str, float]) -> None:
    old = prop("MainPID")
    os.kill(int(old), signal.SIGSTOP)
    _pid, secs = wait_active(old)
    timings["SIGSTOP: watchdog restart to active (s)"] = secs
    assert prop("NRestarts") == "2"
    assert "Watchdog timeout" in journal("--since", "-15min")


def test_the_journal_has_the_attach_line(installed: None) -> None:
    lines = journal("-o", "cat")
    assert len(re.findall(r"^khmon: attached to \d+ probes in [\d.]+ s", lines, re.M)) == 3
    # priorities reach journald (the <N> prefixes): warnings alone show the function-probe
    # refusals where there are any, never the attach line
    assert "attached to" not in journal("-p", "warning", "-o", "cat")


def test_security_score_of_the_running_unit(installed: None, timings: dict[str, float]) -> None:
    out = subprocess.run(["systemd-analyze", "security", "--no-pager", UNIT],
                         capture_output=True, text=True, check=True).stdout
    score = float(re.search(r"Overall exposure level for khmon.service: ([\d.]+)", out).group(1))
    timings["systemd-analyze security (exposure)"] = score
    assert score <= 3.5, out


def test_systemctl_stop_is_clean(installed: None, timings: dict[str, float]) -> None:
    pid = prop("MainPID")
    progs = bpf_programs_of(int(pid))
    assert progs
    # what MemoryMax= is set from: the cgroup's peak (the compile, page cache included)
    peak = Path(f"/sys/fs/cgroup/system.slice/{UNIT}/memory.peak")
    if peak.exists():
        timings["memory.peak of the unit (MiB)"] = int(peak.read_text()) / 2**20
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            timings["VmRSS of the daemon at the end (MiB)"] = int(line.split()[1]) / 1024
    t0 = time.monotonic()
    systemctl("stop", UNIT)
    timings["systemctl stop (s)"] = time.monotonic() - t0
    assert prop("ActiveState") == "inactive"
    assert prop("Result") == "success" and prop("ExecMainStatus") == "0"
    assert "khmon: stopped after" in journal("-o", "cat")
    left = json.loads(subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True,
                                     text=True, check=True).stdout)
    assert not progs & {p["id"] for p in left}
    assert not Path("/run/khmon/khmon.sock").exists()
