"""What every live test directory (tests/live, tests/daemon) requires: root and BPF.

Outside CI, without root, their tests skip; in CI (CI=true) a missing prerequisite fails the
run instead, so they can never silently skip there."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI") == "true"


UNDER_TCG = os.environ.get("KHMON_TCG_GUEST") == "1"


def deselect_host_only(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under TCG (tests/vm/run.sh sets KHMON_TCG_GUEST=1) every khmon process is a 35-75 s
    compile, so the `host_only` variants of a case that runs there too are deselected, not
    skipped: they are not part of a guest's run, and a skip in CI would mean something was
    left out."""
    if not UNDER_TCG:
        return
    dropped = [i for i in items if i.get_closest_marker("host_only")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if not i.get_closest_marker("host_only")]


def require_root(items: list[pytest.Item]) -> None:
    """pytest_collection_modifyitems for a live directory: skip, or refuse in CI, without root."""
    if os.geteuid() == 0:
        return
    if IN_CI:
        raise pytest.UsageError("live tests must run as root in CI (they never skip there)")
    skip = pytest.mark.skip(reason="live tests need root and BPF")
    for item in items:
        item.add_marker(skip)
