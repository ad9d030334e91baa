"""The flight recorder (khmon.stream.flight): files rotated at stats parts by size and on
request, the total kept under the cap (oldest removed first, nothing else touched), and each
file a recording of its own window whose counts add up to the whole stream's."""

from __future__ import annotations

import json
from pathlib import Path

from khdata import START_NS
from synthetic import SyntheticStream

from khmon.pipeline import replay
from khmon.stream.flight import CURRENT, FlightRecorder
from khmon.stream.parts import END, STATS, Part
from khmon.stream.recording import Reader

SEC = 1_000_000_000


def _stream(seconds: int = 12) -> tuple[SyntheticStream, list[Part]]:
    """A synthetic 7.2 stream whose stats parts carry cumulative in-kernel counts, as the
    live capture's do: seen per event equal to what the records count so far, and the exact
    collapse rows."""
    s = SyntheticStream(processes=6, pmds_per_process=40, scanned_per_s=300, seconds=seconds,
                        seed=5)
    by = {lay.name: lay for lay in s.lays}
    seen: dict[str, int] = dict.fromkeys(by, 0)
    col = by["mm_collapse_huge_page"]
    exact: dict[tuple[int, int], int] = {}
    parts = []
    for part in s.parts():
        if part.kind == "R":
            lay = s.lays[part.event]
            for rec in lay.struct.iter_unpack(part.data):
                r = dict(zip((n for n, _o, _c in lay.items), rec, strict=True))
                seen[lay.name] += r["count"]
                if lay is col:
                    exact[(r["order"], r["status"])] = exact.get((r["order"], r["status"]), 0) \
                        + r["count"]
        elif part.kind in (STATS, END):
            part = Part(part.kind, meta={**part.meta, "probe": {
                "seen": dict(seen), "lost": dict.fromkeys(seen, 0),
                "missed": dict.fromkeys(seen, 0),
                "exact": {col.name: [[o, st, 2, n, 0, 0] for (o, st), n in sorted(exact.items())]},
                "hist": {}, "exact_full": 0},
                "counters": {"khugepaged/pages_collapsed": sum(
                    n for (o, st), n in exact.items() if col.fmt.symbols["status"][st]
                    == "succeeded" and o == 9)}})
        parts.append(part)
    return s, parts


def _record(tmp: Path, parts: list[Part], header: dict, max_bytes: int, file_bytes: int,
            hup_at: set[int] = frozenset()) -> FlightRecorder:
    rec = FlightRecorder(tmp, max_bytes, header, file_bytes=file_bytes)
    stats = 0
    for p in parts:
        rec.add(p)
        if p.kind == STATS:
            stats += 1
            if stats in hup_at:
                rec.rotate_soon()
    rec.close()
    return rec


def _reports(rec: FlightRecorder) -> list[dict]:
    out = []
    for path in rec.kept():
        reader = Reader(path)
        out.append(replay(reader).report(reader.warnings))
    return out


def test_files_rotate_at_stats_parts_and_each_is_a_balanced_window(tmp_path: Path) -> None:
    s, parts = _stream()
    rec = _record(tmp_path, parts, s.header, max_bytes=64 << 20, file_bytes=40_000)
    reports = _reports(rec)
    assert len(reports) == rec.rotations + 1 >= 3
    for r in reports:
        assert r["window"]["complete"] and not r["warnings"]
        for name, a in r["accounting"].items():
            assert a["unaccounted"] == 0 and a["lost"] == 0, (name, a)
    # the windows follow each other and add up to the whole stream
    whole = replay_parts(s.header, parts)
    for name in whole["events"]:
        assert sum(r["events"][name] for r in reports) == whole["events"][name]
        assert sum(r["accounting"][name]["seen"] for r in reports) \
            == whole["accounting"][name]["seen"]
    assert sum(r["collapse"]["attempts"] for r in reports) == whole["collapse"]["attempts"] > 0
    assert sum(r["kernel_counters"]["delta"]["khugepaged/pages_collapsed"] for r in reports) \
        == whole["kernel_counters"]["delta"]["khugepaged/pages_collapsed"]
    starts = [r["window"]["start"] for r in reports]
    assert starts == sorted(starts)
    assert (tmp_path / CURRENT).resolve() == rec.kept()[-1]


def replay_parts(header: dict, parts: list[Part]) -> dict:
    from khmon.model.model import Model

    m = Model(header)
    for p in parts:
        m.add(p)
    return m.report()


def test_total_stays_under_the_cap_oldest_removed_first(tmp_path: Path) -> None:
    s, parts = _stream(seconds=20)
    other = tmp_path / "notes.txt"
    other.write_text("not khmon's")
    written = []
    rec = FlightRecorder(tmp_path, 100_000, s.header, file_bytes=25_000)
    largest_second = 0
    before = 0
    for p in parts:
        rec.add(p)
        if p.kind == STATS:
            largest_second = max(largest_second, rec.bytes_written - before)
            before = rec.bytes_written
            written.append(rec.kept_bytes())
    rec.close()
    assert rec.removed > 0
    # at most the cap, plus the one second of records the current file may run over
    assert max(written) <= 100_000 + largest_second
    assert other.read_text() == "not khmon's"
    kept = rec.kept()
    assert kept and all(Reader(p).header for p in kept)
    assert rec.bytes_written > rec.kept_bytes()


def test_rotate_soon_starts_a_new_file_at_the_next_stats_part(tmp_path: Path) -> None:
    s, parts = _stream(seconds=6)
    rec = _record(tmp_path, parts, s.header, max_bytes=64 << 20, file_bytes=1 << 20,
                  hup_at={2, 4})
    assert rec.rotations == 2
    reports = _reports(rec)
    # asked after the 2nd and 4th stats parts: the 3rd and 5th start new files
    assert [r["window"]["seconds"] for r in reports] == [3.0, 2.0, 1.0]
    header = Reader(rec.kept()[1]).header
    assert header["flight_recorder"] == {"rotated_because": "SIGHUP"}
    assert header["start_mono_ns"] == START_NS + 3 * SEC


def test_a_file_cut_by_sigkill_reads_up_to_its_last_part(tmp_path: Path) -> None:
    s, parts = _stream(seconds=4)
    rec = FlightRecorder(tmp_path, 64 << 20, s.header)
    for p in parts[:-3]:
        rec.add(p)
    # no close(): the process was killed; append half a frame, as a write cut short would
    with open(rec.path, "ab") as f:
        f.write(b"S\x10\x00\x00\x00")
    reader = Reader(rec.path)
    r = replay(reader).report(reader.warnings)
    assert any("cut short" in w for w in reader.warnings)
    assert r["events"]["mm_khugepaged_scan_pmd"] > 0


def test_a_write_error_stops_the_recording_not_the_stream(tmp_path: Path) -> None:
    s, parts = _stream(seconds=3)
    logged: list[str] = []
    rec = FlightRecorder(tmp_path, 64 << 20, s.header, log=logged.append)
    rec.writer._f = open("/dev/full", "wb")  # noqa: SIM115 (ENOSPC: a full disk)
    for p in parts:
        rec.add(p)
    assert rec.write_errors == 1 and rec.writer is None
    assert any("recording stopped" in m for m in logged)
    json.dumps(logged)
