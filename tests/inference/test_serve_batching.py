"""`tuneops serve` with continuous batching (issue 34), against a real uvicorn server in a thread
serving the tiny chat model (``chat_model_dir``; its greedy reply never hits a stop token):

- concurrent requests decode in one batch, each with the reply it gets alone;
- a storm of 30 clients that close after their first chunk (16 decoding, the others waiting to
  join the batch): every slot and batch row is free within 1 s of the last one leaving, and the
  next requests are served;
- malformed ``n`` / ``max_tokens`` / stop lists sent while the batch is decoding never reach a
  5xx, and the rows decoding meanwhile finish normally;
- a soak: the RSS of a ``tuneops serve`` process drifts at most 5% over a run of requests (a
  short one here; the 5,000-request run is ``slow``), over a torch-exported graph and a builder graph.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import make_project, wait_for

from .conftest import InProcess, serve_subprocess

pytestmark = pytest.mark.pipeline          # a server in a thread

HELLO = [{"role": "user", "content": "Hello"}]
BATCH = 16


@pytest.fixture(scope="module")
def server(chat_model_dir):
    from tuneops.config import load_config
    from tuneops.inference.http.app import create_app

    root = make_project("serve-batching", (f"serve.max_concurrent={2 * BATCH}", f"serve.max_batch={BATCH}",
                                           "serve.max_batch_tokens=64", "serve.max_queue=40", "serve.threads=1"))
    srv = InProcess(create_app(load_config(root / "params.yaml"), str(chat_model_dir)))
    yield srv
    srv.stop()


def _body(**kw) -> dict:
    return {"model": "tiny-chat", "messages": HELLO, "temperature": 0, **kw}


def _post(srv: InProcess, **kw) -> httpx.Response:
    return httpx.post(f"{srv.base_url}/chat/completions", json=_body(**kw), timeout=120)


def _free(srv: InProcess) -> bool:
    sched, batcher = srv.app.state.scheduler, srv.app.state.model.batcher
    s = sched.state()
    return sched.admitted == 0 and s["running"] == 0 and batcher.state()["batch"] == 0 \
        and batcher.state()["pending"] == 0


def test_concurrent_requests_decode_together_with_the_replies_they_get_alone(server):
    contents = ["Hello", "What is the capital of France?", "hi there, how are you doing today?", "2+2?"] * 2
    alone = [_post(server, messages=[{"role": "user", "content": c}], max_tokens=24 + 4 * i).json()
             for i, c in enumerate(contents)]
    batcher = server.app.state.model.batcher
    batcher.peak = 0
    with ThreadPoolExecutor(len(contents)) as pool:
        together = list(pool.map(lambda ic: _post(server, messages=[{"role": "user", "content": ic[1]}],
                                                  max_tokens=24 + 4 * ic[0]).json(), enumerate(contents)))
    assert [r["choices"][0]["message"]["content"] for r in together] == \
        [r["choices"][0]["message"]["content"] for r in alone]
    assert [r["usage"] for r in together] == [r["usage"] for r in alone]
    assert batcher.peak >= 3, batcher.peak                  # they were decoded in one batch


def test_a_storm_of_clients_closing_after_their_first_chunk_frees_every_slot_within_1_s(server):
    import json

    body = json.dumps(_body(max_tokens=1024, stream=True)).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    closed_at: list[float] = []

    def client() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
            s.sendall(request)
            data = b""
            while b'"content"' not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        closed_at.append(time.monotonic())

    threads = [threading.Thread(target=client) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    wait_for(lambda: _free(server), 1, "every slot and batch row free", interval=0.01)
    freed = time.monotonic() - max(closed_at)
    assert server.app.state.scheduler.state()["cancelled"] >= 30
    with ThreadPoolExecutor(4) as pool:
        after = list(pool.map(lambda _: _post(server, max_tokens=8), range(4)))
    assert [r.status_code for r in after] == [200] * 4
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in after)
    print(f"\nstorm of 30: every slot free {freed * 1000:.0f} ms after the last client left")


BAD = [("n", 2), ("n", 0), ("n", -1), ("n", "1"), ("n", 1.5), ("n", True), ("n", None),
       ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 10 ** 12), ("max_tokens", "8"), ("max_tokens", 1.5),
       ("max_tokens", True), ("max_tokens", []), ("max_completion_tokens", 0), ("max_tokens", 1),
       ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]), ("stop", [1]), ("stop", [["x"]]), ("stop", {"a": 1}),
       ("stop", "x" * 5000), ("stop", []), ("stop", ["\ud800"]), ("stop", [None]), ("stop", ["e", "o", "a", " "])]


def test_malformed_batching_fields_never_reach_a_5xx_while_the_batch_decodes(server):
    with ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(_post, server, max_tokens=200) for _ in range(4)]   # rows decoding meanwhile
        seen = {}
        for field, value in BAD:
            r = httpx.post(f"{server.base_url}/chat/completions", json=_body(**{field: value}), timeout=120) \
                if not (isinstance(value, list) and value == ["\ud800"]) else httpx.post(
                    f"{server.base_url}/chat/completions", timeout=120, headers={"Content-Type": "application/json"},
                    content=b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "Hello"}], '
                            b'"stop": ["\\ud800"]}')
            seen[(field, repr(value)[:20])] = r.status_code
            assert r.status_code < 500, (field, value, r.text[:300])
            if r.status_code >= 400:
                err = r.json()["error"]
                assert r.status_code == 400 and err["param"] == field, (field, value, r.text[:300])
        assert [f.result().status_code for f in busy] == [200] * 4
        assert all(f.result().json()["usage"]["completion_tokens"] == 200 for f in busy)
    assert seen[("max_tokens", "1")] == seen[("stop", "[]")] == seen[("n", "None")] == 200
    wait_for(lambda: _free(server), 5, "the counters after the malformed bodies", interval=0.02)


@pytest.fixture(scope="module", params=["torch export", "builder graph"])
def serve_process(request, chat_model_dir, tmp_path_factory):
    """``tuneops serve`` as a user starts it, in its own process (the soak measures the server's RSS,
    not a test process that also holds the clients), with the batching settings of ``server``; over
    the torch-exported graph (rows left-padded, a new cache each step) and over onnxruntime-genai's
    builder graph of a tiny Llama (rows right-padded, decoding into one KV buffer)."""
    from tuneops.io import free_port

    if request.param == "builder graph":
        from tests.export.test_adapters import _base_folder
        from tuneops.export import adapters

        where = tmp_path_factory.mktemp("builder")
        chat_model_dir = where / "tiny-chat"               # served as ``tiny-chat`` too
        adapters.export_base(_base_folder(where, 0), chat_model_dir, adapters.base_quant("fp32"), how="builder",
                             model_name="tiny")

    root = make_project("serve-soak", (f"serve.max_concurrent={2 * BATCH}", f"serve.max_batch={BATCH}",
                                       "serve.max_batch_tokens=64", "serve.max_queue=40", "serve.threads=1"))
    port, log = free_port(), tmp_path_factory.mktemp("soak") / "serve.log"
    proc = serve_subprocess(root / "params.yaml", chat_model_dir, port, log, root, "-q")
    yield proc, f"http://127.0.0.1:{port}", log
    proc.terminate()
    proc.wait(30)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def soak(serving, requests: int, concurrency: int = 8) -> tuple[int, int]:
    """The server process's RSS after a warm-up of 10% of ``requests``, and at the end; streamed
    and plain requests, some cut short by a stop string, over one keep-alive client (an
    ``httpx.post`` per request builds an SSL context each time: the client's memory, not the
    server's, grows)."""
    proc, url, log = serving

    def idle() -> bool:
        state = httpx.get(f"{url}/health", timeout=10).json()
        return state["running"] + state["waiting"] == 0

    with httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        def one(i: int) -> int:
            kw = {"max_tokens": 4 + i % 13, "stream": bool(i % 2)}
            if i % 5 == 0:
                kw["stop"] = ["e"]
            return client.post("/v1/chat/completions",
                               json=_body(messages=[{"role": "user", "content": f"Hello number {i}"}], **kw)).status_code

        warm = max(1, requests // 10)
        with ThreadPoolExecutor(concurrency) as pool:
            assert set(pool.map(one, range(warm))) == {200}
            wait_for(idle, 5, "the counters after the warm-up", logs=[log], interval=0.02)
            before = _rss(proc.pid)
            assert set(pool.map(one, range(warm, requests))) == {200}
        wait_for(idle, 5, "the counters after the soak", logs=[log], interval=0.02)
    return before, _rss(proc.pid)


def test_rss_does_not_drift_over_a_short_soak(serve_process):
    before, after = soak(serve_process, 400)
    print(f"\nsoak of 400: server RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
    assert after <= before * 1.05


@pytest.mark.slow
def test_rss_does_not_drift_over_5000_requests(serve_process):
    before, after = soak(serve_process, 5000, 16)
    print(f"\nsoak of 5000: server RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
    assert after <= before * 1.05
