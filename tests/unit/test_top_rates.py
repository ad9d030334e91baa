"""Rates between snapshots: per second of stream time, N/A across a restart, a gap, a
counter that went down, or before a second snapshot; history bounded."""

from __future__ import annotations

from topdata import frames

from khmon.outputs.top.rates import BASES, HISTORY, Point, RateKeeper, counters, rates_between

SEC = 1_000_000_000


def pt(seq: int, c: dict[str, int], stream: str = "d:1", epoch: int = 0,
       mono: int | None = None, **kw: float) -> Point:
    return Point(stream, epoch, seq, seq * SEC if mono is None else mono, c, **kw)


def test_counters_of_a_real_snapshot() -> None:
    r = frames()[-1]
    c = counters(r)
    assert c["attempts"] == r["collapse"]["attempts"] + r["collapse"]["file"]["attempts"]
    assert c["collapses"] == r["collapse"]["succeeded"]
    assert c["scans"] == r["events"]["mm_khugepaged_scan_pmd"]
    assert c["order/9/attempts"] == r["collapse"]["by_order"]["9"]["attempts"]
    assert c["waste/uffd_isolate"] == r["wasted"]["by_reason"]["uffd_isolate"]["attempts"]
    p = r["processes"][0]
    assert c[f"proc/{p['pid']}/scans"] == p["scans"]
    assert counters({}) == {}


def test_rate_is_change_per_second_of_stream_time() -> None:
    r = rates_between(pt(1, {"a": 10}), pt(3, {"a": 30}, mono=3 * SEC))
    assert r["a"] == 10.0
    assert rates_between(pt(1, {"a": 10}), pt(2, {"a": 10, "b": 5}))["b"] is None


def test_na_across_restart_gap_reset_and_still_time() -> None:
    prev = pt(5, {"a": 10})
    assert rates_between(None, prev)["a"] is None
    assert rates_between(prev, pt(6, {"a": 20}, stream="d:2"))["a"] is None  # restart
    assert rates_between(prev, pt(6, {"a": 20}, epoch=1))["a"] is None  # gap
    assert rates_between(prev, pt(6, {"a": 5}))["a"] is None  # went down
    assert rates_between(prev, pt(6, {"a": 20}, mono=5 * SEC))["a"] is None  # no time
    assert rates_between(prev, pt(4, {"a": 20}))["a"] is None  # older seq
    assert rates_between(prev, pt(6, {"a": 20}))["a"] == 10.0


def test_cpu_share_from_local_clock() -> None:
    r = rates_between(pt(1, {}, cpu_s=1.0, local_s=10.0), pt(2, {}, cpu_s=1.5, local_s=12.0))
    assert r["cpu"] == 0.25
    assert rates_between(pt(1, {}), pt(2, {}, cpu_s=1.0, local_s=1.0))["cpu"] is None


def test_keeper_same_snapshot_twice_and_replay_step_back() -> None:
    k = RateKeeper()
    k.add(pt(1, {"a": 0}))
    r2 = k.add(pt(2, {"a": 10}))
    r3 = k.add(pt(3, {"a": 30}))
    assert (r2["a"], r3["a"]) == (10.0, 20.0)
    assert k.add(pt(3, {"a": 30}))["a"] == 20.0  # fetched again: not a zero rate
    assert k.add(pt(2, {"a": 10}))["a"] == 10.0  # stepped back: the rate it had
    assert list(k.history["attempts"]) == [None, None, None]  # no such series here
    assert len(k.history["collapses"]) == 3


def test_keeper_rate_after_a_gap_restarts() -> None:
    k = RateKeeper()
    k.add(pt(1, {"collapses": 0}))
    k.gap()
    assert k.add(pt(2, {"collapses": 5}, epoch=1))["collapses"] is None
    assert k.add(pt(3, {"collapses": 9}, epoch=1))["collapses"] == 4.0
    assert list(k.history["collapses"]) == [None, None, None, 4.0]


def test_keeper_is_bounded() -> None:
    k = RateKeeper()
    for i in range(HISTORY * 2):
        k.add(pt(i + 1, {"collapses": i}))
    assert len(k.bases) == BASES and len(k.history["collapses"]) == HISTORY
