"""The console entry point (`khmon`, `python -m khmon`): the command line, imported under a
SIGINT handler of its own.

Importing the command line (typer, click, khmon's modules) takes a few hundred
milliseconds, and Python's default SIGINT handler turns a Ctrl-C there into a
KeyboardInterrupt traceback. Nothing has started yet, so until the import is done a Ctrl-C
ends khmon at once, with one line and status 130 (128 + SIGINT, the shell's convention).
From then on the command line answers Ctrl-C itself (cli.main, capture.stop).
"""

from __future__ import annotations

import os
import signal

EXIT_INTERRUPTED = 128 + signal.SIGINT


def _interrupted(*_: object) -> None:
    try:
        os.write(2, b"khmon: interrupted while starting; nothing was started\n")
    finally:
        os._exit(EXIT_INTERRUPTED)


def main() -> None:
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:  # not when started with SIGINT ignored
        signal.signal(signal.SIGINT, _interrupted)
    from .cli import main as cli_main

    signal.signal(signal.SIGINT, previous)
    cli_main()
