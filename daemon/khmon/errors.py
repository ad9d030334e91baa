"""The one error type the CLI turns into a one-line message and an exit code.

Every failure a user can fix (no root, no tracefs, a foreign recording) is raised as a
KhmonError naming the problem and the fix; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

# Exit codes, shared by every command.
EXIT_OK = 0
EXIT_FAIL = 1  # the environment cannot do what was asked (no root, no tracepoints, no BPF)
EXIT_BAD_INPUT = 2  # bad arguments, or a corrupt / foreign / unreadable recording


class KhmonError(Exception):
    """A problem the user can act on: `problem` says what, `fix` says what to do."""

    def __init__(self, problem: str, fix: str = "", exit_code: int = EXIT_FAIL) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.problem} ({self.fix})" if self.fix else self.problem
