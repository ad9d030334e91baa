"""Live tests: real BPF on the running kernel, checked against the kernel's own counters.

They need root, BPF and the huge_memory tracepoints. Outside CI they skip without root; in
CI (CI=true) a missing prerequisite fails the run instead, so they can never silently skip.
Every test that changes THP or khugepaged settings does it through sysfs.override, which
restores them even when the test fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from khmon.capture.bpfgen import ProbeConfig
from khmon.capture.live import LiveCapture
from khmon.kernel import sysfs
from khmon.pipeline import capture
from khmon.workload import Workloads
from tests.support.live import deselect_host_only, require_root

# Fast scanning so a test's workload is collapsed in seconds.
FAST = {"enabled": "madvise", "khugepaged/scan_sleep_millisecs": "100"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    require_root(items)
    deselect_host_only(config, items)


@pytest.fixture
def fast_khugepaged() -> Iterator[dict[str, str]]:
    """khugepaged scanning every 100 ms with THP enabled=madvise; restored afterwards."""
    with sysfs.override(FAST) as saved:
        yield saved


@pytest.fixture(scope="session")
def live_capture() -> Iterator[LiveCapture]:
    """One compiled and loaded set of probes for the whole run: compiling takes about 30 s
    in a TCG guest, so each test opens a window on these instead of compiling its own."""
    cap = LiveCapture(ProbeConfig())
    cap.probes.detach()
    yield cap
    cap.probes.close()


@pytest.fixture
def run_workloads(live_capture: LiveCapture) -> Callable[..., tuple[dict, list[dict]]]:
    """run(runs, knobs=None, timeout=90): capture while the given workloads run; return the
    report and the workloads' own accounts (pid, comm, collapsed_pmds from smaps)."""

    def run(runs: list[list[str]], knobs: dict[str, str] | None = None,
            timeout: float = 90.0) -> tuple[dict, list[dict]]:
        work = Workloads(runs)
        try:
            with sysfs.override({**FAST, **(knobs or {})}):
                agg, warnings = capture(live_capture.cfg, timeout, None, work,
                                        reuse=live_capture)
        finally:
            work.kill()
        return agg.report(warnings), work.results()

    return run
