"""Fuzz of the recording reader (issue 10, items 4 and 5).

The input is a small real recording (data/recordings/host-6.18.khrec: `khmon record` on the
6.18 host while two workloads ran, kept whole but for two of its three stats parts): a
header, a stats part, scan, isolate and collapse records, a pages part and the end part.
Each case goes through the whole `khmon report FILE` path in-process (Reader, Model,
result, text) and must end one of two ways:
  - a report: for a cut, complete False and one warning that says where the cut is, with
    every part before the cut read and nothing else;
  - a refusal: KhmonError, exit 2, one line.
Nothing else: no other exception, and no intact data dropped without a word. The cases are
the file cut at every byte offset; each bit of each part's kind, length and checksum fields
flipped; bytes of each payload flipped; and several hundred crafted parts whose checksums
are valid but whose shapes are not what khmon writes.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import random
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from khcli import khmon

from khmon.errors import KhmonError
from khmon.model.model import Model
from khmon.outputs.text import render_report
from khmon.stream import recording
from khmon.stream.frames import FRAME, SIGNATURE
from khmon.stream.recording import Part, Reader

REAL = Path(__file__).parent / "data" / "recordings" / "host-6.18.khrec"
DATA = REAL.read_bytes()


def _frames(data: bytes) -> list[tuple[int, str, bytes]]:
    """(offset, kind, payload) of each frame."""
    out, pos = [], SIGNATURE
    while pos < len(data):
        kind, length, _ = FRAME.unpack_from(data, pos)
        out.append((pos, chr(kind), data[pos + FRAME.size:pos + FRAME.size + length]))
        pos += FRAME.size + length
    return out


FRAMES = _frames(DATA)
BOUNDS = [pos for pos, _, _ in FRAMES] + [len(DATA)]
HEADER = json.loads(FRAMES[0][2])


def _frame(kind: str, payload: bytes) -> bytes:
    return FRAME.pack(ord(kind), len(payload), zlib.crc32(payload)) + payload


def _rebuild(frames: list[tuple[str, bytes]]) -> bytes:
    return DATA[:SIGNATURE] + b"".join(_frame(k, p) for k, p in frames)


@pytest.fixture(autouse=True)
def no_live_recorder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recording's recorder pid could be reused on this host: never 'still written'."""
    monkeypatch.setattr(recording, "running_recorder", lambda header: None)


def _report(path: Path) -> tuple[list[Part], Reader, dict]:
    """`khmon report FILE` without printing: the parts read, the reader, the report."""
    reader = Reader(path)
    model = Model(reader.header, reader.layouts)
    parts = []
    for part in reader.parts():
        model.add(part)
        parts.append(part)
    result = model.report(reader.warnings)
    render_report(result, grids=3)
    return parts, reader, result


def _read(path: Path) -> tuple[list[Part], Reader, dict]:
    """The Reader alone (a report of fewer whole parts is no different for the rest)."""
    reader = Reader(path)
    parts = list(reader.parts())
    return parts, reader, {"window": {"complete": reader.complete}}


def _outcome(path: Path, data: bytes | None, how: Callable[[Path], Any] = _report
             ) -> tuple[list[Part], Reader, dict] | KhmonError:
    """`how` on `data` written to `path` (None: on what `path` holds already)."""
    if data is not None:
        path.write_bytes(data)
    try:
        return how(path)
    except KhmonError as e:
        assert e.exit_code == 2, e
        assert "\n" not in str(e), e
        assert str(path) in str(e), e
        return e


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> list[Part]:
    parts, reader, result = _report(REAL)
    assert reader.complete and reader.warnings == [] and result["events"]
    assert {p.kind for p in parts} == {"R", "S", "P", "E"}
    return parts


