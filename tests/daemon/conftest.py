"""The daemon's live tests on the host kernel: the real `khmon daemon` (tests/support/daemon.py)
scraped by a real Prometheus while real khugepaged collapses a workload's PMDs.

They run in the live-host stage (scripts/test.sh). In the TCG guests the daemon is tested
as systemd runs it (tests/systemd), where its compiles are paid once per boot.
"""

from __future__ import annotations

import pytest

from tests.support.live import require_root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    require_root(items)
