"""Where text goes: stdout errors (EPIPE quiet with 141, ENOSPC one line), a stderr that
cannot end anything, and escaping of what any process or file can name (issue 10, items 8
and 12)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from khcli import khmon, one_error_line
from khdata import by_name, capture_header, layouts, pack, stats_meta

from khmon.outputs.escape import printable
from khmon.stream.recording import Part, Writer

HOSTILE = b"\x1b]0;owned\x07[/]\\"  # retitles a terminal; rich markup; a backslash


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6.18 recording whose one process renamed itself to HOSTILE, with a pagemap PMD
    record (so `simulate` runs on it too)."""
    path = tmp_path_factory.mktemp("rec") / "hostile.khrec"
    lays = layouts("6.18")
    scan = by_name(lays)["mm_khugepaged_scan_pmd"]
    w = Writer(path, {**capture_header("6.18", "6.18.44"), "pagemap_ref": "pfn"})
    w.add(Part("R", event=scan.index, data=pack(scan.fmt, scan.index, count=3, mm=0x1000,
                                                pfn=0x1234, owner_tgid=100,
                                                owner_comm=HOSTILE, status=5)))
    w.add(Part("P", meta={"mm": 0x1000, "pid": 100, "comm": HOSTILE.decode(), "ref": 0x1234,
                          "pfn": 0x1234, "address": 0x7F00_0020_0000,
                          "present": "ff" * 32 + "00" * 32, "zero": "00" * 64,
                          "swap": "00" * 64, "none": 256, "shared": 0}))
    w.add(Part("E", meta=stats_meta({"mm_khugepaged_scan_pmd": 3}, {}, secs=1)))
    w.close()
    return path


@pytest.mark.parametrize(("text", "shown"), [
    ("khugepaged", "khugepaged"),
    ("[/]", "[/]"),  # markup is no business of this layer: top draws Text, never markup
    ("café ☕", "café ☕"),  # printable UTF-8 is kept
    ("\x1b[2J", "\\x1b[2J"),  # C0
    ("a\x9bb", "a\\x9bb"),  # C1 (CSI)
    ("\x7f", "\\x7f"),
    ("tab\tnl\n", "tab\\x09nl\\x0a"),
    ("x\u2028y\u200bz", "x\\u2028y\\u200bz"),  # line separator, zero-width space
    ("\u200e\U0001f600", "\\u200e\U0001f600"),  # a direction mark goes; an emoji stays
    ("back\\slash", "back\\\\slash"),  # unambiguous: a literal "\\x1b" stays apart from ESC
    ("\\x1b", "\\\\x1b"),
    ("bad \ufffd utf-8", "bad \ufffd utf-8"),  # invalid UTF-8, decoded as U+FFFD, stays so
])
def test_printable(text: str, shown: str) -> None:
    assert printable(text) == shown


@pytest.mark.parametrize("args", [["report", "{rec}"], ["report", "{rec}", "--grid", "1"],
                                  ["simulate", "{rec}", "--orders", "9"]])
def test_names_are_escaped_in_text(recording: Path, args: list[str]) -> None:
    p = khmon(*(a.format(rec=recording) for a in args))
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout and "\x07" not in p.stdout
    if args[0] == "report":
        assert "\\x1b]0;owned\\x07[/]\\\\" in p.stdout
        lines = p.stdout.splitlines()
        head = lines.index("processes (owner of the scanned mm)") + 1
        assert len(lines[head]) == len(lines[head + 1])  # the escaped name keeps its column


def test_json_keeps_the_real_name(recording: Path) -> None:
    p = khmon("report", recording, "--json")
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout  # json.dumps escapes it as \u001b
    assert json.loads(p.stdout)["processes"][0]["comm"] == HOSTILE.decode()


def test_file_names_are_escaped_in_errors(tmp_path: Path) -> None:
    bad = tmp_path / "\x1b[31mred"
    bad.write_bytes(b"not a recording")
    p = khmon("report", bad)
    assert p.returncode == 2
    assert "\x1b" not in p.stderr and "\\x1b[31mred" in one_error_line(p)


@pytest.mark.parametrize("args", [["report", "{rec}"], ["report", "{rec}", "--json"],
                                  ["simulate", "{rec}"], ["doctor", "--no-trial"],
                                  ["--version"]])
def test_stdout_full_is_one_line(recording: Path, args: list[str]) -> None:
    with open("/dev/full", "w") as full:
        p = khmon(*(a.format(rec=recording) for a in args), stdout=full,
                  stderr=subprocess.PIPE)
    assert p.returncode == 1
    line = one_error_line(p)
    assert "cannot write to standard output: No space left on device" in line


def _closed_pipe_run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run khmon with stdout a pipe nobody reads any more (`| true` that already exited)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return khmon(*args, stdout=w, stderr=subprocess.PIPE)
    finally:
        os.close(w)


@pytest.mark.parametrize("args", [["report", "{rec}"], ["simulate", "{rec}", "--json"],
                                  ["doctor", "--no-trial"]])
def test_stdout_closed_exits_quietly_like_sigpipe(recording: Path, args: list[str]) -> None:
    """`yes | head -1`: the shell sees 128 + SIGPIPE and nobody sees a message."""
    p = _closed_pipe_run(*(a.format(rec=recording) for a in args))
    assert (p.returncode, p.stderr) == (141, "")


def test_stdout_closed_at_start(recording: Path) -> None:
    p = khmon("report", recording, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
              pass_fds=(), preexec_fn=lambda: os.close(1))
    assert p.returncode == 1
    assert "standard output: Bad file descriptor" in one_error_line(p)


def test_stderr_full_changes_nothing(recording: Path, tmp_path: Path) -> None:
    """A warning that cannot be written is dropped; the report is still made (exit 0)."""
    cut = tmp_path / "cut.khrec"
    cut.write_bytes(recording.read_bytes()[:-5])  # a warning: cut short
    with open("/dev/full", "w") as full:
        p = khmon("report", cut, "--json", stdout=subprocess.PIPE, stderr=full)
    assert p.returncode == 0
    assert json.loads(p.stdout)["window"]["complete"] is False
