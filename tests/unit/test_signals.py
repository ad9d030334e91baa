"""Signals: SIGHUP ends a capture like SIGINT and SIGTERM (issue 10, item 3), and a Ctrl-C
at any moment of start-up is one line, never a KeyboardInterrupt traceback (item 15)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from khcli import KHMON
from khdata import capture_header, stats_meta

from khmon.capture.stop import STOP_SIGNALS, StopFlag
from khmon.stream.recording import Part, Writer


@pytest.fixture
def restored_handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_each_stop_signal_stops_a_capture(restored_handlers: None, sig: int) -> None:
    flag = StopFlag()
    assert not flag()
    os.kill(os.getpid(), sig)
    assert flag()


def test_a_signal_ignored_at_start_stays_ignored(restored_handlers: None) -> None:
    """nohup khmon record ...: SIGHUP was ignored on purpose."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    flag = StopFlag()
    os.kill(os.getpid(), signal.SIGHUP)
    assert not flag()
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


def _before_khmon(err: str) -> bool:
    """CPython's own start-up (its initialisation, site, the console script pip wrote, and
    the import of khmon.entry itself): a Ctrl-C there comes before khmon.entry.main() can
    install its handler, and CPython answers it itself. That is about 30 ms of the 170 a
    run takes here."""
    return err.startswith("Fatal Python error: init") or (
        "Traceback" in err and not re.search(r'khmon/(entry|cli)\.py", line \d+, in main', err))


def test_ctrl_c_during_start_up(tmp_path: Path) -> None:
    """SIGINT at staggered moments from exec to exit of `khmon report FILE`: each run ends
    with its report (0) or one line (130), never a traceback. Before the interpreter has
    installed any handler the signal's default action ends it (-SIGINT: the shell shows 130
    too, and there is nothing to say); see _before_khmon for the first ~30 ms."""
    rec = tmp_path / "r.khrec"
    w = Writer(rec, capture_header("6.18", "6.18.44"))
    w.add(Part("E", meta=stats_meta({}, {}, secs=1)))
    w.close()
    seen = set()
    for delay_ms in (0, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 400):
        p = subprocess.Popen([*KHMON, "report", str(rec)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        time.sleep(delay_ms / 1000)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        if _before_khmon(err):
            continue
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, (delay_ms, err)
        assert p.returncode in (0, 130, -signal.SIGINT), (delay_ms, p.returncode, err)
        if p.returncode == 130:
            assert len(err.splitlines()) == 1 and err.startswith("khmon: interrupted"), err
        seen.add(p.returncode)
    assert 130 in seen
