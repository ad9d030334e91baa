"""probes._Refusals: an fentry refusal is remembered per boot and per program text, so a
later capture skips that compile; options and doctor's stub do not change the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from khmon.probes import _Refusals

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
