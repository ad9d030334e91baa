"""Recordings as files among other processes (issue 10, items 6, 7, 10 and 13): read from
pipes, FIFOs and standard input; a file truncated or replaced while it is read; -o checked
before anything is compiled; what a failed write keeps; a recording still being written."""

from __future__ import annotations

import errno
import os
import platform
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from khcli import khmon, one_error_line
from khdata import capture_header, stats_meta

from khmon.errors import KhmonError
from khmon.stream.recording import Part, Reader, Writer, check_output

HEADER = capture_header("6.18", "6.18.44")
PARTS = [Part("S", meta=stats_meta({}, {}, secs=1)),
         Part("E", meta=stats_meta({}, {}, secs=2))]


@pytest.fixture
def rec(tmp_path: Path) -> Path:
    path = tmp_path / "run.khrec"
    w = Writer(path, HEADER)
    for p in PARTS:
        w.add(p)
    w.close()
    return path


def _feed(fd: int, data: bytes) -> threading.Thread:
    """Write `data` to a pipe from another thread, slowly, then close it."""
    def run() -> None:
        with os.fdopen(fd, "wb") as f:
            for i in range(0, len(data), 4096):
                f.write(data[i:i + 4096])
                f.flush()
                time.sleep(0.001)

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.fixture
def pipe_of() -> Iterator:
    threads: list[threading.Thread] = []

    def make(data: bytes) -> Path:
        r, w = os.pipe()
        threads.append(_feed(w, data))
        return Path(f"/dev/fd/{r}")

    yield make
    for t in threads:
        t.join()


def test_a_pipe_reads_like_the_file(rec: Path, pipe_of) -> None:
    r = Reader(pipe_of(rec.read_bytes()))
    assert not r.regular
    assert list(r.parts()) == PARTS and r.complete and r.warnings == []


