"""Bearer-token auth, one implementation for both servers: ``tuneops serve`` with ``serve.auth:
true`` and the jobs API (``tuneops api``) check the jobs API's tokens (``tuneops api token create
NAME``; ``owner_of`` maps a token to its owner, None for an unknown one).

- ``bearer(owner_of)``: the FastAPI dependency of a route: the caller's owner name;
- ``BearerGate``: ASGI middleware refusing an unauthenticated request before its body is read (the
  jobs API: a client without a valid token cannot make it buffer anything).

Both answer 401 in OpenAI's shape: ``missing_api_key`` without a bearer token, ``invalid_api_key``
for an unknown one.
"""
from __future__ import annotations

from typing import Any, Callable

from fastapi import Request

from .errors import ApiError

OwnerOf = Callable[[str], "str | None"]


def token_of(authorization: str) -> str:
    """The token of an ``Authorization`` header value; 401 ``missing_api_key`` without one."""
    if not authorization.lower().startswith("bearer ") or not authorization[7:].strip():
        raise ApiError(401, "You didn't provide an API key: send 'Authorization: Bearer <token>' "
                            "(tokens: `tuneops api token create NAME`)", None, "missing_api_key")
    return authorization[7:].strip()


def unknown_key() -> ApiError:
    return ApiError(401, "Incorrect API key provided", None, "invalid_api_key")


def bearer(owner_of: OwnerOf) -> Callable[[Request], str]:
    """A FastAPI dependency: the token's owner, or 401 in OpenAI's shape."""

    def owner(request: Request) -> str:
        name = owner_of(token_of(request.headers.get("authorization", "")))
        if name is None:
            raise unknown_key()
        return name
    return owner


class BearerGate:
    """Every HTTP request whose path starts with ``prefix`` needs a valid bearer token, checked
    before anything reads its body (the token lookup runs in a worker thread); otherwise 401."""

    def __init__(self, app: Any, owner_of: OwnerOf, prefix: str = "/v1"):
        self.app, self.owner_of, self.prefix = app, owner_of, prefix

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        import anyio
        from fastapi.responses import JSONResponse

        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        try:
            if await anyio.to_thread.run_sync(self.owner_of, token_of(auth)) is None:
                raise unknown_key()
        except ApiError as error:
            return await JSONResponse(error.body, 401)(scope, receive, send)
        await self.app(scope, receive, send)
