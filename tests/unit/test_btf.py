"""btf: a hand-built BTF blob, so every offset asserted here is computed by hand."""

from __future__ import annotations

import struct

import pytest

from khmon.kernel.btf import Btf, Scalar

INT, PTR, STRUCT, UNION, FUNC, FUNC_PROTO, TYPEDEF = 1, 2, 4, 5, 12, 13, 8


def _blob() -> bytes:
    names = [b"", b"int", b"inner", b"b", b"outer", b"a", b"f", b"x", b"p", b"_Bool", b"u32"]
    strs = b"\0".join(names) + b"\0"
    off = {n.decode(): strs.index(b"\0" + n + b"\0") + 1 for n in names if n}

    def t(name: str, kind: int, vlen: int, sot: int, kflag: int = 0) -> bytes:
        return struct.pack("<III", off[name] if name else 0,
                           (kflag << 31) | (kind << 24) | vlen, sot)

    types = b"".join([
        t("int", INT, 0, 4) + struct.pack("<I", (1 << 24) | 32),        # 1: int, signed
        t("inner", STRUCT, 1, 8) + struct.pack("<III", off["b"], 1, 32),  # 2: {pad; int b}
        t("outer", STRUCT, 2, 16)                                          # 3
        + struct.pack("<III", off["a"], 1, 0)                              #    int a at 0
        + struct.pack("<III", 0, 4, 64),                                   #    anon union at 8
        t("", UNION, 1, 8) + struct.pack("<III", 0, 2, 0),                 # 4: union {inner}
        t("", PTR, 0, 3),                                                  # 5: outer *
        t("", FUNC_PROTO, 2, 0)                                            # 6: (int x, outer *p)
        + struct.pack("<II", off["x"], 1) + struct.pack("<II", off["p"], 5),
        t("f", FUNC, 0, 6),                                                # 7
        t("_Bool", INT, 0, 1) + struct.pack("<I", (4 << 24) | 8),          # 8: bool
        t("u32", TYPEDEF, 0, 1),                                           # 9: typedef int u32
    ])
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strs))
    return hdr + types + strs


def test_member_offsets_through_anonymous_members() -> None:
    btf = Btf(_blob())
    assert btf.n_types == 9
    assert btf.member_offset("outer", "a") == 0
    # b: inner starts at bit 64 of outer (8 bytes), b at bit 32 of inner (4 bytes) -> 12
    assert btf.member_offset("outer", "b") == 12
    assert btf.member_offset("outer", "nope") is None
    assert btf.member_offset("nostruct", "a") is None


def test_function_parameters_and_scalars() -> None:
    btf = Btf(_blob())
    assert btf.has_func("f") and not btf.has_func("g")
    assert btf.func_params("f") == [("x", Scalar("int", 4, True)),
                                    ("p", Scalar("struct outer *", 8, False))]
    assert btf.scalar(8) == Scalar("bool", 1, False)
    assert btf.scalar(9) == Scalar("int", 4, True)  # typedefs followed
    assert btf.scalar(3) is None  # a struct is not a scalar


def test_names_match_whole_strings_only() -> None:
    btf = Btf(_blob())
    assert btf.find("STRUCT", "outer") == 3
    assert btf.find("STRUCT", "oute") is None
    assert btf.find("INT", "outer") is None


def test_not_btf() -> None:
    with pytest.raises(ValueError):
        Btf(b"\0" * 40)
