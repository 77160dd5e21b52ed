"""The errors a user sees as one line, not a traceback, and the exit status each one means."""


class SafeMergeError(Exception):
    """A problem with the user's inputs or settings: one line on stderr, exit status 2."""

    exit_code = 2
    run_record: object = None  # set by the fleet job: the output.RunRecord it wrote before raising


class EnvironmentFailure(SafeMergeError):
    """The inputs are right but the environment is not: credentials, a node that cannot see a path,
    an unreachable service, a full disk. One line on stderr, exit status 1."""

    exit_code = 1


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line (a Ray task error's own cause, without its colored task header)."""
    cause = getattr(exc, "cause", None)
    text = str(cause if isinstance(cause, BaseException) else exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class NoCredentials(EnvironmentFailure):
    """boto3's standard chain found no AWS credentials in this process."""
