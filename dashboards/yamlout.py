"""A small YAML writer for the rules and provisioning files this package generates.

The venv has no YAML library, and these files only need maps, lists, numbers, booleans and
strings. A string that could be read as anything else (a number, a boolean, a key, a comment)
is quoted (single quotes, or double quotes with JSON escapes, which YAML reads the same way
when the string holds a single quote); a string with line
breaks is a literal block, so PromQL and descriptions stay readable. promtool parses the rules
and the Prometheus configuration written with it (tests/service), which keeps it honest.
"""

from __future__ import annotations

import json
import re
from typing import Any

_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./-]*")
_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        if _PLAIN.fullmatch(v) and v.lower() not in _WORDS:
            return v
        if "'" not in v and v.isprintable():
            return f"'{v}'"  # single-quoted: backslashes and double quotes stay as they are
        return json.dumps(v, ensure_ascii=False)
    raise TypeError(f"cannot write {type(v).__name__} as YAML")


def _block(text: str, indent: int) -> str:
    chomp = "|" if text.endswith("\n") else "|-"
    pad = " " * indent
    body = "\n".join(pad + line if line else "" for line in text.rstrip("\n").split("\n"))
    return f"{chomp}\n{body}"


def _entry(head: str, item: Any, indent: int) -> list[str]:
    """`head` ("key:" or "-") and its item: on the same line when it is a scalar or a block,
    nested below otherwise (a map in a list starts on the dash's line)."""
    pad = " " * indent
    if isinstance(item, dict | list) and item:
        inner = _lines(item, indent + 2)
        if head == "-" and isinstance(item, dict):
            return [f"{pad}- {inner[0].lstrip()}", *inner[1:]]
        return [f"{pad}{head}", *inner]
    if isinstance(item, str) and "\n" in item:
        return [f"{pad}{head} {_block(item, indent + 2)}"]
    return [f"{pad}{head} {'{}' if item == {} else '[]' if item == [] else _scalar(item)}"]


def _lines(v: Any, indent: int) -> list[str]:
    if isinstance(v, dict):
        return [line for k, item in v.items() for line in _entry(f"{_scalar(k)}:", item, indent)]
    if isinstance(v, list):
        return [line for item in v for line in _entry("-", item, indent)]
    return [" " * indent + _scalar(v)]


def dump(doc: Any, header: str = "") -> str:
    """`doc` as a YAML document, after `header` (comment lines, '# ' added)."""
    comments = [f"# {line}".rstrip() for line in header.splitlines()]
    return "\n".join([*comments, *_lines(doc, 0)]) + "\n"
