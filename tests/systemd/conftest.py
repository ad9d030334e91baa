"""Tests of khmon.service under a real systemd as PID 1: the tests/vm guests (scripts/test.sh
runs them in both, in the same boot as tests/live). Where PID 1 is not systemd (this
project's host) they do not apply and are not collected; in a test guest (KHMON_TCG_GUEST=1)
a missing systemd is a harness fault and fails the run, so they never skip there.

The tests of a module share one installed service and run in order (start, workload, kill,
stop, ...): each bcc compile of the daemon costs 30-75 s under TCG, so every restart counts.
Their measured times (ready, restarts) are printed at the end of the run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.live import UNDER_TCG


def _systemd_is_pid1() -> bool:
    try:
        return Path("/run/systemd/system").is_dir() and \
            Path("/proc/1/comm").read_text().strip() == "systemd"
    except OSError:
        return False


SYSTEMD = _systemd_is_pid1()
if not SYSTEMD and not UNDER_TCG:
    collect_ignore_glob = ["test_*.py"]  # the host: PID 1 is not systemd

TIMINGS: dict[str, float] = {}  # what the tests measured (each name says its unit)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [i for i in items if Path(str(i.fspath)).parent == Path(__file__).parent]
    if mine and not SYSTEMD:
        raise pytest.UsageError("tests/systemd runs in a tests/vm guest with systemd as PID 1, "
                                "and PID 1 here is not systemd")
    if mine and os.geteuid() != 0:
        raise pytest.UsageError("tests/systemd must run as root (systemctl, BPF)")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("khmon.service measured")
        for what, value in TIMINGS.items():
            terminalreporter.write_line(f"{what:52} {value:8.1f}")


@pytest.fixture(scope="session")
def timings() -> dict[str, float]:
    """Record what a test measured: timings["what (unit)"] = value (printed at the end)."""
    return TIMINGS
