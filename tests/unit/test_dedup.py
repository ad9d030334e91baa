"""dedup.Resolver: install and flush records as the BPF code writes them, counted records out.

The records are built by hand the way bpf/khmon.bpf.c lays them out (khdata.pack), and the
expected totals are counted here, not by the resolver.
"""

from __future__ import annotations

from khdata import HDR, by_name, layouts, pack

from khmon.capture.ringbuf import Resolver
from khmon.stream.layout import DEDUP_FLUSH, DEDUP_INSTALL, HEADER_SIZE

SCAN = by_name(layouts("6.18"))["mm_khugepaged_scan_pmd"]


def install(slot: int, cpu: int = 0, ts: int = 1, **values: int) -> bytes:
    return pack(SCAN.fmt, SCAN.index, ts=ts, cpu=cpu, tid=77, owner_tgid=500,
                flags=DEDUP_INSTALL | slot, comm=b"khugepaged", **values)


def flush(slot: int, count: int, cpu: int = 0, ts: int = 2) -> bytes:
    rec = bytearray(HEADER_SIZE)
    HDR.pack_into(rec, 0, ts, count, SCAN.index, cpu, 0, 0, 0, DEDUP_FLUSH | slot, b"", b"")
    return bytes(rec)


def fields(rec: bytes | None) -> dict:
    assert rec is not None
    return SCAN.record_type(*SCAN.struct.unpack(rec))._asdict()


def test_plain_records_pass_unchanged() -> None:
    rec = pack(SCAN.fmt, SCAN.index, status=5)
    assert Resolver().resolve(rec) is rec


def test_install_passes_with_flags_cleared() -> None:
    out = Resolver().resolve(install(3, status=5, pfn=0x1234))
    f = fields(out)
    assert (f["flags"], f["count"], f["status"], f["pfn"], f["tid"]) == (0, 1, 5, 0x1234, 77)


def test_flush_becomes_a_counted_copy_of_its_install() -> None:
    r = Resolver()
    r.resolve(install(3, status=5, pfn=0x1234))
    f = fields(r.resolve(flush(3, 999, ts=42)))
    assert (f["count"], f["ts"], f["status"], f["pfn"], f["owner_tgid"], f["flags"]) == (
        999, 42, 5, 0x1234, 500, 0)


def test_slots_are_per_cpu_and_replaced_by_later_installs() -> None:
    r = Resolver()
    r.resolve(install(3, cpu=0, status=5))
    r.resolve(install(3, cpu=1, status=3))
    assert fields(r.resolve(flush(3, 2, cpu=0)))["status"] == 5
    assert fields(r.resolve(flush(3, 4, cpu=1)))["status"] == 3
    r.resolve(install(3, cpu=0, status=1))  # another payload took the slot on CPU 0
    assert fields(r.resolve(flush(3, 6, cpu=0)))["status"] == 1


def test_counts_add_up_over_a_stream() -> None:
    # slot 0: 1 install + flushes of 10 and 5; slot 1: 1 install + 7; slot 0 again: 1 + 2
    r = Resolver()
    stream = [install(0, status=5), flush(0, 10), install(1, status=3), flush(0, 5), flush(1, 7),
              install(0, status=1), flush(0, 2)]
    out = [r.resolve(rec) for rec in stream]
    by_status: dict[int, int] = {}
    for rec in out:
        f = fields(rec)
        by_status[f["status"]] = by_status.get(f["status"], 0) + f["count"]
    assert by_status == {5: 16, 3: 8, 1: 3}


def test_flush_without_install_is_orphaned_not_dropped() -> None:
    r = Resolver()
    assert r.resolve(flush(9, 12)) is None
    assert r.orphaned[SCAN.index] == 12


def test_repeats_left_in_slots_and_forget() -> None:
    r = Resolver()
    r.resolve(install(4, cpu=1, status=5))
    f = fields(r.repeats((SCAN.index, 1, 4), ts=7, count=3))
    assert (f["count"], f["ts"], f["status"]) == (3, 7, 5)
    r.forget()
    assert r.repeats((SCAN.index, 1, 4), ts=8, count=1) is None
    assert r.orphaned[SCAN.index] == 1