def _cuts(path: Path, offsets: range, whole: list[Part]) -> int:
    """Check the recording cut at each of `offsets` (ascending); the number checked."""
    path.write_bytes(DATA)
    near = {b + d for b in BOUNDS for d in (-1, 0, 1)}
    for n in reversed(offsets):
        os.truncate(path, n)  # shorter and shorter: cheaper than writing each cut anew
        got = _outcome(path, None, _report if n in near or n % 101 == 0 else _read)
        if n < BOUNDS[1]:  # inside the signature or the header: nothing to report
            assert isinstance(got, KhmonError), n
            assert ("cut short" in str(got) or "empty file" in str(got)), (n, got)
            continue
        assert not isinstance(got, KhmonError), (n, got)
        parts, reader, result = got
        whole_parts = sum(1 for b in BOUNDS[2:] if b <= n)
        assert parts == whole[:whole_parts], n  # every part before the cut, nothing else
        assert not reader.complete and not result["window"]["complete"], n
        (warning,) = reader.warnings
        if n in BOUNDS:
            assert warning.startswith("recording has no end part"), (n, warning)
        else:
            start = max(b for b in BOUNDS if b <= n)
            assert warning.startswith(f"recording cut short: the last {n - start} bytes, "
                                      f"from byte {start}, are an incomplete "), (n, warning)
        assert "cannot be known" in warning or "no stats part" in warning, warning
    return len(offsets)


