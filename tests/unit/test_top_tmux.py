"""khmon top in a real terminal (tmux), on a replay, so no root or BPF is needed: first
paint, hostile process names drawn literally, keys, resize, and a terminal restored after
q and after SIGTERM. The live tests do the same on live captures (tests/live/test_top_live.py).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from synthetic import SyntheticStream, _Proc
from topdata import write_recording

from khmon.outputs.top.rates import counters
from tests.support.tmux import KHMON, TopPane

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed "
                                "(scripts/setup.sh installs it)")
NAMES = [b"[/]", b"\x1b[2J\x1b[31mevil", b"[bold]b[/bold]"]


class HostileStream(SyntheticStream):
    """The synthetic stream with processes named as hostile as a comm can be."""

    def _spawn(self, now_s: int) -> _Proc:
        p = super()._spawn(now_s)
        p.comm = NAMES[p.pid % len(NAMES)]
        return p


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    return write_recording(tmp_path / "hostile.khrec", HostileStream(
        processes=6, pmds_per_process=4, scanned_per_s=100, uffd_share=0.3,
        lifetime_s=(100, 200), seconds=12))


def frame_no(screen: str) -> int:
    m = re.search(r"replay frame (\d+)", screen)
    return int(m.group(1)) if m else -1


def test_replay_in_a_terminal_keys_resize_and_quit(tmp_path: Path, recording: Path) -> None:
    with TopPane(["--replay", str(recording), "0.3"], tmp_path) as pane:
        first = pane.wait_for(lambda s: "replay frame" in s, 20, "the first frame")
        paint = time.monotonic() - pane.started
        assert "[/]" in first and "\\x1b[2J\\x1b[31mevil" in first and "[bold]b[/bold]" in first
        assert "\x1b" not in first
        assert "Collapse by order" in first and "Wasted work by reason" in first
        pane.keys("space")
        pane.wait_for(lambda s: "paused" in s, 5, "paused")
        time.sleep(1.0)  # a refresh under way when space was pressed lands first
        n = frame_no(pane.screen())
        pane.keys("]")
        pane.wait_for(lambda s: frame_no(s) == n + 1, 5, f"frame {n + 1}")
        pane.keys("[", "[")
        pane.wait_for(lambda s: frame_no(s) == max(1, n - 1), 5, f"frame {n - 1}")
        pane.keys("h")
        pane.wait_for(lambda s: "this help" in s, 5, "the help")
        pane.keys("x")
        pane.wait_for(lambda s: "this help" not in s and "Processes:" in s, 5, "help closed")
        pane.keys("/", "[/]", "Enter")  # typed at once: the prompt gets every key
        only = pane.wait_for(lambda s: "comm ~ '[/]'" in s, 5, "the comm filter")
        rows = [ln for ln in only.splitlines() if re.match(r"\s+\d{4} ", ln)]
        assert rows and all(" [/] " in ln for ln in rows), rows
        pane.keys("/", "Enter")
        pane.wait_for(lambda s: "comm ~" not in s, 5, "no filter")
        pane.resize(40, 12)
        small = pane.wait_for(lambda s: len(s.splitlines()) <= 12 and "Processes" in s, 5,
                              "a 40x12 screen")
        assert all(len(line) <= 40 for line in small.splitlines())
        pane.resize(160, 50)
        pane.wait_for(lambda s: "Collapse by order" in s, 5, "the full screen again")
        t0 = time.monotonic()
        pane.keys("q")
        assert pane.exit_status(10) == 0
        quit_s = time.monotonic() - t0
        assert pane.terminal_restored() == []
    print(f"first paint {paint:.2f} s (replay child started first), quit {quit_s:.2f} s")
    assert paint < 10 and quit_s < 5


def test_sigterm_restores_the_terminal(tmp_path: Path, recording: Path) -> None:
    with TopPane(["--replay", str(recording)], tmp_path) as pane:
        pane.wait_for(lambda s: "replay frame" in s, 20, "the first frame")
        pids = pane.pids()
        top = min(pids)  # khmon top; its replay child has the higher pid
        os.kill(top, signal.SIGTERM)
        assert pane.exit_status(10) == 128 + signal.SIGTERM
        assert pane.terminal_restored() == []
        deadline = time.monotonic() + 5
        while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(Path(f"/proc/{p}").exists() for p in pids), "a child outlived top"


def test_batch_json_counts_only_grow(recording: Path) -> None:
    p = subprocess.run([str(KHMON), "top", "--replay", str(recording), "-b", "-n", "3",
                        "--json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    snaps = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(snaps) == 3 and [s["frame"] for s in snaps] == [1, 2, 3]
    for a, b in itertools.pairwise(snaps):
        ca, cb = counters(a["report"]), counters(b["report"])
        assert all(cb.get(k, v) >= v for k, v in ca.items() if not k.startswith("proc/"))
        assert cb["scans"] > ca["scans"]
    assert snaps[1]["rates"]["scans"] is not None and snaps[0]["rates"]["scans"] is None


def test_batch_text_and_pipe(recording: Path) -> None:
    p = subprocess.run(f"{KHMON} top --replay {recording} | head -3", shell=True,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert p.stdout.startswith("khmon top  replay frame 1")
    p = subprocess.run([str(KHMON), "top", "--replay", str(recording), "--once"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.count("khmon top  replay") == 1
    assert "[/]" in p.stdout and "\x1b" not in p.stdout


SLOW_CHILD = """
import json, signal, socket, sys, time
fd = int(sys.argv[sys.argv.index("--fd") + 1])
signal.signal(signal.SIGTERM, lambda *a: (time.sleep(3), sys.exit(0)))
s = socket.socket(fileno=fd)
for line in s.makefile("rb"):
    s.sendall(json.dumps({"ok": False, "error": "compiling", "state": "compiling"}).encode()
              + b"\\n")
time.sleep(3)  # the socket closed: 3 s for the probes to detach
"""
HARNESS = """
import sys
from khmon.outputs.top import TopOptions, run
from khmon.outputs.top.sources import ChildSource
src = ChildSource(["--local"], "local capture", argv0=[sys.executable, sys.argv[1]]).start()
sys.exit(run(TopOptions(), source=src))
"""


def test_quit_restores_the_terminal_before_a_slow_detach(tmp_path: Path) -> None:
    """khmon top's run(): the terminal is back as soon as q is pressed, while the capture
    child still takes 3 s to detach its probes; then exit 0."""
    (tmp_path / "child.py").write_text(SLOW_CHILD)
    (tmp_path / "harness.py").write_text(HARNESS)
    py = str(KHMON.parent / "python")
    with TopPane([str(tmp_path / "child.py")], tmp_path,
                 command=[py, str(tmp_path / "harness.py")]) as pane:
        pane.wait_for(lambda s: "compiling" in s, 20, "compiling")
        t0 = time.monotonic()
        pane.keys("q")
        while pane.tmux("display", "-p", "-t", "top", "#{alternate_on}").strip() == "1":
            assert time.monotonic() - t0 < 2, "the terminal waited for the detach"
            time.sleep(0.02)
        restored = time.monotonic() - t0
        assert not pane.status.exists()  # still detaching
        assert pane.exit_status(10) == 0
        done = time.monotonic() - t0
        assert pane.terminal_restored() == []
        assert "khmon: waiting for the probes to detach ..." in pane.screen()
    print(f"terminal restored {restored:.2f} s after q, exit {done:.2f} s after q")
    assert restored < 1.5 and done > 3
