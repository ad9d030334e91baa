"""The daemon's log: one line per state change on stderr, which systemd sends to the journal.

Lines read `khmon: <what changed>`. When stderr is the journal's stream ($JOURNAL_STREAM
names it, see systemd.exec(5)), each line starts with its syslog priority as `<N>`, which
journald takes as the entry's priority (SyslogLevelPrefix=, on by default) and strips:
`journalctl -p warning -u khmon` then shows just the trouble. The logging module is used
for its thread safety (the pipeline's worker and the socket server log too), nothing else.
"""

from __future__ import annotations

import logging
import os
import sys

PRIORITY = {logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class _Format(logging.Formatter):
    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{PRIORITY.get(record.levelno, 6)}>" if self.journal else ""
        return f"{prefix}khmon: {record.getMessage()}"


def _stderr_is_journal() -> bool:
    want = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = want.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return bool(want) and f"{st.st_dev}" == dev and f"{st.st_ino}" == ino


def daemon_logger() -> logging.Logger:
    """The `khmon.daemon` logger, writing to stderr (set up once)."""
    log = logging.getLogger("khmon.daemon")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Format(_stderr_is_journal()))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log
