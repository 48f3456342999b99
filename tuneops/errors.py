"""One family of user-facing errors. Each carries its exit code; the CLI prints ``str(exc)``
as one line (``tuneops: error: ...``) and exits with ``exc.exit_code``, no traceback.

Raise a subclass (or ``TuneopsError(msg, exit_code=N)``) for anything a user can fix: bad
params, bad data, a missing model or registry entry, a server that is not running. Anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

EXIT_FAILED = 1          # the request was understood but could not be done (data rejected, no such version)
EXIT_INVALID_INPUT = 2   # the request itself is wrong (params, flags, arguments)


class TuneopsError(Exception):
    """Base of every user-facing error; ``exit_code`` is what the CLI exits with."""

    exit_code: int = EXIT_FAILED

    def __init__(self, *args: object, exit_code: int | None = None):
        super().__init__(*args)
        if exit_code is not None:
            self.exit_code = exit_code


class InvalidInput(TuneopsError, ValueError):
    """Bad params, flags or arguments: exit 2."""

    exit_code = EXIT_INVALID_INPUT


class ConfigError(InvalidInput):
    """A params problem; ``str()`` is the one-line message shown to the user."""


class DataValidationError(TuneopsError):
    """The data gate rejected the data: one ``PATH:LINE: FIELD: RULE: message`` line per problem."""

    exit_code = EXIT_FAILED

    def __init__(self, problems: list, report: str):
        self.problems = problems
        self.report = report
        shown = "\n".join(str(p) for p in problems[:50])
        more = f"\n... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"data validation failed ({len(problems)} problems; report: {report})\n{shown}{more}")
