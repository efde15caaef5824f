"""Every API error in one JSON shape, and the request body size limit.

Handlers turn labgate errors, HTTP errors, validation errors and unexpected
exceptions into ``{"error": code, "detail": text}``. Unexpected exceptions
are logged with their traceback and answered with a plain 500 body: a client
never sees a traceback.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from labgate.errors import LabgateError, TooManyRequests, error_body
from labgate.portal.auth import identify
from labgate.portal.ui.render import error_page, wants_html

log = logging.getLogger(__name__)

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def json_error(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    """A JSON error response in the one shape."""
    headers = {"WWW-Authenticate": "token"} if status == 401 else None
    return JSONResponse(error_body(code, detail, **extra), status_code=status, headers=headers)


def _answer(request: Request, status: int, code: str, detail: str, **extra: Any) -> Response:
    """The error as a page for a browser asking for one outside the API, else as JSON."""
    if wants_html(request):
        return error_page(request, status, code, detail)
    return json_error(status, code, detail, **extra)


def _describe(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {_message(err)}")
    return "; ".join(parts)


def _message(err: dict[str, Any]) -> str:
    """pydantic's message, in characters where it counts a text's length in "items".

    A length limit on a text type with its own validator (``LineText``) is
    checked as a generic length: "Value should have at most 500 items after
    validation, not 600".
    """
    ctx = err.get("ctx") or {}
    if err.get("type") in ("too_long", "too_short") and isinstance(err.get("input"), str):
        if err["type"] == "too_long":
            bound = f"at most {ctx.get('max_length')}"
        else:
            bound = f"at least {ctx.get('min_length')}"
        return f"Text should have {bound} characters, not {len(err['input'])}"
    return str(err.get("msg", "invalid"))


async def _note_caller(request: Request) -> None:
    """Who asks, for the error page's navigation, when no route looked yet (an unknown page).

    Only for a browser's GET or HEAD: identifying never needs a CSRF check or a
    form read there. A bad session just means the page for the signed-out.
    """
    if request.method not in ("GET", "HEAD") or not wants_html(request):
        return
    if hasattr(request.state, "principal"):
        return
    with contextlib.suppress(LabgateError):
        caller = await identify(request)
        if caller is not None and caller.via == "router":
            request.state.principal = None


async def _labgate_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, LabgateError):
        raise TypeError(f"not a LabgateError: {exc!r}")
    await _note_caller(request)
    response = _answer(request, exc.status, exc.code, exc.detail, **exc.extra)
    if isinstance(exc, TooManyRequests):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, StarletteHTTPException):
        raise TypeError(f"not an HTTPException: {exc!r}")
    code = HTTP_CODES.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"nothing at {request.url.path}"
    await _note_caller(request)
    response = _answer(request, exc.status_code, code, detail)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _validation_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, RequestValidationError):
        raise TypeError(f"not a RequestValidationError: {exc!r}")
    errors = list(exc.errors())
    if any(err.get("type") == "json_invalid" for err in errors):
        return json_error(400, "invalid_json", "the request body is not valid JSON")
    return _answer(request, 422, "validation_error", _describe(errors))


async def _data_error(request: Request, exc: Exception) -> Response:
    # The database refused a value validation let through: a NUL character in text
    # (PostgreSQL stores none) or a number beyond its column. The client's input, not a bug.
    log.info("database refused a value on %s %s: %s", request.method, request.url.path, exc)
    detail = "a value cannot be stored: text with a NUL character, or a number out of range"
    return _answer(request, 422, "validation_error", detail)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _answer(request, 500, "internal_error", "internal error; the server log has the details")


def install_error_handlers(app: FastAPI) -> None:
    """Map every kind of error to the one JSON shape."""
    app.add_exception_handler(LabgateError, _labgate_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DataError, _data_error)
    app.add_exception_handler(Exception, _unexpected)


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit`` bytes with a 413, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.limit:
                    await self._refuse(scope, receive, send, declared < 0)
                    return
        # No (valid) length declared: the body is streamed. API bodies are small,
        # so read it up to the limit here and replay it to the app.
        if not any(name == b"content-length" for name, _ in scope.get("headers", [])):
            body = bytearray()
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    await self.app(scope, _replay(message), send)
                    return
                body += message.get("body", b"")
                if len(body) > self.limit:
                    await self._refuse(scope, receive, send, False)
                    return
                if not message.get("more_body", False):
                    break
            replay: Message = {"type": "http.request", "body": bytes(body), "more_body": False}
            await self.app(scope, _replay(replay, receive), send)
            return
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, malformed: bool) -> None:
        if malformed:
            response = json_error(400, "bad_request", "invalid Content-Length header")
        else:
            response = json_error(
                413, "payload_too_large", f"request body larger than {self.limit} bytes"
            )
        await response(scope, receive, send)


def _replay(first: Message, then: Receive | None = None) -> Receive:
    """A receive callable that returns ``first`` once, then defers to ``then``."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return first
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive
