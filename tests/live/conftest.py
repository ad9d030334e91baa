"""Live tests: real BPF on the running kernel, checked against the kernel's own counters.

They need root, BPF and the huge_memory tracepoints. Outside CI they skip without root; in
CI (CI=true) a missing prerequisite fails the run instead, so they can never silently skip.
Every test that changes THP or khugepaged settings does it through sysfs.override, which
restores them even when the test fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from khmon import sysfs
from khmon.bpfgen import ProbeConfig
from khmon.session import capture
from khmon.workload import Workloads

IN_CI = os.environ.get("CI") == "true"
# Fast scanning so a test's workload is collapsed in seconds.
FAST = {"enabled": "madvise", "khugepaged/scan_sleep_millisecs": "100"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    if IN_CI:
        raise pytest.UsageError("live tests must run as root in CI (they never skip there)")
    skip = pytest.mark.skip(reason="live tests need root and BPF")
    for item in items:
        item.add_marker(skip)


@pytest.fixture
def fast_khugepaged() -> Iterator[dict[str, str]]:
    """khugepaged scanning every 100 ms with THP enabled=madvise; restored afterwards."""
    with sysfs.override(FAST) as saved:
        yield saved


@pytest.fixture
def run_workloads() -> Callable[..., tuple[dict, list[dict]]]:
    """The function below, as a fixture so test modules need not import conftest."""
    return _run_workloads


def _run_workloads(runs: list[list[str]], cfg: ProbeConfig | None = None,
                   knobs: dict[str, str] | None = None, timeout: float = 90.0
                   ) -> tuple[dict, list[dict]]:
    """Capture while the given workloads run; return the report and the workloads' own
    accounts (pid, comm, collapsed_pmds from smaps)."""
    work = Workloads(runs)
    try:
        with sysfs.override({**FAST, **(knobs or {})}):
            agg, warnings = capture(cfg or ProbeConfig(), timeout, None, work)
    finally:
        work.kill()
    return agg.result(warnings), work.results()
