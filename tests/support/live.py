"""What every live test directory (tests/live, tests/daemon) requires: root and BPF.

Outside CI, without root, their tests skip; in CI (CI=true) a missing prerequisite fails the
run instead, so they can never silently skip there."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI") == "true"


def require_root(items: list[pytest.Item]) -> None:
    """pytest_collection_modifyitems for a live directory: skip, or refuse in CI, without root."""
    if os.geteuid() == 0:
        return
    if IN_CI:
        raise pytest.UsageError("live tests must run as root in CI (they never skip there)")
    skip = pytest.mark.skip(reason="live tests need root and BPF")
    for item in items:
        item.add_marker(skip)