def test_cut_at_every_byte(tmp_path: Path, whole: list[Part]) -> None:
    """Through the Reader at every offset, and through the whole report at every part's
    boundaries and every 101st offset; the offsets are shared out over the CPUs (each
    Reader parses the real header again: about 0.6 ms a cut)."""
    workers = min(4, os.cpu_count() or 1)
    chunk = -(-len(DATA) // workers)
    jobs = [(tmp_path / f"cut{i}.khrec", range(i * chunk, min(len(DATA), (i + 1) * chunk)),
             whole) for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        done = sum(pool.map(_cuts, *zip(*jobs, strict=True)))
    assert done == len(DATA)


def _flipped(offset: int, bit: int) -> bytes:
    data = bytearray(DATA)
    data[offset + bit // 8] ^= 1 << bit % 8
    return bytes(data)


@pytest.mark.parametrize(("field", "at", "bits", "says"), [
    ("kind", 0, 8, ("unknown part", "bad JSON", "do not fit its layout")),
    ("length", 1, 32, ("damaged length field", "checksum mismatch")),
    ("checksum", 5, 32, ("checksum mismatch",)),
])
def test_each_bit_of_each_frame_header(tmp_path: Path, field: str, at: int, bits: int,
                                        says: tuple[str, ...]) -> None:
    """A damaged length used to read as a cut ("cut short", exit 0), dropping every intact
    part after it; now every flip is refused, saying at which byte."""
    path = tmp_path / f"{field}.khrec"
    for pos, _, _ in FRAMES:
        for bit in range(bits):
            got = _outcome(path, _flipped(pos + at, bit))
            assert isinstance(got, KhmonError), (field, pos, bit)
            assert any(s in str(got) for s in says) and f"at byte {pos}" in str(got), got


def test_payload_bytes(tmp_path: Path) -> None:
    path = tmp_path / "payload.khrec"
    rnd = random.Random(10)
    for pos, _, payload in FRAMES:
        for i in sorted(rnd.sample(range(len(payload)), min(8, len(payload)))):
            got = _outcome(path, _flipped(pos + FRAME.size + i, rnd.randrange(8)))
            assert isinstance(got, KhmonError) and "checksum mismatch" in str(got), (pos, i)


# Crafted parts: checksums valid, shapes wrong. Each is (name, frames) built from the real
# ones; `accept` names the few that are still a recording khmon could have written.
WRONG = [None, True, 0, -1, 1.5, "", "x", [], [1], {}, {"x": 1}]


def _with_header(h: Any) -> list[tuple[str, bytes]]:
    return [("H", json.dumps(h).encode()), *((k, p) for _, k, p in FRAMES[1:])]


def _set(doc: Any, path: tuple, value: Any) -> Any:
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


_DELETE = object()
_OPTIONAL = {"host", "start_wall", "attached", "btf_offsets", "owner_source", "options",
             "vma_flag_bits", "function_probes", "pagemap_ref", "settings", "counters",
             "recorder_pid", "kernel.version", "kernel.machine"}


def _header_cases() -> Iterator[tuple[str, list[tuple[str, bytes]], bool]]:
    """(name, frames, accepted): each header field deleted or given each wrong value."""
    paths = [(k,) for k in HEADER] + [("kernel", k) for k in HEADER["kernel"]]
    paths += [("events", 0, k) for k in HEADER["events"][0]]
    paths += [("events", 5, k) for k in HEADER["events"][5]]  # the raw tracepoint's
    paths += [("options", "pid"), ("function_probes", "mode"), ("function_probes", "refused")]
    for path in paths:
        orig = HEADER
        for key in path:
            orig = orig[key]
        name = ".".join(map(str, path))
        generic = ".".join(str(p if not isinstance(p, int) else 0) for p in path)
        yield (f"{name} deleted", _with_header(_set(HEADER, path, _DELETE)),
               generic in _OPTIONAL or path[-1] in ("mode", "refused", "pid"))
        for value in WRONG:
            optional_str = name in ("pagemap_ref", "function_probes.mode")
            same = type(value) is type(orig) or (optional_str and (value is None
                                                                    or isinstance(value, str)))
            if value == orig or same:
                continue
            yield f"{name} = {value!r}", _with_header(_set(HEADER, path, value)), False
    for version in (0, 2, "1", 1.0):
        yield f"version {version!r}", _with_header(_set(HEADER, ("version",), version)), False
    raw = ("events", 5, "raw_args")
    assert HEADER["events"][5].get("raw_args"), "the real header's scan_pmd is a raw tracepoint"
    for value in ([], [[]], [["pfn", "u64", 8]], [["pfn", "u64", -8, 8, False]],
                  [["pfn", "u64", 8, 8, False], ["pfn", "u64", 16, 8, False]],
                  [["1pfn", "u64", 8, 8, False]], [["_pfn", "u64", 8, 8, False]],
                  [["class", "u64", 8, 8, False]]):
        yield f"raw_args {value!r}", _with_header(_set(HEADER, raw, value)), False
    for value in ("", "not a format", "name: x\nfield:int a;\toffset:8;\tsize:4;\tsigned:1;\n",
                  "name: mm_khugepaged_scan_pmd\nformat:\n\tfield:unsigned long pfn;\t"
                  "offset:8;\tsize:99999999999;\tsigned:0;\n"):
        yield (f"format {value[:20]!r}", _with_header(_set(HEADER, ("events", 0, "format"),
                                                              value)), False)
    yield "events empty", _with_header(_set(HEADER, ("events",), [])), False
    yield "events[0] a list", _with_header(_set(HEADER, ("events", 0), [1])), False
    yield "settings max_ptes_none", _with_header(
        _set(HEADER, ("settings", "khugepaged/max_ptes_none"), "many")), False
    yield "settings hugepages key", _with_header(
        _set(HEADER, ("settings", "hugepages-xkB/enabled"), "always")), False
    yield "counters value", _with_header(_set(HEADER, ("counters", "thp_fault_alloc"), "1")), False
    yield "attached value", _with_header(
        _set(HEADER, ("attached", "mm_khugepaged_scan_pmd"), 1)), False
    yield "pagemap_ref names no field", _with_header(_set(HEADER, ("pagemap_ref",), "nope")), False
    yield "header a list", [("H", b"[1, 2]"), *((k, p) for _, k, p in FRAMES[1:])], False
    yield "header deeply nested", [("H", b"[" * 100_000 + b"]" * 100_000)], False


def _stats_like() -> dict:
    return json.loads(next(p for _, k, p in FRAMES if k == "S"))


def _pages_like() -> dict:
    return json.loads(next(p for _, k, p in FRAMES if k == "P"))


def _part_cases() -> Iterator[tuple[str, list[tuple[str, bytes]], bool]]:
    """(name, frames, accepted): stats, end, pages and records parts of the wrong shape."""
    head = [(k, p) for _, k, p in FRAMES[:1]]
    rest = [(k, p) for _, k, p in FRAMES[1:]]
    for kind, like in (("S", _stats_like()), ("E", _stats_like()), ("P", _pages_like())):
        for value in ([], 1, "x", None, True):
            yield f"{kind} part {value!r}", [*head, (kind, json.dumps(value).encode())], False
        keys = [(k,) for k in like] + [("probe", k) for k in like.get("probe", {})]
        for path in keys:
            required = (kind == "P" and path[0] not in ("comm", "ts", "pfn")) or path == ("mono_ns",)
            yield (f"{kind}.{'.'.join(path)} deleted",
                   [*head, (kind, json.dumps(_set(like, path, _DELETE)).encode())], not required)
            orig = like
            for key in path:
                orig = orig[key]
            for value in WRONG:
                if type(value) is type(orig) or value == orig:
                    continue
                yield (f"{kind}.{'.'.join(path)} = {value!r}",
                       [*head, (kind, json.dumps(_set(like, path, value)).encode())], False)
        yield f"{kind} deeply nested", [*head, (kind, b"[" * 100_000 + b"]" * 100_000)], False
        yield f"{kind} not UTF-8", [*head, (kind, b'{"mono_ns": "\xff"}')], False
        yield f"{kind} a huge number", [*head, (kind, b'{"mono_ns": 1' + b"0" * 5000 + b"}")], False
    pages = _pages_like()
    for key in ("present", "zero", "swap"):
        for value in ("ff" * 63, "ff" * 65, "zz" * 64):
            yield (f"P.{key} = {value[:6]}...",
                   [*head, ("P", json.dumps({**pages, key: value}).encode())], False)
    scan = next(p for _, k, p in FRAMES if k == "R")
    for name, payload in (("empty", b""), ("one byte", b"\x00"), ("event 99", b"\x63\x00" + scan[2:]),
                          ("a record and a byte", scan + b"\x00"), ("half a record", scan[:40])):
        yield f"R {name}", [*head, ("R", payload)], False
    yield "a second header", [*head, *rest[:2], head[0], *rest[2:]], False
    yield "a part after the end", [*head, *rest, rest[0]], False
    yield "two end parts", [*head, *rest, rest[-1]], False
    yield "no header", rest, False
    yield "stats instead of a header", [("S", rest[0][1]), *rest], False


def _cases() -> list[tuple[str, list[tuple[str, bytes]], bool]]:
    return [*_header_cases(), *_part_cases()]


def test_crafted_parts_with_valid_checksums(tmp_path: Path) -> None:
    cases = _cases()
    assert len(cases) >= 300, len(cases)
    path = tmp_path / "crafted.khrec"
    for name, frames, accepted in cases:
        got = _outcome(path, _rebuild(frames))
        if accepted:
            assert not isinstance(got, KhmonError), (name, got)
        else:
            assert isinstance(got, KhmonError), name


def _mutate(rnd: random.Random) -> Callable[[bytes], bytes]:
    return rnd.choice([
        lambda b: b[:rnd.randrange(len(b))],
        lambda b: _flipped(rnd.randrange(len(b)), rnd.randrange(8)),
        lambda b: b + rnd.randbytes(rnd.randrange(1, 40)),
    ])


def test_through_the_command_line(tmp_path: Path) -> None:
    """A sample of the same cases through `khmon report`: exit 0 or 2, one line, no traceback."""
    rnd = random.Random(7)
    path = tmp_path / "cli.khrec"
    cases = _cases()
    for name, frames, accepted in rnd.sample(cases, 12):
        path.write_bytes(_rebuild(frames))
        p = khmon("report", path)
        assert p.returncode == (0 if accepted else 2), (name, p.stderr)
        assert "Traceback" not in p.stderr, (name, p.stderr)
        assert len(p.stderr.splitlines()) == (0 if accepted else 1), (name, p.stderr)
    for _ in range(10):
        path.write_bytes(_mutate(rnd)(DATA))
        p = khmon("report", path, "--json")
        assert p.returncode in (0, 2) and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.splitlines()) == 1, p.stderr  # the warning, or the error


def test_random_record_values(tmp_path: Path) -> None:
    """Records of the right size whose every byte is random, for the real recording's events
    and for the 7.2 function-probe events (the correlator's input): a report or a refusal,
    never a traceback and never memory exhausted (an order is a shift count downstream)."""
    from khdata import capture_header, func_layouts_72

    from khmon.stream.layout import header_events

    lays72 = func_layouts_72()
    head72 = {**capture_header("7.2", "7.2.13"), "events": header_events(lays72),
              "vma_flag_bits": {"uffd_missing": 512, "hugepage": 1 << 29}}
    real = Reader(REAL).layouts
    rnd = random.Random(11)
    path = tmp_path / "values.khrec"
    for i in range(200):
        header, lays = (HEADER, real) if i % 2 else ({"version": 1, **head72}, lays72)
        frames = [("H", json.dumps(header).encode())]
        for _ in range(6):
            lay = rnd.choice(lays)
            frames.append(("R", lay.index.to_bytes(2, "little")
                           + rnd.randbytes(lay.size * rnd.randrange(1, 4))))
        frames.append(("E", json.dumps({"mono_ns": header["start_mono_ns"] + 10**9}).encode()))
        got = _outcome(path, _rebuild(frames))
        if isinstance(got, KhmonError):
            assert "order above the PMD order" in str(got), got
