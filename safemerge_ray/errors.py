"""The errors a user sees as one line, not a traceback, and the exit status each one means."""

import threading
from collections.abc import Callable
from enum import IntEnum
from typing import TypeVar

T = TypeVar("T")


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


class TimedOut(EnvironmentFailure):
    """A call that gave no answer within its time: a store, a gateway or an evaluation that hangs."""


def call_within(call: Callable[[], T], seconds: float | None, what: str) -> T:
    """call(), but given `seconds`, for at most that long (TimedOut after it): a server that hangs (no answer, no
    error, a client waiting out its timeouts and retries) must not hold a run past its deadline. The call goes on
    in a daemon thread, which does not hold up the exit; its own exception is raised here."""
    if seconds is None:
        return call()
    result: list[tuple[bool, object]] = []

    def target() -> None:
        try:
            result.append((True, call()))
        except BaseException as exc:  # noqa: BLE001  # handed to the caller's thread
            result.append((False, exc))

    thread = threading.Thread(target=target, name=f"safemerge-within-{seconds:g}s", daemon=True)
    thread.start()
    thread.join(seconds)
    if not result:
        raise TimedOut(f"{what} did not finish within {seconds:g} s")
    ok, value = result[0]
    if not ok:
        raise value  # type: ignore[misc]  # the call's own exception
    return value  # type: ignore[return-value]