def test_a_fifo_reads_like_the_file(rec: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t = threading.Thread(target=lambda: fifo.write_bytes(rec.read_bytes()))
    t.start()
    r = Reader(fifo)
    assert list(r.parts()) == PARTS and r.complete
    t.join()


def test_a_cut_stream_warns_and_a_damaged_one_is_refused(rec: Path, pipe_of) -> None:
    data = rec.read_bytes()
    r = Reader(pipe_of(data[:-5]))
    assert list(r.parts()) == PARTS[:1]
    assert "cut short" in r.warnings[0]
    (header_len,) = struct.unpack_from("<I", data, 13)
    stats_at = 12 + 9 + header_len
    damaged = bytearray(data)
    damaged[stats_at + 3] ^= 0x10  # bit 20 of the stats part's length: far past the end
    with pytest.raises(KhmonError) as e:
        list(Reader(pipe_of(bytes(damaged))).parts())
    assert f"corrupt recording at byte {stats_at}" in str(e.value)
    assert "damaged length field" in str(e.value) and e.value.exit_code == 2


@pytest.mark.parametrize(("cmd", "shell"), [("report -", "cat {rec} | {khmon} report -"),
                                            ("report /dev/stdin", "{khmon} report /dev/stdin "
                                             "< {rec}"),
                                            ("<(...)", "bash -c '{khmon} report <(cat {rec})'")])
def test_the_command_line_reads_streams(rec: Path, cmd: str, shell: str) -> None:
    import subprocess

    from khcli import KHMON

    p = subprocess.run(shell.format(rec=rec, khmon=" ".join(KHMON)), shell=True, text=True,
                       capture_output=True, executable="/bin/bash")
    assert p.returncode == 0, (cmd, p.stderr)
    assert p.stdout.startswith("khmon report: kernel 6.18.44") and p.stderr == ""


@pytest.mark.parametrize(("path", "says"), [("/dev/zero", "bad magic"),
                                            ("/dev/null", "empty input")])
def test_devices_are_read_as_streams(path: str, says: str) -> None:
    p = khmon("report", path)
    assert p.returncode == 2 and says in one_error_line(p)


def test_a_file_truncated_while_read(rec: Path) -> None:
    """`: > FILE` under a running report: refused, saying so (the mapped reader died of
    SIGBUS, exit 135 and no word)."""
    r = Reader(rec)
    os.truncate(rec, 100)
    with pytest.raises(KhmonError) as e:
        list(r.parts())
    assert "shrank to 100 bytes while it was read" in str(e.value)
    assert e.value.exit_code == 2


def test_writing_over_a_file_replaces_it(rec: Path) -> None:
    """A new recording at the same path is a new file: a report reading the old one reads
    it whole, and the path then holds the new one."""
    r = Reader(rec)
    w = Writer(rec, {**HEADER, "host": "another"})
    w.close()
    assert list(r.parts()) == PARTS and r.complete
    assert Reader(rec).header["host"] == "another"


def test_check_output(tmp_path: Path) -> None:
    existing = tmp_path / "old.khrec"
    existing.write_bytes(b"precious")
    for path, replace, says in [
        (tmp_path, False, "is a directory"),
        (tmp_path / "no" / "x.khrec", False, "cannot create a file in"),
        (existing, False, "exists (8 bytes) (use --force to replace it"),
    ]:
        with pytest.raises(KhmonError) as e:
            check_output(path, replace)
        assert says in str(e.value) and e.value.exit_code == 2, path
    check_output(existing, True)
    check_output(tmp_path / "new.khrec", False)
    check_output(Path("/dev/null"), False)
    assert existing.read_bytes() == b"precious" and not (tmp_path / "new.khrec").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["old.khrec"]  # no probe file left


def test_writing_to_a_full_device_says_nothing_was_kept() -> None:
    with pytest.raises(KhmonError) as e:
        Writer(Path("/dev/full"), HEADER)
    assert "No space left on device; nothing readable was written" in str(e.value)
    assert "before byte 0" not in str(e.value)


def test_a_disk_filling_up_says_what_is_kept(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    w = Writer(tmp_path / "full.khrec", HEADER)
    kept = w.bytes_written

    def enospc(_data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(w._f, "write", enospc)
    with pytest.raises(KhmonError) as e:
        w.add(PARTS[0])
    assert f"its first {kept} bytes read as a recording cut short" in str(e.value)


@pytest.fixture
def recorder() -> Iterator[int]:
    """A process that looks like `khmon record` (its argv has khmon and record)."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "khmon",
                          "record"])
    time.sleep(0.05)
    yield p.pid
    p.kill()
    p.wait()


def test_a_recording_still_being_written(tmp_path: Path, recorder: int) -> None:
    """Its recorder runs on this host: not 'the recorder was killed'."""
    path = tmp_path / "live.khrec"
    w = Writer(path, {**HEADER, "host": platform.node(), "recorder_pid": recorder,
                      "start_mono_ns": time.clock_gettime_ns(time.CLOCK_MONOTONIC)})
    w.add(PARTS[0])
    r = Reader(path)
    list(r.parts())
    (warning,) = r.warnings
    assert warning.startswith(f"recording still being written (its recorder, pid {recorder}, "
                              "is running)")
    w.close()


@pytest.mark.parametrize("who", ["init", "gone", "reused"])
def test_no_recorder_is_still_writing(tmp_path: Path, recorder: int, who: str) -> None:
    """pid 1 is no khmon record; a pid gone is gone; a khmon record that started after the
    recording did cannot be its recorder (a reused pid)."""
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    pid, start = {"init": (1, now), "gone": (999_999_999, now),
                  "reused": (recorder, now - 10**10)}[who]
    path = tmp_path / "dead.khrec"
    w = Writer(path, {**HEADER, "host": platform.node(), "recorder_pid": pid,
                      "start_mono_ns": start})
    w.add(PARTS[0])
    w.close()
    r = Reader(path)
    list(r.parts())
    assert r.warnings[0].startswith("recording has no end part (its recorder was killed")
