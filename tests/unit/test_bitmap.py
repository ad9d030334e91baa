"""The bitmap codec (khmon.bitmap): bit i = PTE i, 64 bytes in memory order, bit k of
byte j = PTE 8j+k, hand-placed here."""

from __future__ import annotations

import pytest

from khmon import bitmap


def test_hex_is_the_bytes_in_memory_order() -> None:
    assert bitmap.from_hex("01" + "00" * 63) == 1 << 0
    assert bitmap.from_hex("80" + "00" * 63) == 1 << 7
    assert bitmap.from_hex("00" + "01" + "00" * 62) == 1 << 8
    assert bitmap.from_hex("00" * 63 + "80") == 1 << 511
    every4th = sum(1 << i for i in range(512) if i % 4 != 3)
    assert bitmap.from_hex("77" * 64) == every4th
    assert bitmap.to_hex(every4th) == "77" * 64
    with pytest.raises(ValueError, match="64 bytes"):
        bitmap.from_hex("00" * 8)


def test_bytes_count_weight_and_bits() -> None:
    raw = bytearray(64)
    raw[0], raw[63] = 0b0000_0101, 0b1000_0000  # PTEs 0, 2 and 511
    bits = bitmap.from_bytes(bytes(raw))
    assert bitmap.to_bytes(bits) == bytes(raw)
    assert [i for i, x in enumerate(bitmap.bits_list(bits)) if x] == [0, 2, 511]
    assert bitmap.count(bits) == 3
    assert bitmap.weight(bits, 0, 8) == 2 and bitmap.weight(bits, 1, 1) == 0
    assert bitmap.weight(bits, 256, 256) == 1
    assert bitmap.span(4, 2) == 0b1111 << 4
