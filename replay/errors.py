"""Replay errors, each carrying the gRPC status code name it maps to.

The table and storages raise these; the gRPC server turns ``err.code`` into a status code with
``getattr(grpc.StatusCode, err.code)`` and ``str(err)`` into the details, so a message must say what
was wrong (the offending value and what was expected) on its own.

Example::

    from replay.errors import InvalidArgument, ReplayError
    try:
        table.insert({"obs": bad})
    except ReplayError as err:
        print(err.code, err)   # INVALID_ARGUMENT field 'obs': expected dtype float32, got float64
"""

from __future__ import annotations

__all__ = [
    "Aborted",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "ReplayError",
    "ResourceExhausted",
    "Unauthenticated",
]


class ReplayError(Exception):
    """Base class; ``code`` is a ``grpc.StatusCode`` member name."""

    code = "INTERNAL"


class InvalidArgument(ReplayError, ValueError):
    """Bad field names/dtypes/shapes, empty batch, NaN/negative priority, batch larger than the table."""

    code = "INVALID_ARGUMENT"


class FailedPrecondition(ReplayError):
    """The call is well formed but the table's state or config means it can never succeed."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(ReplayError):
    """A message or request exceeds a size limit, or too many calls already wait on the rate limiter
    (then ``retryable`` is True: the shard sends trailing metadata ``evergreen-retry: 1`` and the client
    retries with backoff)."""

    code = "RESOURCE_EXHAUSTED"
    retryable = False


class Aborted(ReplayError):
    """A concurrent call conflicts with this one (another insert of the same writer is in progress);
    retrying later is safe."""

    code = "ABORTED"


class Unauthenticated(ReplayError):
    """The call carried no token or the wrong one (the message never repeats what was sent)."""

    code = "UNAUTHENTICATED"


class DeadlineExceeded(ReplayError, TimeoutError):
    """The rate limiter kept the call blocked past its timeout (the message names the side and counts)."""

    code = "DEADLINE_EXCEEDED"


class NotFound(ReplayError, KeyError):
    """Unknown table name."""

    code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return Exception.__str__(self)


class Cancelled(ReplayError):
    """The table was closed while the caller was blocked."""

    code = "CANCELLED"
