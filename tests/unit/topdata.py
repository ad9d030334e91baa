"""Snapshot reports for khmon top's tests: real Model snapshots of the synthetic 7.2 stream
(tests/unit/synthetic.py), one per stats part, so counts grow as a live stream's do."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

from synthetic import SyntheticStream

from khmon.model.model import Model
from khmon.stream.parts import END, STATS
from khmon.stream.recording import Writer

HOSTILE = ["[/]", "[bold red]x[/]", "\x1b[2J\x1b[31mevil", "tab\there", "wide漢字名", "back\\slash"]


@functools.cache
def _frames(processes: int, seconds: int) -> tuple[dict[str, Any], ...]:
    s = SyntheticStream(processes=processes, pmds_per_process=8, scanned_per_s=200,
                        uffd_share=0.25, lifetime_s=(100, 200), seconds=seconds)
    m = Model(s.header, s.lays)
    out = []
    for part in s.parts():
        m.add(part)
        if part.kind in (STATS, END):
            out.append(m.snapshot(200).report)
    return tuple(out)


def frames(processes: int = 6, seconds: int = 6) -> list[dict[str, Any]]:
    """Fresh copies (tests may change them) of every stats part's snapshot report."""
    return copy.deepcopy(list(_frames(processes, seconds)))


def report(**kw: Any) -> dict[str, Any]:
    """The last snapshot's report."""
    return frames(**kw)[-1]


def hostile(rep: dict[str, Any]) -> dict[str, Any]:
    """The report with its processes' and PMDs' comms replaced by hostile names."""
    for i, p in enumerate(rep["processes"]):
        p["comm"] = HOSTILE[i % len(HOSTILE)]
    for i, p in enumerate(rep["pmds"]):
        p["comm"] = HOSTILE[i % len(HOSTILE)]
    return rep


def write_recording(path: Path, stream: SyntheticStream) -> Path:
    """The stream as a recording file (what `khmon top --replay` plays)."""
    w = Writer(path, stream.header)
    for part in stream.parts():
        w.add(part)
    w.close()
    return path
