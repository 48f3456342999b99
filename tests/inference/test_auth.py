"""One bearer-token auth for both servers (``tuneops.inference.http.auth``): the route dependency
and the gate that refuses before a body is read answer the same OpenAI-shaped 401s."""
from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient

from tuneops.inference.http.auth import BearerGate, bearer
from tuneops.inference.http.errors import install_error_handlers

TOKENS = {"tok-alice": "alice"}


def _app(gate: bool) -> tuple[FastAPI, list[bytes]]:
    app, bodies = FastAPI(), []
    if gate:
        app.add_middleware(BearerGate, owner_of=TOKENS.get)
    install_error_handlers(app)

    @app.post("/v1/echo")
    async def echo(request: Request, who: str = Depends(bearer(TOKENS.get))) -> dict:
        bodies.append(await request.body())
        return {"owner": who}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}
    return app, bodies


def test_the_dependency_and_the_gate_answer_the_same_401s():
    for gate in (False, True):
        app, bodies = _app(gate)
        client = TestClient(app)
        for headers, code in (({}, "missing_api_key"), ({"Authorization": "Bearer "}, "missing_api_key"),
                              ({"Authorization": "Basic tok-alice"}, "missing_api_key"),
                              ({"Authorization": "Bearer tok-bob"}, "invalid_api_key")):
            r = client.post("/v1/echo", content=b"x" * 1000, headers=headers)
            assert r.status_code == 401, (gate, headers)
            error = r.json()["error"]
            assert error["code"] == code and error["type"] == "invalid_request_error" and error["param"] is None
        assert bodies == []                                     # no handler ran
        r = client.post("/v1/echo", content=b"hi", headers={"Authorization": "bearer  tok-alice "})
        assert r.status_code == 200 and r.json() == {"owner": "alice"} and bodies == [b"hi"]
        assert client.get("/health").status_code == 200         # outside /v1: no token needed
