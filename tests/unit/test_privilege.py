"""What a live capture needs, from the capability mask (issue 10, item 1; the unprivileged
runs themselves are in test_unprivileged.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from khmon.kernel import privilege
from khmon.kernel.privilege import CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, capture_refusal


@pytest.fixture
def tracefs_readable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(privilege, "_tracefs_denied", lambda: None)


@pytest.mark.parametrize(("caps", "ok"), [
    (1 << CAP_SYS_ADMIN, True),
    (1 << CAP_BPF | 1 << CAP_PERFMON, True),
    (1 << CAP_BPF, False),
    (1 << CAP_PERFMON, False),
    (0, False),
])
def test_capabilities(tracefs_readable: None, caps: int, ok: bool) -> None:
    why = capture_refusal(caps)
    assert (why is None) == ok
    if why:
        assert why.startswith("live capture needs root, or CAP_BPF, CAP_PERFMON and read "
                              "access to tracefs: this process")
        assert why.endswith("lacks CAP_BPF and CAP_PERFMON")


def test_tracefs_not_readable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(privilege, "_tracefs_denied", lambda: Path("/sys/kernel/tracing"))
    why = capture_refusal(1 << CAP_SYS_ADMIN)
    assert why is not None and why.endswith("lacks read access to /sys/kernel/tracing")


def test_effective_caps_of_a_status_file(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000000c000000000\n")
    assert privilege.effective_caps(status) == 1 << CAP_BPF | 1 << CAP_PERFMON
    assert privilege.effective_caps(tmp_path / "missing") == 0
