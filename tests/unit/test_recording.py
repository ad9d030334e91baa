"""recording: the file format, round trips, files cut at every byte, and foreign files."""

from __future__ import annotations

import json
import random
import struct
import zlib
from pathlib import Path

import pytest
from khdata import layouts

from khmon.errors import KhmonError
from khmon.stream.layout import header_events
from khmon.stream.parts import Part
from khmon.stream.recording import Reader, Writer

# The documented format, written out here: magic, u16 version, frames <kind:u8><len:u32><crc:u32>
MAGIC = b"\x89KHMON\r\n\x1a\n"
LAYOUTS = layouts("6.18")
HEADER = {"kernel": {"release": "6.18.44"}, "events": header_events(LAYOUTS), "start_mono_ns": 5}
SIZE0, SIZE1 = LAYOUTS[0].size, LAYOUTS[1].size


def _frame(kind: bytes, payload: bytes) -> bytes:
    return struct.pack("<BII", kind[0], len(payload), zlib.crc32(payload)) + payload


def _parts() -> list[Part]:
    return [
        Part("R", event=0, data=b"\x01" * SIZE0),
        Part("R", event=1, data=bytes(range(SIZE1)) * 2),
        Part("S", meta={"probe": {"seen": {"a": 3}}, "mono_ns": 10}),
        Part("P", meta={"mm": 1, "address": 2 << 20, "pid": 7, "ref": 3, "present": "ff" * 64,
                        "zero": "00" * 64, "swap": "00" * 64, "none": 0, "shared": 0}),
        Part("R", event=0, data=b"\x02" * SIZE0 * 3),
        Part("E", meta={"probe": {"seen": {"a": 7}}, "mono_ns": 20}),
    ]


def _write(path: Path, parts: list[Part], header: dict = HEADER) -> None:
    w = Writer(path, header)
    for p in parts:
        w.add(p)
    w.close()


def _read_all(path: Path) -> tuple[Reader, list[Part]]:
    r = Reader(path)
    return r, list(r.parts())


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run.khrec"
    parts = _parts()
    _write(path, parts)
    r, got = _read_all(path)
    assert r.header == {"version": 1, **HEADER}
    assert got == parts
    assert r.complete is True
    assert r.warnings == []


def test_bytes_on_disk_are_the_documented_format(tmp_path: Path) -> None:
    path = tmp_path / "run.khrec"
    w = Writer(path, {"a": 1})
    w.add(Part("R", event=3, data=b"xyz"))
    w.add(Part("R", event=4, data=b""))  # nothing to write: no frame
    w.add(Part("E", meta={"b": 2}))
    w.close()
    expected = (MAGIC + b"\x01\x00"
                + _frame(b"H", json.dumps({"version": 1, "a": 1}).encode())
                + _frame(b"R", b"\x03\x00xyz")
                + _frame(b"E", b'{"b": 2}'))
    data = path.read_bytes()
    assert data == expected
    assert w.bytes_written == len(expected)


def test_without_end_part_warns(tmp_path: Path) -> None:
    path = tmp_path / "run.khrec"
    _write(path, _parts()[:3])
    r, got = _read_all(path)
    assert got == _parts()[:3]
    assert r.complete is False
    assert len(r.warnings) == 1 and "no end part" in r.warnings[0]


def test_cut_at_every_byte(tmp_path: Path) -> None:
    full = tmp_path / "full.khrec"
    parts = _parts()
    _write(full, parts)
    data = full.read_bytes()
    # frame boundaries, from the payload sizes (9-byte frame header, R adds a u16 event index)
    head_end = len(MAGIC) + 2 + 9 + len(json.dumps({"version": 1, **HEADER}).encode())
    bounds = [head_end]
    for p in parts:
        size = 2 + len(p.data) if p.kind == "R" else len(json.dumps(p.meta).encode())
        bounds.append(bounds[-1] + 9 + size)
    assert bounds[-1] == len(data)

    cut = tmp_path / "cut.khrec"
    refused = read = 0
    for n in range(len(data)):
        cut.write_bytes(data[:n])
        if n < head_end:
            with pytest.raises(KhmonError) as e:
                Reader(cut)
            assert e.value.exit_code == 2, n
            assert "\n" not in str(e.value)
            refused += 1
            continue
        r, got = _read_all(cut)
        complete_frames = sum(1 for b in bounds[1:] if b <= n)
        assert got == parts[:complete_frames], n
        assert r.complete is False, n
        assert len(r.warnings) == 1, (n, r.warnings)
        if n in bounds:
            assert "no end part" in r.warnings[0], n
        else:
            assert "cut short" in r.warnings[0], n
            assert f"last {n - bounds[complete_frames]} bytes" in r.warnings[0], n
        read += 1
    assert refused == head_end and read == len(data) - head_end


