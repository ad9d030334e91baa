"""Running the khmon command line as a process, for the CLI tests: the command, and the
one-line error every user-caused failure must be."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

_SCRIPT = Path(sys.executable).parent / "khmon"
KHMON = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "khmon"]


def khmon(*args: str | Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run khmon with these arguments; stdin is /dev/null unless given."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("capture_output", "stdout" not in kw and "stderr" not in kw)
    return subprocess.run([*KHMON, *map(str, args)], text=True, timeout=60, **kw)


def one_error_line(p: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line of a failed run, `khmon: error: <problem> (<fix>)`."""
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("khmon: error: "), lines[0]
    assert lines[0].endswith(")"), lines[0]  # names the fix
    return lines[0]
