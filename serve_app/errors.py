"""The service's error hierarchy, its one mapping to HTTP statuses, and the stable `code` each
error carries on the wire so that clients can rebuild its type.

Every error crosses Ray process boundaries, so each keeps all of its constructor arguments in
`args` (the default exception pickling calls `cls(*args)`).
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error a user can be shown. `str(e)` is the user-facing message."""

    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0])

    def __str__(self) -> str:
        return self.message


class InvalidJob(ServiceError):
    """The job JSON or its config breaks the contract, or the request is malformed."""

    code = "invalid_job"


class UnknownJobType(InvalidJob):
    code = "unknown_job_type"


class UploadTooLarge(ServiceError):
    """The upload is over the byte limit (checked while reading, before buffering more)."""

    code = "upload_too_large"


class UploadTimeout(ServiceError):
    """The upload stalled, or arrived slower than the minimum rate."""

    code = "upload_timeout"


class VideoLimitExceeded(ServiceError):
    """The video decodes but is over a documented cap (width, height, frames, fps)."""

    code = "video_limit_exceeded"


class UnsupportedMedia(ServiceError):
    """Not an mp4/mov, no decodable video stream, an unsupported codec, or a truncated file."""

    code = "unsupported_media"


class Unauthorized(ServiceError):
    code = "unauthorized"


class NotFound(ServiceError):
    code = "not_found"


class MethodNotAllowed(ServiceError):
    code = "method_not_allowed"


class ClientGone(ServiceError):
    """The client closed the connection before its answer: logged and counted as 499, its doing."""

    code = "client_closed_request"


class Overloaded(ServiceError):
    """The queue is full; try again after `retry_after_s` seconds."""

    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        Exception.__init__(self, message, retry_after_s)

    @property
    def retry_after_s(self) -> int:
        return int(self.args[1])


class ModelError(ServiceError):
    """The tracker failed on a valid input (our fault, not the user's)."""

    code = "model_error"


class JobTimeout(ServiceError):
    """The job ran past its deadline and was cancelled in every stage."""

    code = "job_timeout"


class JobNotDone(ServiceError):
    """An async job's result was asked for before it was processed."""

    code = "job_not_done"


class ModelUnavailable(ServiceError):
    """The model cannot be loaded (no weights configured, no device)."""

    code = "model_unavailable"


class InsufficientStorage(ServiceError):
    """The async jobs' store has no room for the job's files."""

    code = "insufficient_storage"


class StoreUnavailable(ServiceError):
    """The async jobs' database or file store cannot be used (a setting, a server, permissions)."""

    code = "store_unavailable"


class InvalidBatch(ServiceError):
    """A batch cannot start: its manifest, its flags or its destination (serve_app/batch)."""

    code = "invalid_batch"


class InputUnreadable(ServiceError):
    """A batch input that cannot be read (gone, no permission): that input fails, the batch goes on."""

    code = "input_unreadable"


# The one table from error type to HTTP status. Most specific class first; anything not listed
# (and any non-ServiceError) is a 500 with the request id logged. Invalid config is 400, not
# 422: the official client resends a 422 (docs/design.md, Errors on the wire).
HTTP_STATUS: tuple[tuple[type[ServiceError], int], ...] = (
    (InvalidJob, 400),
    (Unauthorized, 401),
    (NotFound, 404),
    (MethodNotAllowed, 405),
    (UploadTimeout, 408),
    (JobNotDone, 409),
    (UploadTooLarge, 413),
    (VideoLimitExceeded, 413),
    (UnsupportedMedia, 415),
    (Overloaded, 429),
    (ClientGone, 499),
    (ModelUnavailable, 503),
    (StoreUnavailable, 503),
    (InsufficientStorage, 507),
    (JobTimeout, 504),
    (ModelError, 500),
)


def http_status(exc: BaseException) -> int:
    for cls, status in HTTP_STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def _all(cls: type[ServiceError]) -> list[type[ServiceError]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _all(child))]


def error_from_code(code: str | None, message: str, retry_after_s: int = 5) -> ServiceError:
    """The error a `code` from the wire names, rebuilt around `message` (a ServiceError for a
    code this version does not know)."""
    cls = next((c for c in _all(ServiceError) if c.code == code), ServiceError)
    return cls(message, retry_after_s) if cls is Overloaded else cls(message)

