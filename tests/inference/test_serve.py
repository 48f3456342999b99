"""`tuneops serve` (issue 16) on the tiny model, with the official `openai` client: replies
non-streamed and streamed, usage counted by the model's tokenizer, stop strings, seeded sampling,
OpenAI-shaped 400 / 401 / 404 / 429 errors, and the CLI serving an exported folder."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from tests.conftest import wait_for
from tuneops.io import free_port

from .conftest import InProcess

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def registered(stage, tiny_cfg):
    stage("register")
    return tiny_cfg


@pytest.fixture(scope="module")
def server(registered):
    from tuneops.inference.http.app import create_app

    srv = InProcess(create_app(registered))
    yield srv
    srv.stop()


def test_chat_replies_streamed_and_not_with_usage_from_the_tokenizer(server, registered, tokenizer):
    from tuneops.inference.chat import prompt_ids
    from tuneops.inference.commands import generate

    client, name = server.client(), registered.register.model_name
    assert [m.id for m in client.models.list()] == [name]
    r = client.chat.completions.create(model=name, messages=HELLO, max_tokens=6, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == name and choice.message.role == "assistant"
    assert r.usage.prompt_tokens == len(prompt_ids(tokenizer, HELLO))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 6
    # the same text as `tuneops generate` on the registered champion (template, stop tokens, greedy)
    args = SimpleNamespace(model=f"models:/{name}@champion", variant=None, prompt="Hello", max_new_tokens=6,
                           sample=False, temperature=1.0, top_k=0, top_p=1.0, seed=None, raw=False)
    import io

    assert choice.message.content == generate(registered, args, io.StringIO())

    chunks = list(client.chat.completions.create(model=f"models:/{name}@champion", messages=HELLO,
                                                 max_completion_tokens=6,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == r.usage.model_dump()
    raw = httpx.post(f"{server.base_url}/chat/completions", json={"model": name, "messages": HELLO, "max_tokens": 2,
                                                                  "stream": True}, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")
    assert httpx.get(f"http://127.0.0.1:{server.port}/health").json()["status"] == "ok"


def test_stop_strings_and_seeds(server, registered):
    client, name = server.client(), registered.register.model_name
    full = client.chat.completions.create(model=name, messages=HELLO, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    assert len(text) >= 4, f"the tiny model's greedy reply is too short to cut: {text!r}"
    stop = text[2:4]
    cut = client.chat.completions.create(model=name, messages=HELLO, max_tokens=12, temperature=0, stop=[stop, "\x00"])
    assert cut.choices[0].message.content == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < full.usage.completion_tokens
    streamed = client.chat.completions.create(model=name, messages=HELLO, max_tokens=12, temperature=0, stop=stop,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[:text.find(stop)]

    def sampled(seed: int) -> str:
        return client.chat.completions.create(model=name, messages=HELLO, max_tokens=12, temperature=1.5,
                                              seed=seed).choices[0].message.content
    a = sampled(11)
    assert sampled(11) == a
    assert len({a, sampled(12), sampled(13)}) > 1          # sampling does sample


def test_errors_in_openai_shape(registered, tokenizer):
    from tuneops.inference.chat import prompt_ids
    from tuneops.config import load_config
    from tuneops.inference.http.app import create_app
    from tuneops.service.app import database_url
    from tuneops.service.db import Store

    cfg = load_config(registered.root / "params.yaml",
                      ["serve.auth=true", "serve.max_input_tokens=32", "serve.max_queue=0", "serve.max_concurrent=1"])
    store = Store(database_url(cfg))
    store.revoke_token("serve-test")
    token = store.create_token("serve-test")
    srv = InProcess(create_app(cfg))
    try:
        name = cfg.register.model_name
        for key, code in (("tuneops-wrong", "invalid_api_key"),):
            with pytest.raises(openai.AuthenticationError) as err:
                srv.client(key).chat.completions.create(model=name, messages=HELLO, max_tokens=2)
            assert err.value.status_code == 401 and err.value.body["code"] == code
        r = httpx.post(f"{srv.base_url}/chat/completions", json={"model": name, "messages": HELLO}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        client = srv.client(token)
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2)
        assert err.value.body == {"message": "The model 'gpt-4o' does not exist or you do not have access to it",
                                  "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
        long = [{"role": "user", "content": "word " * 100}]
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=name, messages=long)
        body = err.value.body
        assert body["code"] == "context_length_exceeded" and body["param"] == "messages"
        assert body["message"] == (f"This model's maximum input length is 32 tokens (serve.max_input_tokens); "
                                   f"your messages are {len(prompt_ids(tokenizer, long))} tokens")
        for bad, param in (({"messages": []}, "messages"), ({"n": 2}, "n"), ({"max_tokens": 0}, "max_tokens"),
                           ({"temperature": 3}, "temperature"), ({"messages": [{"role": "robot", "content": "x"}]},
                                                                 "messages[0].role")):
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(**{"model": name, "messages": HELLO, **bad})
            assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"
        # the queue holds max_concurrent + max_queue = 1: while one request is admitted, the next is a 429
        ticket = srv.app.state.scheduler.admit()
        try:
            with pytest.raises(openai.RateLimitError) as err:
                client.chat.completions.create(model=name, messages=HELLO, max_tokens=2)
            assert err.value.status_code == 429 and err.value.body["type"] == "rate_limit_error"
        finally:
            ticket.release()
        assert client.chat.completions.create(model=name, messages=HELLO, max_tokens=2).usage.completion_tokens <= 2
    finally:
        srv.stop()
        store.revoke_token("serve-test")


def test_queued_requests_all_complete(server, registered):
    """Requests arriving together wait in the bounded queue and all get their (identical) reply."""
    from concurrent.futures import ThreadPoolExecutor

    client, name = server.client(), registered.register.model_name

    def ask(_: int) -> str:
        return client.chat.completions.create(model=name, messages=HELLO, max_tokens=5,
                                              temperature=0).choices[0].message.content
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(ask, range(6)))
    assert len(set(replies)) == 1 and server.app.state.scheduler.admitted == 0


def test_cli_serves_an_exported_folder(registered, tmp_path):
    """`tuneops serve FOLDER` as a user types it: the optimize output's default variant."""
    port = free_port()
    opt = registered.path("optimize_dir")
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tuneops", "--params", str(registered.root / "params.yaml"),
                                 "serve", str(opt), "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                cwd=tmp_path)
    try:
        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                assert proc.poll() is None, log.read_text()[-3000:]
                return False
        wait_for(up, 120, "tuneops serve", logs=[log], interval=0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        assert model == opt.name
        r = client.chat.completions.create(model=model, messages=HELLO, max_tokens=3, temperature=0)
        assert r.usage.completion_tokens <= 3 and r.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_bad_model_reference_is_one_clear_error(registered, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tuneops", "--params", str(registered.root / "params.yaml"),
                           "serve", "models:/no-such-model@champion"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("tuneops: error: models:/no-such-model@champion: no such registered model")
    time.sleep(0)


def test_classify_endpoint_on_an_exported_classifier(registered, tmp_path):
    """`tuneops serve` of a classification model answers POST /v1/classify (documented shape) with
    the labels `tuneops classify` gives; the chat endpoint tells the caller to use it."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tuneops.export.exporter import export_classifier
    from tuneops.models import load_tokenizer
    from tuneops.inference.http.app import create_app

    base = registered.path("base_model_dir")
    conf = AutoConfig.from_pretrained(str(base), num_labels=2, id2label={0: "neg", 1: "pos"},
                                      label2id={"neg": 0, "pos": 1})
    torch.manual_seed(0)
    src = tmp_path / "classifier"
    AutoModelForSequenceClassification.from_config(conf).save_pretrained(str(src))
    load_tokenizer(base).save_pretrained(str(src))
    assert export_classifier(src, tmp_path / "onnx", registered.optimize.opset, registered.optimize.parity_atol)[
        "accepted"]
    srv = InProcess(create_app(registered, str(tmp_path / "onnx")))
    try:
        texts = ["good", "a much longer and worse text"]
        r = httpx.post(f"{srv.base_url}/classify", json={"model": "onnx", "input": texts}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
        from tuneops.inference.engine import Classifier

        direct = Classifier(onnx_path=tmp_path / "onnx" / "model.onnx").classify(texts)
        assert [d["label"] for d in body["data"]] == [d["label"] for d in direct]
        assert all(0 < d["score"] <= 1 for d in body["data"])
        with pytest.raises(openai.BadRequestError) as err:
            srv.client().chat.completions.create(model="onnx", messages=HELLO)
        assert err.value.body["code"] == "wrong_endpoint" and "/v1/classify" in err.value.body["message"]
        bad = httpx.post(f"{srv.base_url}/classify", json={"model": "onnx", "input": []}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"
    finally:
        srv.stop()


def test_model_pool_loads_once_and_evicts_least_recently_used():
    from concurrent.futures import ThreadPoolExecutor

    from tuneops.inference.pool import ModelPool

    loads = []

    class Spec:
        def __init__(self, name):
            self.id = name

        def load(self, threads):
            loads.append(self.id)
            time.sleep(0.05)
            return SimpleNamespace(kind="chat")

    pool = ModelPool(limit=2)
    with ThreadPoolExecutor(4) as ex:                       # four requests for one model arrive together
        models = list(ex.map(lambda _: pool.get("a", lambda: Spec("a")), range(4)))
    assert loads == ["a"] and all(m is models[0] for m in models) and models[0].id == "a"
    pool.get("b", Spec("b"))
    pool.get("a", Spec("a"))                                 # a is now the most recently used
    pool.get("c", Spec("c"))                                 # evicts b
    assert pool.loaded() == ["a", "c"] and loads == ["a", "b", "c"]
    pool.get("b", Spec("b"))
    assert pool.loaded() == ["c", "b"] and loads == ["a", "b", "c", "b"]


def test_serving_code_names_no_model_family():
    """The served template and stop tokens come from the model's tokenizer and generation_config
    (tuneops/inference/chat.py): the serving code names no family and no family's turn marker."""
    import re

    from tests.conftest import REPO

    inference = REPO / "tuneops" / "inference"
    files = [inference / n for n in ("engine.py", "resolve.py", "layout.py", "scheduler.py", "pool.py", "pyfunc.py")]
    files += sorted((inference / "http").glob("*.py"))
    pattern = re.compile(r"gemma|llama|qwen|phi-?3|mistral|smollm|<end_of_turn>|<start_of_turn>|<\|im_end\|>|"
                         r"<\|eot_id\|>|<\|end\|>|bos_token_id", re.IGNORECASE)
    hits = [f"{f.name}:{i}: {line.strip()}" for f in files
            for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_cancelling_a_ticket_gives_its_slot_and_queue_place_back_at_once():
    """The scheduler's counters follow cancellation (issue 36), with no garbage collection involved:
    a queued request that is cancelled leaves the queue, a running one keeps its slot until its
    generation stops, and ``close`` (SIGINT / SIGTERM) cancels everything and admits nothing more."""
    from tuneops.inference.scheduler import Busy, Cancelled, Closed, Scheduler

    sched = Scheduler(max_concurrent=1, max_queue=1)
    first, second = sched.admit(), sched.admit()
    with pytest.raises(Busy):
        sched.admit()
    outcome = {}

    def wait_for_slot() -> None:
        try:
            with second.running():
                outcome["second"] = "ran"
        except Cancelled as exc:
            outcome["second"] = f"cancelled: {exc}"
        finally:
            second.release()

    with first.running():
        waiter = threading.Thread(target=wait_for_slot)
        waiter.start()
        wait_for(lambda: sched.state() == {"running": 1, "waiting": 1, "max_concurrent": 1, "capacity": 2,
                                           "cancelled": 0, "closed": False}, 5, "a queued request", interval=0.01)
        second.cancel("the client went away")
        waiter.join(2)
        assert not waiter.is_alive() and outcome["second"] == "cancelled: the client went away"
        assert sched.admitted == 1 and sched.cancelled == 1
        third = sched.admit()                        # its queue place is free again
        sched.close()
        assert first.cancelled.is_set() and third.cancelled.is_set() and sched.cancelled == 3
        with pytest.raises(Closed):
            sched.admit()
        assert sched.stalled_s() >= 0 and sched.state()["running"] == 1
    first.release()
    third.release()
    third.cancel()                                   # a released ticket: nothing changes
    assert sched.admitted == 0 and sched.state()["running"] == 0 and sched.cancelled == 3


def test_chat_requests_are_checked_by_their_schema():
    from tuneops.config import load_config
    from tuneops.inference.http.errors import ApiError
    from tuneops.inference.http.schema import MAX_DEPTH, chat_request, json_depth, parse_body
    from tests.conftest import REPO

    settings = load_config(REPO / "params.yaml").serve
    hello = {"model": "m", "messages": HELLO}
    req = chat_request({**hello, "temperature": 5e-324, "seed": 2**63 - 1, "stop": "x"}, settings)
    assert req["temperature"] == 0.0 and req["seed"] == 2**63 - 1 and req["stop"] == ["x"]
    assert req["max_tokens"] == settings.default_max_tokens
    assert req["messages"] == [{"role": "user", "content": "Hello"}]
    for bad, param in (({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"),
                       ({"temperature": float("nan")}, "temperature"),
                       ({"messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role"),
                       ({"messages": [{"role": "user", "content": "a\ud800"}]}, "messages[0].content"),
                       ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
                        "messages[0].content[0]"),
                       ({"response_format": "json_object"}, "response_format"),
                       ({"max_tokens": "9" * 10_000}, "max_tokens"),
                       ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage")):
        with pytest.raises(ApiError) as err:
            chat_request({**hello, **bad}, settings)
        assert err.value.status_code == 400 and err.value.body["error"]["param"] == param, (bad, err.value.body)
        assert len(err.value.body["error"]["message"]) < 300
    assert json_depth(b'{"a": "[[[[[[", "b": [[1]]}') == 3
    assert json_depth(b"[" * 100_000) == MAX_DEPTH + 1                # counted no further than it matters
    for raw in (b"[" * 5000 + b"]" * 5000, b"", b"\xff", b"{", b"9" * 5000):
        with pytest.raises(ApiError) as err:
            parse_body(raw)
        assert err.value.status_code == 400 and err.value.body["error"]["code"] == "invalid_json"
