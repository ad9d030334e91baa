"""A real terminal for `khmon top`: tmux on a private server, at a fixed size, driven as a
person would (keys in, screen out) and checked afterwards for what the program left behind.

    with TopPane(["--local"], tmp_path) as pane:
        pane.wait_for(lambda s: "attached to" in s, 60)
        pane.keys("q")
        assert pane.exit_status(10) == 0
        assert pane.terminal_restored() == []

The command runs under `sh -c 'khmon top ARGS; echo $? > status; stty -a > stty; sleep'`,
so its exit status and the terminal modes it left are read from files, and the pane stays
open for tmux's own view of the terminal state (alternate screen, cursor, mouse, keypad).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[2]
KHMON = ROOT / ".venv" / "bin" / "khmon"
SIZE = (160, 50)
# tmux's view of the modes a full-screen program sets; all must be back to these after exit.
RESTORED = {"alternate_on": "0", "cursor_flag": "1", "mouse_any_flag": "0",
            "mouse_button_flag": "0", "mouse_all_flag": "0", "mouse_sgr_flag": "0",
            "keypad_cursor_flag": "0", "insert_flag": "0", "origin_flag": "0", "wrap_flag": "1"}


class TopPane:
    """`khmon top ARGS` in a fresh tmux server (its own socket), SIZE cells."""

    def __init__(self, args: list[str], tmp: Path, size: tuple[int, int] = SIZE,
                 env: dict[str, str] | None = None, command: list[str] | None = None) -> None:
        """`command`: run that instead of `khmon top` (args are then appended to it)."""
        self.tmp = tmp
        self.server = f"khmon-top-{os.getpid()}-{id(self)}"
        self.status = tmp / "status"
        self.stty = tmp / "stty"
        envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        cmd = " ".join(shlex.quote(a) for a in (*(command or [str(KHMON), "top"]), *args))
        # pytest's terminal writer exports COLUMNS and LINES, and the size they claim
        # wins over the terminal's own (shutil.get_terminal_size): unset them.
        self.script = (f"unset COLUMNS LINES; cd {shlex.quote(str(ROOT))}; {envs} {cmd}; "
                       f"echo $? > {self.status}; "
                       f"stty -a > {self.stty} 2>&1; sleep 3600")
        self.size = size
        self.started = 0.0

    def tmux(self, *args: str, check: bool = True) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TMUX")}
        p = subprocess.run(["tmux", "-L", self.server, *args], capture_output=True, text=True,
                           timeout=30, env=env)
        if check and p.returncode:
            raise AssertionError(f"tmux {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def __enter__(self) -> TopPane:
        w, h = self.size
        self.started = time.monotonic()
        self.tmux("-f", "/dev/null", "new-session", "-d", "-s", "top", "-x", str(w), "-y", str(h),
                  "sh", "-c", self.script)
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.tmux("kill-server", check=False)

    def screen(self) -> str:
        """What the pane shows now, one line per row."""
        return self.tmux("capture-pane", "-p", "-t", "top")

    def wait_for(self, cond: Callable[[str], bool], timeout: float, what: str = "") -> str:
        """The screen once cond(screen) holds; fails with the last screen after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.screen()
            if cond(s):
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"not on screen after {timeout:.0f} s: {what}\n{s}")
            time.sleep(0.2)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "top", *keys)

    def resize(self, w: int, h: int) -> None:
        self.tmux("resize-window", "-t", "top", "-x", str(w), "-y", str(h))

    def pids(self) -> list[int]:
        """khmon top's pid and its descendants' (the capture child)."""
        shell = int(self.tmux("display", "-p", "-t", "top", "#{pane_pid}").strip())
        kids: dict[int, list[int]] = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                kids.setdefault(ppid, []).append(int(d.name))
        out, todo = [], list(kids.get(shell, []))
        while todo:
            p = todo.pop()
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            except OSError:
                continue
            if b"khmon" in cmd:
                out.append(p)
            todo += kids.get(p, [])
        return sorted(out)

    def exit_status(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while not (self.status.exists() and self.status.read_text().strip()):
            if time.monotonic() > deadline:
                raise AssertionError(f"khmon top still running after {timeout:.0f} s:\n"
                                     + self.screen())
            time.sleep(0.05)
        return int(self.status.read_text())

    def terminal_restored(self) -> list[str]:
        """What khmon left changed in the terminal: tmux's mode flags that differ from a
        fresh terminal's, and stty modes of a raw terminal (-icanon, -echo, ...)."""
        fmt = " ".join(f"{k}=#{{{k}}}" for k in RESTORED)
        got = dict(kv.split("=", 1) for kv in self.tmux("display", "-p", "-t", "top", fmt).split())
        bad = [f"{k}={v} (want {RESTORED[k]})" for k, v in got.items() if RESTORED[k] != v]
        deadline = time.monotonic() + 5  # the shell writes it just after the status
        while not (self.stty.exists() and self.stty.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        stty = self.stty.read_text().split() if self.stty.exists() else ["(no stty output)"]
        bad += [f"stty {m}" for m in ("-icanon", "-echo", "-isig", "-icrnl", "-opost")
                if m in stty]
        return bad
