"""Errors as ``application/problem+json`` (RFC 9457) carrying Tessera's stable codes; never a traceback."""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipelines.errors import TesseraError

log = logging.getLogger(__name__)
PROBLEM_TYPE = "application/problem+json"


class Problem(BaseModel):
    """What went wrong: ``code`` is stable (clients key on it), ``detail`` is one line for people."""

    type: str
    title: str
    status: int
    code: str
    detail: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class ProblemError(Exception):
    """Raised by routes: answered as a problem document with this status and code."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


MAX_DETAIL_CHARS = 400
_CONTROL = dict.fromkeys(range(32), " ") | {127: " "}


def clean_detail(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """A message fit to send back: control characters blanked, capped (it may echo what a client sent)."""
    text = str(text).translate(_CONTROL)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def problem_response(status: int, code: str, detail: str, instance: str | None = None,
                     headers: dict[str, str] | None = None, errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    if errors:
        errors = [{**e, "msg": clean_detail(str(e.get("msg", "")), 200)} for e in errors[:20]]
    body = Problem(type=f"urn:tessera:error:{code.lower()}", title=HTTPStatus(status).phrase, status=status,
                   code=code[:64], detail=clean_detail(detail), instance=clean_detail(instance, 200) if instance
                   else None, errors=errors)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers,
                        media_type=PROBLEM_TYPE)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for routes that answer these problem statuses."""
    return {status: {"model": Problem, "description": HTTPStatus(status).phrase,
                     "content": {PROBLEM_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for status in statuses}


_HTTP_CODES = {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND",
               405: "METHOD_NOT_ALLOWED", 406: "NOT_ACCEPTABLE", 413: "UPLOAD_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE"}


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def install_problem_handlers(app: FastAPI) -> None:
    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ProblemError)
        return problem_response(exc.status, exc.code, exc.detail, request.url.path, exc.headers)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, f"HTTP_{exc.status_code}")
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # one route per method: list every method the path has, not just one
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return problem_response(exc.status_code, code, detail, request.url.path, headers)

    async def on_invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        loc, msg = [str(p) for p in first["loc"]], str(first["msg"])
        detail = f"{'.'.join(loc)}: {msg}" if loc else msg
        return problem_response(422, "REQUEST_INVALID", detail, request.url.path, errors=errors)

    async def on_tessera(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, TesseraError)
        return problem_response(422, exc.code, exc.message, request.url.path)

    async def on_disconnect(request: Request, exc: Exception) -> JSONResponse:
        log.info("client went away during %s %s", request.method, request.url.path)  # expected: no traceback
        return problem_response(400, "CLIENT_DISCONNECTED", "the client closed the connection before the request "
                                                            "was complete", request.url.path)

    async def on_bad_body(request: Request, exc: Exception) -> JSONResponse:
        log.info("malformed body on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return problem_response(400, "REQUEST_MALFORMED", f"the request body cannot be parsed ({exc})",
                                request.url.path)

    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, ClientDisconnect) or isinstance(exc.__cause__ or exc.__context__, ClientDisconnect):
            return await on_disconnect(request, exc)
        log.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
        return problem_response(500, "INTERNAL_ERROR", "an internal error occurred; it has been logged",
                                request.url.path)

    app.add_exception_handler(ProblemError, on_problem)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(TesseraError, on_tessera)
    app.add_exception_handler(ClientDisconnect, on_disconnect)
    app.add_exception_handler(MultiPartException, on_bad_body)
    app.add_exception_handler(Exception, on_bug)


class HeadAsGet:
    """HEAD answered wherever GET is (RFC 9110 section 9.3.2): the GET route runs, its body is not sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)


class _BodyRefusedError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(code)
        self.status, self.code, self.detail = status, code, detail


class RequestBodyLimits:
    """Bounds what one request body may cost: 413 when it is over ``limit`` bytes (at once from Content-Length,
    else as soon as the streamed body passes it: nothing past it is read or stored), 408 when it stalls for
    ``idle_timeout_s`` or averages under ``min_rate`` bytes/s after its first ``idle_timeout_s`` (a slow client
    holds a connection for a bounded time, whatever it sends)."""

    def __init__(self, app: ASGIApp, limit: int, idle_timeout_s: float = 30.0, min_rate: int = 0) -> None:
        self.app, self.limit, self.idle_timeout_s, self.min_rate = app, limit, idle_timeout_s, min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send, self._too_large())
            return
        seen = 0
        started = False
        began = time.monotonic()

        async def bounded_receive() -> Message:
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), self.idle_timeout_s)
            except TimeoutError:
                raise _BodyRefusedError(408, "REQUEST_TIMEOUT", f"the request body stalled for "
                                        f"{self.idle_timeout_s:g} s (body_idle_timeout_s)") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._too_large()
                elapsed = time.monotonic() - began
                if message.get("more_body") and self.min_rate and elapsed > self.idle_timeout_s \
                        and seen < self.min_rate * elapsed:
                    raise _BodyRefusedError(408, "REQUEST_TIMEOUT", f"the request body arrives at "
                                            f"{seen / elapsed:.0f} bytes/s, under the {self.min_rate} bytes/s "
                                            "the service needs (min_upload_rate)")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracking_send)
        except _BodyRefusedError as refused:
            if refused.status == 408:
                log.info("%s %s: %s", scope.get("method"), scope.get("path"), refused.detail)
            if not started:
                await self._refuse(scope, receive, send, refused)

    def _too_large(self) -> _BodyRefusedError:
        return _BodyRefusedError(413, "UPLOAD_TOO_LARGE",
                                 f"request body over the limit of {self.limit / 1024**2:.0f} MiB (max_upload_bytes)")

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, refused: _BodyRefusedError) -> None:
        response = problem_response(refused.status, refused.code, refused.detail, scope.get("path"),
                                    headers={"Connection": "close"})
        await response(scope, receive, send)
