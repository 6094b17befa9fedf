"""The S3 side's fault model (issue #12, docs/operations.md): the retry policy every ``s3://``
operation runs under, which errors are transient (retried) and which are not, and the client
session. A bottom module: :mod:`medisyn.storage` imports it and re-exports its names."""

from __future__ import annotations

import errno
import functools
from dataclasses import dataclass
from typing import Any


class StorageError(ConnectionError):
    """An object-storage operation failed past the retry budget; the message names the URI."""


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds of every ``s3://`` operation (the ``storage.*`` fields of the run config)."""

    attempts: int = 5  # tries of one operation
    backoff_s: float = 0.5  # first wait between tries; doubles
    max_backoff_s: float = 20.0  # cap on one wait
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0

    @classmethod
    def from_config(cls, storage_cfg: Any) -> RetryPolicy:
        return cls(attempts=storage_cfg.retry_attempts, backoff_s=storage_cfg.retry_backoff_s,
                   max_backoff_s=storage_cfg.retry_max_backoff_s, connect_timeout_s=storage_cfg.connect_timeout_s,
                   read_timeout_s=storage_cfg.read_timeout_s)

    def wait_s(self, tries_done: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** (tries_done - 1))


# Errors of a store that is down, unreachable, slow or overloaded: worth another try. Anything else
# (a missing key, access denied, a bad request) fails at once.
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN, errno.EBUSY, errno.EIO}


def is_transient(exc: BaseException) -> bool:
    """True for errors of an unreachable, slow or failing store (retried), False for the rest."""
    if isinstance(exc, StorageError):
        return False
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    try:
        import botocore.exceptions as bx

        if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError, bx.ResponseStreamingError)):
            return True
        if isinstance(exc, bx.ClientError):
            code = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
            return int(code) >= 500 or exc.response.get("Error", {}).get("Code") in ("SlowDown", "RequestTimeout")
    except ImportError:  # pragma: no cover - boto is part of the stack
        pass
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return True
    except ImportError:  # pragma: no cover
        pass
    from fsspec.exceptions import FSTimeoutError

    if isinstance(exc, FSTimeoutError):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient(cause)


@functools.cache
def _aio_session() -> Any:
    """The S3 client session, without ``Expect: 100-continue`` on uploads: aiobotocore waits for the
    100 answer with no timeout at all, so an endpoint that accepts connections and never answers
    hung every upload for good (issue #12; read_timeout_s bounds the wait without it)."""
    import aiobotocore.session
    from botocore.handlers import add_expect_header

    session = aiobotocore.session.AioSession()
    session.unregister("before-call.s3", add_expect_header)
    return session
