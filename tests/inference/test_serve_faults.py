"""The served model survives its clients (issue 36): `tuneops serve` (and the jobs API's chat
endpoint) against clients that vanish, stall, send hostile bodies or stop the server.

A real uvicorn server on a free port (in a thread, or `tuneops serve` in a subprocess) serves a
real tiny model (``chat_model_dir``, tests/inference/conftest.py): a 2-layer random Llama with its
own BPE tokenizer and Llama 3 chat template (tests/family_models.py), exported to ONNX with a KV
cache. Its greedy reply never hits a stop token, so a request for 1024 tokens keeps a generation
slot busy.

- disconnect storms: clients that close after the first chunk, and clients that close while
  queued, give their slot and queue place back at once (no garbage collection involved); the
  next request is served at its normal latency and the scheduler's counters are back at zero;
- a client that stops reading holds no slot: the others are served meanwhile;
- SIGTERM stops `tuneops serve` within 5 s in the middle of generations; every stream that was
  being read ends with an error event or its finish chunk, then `[DONE]`;
- fuzz: hostile chat bodies against both servers: 0 x 5xx, every error in OpenAI's shape naming
  its param, no error response over 64 KB; a keep-alive connection survives a 4xx and a 500;
- `/health` answers 503 while every slot is wedged; `/v1/models` shows no server path;
- the CLI: a corrupt model.onnx, bad ports and bad database URLs are one line each, no traceback.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, make_project, wait_for
from tuneops.io import free_port

from .conftest import InProcess, serve_subprocess

pytestmark = pytest.mark.pipeline          # servers in threads and `tuneops` in subprocesses

HELLO = [{"role": "user", "content": "Hello"}]
LONG = 1024                                # serve.max_tokens (default): a long generation
KB64 = 64 * 1024


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cfg():
    from tuneops.config import load_config

    root = make_project("serve-faults", ("serve.max_concurrent=1", "serve.max_queue=40"))
    return load_config(root / "params.yaml")


@pytest.fixture(scope="module")
def server(cfg, chat_model_dir):
    from tuneops.inference.http.app import create_app

    app = create_app(cfg, str(chat_model_dir))

    @app.get("/test-bug")
    def bug() -> None:                      # a route with a bug: what a 500 looks like
        raise RuntimeError("a bug in a route")

    srv = InProcess(app)
    yield srv
    srv.stop()


def _body(**kw) -> dict:
    return {"model": "tiny-chat", "messages": HELLO, **kw}


def _http(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body or method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (head + "\r\n").encode() + body


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One Content-Length response from a keep-alive socket: (status, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        rest += chunk
    return int(head.split(b" ")[1]), rest


def _latency(srv: InProcess) -> float:
    t0 = time.perf_counter()
    r = httpx.post(f"{srv.base_url}/chat/completions", json=_body(max_tokens=16, temperature=0), timeout=60)
    assert r.status_code == 200, r.text
    return time.perf_counter() - t0


def _idle(sched) -> bool:
    s = sched.state()
    return sched.admitted == 0 and s["running"] == 0 and s["waiting"] == 0


def _request_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tuneops-request"]


# -- clients that vanish or stall ------------------------------------------------------------------

def test_disconnect_storms_give_slots_back_at_once(server):
    sched, n = server.app.state.scheduler, 12
    normal = statistics.median(_latency(server) for _ in range(3))
    stream = json.dumps(_body(max_tokens=LONG, temperature=0, stream=True)).encode()
    plain = json.dumps(_body(max_tokens=LONG, temperature=0)).encode()

    # storm 1: n clients at once, each closing its socket as soon as its first chunk arrives
    def close_after_first_chunk(_: int) -> bool:
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
            s.sendall(_http("POST", "/v1/chat/completions", stream))
            data = b""
            while b"data: " not in data:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                data += chunk
        return True

    cancelled0 = sched.cancelled
    t0 = time.perf_counter()
    threads = [threading.Thread(target=close_after_first_chunk, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    storm1 = time.perf_counter() - t0
    wait_for(lambda: _idle(sched), 5, "the slot and queue counters after storm 1", interval=0.02)
    drained1 = time.perf_counter() - t0
    cut_short = sched.cancelled - cancelled0
    assert cut_short >= n // 2, f"only {cut_short} of {n} generations were cancelled by their client leaving"
    after1 = _latency(server)

    # storm 2: the slot is held; n clients queue behind it (half streamed, half not) and close
    held = sched.admit()
    with held.running():
        socks = []
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=60)
            s.sendall(_http("POST", "/v1/chat/completions", stream if i % 2 else plain))
            socks.append(s)
        wait_for(lambda: sched.state()["waiting"] == n, 30, f"{n} queued requests", interval=0.02)
        cancelled0 = sched.cancelled
        t0 = time.perf_counter()
        for s in socks:
            s.close()
        wait_for(lambda: sched.admitted == 1, 5, "the queue places of the clients that left", interval=0.01)
        drained2 = time.perf_counter() - t0
        assert sched.cancelled - cancelled0 == n and sched.state()["running"] == 1
    held.release()
    wait_for(lambda: _idle(sched) and not _request_threads(), 5, "no request thread left", interval=0.02)
    after2 = _latency(server)
    health = httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=10)
    assert health.status_code == 200 and health.json()["waiting"] == 0
    print(f"\ndisconnect storms ({n} clients each): normal latency {normal * 1000:.0f} ms; storm 1 (close after the "
          f"first chunk) {storm1:.2f} s, counters at zero {drained1:.2f} s after its start, {cut_short}/{n} "
          f"generations cut short, next request {after1 * 1000:.0f} ms; storm 2 (close while queued) queue "
          f"emptied {drained2 * 1000:.0f} ms after the clients left, next request {after2 * 1000:.0f} ms")
    assert after1 <= normal + 1.0 and after2 <= normal + 1.0


def test_a_client_that_stops_reading_holds_no_slot(server):
    sched = server.app.state.scheduler
    normal = statistics.median(_latency(server) for _ in range(3))
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", server.port))
    cancelled0 = sched.cancelled
    try:
        stuck.sendall(_http("POST", "/v1/chat/completions",
                            json.dumps(_body(max_tokens=LONG, temperature=0, stream=True)).encode()))
        wait_for(lambda: sched.state()["running"] == 1, 30, "the stuck client's generation", interval=0.01)
        t0 = time.perf_counter()
        # its generation runs to the end into the server's buffer and gives the slot back, unread
        wait_for(lambda: _idle(sched), 120, "the stuck client's generation to give its slot back", interval=0.02)
        generated = time.perf_counter() - t0
        others = [_latency(server) for _ in range(3)]        # served while the stuck client still reads nothing
        assert max(others) <= normal + 1.0, (normal, others)
        assert sched.cancelled == cancelled0                 # it was not cancelled: it finished, unread
        stuck.settimeout(30)
        data = b""
        while b"data: [DONE]" not in data:                  # everything it did not read is still delivered
            chunk = stuck.recv(65536)
            assert chunk, data[-300:]
            data += chunk
        events = re.findall(r"^data: (.*)$", data.decode(), re.M)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[1:-2])
        print(f"\nstuck client: its {LONG} tokens generated in {generated:.1f} s, then the slot was free while it "
              f"read nothing: normal latency {normal * 1000:.0f} ms, others meanwhile "
              f"{', '.join(f'{x * 1000:.0f}' for x in others)} ms; everything delivered once it read")
    finally:
        stuck.close()


def test_health_is_not_ready_while_every_slot_is_wedged(cfg, chat_model_dir):
    from tuneops.config import load_config
    from tuneops.inference.http.app import create_app

    wedgeable = load_config(cfg.source, ["serve.stall_s=0.5"])
    srv = InProcess(create_app(wedgeable, str(chat_model_dir)))
    try:
        health = f"http://127.0.0.1:{srv.port}/health"
        sched = srv.app.state.scheduler
        ticket = sched.admit()
        with ticket.running():              # a generation that holds its slot and produces nothing
            time.sleep(0.3)
            assert httpx.get(health, timeout=10).status_code == 200
            time.sleep(0.5)
            r = httpx.get(health, timeout=10)
            assert r.status_code == 503
            err = r.json()["error"]
            assert err["code"] == "not_ready" and err["type"] == "server_error" and "serve.stall_s" in err["message"]
        ticket.release()
        assert httpx.get(health, timeout=10).json()["status"] == "ok"
        sched.close()                       # what SIGINT / SIGTERM do
        r = httpx.get(health, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
        r = httpx.post(f"{srv.base_url}/chat/completions", json=_body(max_tokens=2), timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
    finally:
        srv.stop()


def test_models_show_no_server_path(server, chat_model_dir):
    r = httpx.get(f"{server.base_url}/models", timeout=10)
    assert r.status_code == 200
    assert r.json()["data"] == [{"id": "tiny-chat", "object": "model", "created": r.json()["data"][0]["created"],
                                 "owned_by": "tuneops", "kind": "chat", "version": None}]
    for text in (r.text, httpx.get(f"{server.base_url}/models/tiny-chat", timeout=10).text):
        assert str(chat_model_dir) not in text and str(REPO) not in text and "/" not in text.replace("\\/", "")


def test_keep_alive_connections_survive_errors(server):
    """A 400, a 404, a 413 and a 500 on one keep-alive connection, each followed by a good request."""
    good = json.dumps(_body(max_tokens=2, temperature=0)).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        for request, status in ((_http("POST", "/v1/chat/completions", b'{"model": "tiny-chat", "messages": 5}'), 400),
                                (_http("POST", "/v1/chat/completions", json.dumps(_body(model="nope")).encode()), 404),
                                (_http("POST", "/v1/chat/completions", b"{" + b" " * (2 * 2**20) + b"}"), 413),
                                (_http("GET", "/test-bug"), 500)):
            s.sendall(request)
            got, body = _read_response(s)
            assert got == status, body[:300]
            err = json.loads(body)["error"]
            assert set(err) == {"message", "type", "param", "code"}
            if status == 500:
                assert err["type"] == "server_error" and "bug" not in err["message"]
            s.sendall(_http("POST", "/v1/chat/completions", good))
            got, body = _read_response(s)
            assert got == 200 and json.loads(body)["object"] == "chat.completion"


# -- SIGTERM -----------------------------------------------------------------------------------------

def test_sigterm_stops_tuneops_serve_mid_generation(cfg, chat_model_dir, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    proc = serve_subprocess(cfg.source, chat_model_dir, port, log, tmp_path)
    try:
        body = json.dumps(_body(max_tokens=LONG, temperature=0, stream=True)).encode()
        stuck = socket.socket()                  # a client that reads nothing of its finished reply
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", port))
        stuck.sendall(_http("POST", "/v1/chat/completions", body))

        def admitted() -> int:
            state = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
            return state["running"] + state["waiting"]
        wait_for(lambda: admitted() == 1, 30, "the stuck client's generation", logs=[log], interval=0.01)
        wait_for(lambda: admitted() == 0, 120, "the stuck client's generation to end", logs=[log], interval=0.05)
        streams: list[bytes] = [b""] * 4
        first = threading.Event()

        def read(i: int) -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(_http("POST", "/v1/chat/completions", body))
                while True:
                    try:
                        chunk = s.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        return
                    streams[i] += chunk
                    if b"data: " in streams[i]:
                        first.set()

        readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(4)]
        for t in readers:
            t.start()
        assert first.wait(60), log.read_text()[-3000:]
        wait_for(lambda: admitted() >= 4, 30, "the streams to be admitted", logs=[log], interval=0.02)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        took = time.monotonic() - t0
        for t in readers:
            t.join(10)
        stuck.close()
        print(f"\nSIGTERM with 4 streams of {LONG} tokens being read and one client not reading its reply: "
              f"exited in {took:.2f} s (rc {proc.returncode}; serve.shutdown_s {cfg.serve.shutdown_s:g})")
        assert took < 5, log.read_text()[-3000:]
        events = [re.findall(r"^data: (.*)$", s.decode(), re.M) for s in streams]    # (chunked transfer)
        assert all(e and e[-1] == "[DONE]" for e in events), [e[-3:] for e in events]
        last = [json.loads(e[-2]) for e in events]          # an error event, or the finish chunk of a stream done
        assert all("error" in x or x["choices"][0]["finish_reason"] for x in last), last
        assert any(x.get("error", {}).get("code") == "server_shutting_down" for x in last), last
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# -- fuzz ---------------------------------------------------------------------------------------------

def _fuzz_cases(model: str) -> list[tuple[str, bytes, str, str | None]]:
    """(label, raw body, expectation, param): expectation ``ok`` (a reply), ``bad`` (400 naming
    ``param``), ``long`` (400 context_length_exceeded), ``big`` (413 before the body is read), ``model``
    (400 naming ``param`` once the model is known: on the jobs API, with no such model, a 404)."""
    cases: list[tuple[str, bytes, str, str | None]] = []
    good = {"model": model, "messages": HELLO, "max_tokens": 3}
    msg = '{"role": "user", "content": "Hello"}'

    def add(label: str, body: dict, expect: str = "bad", param: str | None = None) -> None:
        cases.append((label, json.dumps(body, allow_nan=True).encode(), expect, param))

    def raw(label: str, data: bytes, expect: str = "bad", param: str | None = None) -> None:
        cases.append((label, data, expect, param))

    for stream in (False, True):
        for seed in (-1, -2**63, 2**63, 10**30, 1.5, "7", True, [1]):
            add(f"seed={str(seed)[:12]} stream={stream}", {**good, "seed": seed, "temperature": 1, "stream": stream},
                "bad", "seed")
        for seed in (0, 2**63 - 1, 12345):
            add(f"seed={seed} stream={stream}", {**good, "seed": seed, "temperature": 1, "stream": stream}, "ok")
        for t in (5e-324, 1e-310, 1e-300, 1e-6, 1e-5, 0, -0.0, 0.7, 2):
            add(f"temperature={t} stream={stream}", {**good, "temperature": t, "seed": 1, "stream": stream}, "ok")
        for t in (-5e-324, -1e-6, 2.0000001, 1e308, "0.5", True, [0.5], {"t": 1}):
            add(f"temperature={str(t)[:10]} stream={stream}", {**good, "temperature": t, "stream": stream}, "bad",
                "temperature")
        for lit in ("NaN", "Infinity", "-Infinity", "1e400", "-1e400"):
            for key in ("temperature", "top_p"):
                raw(f"{key}={lit} stream={stream}", f'{{"model": "{model}", "messages": [{msg}], "max_tokens": 3, '
                    f'"stream": {str(stream).lower()}, "{key}": {lit}}}'.encode(), "bad", key)
        for p in (5e-324, 1e-300, 0.5, 1):
            add(f"top_p={p} stream={stream}", {**good, "top_p": p, "temperature": 1, "seed": 3, "stream": stream}, "ok")
    add("role='tool' with no call before it", {**good, "messages": [{"role": "tool", "content": "Hi"}]}, "bad",
        "messages[0].tool_call_id")
    for role in (["user"], {"role": "user"}, 5, None, True, "", "function", "USER", "user\n", "\ud800", "x" * 5000):
        add(f"role={str(role)[:12]!r}", {**good, "messages": [{"role": role, "content": "Hi"}]}, "bad",
            "messages[0].role")
    add("no role", {**good, "messages": [{"content": "Hi"}]}, "bad", "messages[0].role")
    add("second message's role a list", {**good, "messages": [*HELLO, {"role": ["assistant"], "content": "x"}]},
        "bad", "messages[1].role")
    for label, content, param in (("lone high surrogate", "\ud800", "messages[0].content"),
                                  ("lone low surrogate inside", "a\udfffb", "messages[0].content"),
                                  ("surrogate in a part", [{"type": "text", "text": "\ud83d"}],
                                   "messages[0].content[0].text"),
                                  ("image part", [{"type": "image_url", "image_url": {"url": "x"}}],
                                   "messages[0].content[0]"),
                                  ("content a number", 5, "messages[0].content"),
                                  ("content an object", {"text": "x"}, "messages[0].content"),
                                  ("part not an object", ["x"], "messages[0].content[0]")):
        add(label, {**good, "messages": [{"role": "user", "content": content}]}, "bad", param)
    add("surrogate in stop", {**good, "stop": ["\udc00"]}, "bad", "stop")
    add("surrogate in model", {**good, "model": "\ud800"}, "bad", "model")
    raw("UTF-8-encoded surrogate", b'{"model": "%s", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'
        % model.encode(), "bad", "messages[0].content")
    raw("invalid UTF-8", b'{"model": "%s", "messages": [{"role": "user", "content": "\xff\xfe"}]}' % model.encode())
    add("content parts of text", {**good, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]},
        "ok")
    for depth in (33, 1000, 5000, 100_000):
        raw(f"arrays {depth} deep", b"[" * depth + b"]" * depth)
        raw(f"objects {depth} deep", b'{"a":' * depth + b"1" + b"}" * depth)
        raw(f"content {depth} deep", b'{"model": "%s", "messages": [{"role": "user", "content": %s}]}'
            % (model.encode(), b"[" * depth + b"]" * depth))
        raw(f"ignored field {depth} deep", b'{"model": "%s", "messages": [%s], "metadata": %s}'
            % (model.encode(), msg.encode(), b"[" * depth + b"]" * depth))
    raw("ignored field 20 deep", b'{"model": "%s", "messages": [%s], "max_tokens": 3, "metadata": %s}'
        % (model.encode(), msg.encode(), b"[" * 20 + b"]" * 20), "ok")
    five_mb = "x" * (5 * 2**20)
    for key in ("content", "model", "max_tokens", "stop", "role"):
        body = {**good, key: five_mb} if key in ("model", "max_tokens", "stop") else \
            {**good, "messages": [{"role": five_mb if key == "role" else "user",
                                   "content": five_mb if key == "content" else "Hi"}]}
        add(f"5 MB {key}", body, "big")
    half_mb = "y" * (2**19)
    for key, param in (("model", "model"), ("max_tokens", "max_tokens"), ("seed", "seed"), ("n", "n"),
                       ("temperature", "temperature"), ("response_format", "response_format"), ("stream", "stream"),
                       ("stop", None)):
        body = {**good, key: {"a": half_mb} if key == "stop" else half_mb}
        add(f"512 KB {key}", body, "bad", param or "stop")
    add("512 KB stop string", {**good, "stop": [half_mb]}, "ok")
    add("512 KB role", {**good, "messages": [{"role": half_mb, "content": "Hi"}]}, "bad", "messages[0].role")
    add("512 KB content", {**good, "messages": [{"role": "user", "content": "word " * 100_000}]}, "long", "messages")
    for n in ("1", 2, 0, -1, 1.5, [1], {}, True, 10**40):
        add(f"n={str(n)[:10]}", {**good, "n": n}, "bad", "n")
    add("n=1", {**good, "n": 1}, "ok")
    for key in ("max_tokens", "max_completion_tokens"):
        for v in ("5", 5.5, 0, -1, 10**6, 10**40, [], {}, True):
            add(f"{key}={str(v)[:10]}", {**good, key: v}, "bad", key)
    for stop in (5, [1], ["a"] * 5, {"a": 1}, [None], [["a"]]):
        add(f"stop={str(stop)[:15]}", {**good, "stop": stop}, "bad", "stop")
    for stop in ("", [], ["\n", "x"], None):
        add(f"stop={stop!r}", {**good, "stop": stop}, "ok")
    for v in ("true", 1, [], {}):
        add(f"stream={v!r}", {**good, "stream": v}, "bad", "stream")
    for v, param in (("x", "stream_options"), ([], "stream_options"), ({"include_usage": "yes"},
                                                                       "stream_options.include_usage")):
        add(f"stream_options={v!r}", {**good, "stream": True, "stream_options": v}, "bad", param)
    add("include_usage", {**good, "stream": True, "stream_options": {"include_usage": True}}, "ok")
    for fmt in ("json_object", "text", 5, [], True):
        add(f"response_format={str(fmt)[:20]}", {**good, "response_format": fmt}, "bad", "response_format")
    for fmt, param in (({"type": 5}, "response_format.type"), ({"type": "xml"}, "response_format.type"),
                       ({"type": "json_schema"}, "response_format.json_schema"),
                       ({"type": "json_schema", "json_schema": {}}, "response_format.json_schema.name"),
                       ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}},
                        "response_format.json_schema.name"),
                       ({"type": "json_schema", "json_schema": {"name": "r"}}, "response_format.json_schema.schema"),
                       *(({"type": "json_schema", "json_schema": {"name": "r", "schema": bad}},
                          "response_format.json_schema.schema")
                         for bad in ({"type": "nonsense"}, {"type": "object", "properties": 5}, [], "x",
                                     {"minLength": -1}, {"$ref": "#/$defs/missing"}, {"enum": []},
                                     {"type": "object", "required": "a"}, {"pattern": "("})),
                       ({"type": "json_schema", "json_schema": {"name": "r", "schema": {}, "strict": "yes"}},
                        "response_format.json_schema.strict")):
        add(f"response_format={str(fmt)[:60]}", {**good, "response_format": fmt}, "bad", param)
    add("response_format text", {**good, "response_format": {"type": "text"}}, "ok")
    add("response_format json_object", {**good, "response_format": {"type": "json_object"}}, "ok")
    add("response_format json_schema", {**good, "response_format": {"type": "json_schema", "json_schema": {
        "name": "r", "strict": True, "schema": {"type": "object", "properties": {"a": {"type": "boolean"}},
                                                "required": ["a"], "additionalProperties": False}}}}, "ok")
    fn = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x"], "additionalProperties": False}}}
    for tools, param in ((5, "tools"), ({}, "tools"), ([5], "tools[0]"), ([{"type": "web"}], "tools[0]"),
                         ([{"type": "function"}], "tools[0].function"),
                         ([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name"),
                         ([{"type": "function", "function": {"name": "x" * 65}}], "tools[0].function.name"),
                         ([fn, fn], "tools[1].function.name"),
                         ([{"type": "function", "function": {"name": "f", "description": 5}}],
                          "tools[0].function.description"),
                         *(([fn, {"type": "function", "function": {"name": "g", "parameters": bad}}],
                            "tools[1].function.parameters")
                           for bad in ({"type": "nonsense"}, [], "x", {"type": "string"},
                                       {"type": "object", "properties": {"a": {"minimum": "0"}}}))):
        add(f"tools={str(tools)[:60]}", {**good, "tools": tools}, "bad", param)
    for choice, tools in (("always", [fn]), (5, [fn]), ({"type": "function"}, [fn]),
                          ({"type": "function", "function": {"name": "g"}}, [fn]), ("required", None),
                          ({"type": "function", "function": {"name": "f"}}, None)):
        add(f"tool_choice={str(choice)[:40]}", {**good, "tools": tools, "tool_choice": choice}, "bad", "tool_choice")
    add("parallel_tool_calls=1", {**good, "tools": [fn], "parallel_tool_calls": 1}, "bad", "parallel_tool_calls")
    for choice in ("required", {"type": "function", "function": {"name": "g"}}):
        add(f"undecodable tool schema, tool_choice={str(choice)[:30]}",
            {**good, "tools": [fn, {"type": "function", "function": {"name": "g", "parameters": {
                "type": "object", "properties": {"a": {"$ref": "#/$defs/none"}}}}}], "tool_choice": choice},
            "bad", "tools[1].function.parameters")
    for choice in ("none", "auto", "required", {"type": "function", "function": {"name": "f"}}):
        add(f"tools ok, tool_choice={str(choice)[:30]}", {**good, "tools": [fn], "tool_choice": choice}, "ok")
    add("tools streamed", {**good, "tools": [fn], "tool_choice": "required", "stream": True}, "ok")
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    add("tool history", {**good, "tools": [fn], "messages": [*HELLO, {"role": "assistant", "tool_calls": [call]},
                                                            {"role": "tool", "tool_call_id": "call_1", "content": "4"}]},
        "ok")
    for msgs, param in (([*HELLO, {"role": "tool", "tool_call_id": "call_1", "content": "4"}],
                         "messages[1].tool_call_id"),
                        ([*HELLO, {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "content": "4"}],
                         "messages[2].tool_call_id"),
                        ([*HELLO, {"role": "assistant", "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": "call_2", "content": "4"}], "messages[2].tool_call_id"),
                        ([*HELLO, {"role": "assistant", "tool_calls": [{**call, "function": {"name": "f",
                                                                                          "arguments": "{x"}}]}],
                         "messages[1].tool_calls[0].function.arguments"),
                        ([*HELLO, {"role": "assistant", "tool_calls": [{"id": "c"}]}], "messages[1].tool_calls[0]"),
                        ([{"role": "user", "content": "x", "tool_calls": [call]}], "messages[0].tool_calls")):
        add(f"tool messages {param}", {**good, "tools": [fn], "messages": msgs}, "bad", param)
    for key, v in (("top_logprobs", 3), ("logit_bias", {"1": 5})):
        add(f"{key}", {**good, key: v}, "bad", key)
    for lp, top in ((True, None), (True, 0), (True, 20), (False, None)):
        for stream in (False, True):
            add(f"logprobs={lp} top_logprobs={top} stream={stream}",
                {**good, "logprobs": lp, "stream": stream, **({} if top is None else {"top_logprobs": top})}, "ok")
    for lp, top, param in (("true", None, "logprobs"), (1, None, "logprobs"), ([], None, "logprobs"),
                           (True, 21, "top_logprobs"), (True, -1, "top_logprobs"), (True, 2.5, "top_logprobs"),
                           (True, "3", "top_logprobs"), (True, True, "top_logprobs"), (True, 10**40, "top_logprobs"),
                           (False, 2, "top_logprobs"), (None, 0, "top_logprobs")):
        add(f"logprobs={lp!r} top_logprobs={str(top)[:10]}", {**good, "logprobs": lp, "top_logprobs": top}, "bad",
            param)
    legacy = {"name": "f", "parameters": fn["function"]["parameters"]}
    for functions, param in ((5, "functions"), ({}, "functions"), ([{}], "functions[0].name"), ([5], "functions[0]"),
                             ([{"name": "a b"}], "functions[0].name"), ([legacy, legacy], "functions[1].name"),
                             ([{"name": "g", "parameters": {"type": "nonsense"}}], "functions[0].parameters"),
                             ([{"name": "g", "parameters": {"type": "string"}}], "functions[0].parameters"),
                             ([{"name": "g", "description": 5}], "functions[0].description")):
        add(f"functions={str(functions)[:50]}", {**good, "functions": functions}, "bad", param)
    for fc, functions, param in (("always", [legacy], "function_call"), (5, [legacy], "function_call"),
                                   ({"name": 5}, [legacy], "function_call"), ({"name": "g"}, [legacy], "function_call"),
                                   ({"name": "f"}, None, "function_call"),
                                   ("auto", [legacy], None), ("none", [legacy], None), ({"name": "f"}, [legacy], None)):
        add(f"function_call={str(fc)[:20]} functions={functions is not None}",
            {**good, "functions": functions, "function_call": fc}, "ok" if param is None else "bad", param)
    add("functions and tools", {**good, "functions": [legacy], "tools": [fn]}, "bad", "functions")
    add("function_call and tool_choice", {**good, "functions": [legacy], "function_call": "auto",
                                          "tool_choice": "auto", "tools": [fn]}, "bad", "functions")
    add("undecodable legacy function, forced",
        {**good, "functions": [{"name": "g", "parameters": {"type": "object", "properties": {
            "a": {"$ref": "#/$defs/none"}}}}], "function_call": {"name": "g"}}, "bad", "functions[0].parameters")
    add("legacy streamed", {**good, "functions": [legacy], "function_call": {"name": "f"}, "stream": True}, "ok")
    fcall = {"name": "f", "arguments": '{"x": 1}'}
    add("legacy history", {**good, "functions": [legacy], "messages": [
        *HELLO, {"role": "assistant", "function_call": fcall}, {"role": "function", "name": "f", "content": "4"}]}, "ok")
    for msgs, param in (([*HELLO, {"role": "function", "name": "f", "content": "4"}], "messages[1].role"),
                        ([*HELLO, {"role": "assistant", "function_call": "f"}], "messages[1].function_call"),
                        ([*HELLO, {"role": "assistant", "function_call": {"name": "f", "arguments": 5}}],
                         "messages[1].function_call.arguments"),
                        ([*HELLO, {"role": "assistant", "function_call": {"name": "a b", "arguments": "{}"}}],
                         "messages[1].function_call.name"),
                        ([*HELLO, {"role": "user", "content": "x", "function_call": fcall}],
                         "messages[1].function_call"),
                        ([*HELLO, {"role": "assistant", "function_call": fcall, "tool_calls": [call]}],
                         "messages[1].function_call"),
                        ([*HELLO, {"role": "assistant", "function_call": fcall}, *HELLO], "messages[1].tool_calls"),
                        ([*HELLO, {"role": "assistant", "function_call": fcall}], "messages[1].tool_calls"),
                        ([*HELLO, {"role": "assistant", "tool_calls": [call]}, *HELLO], "messages[1].tool_calls"),
                        ([*HELLO, {"role": "assistant", "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": "call_1", "content": "4"},
                          {"role": "tool", "tool_call_id": "call_1", "content": "4"}], "messages[3].tool_call_id")):
        add(f"out of order {param} {str(msgs[-1])[:30]}", {**good, "functions": [legacy], "messages": msgs}, "bad",
            param)
    for msgs, param in (([], "messages"), ({}, "messages"), ("hi", "messages"), (None, "messages"),
                        ([5], "messages[0]"), ([[]], "messages[0]"), ([None], "messages[0]")):
        add(f"messages={msgs!r}", {**good, "messages": msgs}, "bad", param)
    add("messages missing", {"model": model}, "bad", "messages")
    for m, param in ((5, "model"), ([], "model"), (None, "model"), ("", "model"), ("m" * 300, "model")):
        add(f"model={str(m)[:10]!r}", {**good, "model": m}, "bad", param)
    add("unknown model", {**good, "model": "no-such-model"}, "bad", "model")       # 404
    for label, data in (("empty body", b""), ("whitespace", b"  \n"), ("truncated", b'{"model": '),
                        ("not JSON", b"model=x"), ("array", b"[]"), ("null", b"null"), ("number", b"1"),
                        ("string", b'"x"'), ("NaN body", b"NaN"),
                        ("huge integer", b'{"max_tokens": ' + b"9" * 5000 + b"}"),
                        ("unterminated string", b'{"model": "x' + b"\\" * 1000)):
        raw(label, data)
    raw("BOM", b'\xef\xbb\xbf{"model": "x"}', "bad", "messages")       # UTF-8 with a BOM is read
    return cases


def _completion_cases(model: str) -> list[tuple[str, bytes, str, str | None]]:
    """``/v1/completions`` bodies, as ``_fuzz_cases``."""
    cases: list[tuple[str, bytes, str, str | None]] = []
    good = {"model": model, "prompt": "Hello", "max_tokens": 2}

    def add(label: str, body: Any, expect: str = "bad", param: str | None = None) -> None:
        cases.append((f"completions: {label}", json.dumps(body).encode(), expect, param))

    for prompt in ("Hello", ["Hello", "Hi"], [5, 6, 7], [[5, 6], [7]], "\u00e9t\u00e9"):
        for echo, lp, n in ((False, None, 2), (True, 1, 0), (True, 5, 1), (False, 0, 3)):
            add(f"prompt={str(prompt)[:20]} echo={echo} logprobs={lp} max_tokens={n}",
                {**good, "prompt": prompt, "echo": echo, "logprobs": lp, "max_tokens": n}, "ok")
    for prompt, param in (([], "prompt"), (None, "prompt"), (5, "prompt"), ({}, "prompt"), ([[]], "prompt[0]"),
                          ([[1, -1]], "prompt[0]"), ([[1, 2.5]], "prompt[0]"), ([True], "prompt[0]"),
                          (["a", None], "prompt[1]"), (["\ud800"], "prompt[0]"), ("\ud800", "prompt[0]"),
                          (["x"] * 65, "prompt")):
        add(f"prompt={str(prompt)[:20]}", {**good, "prompt": prompt}, "bad", param)
    for prompt, param in (([10**9], "prompt"), ([[1], [10**9]], "prompt[1]"), ([10**40], "prompt"), ("", "prompt"),
                          ("word " * 5000, "prompt")):       # known bad once the model's tokenizer has read them
        add(f"prompt={str(prompt)[:20]}", {**good, "prompt": prompt}, "model", param)
    for key, values in (("logprobs", (-1, 21, 2.5, "1", True, [1], 10**40)), ("max_tokens", (-1, 10**6, "2", 1.5, True)),
                        ("echo", ("true", 1, [], {})), ("n", (2, 0, "1")), ("best_of", (2, "1")),
                        ("suffix", ("x",)), ("logit_bias", ({"1": 5},)), ("stream", ("x",)),
                        ("temperature", (-1, 3, "0", float("nan"))), ("top_p", (2, -0.5)), ("seed", (-1, 2**64, 1.5)),
                        ("stop", (5, [1], ["a"] * 5)), ("stream_options", ("x",)), ("model", (5, "", "m" * 300))):
        for v in values:
            add(f"{key}={str(v)[:12]}", {**good, key: v}, "bad", key)
    add("unknown model", {**good, "model": "no-such-model"}, "bad", "model")
    add("prompt missing", {"model": model}, "bad", "prompt")
    add("completion streamed", {**good, "stream": True, "stream_options": {"include_usage": True}}, "ok")
    add("streamed logprobs", {**good, "stream": True, "logprobs": 1}, "bad", "logprobs")
    for label, body in (("a list", []), ("a string", "x"), ("null", None)):
        add(label, body)
    return cases


def _check(label: str, expect: str, param: str | None, r: httpx.Response, jobs_api: bool) -> None:
    """One fuzz response against its expectation (the jobs API knows no model by this name: 404)."""
    assert r.status_code < 500, (label, r.status_code, r.text[:300])
    if expect == "ok" and not jobs_api:
        assert r.status_code == 200, (label, r.text[:300])
        if r.headers["content-type"].startswith("text/event-stream"):
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1]), label
        else:
            assert r.json()["object"] in ("chat.completion", "text_completion"), label
        return
    assert len(r.content) < KB64, (label, len(r.content))
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, (label, err)
    assert err["type"] == "invalid_request_error" and err["message"], (label, err)
    assert "Traceback" not in err["message"] and str(REPO) not in err["message"], (label, err)
    if expect == "big":
        assert r.status_code == 413 and err["code"] == "request_too_large", (label, r.status_code, err)
    elif expect == "ok" or (jobs_api and expect in ("long", "model")) or label.endswith("unknown model"):
        assert r.status_code == 404 and err["code"] == "model_not_found", (label, r.status_code, err)
    elif expect == "long":
        assert r.status_code == 400 and err["code"] == "context_length_exceeded", (label, err)
    else:
        assert r.status_code == 400, (label, r.status_code, err)
        assert err["param"] == param, (label, err)


def _fuzz(base_url: str, model: str, headers: dict[str, str], jobs_api: bool) -> dict[str, int]:
    cases = _fuzz_cases(model)
    counts = {"sent": 0, "2xx": 0, "4xx": 0, "5xx": 0, "largest_error_bytes": 0}
    with httpx.Client(timeout=60, headers={"Content-Type": "application/json", **headers}) as http:
        for label, body, expect, param in cases:
            r = http.post(f"{base_url}/chat/completions", content=body)
            counts["sent"] += 1
            counts[f"{r.status_code // 100}xx"] = counts.get(f"{r.status_code // 100}xx", 0) + 1
            if r.status_code >= 400:
                counts["largest_error_bytes"] = max(counts["largest_error_bytes"], len(r.content))
            _check(label, expect, param, r, jobs_api)
        for label, body, expect, param in _completion_cases(model):
            r = http.post(f"{base_url}/completions", content=body)
            counts["sent"] += 1
            counts[f"{r.status_code // 100}xx"] = counts.get(f"{r.status_code // 100}xx", 0) + 1
            if r.status_code >= 400:
                counts["largest_error_bytes"] = max(counts["largest_error_bytes"], len(r.content))
            _check(label, expect, param, r, jobs_api)
        for label, body in (("classify deep", b'{"model": "x", "input": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
                            ("classify surrogate", b'{"model": "x", "input": "\\ud800"}'),
                            ("classify 5 MB", b'{"model": "x", "input": "' + b"z" * (5 * 2**20) + b'"}'),
                            ("classify list of numbers", b'{"model": "x", "input": [1, 2]}')):
            r = http.post(f"{base_url}/classify", content=body)
            counts["sent"] += 1
            counts[f"{r.status_code // 100}xx"] = counts.get(f"{r.status_code // 100}xx", 0) + 1
            assert 400 <= r.status_code < 500 and len(r.content) < KB64, (label, r.status_code, r.text[:300])
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}, label
    return counts


def test_fuzzed_chat_requests_on_tuneops_serve(server):
    sched = server.app.state.scheduler
    counts = _fuzz(server.base_url, "tiny-chat", {}, jobs_api=False)
    print(f"\ntuneops serve fuzz: {counts}")
    assert counts["5xx"] == 0
    wait_for(lambda: _idle(sched), 5, "the counters after the fuzz", interval=0.02)
    assert httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=10).status_code == 200


def test_fuzzed_chat_requests_on_the_jobs_api(cfg):
    """The jobs API's chat endpoint (the same code, behind its auth and body gate): no fine-tuned
    model exists here, so a valid body is a 404; everything else as on `tuneops serve`."""
    import uvicorn

    from tuneops.service.app import create_app, database_url
    from tuneops.service.db import Store

    store = Store(database_url(cfg))
    store.revoke_token("faults-fuzz")
    token = store.create_token("faults-fuzz")
    app = create_app(cfg, start_background=False)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: srv.started, 30, "the jobs API", interval=0.05)
        base = f"http://127.0.0.1:{port}/v1"
        r = httpx.post(f"{base}/chat/completions", content=b"[" * 5000 + b"]" * 5000, timeout=30)
        assert r.status_code == 401                          # no token: refused before the body is read
        counts = _fuzz(base, "no-such-fine-tuned-model", {"Authorization": f"Bearer {token}"}, jobs_api=True)
        print(f"\njobs API fuzz: {counts}")
        assert counts["5xx"] == 0 and counts.get("2xx", 0) == 0
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json() == {
            "status": "ok", "models_loaded": 0, "base_graphs_loaded": 0}
    finally:
        srv.should_exit = True
        thread.join(10)
        store.revoke_token("faults-fuzz")


# -- the CLI ------------------------------------------------------------------------------------------

def test_cli_refusals_are_one_line_without_a_traceback(cfg, chat_model_dir, tmp_path):
    corrupt = tmp_path / "corrupt-model"
    shutil.copytree(chat_model_dir, corrupt)
    (corrupt / "model.onnx").write_bytes(b"this is not an ONNX protobuf" * 100)
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}      # `tuneops api` gets to its database
    calls = {
        "corrupt model.onnx": (["serve", str(corrupt)], "the model cannot be loaded"),
        "--port 99999": (["serve", str(chat_model_dir), "--port", "99999"], "--port 99999: expected a port number"),
        "--port -1": (["serve", str(chat_model_dir), "--port", "-1"], "--port -1: expected a port number"),
        "database_url=notaurl": (["--set", "service.database_url=notaurl", "api"],
                                 "service.database_url 'notaurl': not a database URL"),
        "postgresql:// without its driver": (["--set", "service.database_url="
                                              "postgresql://tuneops:s3cret@127.0.0.1:9/db", "api"],
                                             "service.database_url 'postgresql://tuneops:***@127.0.0.1:9/db'"),
    }
    procs = {label: subprocess.Popen([sys.executable, "-m", "tuneops", "--params", str(cfg.source), *argv],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
             for label, (argv, _) in calls.items()}
    for label, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode not in (0, None), (label, out, err)
        assert "Traceback" not in out + err, (label, err)
        assert len(lines) == 1 and lines[0].startswith("tuneops: error: "), (label, err)
        assert calls[label][1] in lines[0], (label, lines[0])
        assert "s3cret" not in out + err
        print(f"\n{label}: rc {proc.returncode}: {lines[0]}")
