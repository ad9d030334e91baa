"""probes._Refusals: an fentry refusal is remembered per boot and per program text, so a
later capture skips that compile; options and doctor's stub do not change the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from khmon.capture import fentry as probes
from khmon.capture.fentry import _Refusals, trampoline_would_block

PROG = ("KFUNC_PROBE(collapse_huge_page)\n{\n    u32 ev = 8;\n"
        "    return 0;\n}\n")


@pytest.fixture
def refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> _Refusals:
    monkeypatch.setattr(_Refusals, "DIR", tmp_path / "khmon")
    return _Refusals()


def test_remembered_across_options_and_stub(refusals: _Refusals) -> None:
    assert refusals.get("#define FILTER_TGID 0\n" + PROG) is None
    refusals.put("#define FILTER_TGID 0\n" + PROG, "ENOENT")
    stubbed = "#define FILTER_TGID 42\n" + PROG + "int khmon_kprobe_stub(void *ctx) { return 0; }\n"
    assert refusals.get(stubbed) == "ENOENT"


def test_other_program_text_is_not_refused(refusals: _Refusals) -> None:
    refusals.put(PROG, "ENOENT")
    assert refusals.get(PROG.replace("ev = 8", "ev = 9")) is None


@pytest.mark.parametrize(("sleep_ms", "blocks"), [("0", True), ("10000", False), (None, False)])
def test_no_fentry_while_khugepaged_never_sleeps(tmp_path: Path, sleep_ms: str | None,
                                                  blocks: bool) -> None:
    """scan_sleep_millisecs 0 keeps khugepaged from ever sleeping, and a trampoline attach
    waits for it to (seen hanging the 6.1 guest for over 15 minutes): the fentry trial
    answers with that reason (and makes no trial attach: next test)."""
    if sleep_ms is not None:
        (tmp_path / "scan_sleep_millisecs").write_text(sleep_ms + "\n")
    why = trampoline_would_block(tmp_path)
    assert (why is not None) == blocks
    if blocks:
        assert "scan_sleep_millisecs is 0" in why and "RCU-tasks" in why


def test_fentry_trial_not_made_while_it_would_block(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_trial(*_a: object) -> str:
        raise AssertionError("the trial attach would hang")

    monkeypatch.setattr(probes, "_trace_trial", no_trial)
    monkeypatch.setattr(probes, "trampoline_would_block", lambda: "scan_sleep_millisecs is 0")
    assert probes.fentry_refusal("collapse_huge_page", 123, fexit=True) == "scan_sleep_millisecs is 0"
