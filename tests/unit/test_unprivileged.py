"""khmon run as an unprivileged user, for real (issue 10, item 1): privileges are dropped
with setpriv, not mocked. doctor runs to its end and shows what it could not read and why;
the capture commands say in one line what they need, and exit 1.

Dropping privileges needs root: outside CI these skip without it; in CI (CI=true, run as
root) they never skip, as the live tests do not.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from khcli import KHMON, one_error_line
from khdata import capture_header, stats_meta

from khmon.stream.recording import Part, Writer

IN_CI = os.environ.get("CI") == "true"
pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not IN_CI,
                                reason="dropping privileges needs root")
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
WITH_BPF_CAPS = [*NOBODY, "--inh-caps=+bpf,+perfmon", "--ambient-caps=+bpf,+perfmon"]
NEEDS = "live capture needs root, or CAP_BPF, CAP_PERFMON and read access to tracefs"


def as_user(*args: str, drop: list[str] = NOBODY) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*drop, *KHMON, *args], capture_output=True, text=True, timeout=120,
                       cwd="/", stdin=subprocess.DEVNULL)
    assert "cannot open" not in p.stderr and "Permission denied: '" not in p.stderr, (
        "the checkout and its .venv must be readable by nobody", p.stderr)
    return p


@pytest.mark.parametrize("args", [["doctor"], ["doctor", "--no-trial"]])
def test_doctor_runs_to_the_end(args: list[str]) -> None:
    p = as_user(*args)
    assert p.returncode == 1
    (line,) = p.stderr.splitlines()  # no traceback: one line
    assert line.startswith(f"khmon: live capture will not work: root: {NEEDS}: this process "
                           "(uid 65534) lacks CAP_BPF and CAP_PERFMON and read access to ")
    rows = p.stdout.splitlines()
    assert any(r.startswith("FAIL  kernel root ") for r in rows), p.stdout
    tracefs = next(r for r in rows if r.startswith("FAIL  tracefs tracepoints"))
    assert "Permission denied: tracefs is readable only by root (run khmon as root" in tracefs
    assert rows[-1].startswith("INFO  tier 3 bitmap sources"), rows[-1]  # ran to its end
    assert any(r.startswith("OK    btf /sys/kernel/btf/vmlinux") for r in rows)


def test_doctor_json() -> None:
    p = as_user("doctor", "--json")
    assert p.returncode == 1
    doc = json.loads(p.stdout)
    assert doc["live_capture"] is False
    root = next(c for c in doc["checks"] if c["item"] == "root")
    assert root["state"] == "fail" and NEEDS in root["detail"]


@pytest.mark.parametrize("args", [["record", "-o", "/tmp/khmon-unprivileged.khrec"],
                                  ["record", "-o", "/root/x.khrec", "--duration", "1"],
                                  ["report", "--live", "--duration", "1"]])
def test_capture_commands_need_privileges(args: list[str]) -> None:
    p = as_user(*args)
    assert p.returncode == 1
    line = one_error_line(p)
    assert line.startswith(f"khmon: error: {NEEDS}: this process (uid 65534) lacks CAP_BPF "
                           "and CAP_PERFMON and read access to /sys/kernel/tracing")
    assert line.endswith("(run khmon with sudo)")
    assert not os.path.exists("/tmp/khmon-unprivileged.khrec")


def test_generated_c_needs_tracefs() -> None:
    p = as_user("record", "-o", "/tmp/x.khrec", "--ebpf")
    assert p.returncode == 1
    assert "tracefs is readable only by root (run khmon as root, or with CAP_BPF, " \
           "CAP_PERFMON and read access to tracefs)" in one_error_line(p)


def test_the_capabilities_alone_are_not_enough() -> None:
    """CAP_BPF and CAP_PERFMON without read access to tracefs: the one thing missing is named."""
    p = as_user("record", "-o", "/tmp/x.khrec", drop=WITH_BPF_CAPS)
    assert p.returncode == 1
    assert one_error_line(p).startswith(
        f"khmon: error: {NEEDS}: this process (uid 65534) lacks read access to "
        "/sys/kernel/tracing (")


def test_reading_a_recording_needs_no_privileges() -> None:
    path = Path("/tmp") / f"khmon-unprivileged-{os.getpid()}.khrec"  # readable by nobody
    try:
        w = Writer(path, capture_header("6.18", "6.18.44"))
        w.add(Part("E", meta=stats_meta({}, {}, secs=1)))
        w.close()
        p = as_user("report", str(path))
        assert p.returncode == 0 and p.stderr == "", p.stderr
    finally:
        path.unlink(missing_ok=True)
