"""The one codec for per-PMD present-PTE bitmaps.

A bitmap has one bit per PTE of a PMD, 512 on x86-64: bit i is PTE i. In memory (the
kernel's collapse_control.mthp_present_ptes, an unsigned long[8], and khmon's BPF PTE walk)
it is 64 bytes where bit k of byte j is PTE 8j+k, which on little-endian x86-64 is the
little-endian integer of those bytes. khmon holds bitmaps as Python ints in that sense
(cheap to AND, count and compare), prints them as the 128 hex digits of the 64 bytes in
memory order, and reads them back the same way. Nothing else converts bitmaps.
"""

from __future__ import annotations

from .geometry import BITMAP_BYTES, PTES

ALL = (1 << PTES) - 1


def from_bytes(raw: bytes) -> int:
    """A bitmap as it lies in kernel memory (64 bytes) -> int, bit i = PTE i."""
    return int.from_bytes(raw, "little")


def to_bytes(bits: int) -> bytes:
    return bits.to_bytes(BITMAP_BYTES, "little")


def to_hex(bits: int) -> str:
    """128 hex digits: byte 0 (PTEs 0-7) first, as reports and recordings show bitmaps."""
    return to_bytes(bits).hex()


def from_hex(text: str) -> int:
    """The inverse of to_hex; ValueError for anything that is not 64 bytes of hex."""
    raw = bytes.fromhex(text)
    if len(raw) != BITMAP_BYTES:
        raise ValueError(f"a PMD bitmap is {BITMAP_BYTES} bytes, got {len(raw)}")
    return from_bytes(raw)


def count(bits: int) -> int:
    """Set bits: present PTEs."""
    return bits.bit_count()


def weight(bits: int, offset: int, nr: int) -> int:
    """The kernel's bitmap_weight_from(bits, offset, offset + nr): set bits in [offset, offset+nr)."""
    return (bits >> offset & ((1 << nr) - 1)).bit_count()


def span(offset: int, order: int) -> int:
    """The bits of PTEs [offset, offset + 2^order)."""
    return ((1 << (1 << order)) - 1) << offset


def bits_list(bits: int, n: int = PTES) -> list[bool]:
    """PTE i's bit for i in 0..n-1 (the grid view)."""
    return [bool(bits >> i & 1) for i in range(n)]
