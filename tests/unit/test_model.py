"""The model over a long synthetic stream (tests/unit/synthetic.py: processes that come and go
with recycled mm addresses, rescans, uffd waste, collapses): reading it never changes it,
its totals never go down, and its memory stays within its caps."""

from __future__ import annotations

import json
from typing import Any

import pytest
from synthetic import SyntheticStream, totals, went_down

from khmon.model.model import Model
from khmon.stream.parts import Part


def small_stream(**kw: Any) -> SyntheticStream:
    return SyntheticStream(**{"processes": 6, "pmds_per_process": 40, "scanned_per_s": 120,
                              "repeats": 5, "uffd_share": 0.1, "lifetime_s": (1, 3),
                              "seconds": 8, **kw})


@pytest.fixture(scope="module")
def parts() -> tuple[SyntheticStream, list[Part]]:
    s = small_stream()
    return s, list(s.parts())


def run(s: SyntheticStream, parts: list[Part], every: int | None, **kw: Any) -> tuple[Model, list]:
    m = Model(s.header, s.lays, **kw)
    snaps = []
    for i, part in enumerate(parts, 1):
        m.add(part)
        if every is not None and i % every == 0:
            snaps.append(m.snapshot())
    return m, snaps


@pytest.mark.parametrize("every", [1, 10, 1000, None])
def test_snapshots_at_any_cadence_end_in_the_same_report(parts: tuple, every: int | None) -> None:
    s, ps = parts
    plain = json.dumps(run(s, ps, None, pmd_cap=150)[0].report(), sort_keys=True)
    m, snaps = run(s, ps, every, pmd_cap=150)
    assert json.dumps(m.report(), sort_keys=True) == plain
    if every == 1:
        assert len(snaps) == len(ps)


def test_the_stream_has_what_the_tests_rely_on(parts: tuple) -> None:
    s, ps = parts
    assert run(s, ps, None, pmd_cap=150)[0].report()["model"]["pmds_evicted"]["lru"] > 0
    r = run(s, ps, None)[0].report()  # no eviction: rescans find the PMD they rescan
    assert r["wasted"]["by_reason"]["uffd_isolate"]["attempts"] > 0
    assert r["wasted"]["by_reason"]["futile_rescan"]["attempts"] > 0
    assert r["collapse"]["succeeded"] > 0
    # recycled mm addresses: more processes than mm addresses in the pool at any time
    assert len({(p["pid"]) for p in r["processes"]}) > s.n_procs


def test_no_total_in_any_snapshot_is_below_the_one_before(parts: tuple) -> None:
    s, ps = parts
    _m, snaps = run(s, ps, 1, pmd_cap=150, exit_grace_s=1, process_labels=3)
    before: dict[str, float] = {}
    checked = 0
    for snap in snaps:
        now = totals(snap.report)
        assert not went_down(before, now), (snap.seq, went_down(before, now)[:5])
        checked += len(before)
        before = now
    assert checked > 10_000
    # with a budget of 3 labels, the rest of the comms counted under "other"
    last = snaps[-1].report
    assert len(last["by_comm"]) == 4 and "other" in last["by_comm"]
    assert last["model"]["process_label_overflow"] > 0


def test_memory_stays_within_the_caps() -> None:
    s = small_stream(seconds=20, processes=10, pmds_per_process=80, lifetime_s=(1, 2))
    m = Model(s.header, s.lays, pmd_cap=300, process_cap=40, exit_grace_s=2)
    most_pmds = most_procs = 0
    for part in s.parts():
        m.add(part)
        most_pmds = max(most_pmds, len(m.pmds.pmds))
        most_procs = max(most_procs, len(m.processes))
        assert len(m.pmds.open) <= 1 and not m.pmds._pending
    r = m.report()
    assert most_pmds == 300 and most_procs <= 40
    assert r["model"]["pmds_evicted"]["exited"] > 0 and r["model"]["processes_forgotten"]["exited"] > 0
    # every PMD record still held belongs to a process still held
    held = {(p.mm, p.pid) for p in m.processes.procs.values()}
    assert all((k[0], k[1]) in held for k in m.pmds.pmds)
