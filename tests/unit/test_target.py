"""-p PID names a process, or khmon says it does not (issue 10, item 11)."""

from __future__ import annotations

from pathlib import Path

import pytest

from khmon.capture.target import Target


def _task(proc: Path, pid: int, tgid: int) -> None:
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "status").write_text(f"Name:\tx\nTgid:\t{tgid}\nPid:\t{pid}\n")


def test_a_running_process_is_not_warned_about(tmp_path: Path) -> None:
    _task(tmp_path, 42, 42)
    t = Target(42, tmp_path)
    assert t.at_start() is None
    assert t.at_end({"processes": []}) is None


def test_no_such_process_is_said_at_start_and_at_end(tmp_path: Path) -> None:
    t = Target(42, tmp_path)
    assert t.at_start() == ("no process 42 is running: -p 42 records only events of a "
                            "process with that id, should one start")
    end = t.at_end({"processes": [{"pid": None}]})
    assert end is not None and end.startswith("process 42 never appeared: nothing was recorded")


@pytest.mark.parametrize("how", ["events", "running now"])
def test_a_process_that_appeared_is_not_warned_about_at_the_end(tmp_path: Path,
                                                                 how: str) -> None:
    t = Target(42, tmp_path)
    if how == "running now":
        _task(tmp_path, 42, 42)
    assert t.at_end({"processes": [{"pid": 42}] if how == "events" else []}) is None


def test_a_thread_id_is_not_a_process_id(tmp_path: Path) -> None:
    _task(tmp_path, 43, 42)
    assert Target(43, tmp_path).at_start() == (
        "43 is a thread of process 42, and -p takes a process id: nothing will match "
        "(use -p 42)")
