"""labgate's exceptions, and the one JSON shape every API error takes.

::

    LabgateError                 base; carries an error code, HTTP status, detail
    ├── BadRequest               400 bad_request / invalid_json / validation_error
    ├── Unauthorized             401 unauthorized
    ├── Forbidden                403 forbidden / csrf_failed
    ├── NotFound                 404 not_found
    ├── Conflict                 409 conflict / invalid_state
    │   └── NotLeader            409 not_leader: this portal replica no longer leads
    ├── PayloadTooLarge          413 payload_too_large
    ├── Unprocessable            422 validation_error / weak_password
    ├── QuotaExceeded            429 quota_exceeded
    ├── TooManyRequests          429 too_many_requests (with Retry-After)
    ├── BackendError             500-class problems of an engine, never shown as tracebacks
    │   └── InstanceStartError   a tool could not be started
    └── ConfigError              labgate cannot start as configured (one line per problem)

Every error the API returns is ``{"error": code, "detail": text}``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class LabgateError(Exception):
    """Base of every labgate error; maps to one HTTP status and one error code."""

    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal_error"

    def __init__(self, detail: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code or self.default_code
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """The JSON body of this error."""
        return error_body(self.code, self.detail, **self.extra)


class BadRequest(LabgateError):
    """The request cannot be understood or is invalid."""

    status = 400
    default_code = "bad_request"


class Unauthorized(LabgateError):
    """No valid credentials."""

    status = 401
    default_code = "unauthorized"


class Forbidden(LabgateError):
    """Credentials are valid but do not allow this."""

    status = 403
    default_code = "forbidden"


class NotFound(LabgateError):
    """No such thing, or not visible to the caller."""

    status = 404
    default_code = "not_found"


class Conflict(LabgateError):
    """The request conflicts with the current state."""

    status = 409
    default_code = "conflict"


class NotLeader(Conflict):
    """A portal replica that does not (or no longer) lead tried what only the leader does."""

    default_code = "not_leader"


class PayloadTooLarge(LabgateError):
    """The request body is larger than allowed."""

    status = 413
    default_code = "payload_too_large"


class Unprocessable(LabgateError):
    """The request is well formed but a value in it is refused (e.g. a weak password)."""

    status = 422
    default_code = "validation_error"


class TooManyRequests(LabgateError):
    """Too many attempts; ``retry_after`` seconds until the next one is accepted."""

    status = 429
    default_code = "too_many_requests"

    def __init__(self, detail: str, *, retry_after: int, code: str | None = None) -> None:
        super().__init__(detail, code=code)
        self.retry_after = max(1, retry_after)


class QuotaExceeded(LabgateError):
    """A limit on the user's use would be exceeded; nothing was started."""

    status = 429
    default_code = "quota_exceeded"


class BackendError(LabgateError):
    """An engine failed in a way the user cannot fix by changing the request."""

    status = 502
    default_code = "backend_error"


class InstanceStartError(BackendError):
    """A tool could not be started (bad command, missing binary, ...)."""

    default_code = "start_failed"


class ConfigError(LabgateError):
    """labgate cannot run as configured: a bad setting, or the machine refuses it.

    Raised before serving (settings, data dir, database, sites, start-up
    checks), never by a request. ``problems`` holds one plain sentence per
    problem, each naming the setting at fault; the CLI prints each as one
    ``error:`` line and exits 1, without a traceback.
    """

    default_code = "config_error"

    def __init__(self, *problems: str) -> None:
        self.problems = [" ".join(problem.split()) for problem in problems]
        super().__init__("; ".join(self.problems))


def error_body(code: str, detail: str, **extra: Any) -> dict[str, Any]:
    """Build the one JSON error shape."""
    body: dict[str, Any] = {"error": code, "detail": detail}
    body.update(extra)
    return body