def _foreign_cases(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    good = tmp_path / "good.khrec"
    _write(good, _parts())
    data = good.read_bytes()
    hdr_payload_at = len(MAGIC) + 2 + 9
    bounds_h = hdr_payload_at + len(json.dumps({"version": 1, **HEADER}).encode())
    flipped_header = bytearray(data)
    flipped_header[hdr_payload_at + 3] ^= 0x01
    flipped_record = bytearray(data)
    flipped_record[-20] ^= 0x40  # inside the E part's JSON
    rnd = random.Random(1234)
    return {
        "empty": (b"", "empty"),
        "random": (bytes([0x00]) + rnd.randbytes(4095), "bad magic"),
        "text": (b"hello, this is a text file\nwith two lines\n", "bad magic"),
        "png": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(20), "bad magic"),
        "flipped header byte": (bytes(flipped_header), "checksum"),
        "future version": (MAGIC + b"\x02\x00" + data[len(MAGIC) + 2:], "version 2"),
        "magic only": (MAGIC, "cut short inside its 12-byte signature"),
        "unknown part kind": (data[:len(MAGIC) + 2] + _frame(b"Z", b"{}"), "unknown part"),
        "header is not JSON": (MAGIC + b"\x01\x00" + _frame(b"H", b"\xff{"), "bad JSON"),
        "first part not a header": (MAGIC + b"\x01\x00" + _frame(b"E", b"{}"),
                                    "no header: the first part, at byte 12, is an end part"),
        "record part without event index": (data[:bounds_h] + _frame(b"R", b"\x01"),
                                            "empty record part"),
        "header version 2": (MAGIC + b"\x01\x00" + _frame(b"H", json.dumps(
            {**HEADER, "version": 2}).encode()), "recording header version 2; this khmon "
            "reads version 1"),
    }


@pytest.mark.parametrize("case", [
    "empty", "random", "text", "png", "flipped header byte", "future version", "magic only",
    "unknown part kind", "header is not JSON", "first part not a header",
    "record part without event index", "header version 2"])
def test_foreign_files_refused(tmp_path: Path, case: str) -> None:
    content, words = _foreign_cases(tmp_path)[case]
    path = tmp_path / "foreign"
    path.write_bytes(content)
    with pytest.raises(KhmonError) as e:
        _read_all(path)
    assert e.value.exit_code == 2
    msg = str(e.value)
    assert "\n" not in msg
    assert words in msg
    assert str(path) in msg


def test_flipped_byte_in_a_later_part_is_a_checksum_error(tmp_path: Path) -> None:
    good = tmp_path / "good.khrec"
    _write(good, _parts())
    data = bytearray(good.read_bytes())
    data[-20] ^= 0x40  # inside the E part's JSON payload
    path = tmp_path / "bad.khrec"
    path.write_bytes(bytes(data))
    r = Reader(path)  # the header is intact
    with pytest.raises(KhmonError) as e:
        list(r.parts())
    assert e.value.exit_code == 2
    assert "checksum" in str(e.value) and "\n" not in str(e.value)


def test_unreadable_paths(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.khrec", tmp_path):
        with pytest.raises(KhmonError) as e:
            Reader(path)
        assert e.value.exit_code == 2
        assert "\n" not in str(e.value)


def test_writer_refuses_a_header_part(tmp_path: Path) -> None:
    w = Writer(tmp_path / "x.khrec", HEADER)
    with pytest.raises(ValueError):
        w.add(Part("H", meta={}))
    w.close()


def test_writer_to_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(KhmonError) as e:
        Writer(tmp_path / "no" / "such" / "dir.khrec", HEADER)
    assert "cannot create" in str(e.value)
    assert e.value.exit_code == 1
