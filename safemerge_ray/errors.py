"""The errors a user sees as one line, not a traceback, and the exit status each one means."""

from enum import IntEnum


class ExitStatus(IntEnum):
    """Every exit status of every command: the one place they are defined."""

    OK = 0  # done: every adapter committed or unchanged
    ENVIRONMENT = 1  # credentials, a node that cannot see a path, an unreachable service, a full disk
    USAGE = 2  # bad input or config; nothing was done
    PARTIAL = 3  # (fleet) some adapters failed or were held back by the gate; the rest are usable
    FAILED = 4  # (fleet) no adapter is usable
    LOCKED = 5  # another run holds the output's lock; nothing was done
    INTERRUPTED = 130  # Ctrl-C or SIGTERM


class SafeMergeError(Exception):
    """A problem with the user's inputs or settings: one line on stderr, exit status 2."""

    exit_code: int = ExitStatus.USAGE
    run_record: object = None  # set by the fleet job: the store's RunRecord it wrote before raising


class EnvironmentFailure(SafeMergeError):
    """The inputs are right but the environment is not: credentials, a node that cannot see a path,
    an unreachable service, a full disk. One line on stderr, exit status 1."""

    exit_code = ExitStatus.ENVIRONMENT


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line (a Ray task error's own cause, without its colored task header)."""
    cause = getattr(exc, "cause", None)
    text = str(cause if isinstance(cause, BaseException) else exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class NoCredentials(EnvironmentFailure):
    """boto3's standard chain found no AWS credentials in this process."""
