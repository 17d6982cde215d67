"""Errors that reach the user as one line and an exit code (see README, "Exit codes")."""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1  # a budget or quality gate failed: the release gate
EXIT_USAGE = 2  # bad option, bad recipe, output folder in the way
EXIT_BAD_INPUT = 3  # missing/corrupt model, unsupported architecture
EXIT_NOT_ON_HOST = 4  # a target cannot be built or checked on this host
EXIT_INTERNAL = 70  # a bug in edgepack (EX_SOFTWARE); `--debug` shows the traceback


class EdgepackError(Exception):
    """Base class: `message` is printed on one line, the process exits with `exit_code`."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str):
        # One line, always: release pipelines grep stderr.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self)


class UsageError(EdgepackError):
    exit_code = EXIT_USAGE


class OutputExistsError(UsageError):
    pass


class BadInputError(EdgepackError):
    exit_code = EXIT_BAD_INPUT


class UnsupportedModelError(BadInputError):
    pass


class NotOnThisHostError(EdgepackError):
    exit_code = EXIT_NOT_ON_HOST


class GateFailedError(EdgepackError):
    """A parity, quality or budget gate failed; outputs are complete and say why."""

    exit_code = EXIT_GATE_FAILED
