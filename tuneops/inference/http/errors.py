"""Errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` for both servers,
and ``CatchAll``: no exception reaches the HTTP server, so a keep-alive connection survives
every error (see ``tuneops.inference.http.routes`` for which status means what)."""
from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import Request
from starlette.exceptions import HTTPException

from ..scheduler import Busy

log = logging.getLogger(__name__)

SHOWN = 40                    # characters of a bad value shown in its error message


class ApiError(HTTPException):
    """An error in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}`` (rendered by
    the handlers of ``install_error_handlers`` from ``body``); ``extra`` adds fields to the error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code, **(extra or {})}}


def install_error_handlers(app: Any) -> None:
    """Every HTTP error and every request-validation error of ``app`` answers in OpenAI's shape
    (a validation error is a 400 naming the first bad field as ``param``)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        body = getattr(exc, "body", None) or {"error": {"message": str(exc.detail), "type": "invalid_request_error",
                                                        "param": None, "code": None}}
        return JSONResponse(body, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "path"))
        return JSONResponse(ApiError(400, f"{where}: {err['msg']}", where or None, "invalid_request").body, 400)

    app.add_middleware(CatchAll)


def server_error(message: str = "The server had an error while processing your request (see the server log)",
                 status: int = 500, code: str = "internal_error") -> ApiError:
    return ApiError(status, message, None, code, type="server_error")


class CatchAll:
    """The outermost middleware: an exception that escapes the app (a bug) is logged with its
    traceback and answered with an OpenAI-shaped 500, or, once a response has started, ends that
    response cleanly. Nothing reaches uvicorn, which would answer plain text and close the
    keep-alive connection (the client's next request on it would fail with a reset)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = complete = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started, complete
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            from starlette.requests import ClientDisconnect

            if isinstance(exc, (ClientDisconnect, OSError)):      # the client went away: nobody to answer
                return
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            try:
                if not started:
                    body = json.dumps(server_error().body).encode()
                    await send({"type": "http.response.start", "status": 500,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode())]})
                    await send({"type": "http.response.body", "body": body})
                elif not complete:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass


def model_not_found(model: Any) -> ApiError:
    return ApiError(404, f"The model {short(model)} does not exist or you do not have access to it", "model",
                    "model_not_found")


def busy(exc: Busy) -> ApiError:
    return ApiError(429, f"Server busy: {exc}", None, "rate_limit_exceeded", type="rate_limit_error",
                    headers={"Retry-After": "1"})


def shutting_down() -> ApiError:
    return server_error("The server is shutting down; retry on another replica or later", 503,
                        "server_shutting_down")


def short(value: Any) -> str:
    """A bad value as its error message shows it: at most ``SHOWN`` characters of its repr (which
    escapes lone surrogates), or the type and size of a list / object."""
    if isinstance(value, (list, dict)):
        return f"a list of length {len(value)}" if isinstance(value, list) else f"an object with {len(value)} keys"
    text = repr(value)
    if len(text) <= SHOWN:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} digits"
    return f"{text[:SHOWN]}... ({size})"
