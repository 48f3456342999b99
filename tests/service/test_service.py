"""The fine-tuning jobs API (`tuneops api`) driven by the official `openai` Python client,
against real services started here: a Prefect server, a process worker for the service's
work pool and the API itself (subprocesses, free ports, SQLite databases in the test state).

- a chat JSONL is uploaded and validated; a job on the tiny model is queued, runs as a
  Prefect deployment run in its own working directory, survives an API restart in the
  middle, succeeds, lists its events and checkpoints, and its model is in `models.list()`
  and in the MLflow registry (with the job's lineage tags);
- an invalid file is a 400 naming the line; no token is a 401; another token gets 404
  for the job (retrieve, cancel, events); an over-limit upload is a 413 and stores nothing;
- cancelling a running job stops its flow run.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tuneops.io import free_port

from tests.conftest import REPO, TEST_ROOT, make_project
from tests.conftest import wait_for as _wait

openai = pytest.importorskip("openai")

LOGS = TEST_ROOT / "service-logs"


class Service:
    def __init__(self, root: Path, cfg, env: dict[str, str], port: int, tokens: dict[str, str]):
        self.root, self.cfg, self.env, self.port, self.tokens = root, cfg, env, port, tokens
        self.api: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.api_log = LOGS / "api.log"
        self.worker_log = LOGS / "worker.log"
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def tuneops(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tuneops", "--params", str(self.root / "params.yaml"), *args],
                              env=self.env, capture_output=True, text=True, timeout=120)

    def client(self, who: str = "alice") -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.base_url, api_key=self.tokens[who], max_retries=0, timeout=60)

    def start_api(self) -> None:
        with self.api_log.open("ab") as out:
            self.api = subprocess.Popen(
                [sys.executable, "-m", "tuneops", "--params", str(self.root / "params.yaml"), "api",
                 "--port", str(self.port)], env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

        def up() -> bool:
            assert self.api.poll() is None, self.api_log.read_text(errors="replace")[-5000:]
            try:
                return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(up, 120, "the API to answer", (self.api_log,))

    def stop_api(self) -> None:
        if self.api is not None and self.api.poll() is None:
            os.killpg(self.api.pid, signal.SIGTERM)
            self.api.wait(30)

    def wait_status(self, client, job_id: str, statuses: set[str], timeout: float):
        def reached():
            job = client.fine_tuning.jobs.retrieve(job_id)
            assert job.status not in {"failed", "cancelled"} - statuses, f"job {job.status}: {job.error}"
            return job if job.status in statuses else None

        return _wait(reached, timeout, f"job {job_id} to be {statuses}", (self.worker_log, self.api_log), 2.0)


def _chat_jsonl(cfg, n: int, skip: int = 0) -> bytes:
    from tuneops.data import scenarios

    train, _, _ = scenarios.build("chat", cfg.ingest)
    return b"".join(json.dumps({"messages": r["messages"]}).encode() + b"\n" for r in train[skip:skip + n])


@pytest.fixture(scope="module")
def svc():
    from tuneops.config import load_config
    from tuneops.orchestrate import server

    root = make_project("service", (
        "train.max_steps=6", "train.save_steps=3", "evaluate.max_samples=8", "evaluate.generations=0",
        "optimize.parity_samples=1", "optimize.ppl_samples=4", "orchestrate.startup_timeout_s=180",
        "service.max_upload_mb=1", "service.sync_interval_s=1", "service.dead_after_s=60",
        "model.max_seq_len=512"))      # (OpenAI's function-calling rows, tools declared, are up to ~400 tokens)
    cfg = load_config(root / "params.yaml")
    LOGS.mkdir(parents=True, exist_ok=True)
    for log in LOGS.glob("*.log"):
        log.unlink()
    server.stop(cfg)
    (cfg.state_dir / "prefect-server.db").unlink(missing_ok=True)
    shutil.rmtree(cfg.state_dir / "service", ignore_errors=True)      # the service db of an earlier session
    rec = server.start_prefect(cfg, free_port())
    env = server.client_env(cfg, rec["url"])
    env.update({"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)})
    service = Service(root, cfg, env, free_port(), {})
    worker = None
    try:
        for who in ("alice", "bob"):
            out = service.tuneops("api", "token", "create", who)
            assert out.returncode == 0, out.stderr
            service.tokens[who] = out.stdout.strip()
        with service.worker_log.open("ab") as wlog:
            worker = subprocess.Popen([sys.executable, "-m", "tuneops", "--params", str(root / "params.yaml"),
                                       "api", "worker"], env=env, stdout=wlog, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        service.worker = worker
        service.start_api()
        yield service
    finally:
        service.stop_api()
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:     # `tuneops api worker` stops its Prefect worker (and its flow runs) within a few seconds
                worker.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(10)
        server.stop(cfg)


def test_tokens_are_stored_hashed_only(svc):
    from sqlalchemy import create_engine, text

    from tuneops.service.app import database_url

    with create_engine(database_url(svc.cfg)).connect() as c:
        rows = c.execute(text("select name, sha256 from tokens")).all()
    dump = repr(rows)
    assert {r.name for r in rows} == {"alice", "bob"}
    assert all(t not in dump for t in svc.tokens.values())       # the tokens themselves are nowhere in the db
    listed = svc.tuneops("api", "token", "list")
    assert "alice" in listed.stdout and svc.tokens["alice"] not in listed.stdout


def test_no_token_is_401_and_a_wrong_one_too(svc):
    r = httpx.get(f"{svc.base_url}/fine_tuning/jobs", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=svc.base_url, api_key="tuneops-not-a-token", max_retries=0).models.list()
    assert err.value.status_code == 401


def test_invalid_file_is_a_400_naming_the_line_and_nothing_is_stored(svc):
    client = svc.client()
    good = _chat_jsonl(svc.cfg, 30).splitlines()
    bad = b"\n".join(good[:2] + [b'{"messages": [{"role": "wizard", "content": "hi"}]}'] + good[3:]) + b"\n"
    before = client.files.list().data
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("train.jsonl", bad), purpose="fine-tune")
    assert err.value.status_code == 400
    assert "train.jsonl:3:" in err.value.body["message"]
    assert any(p["line"] == 3 and "role" in p["field"] for p in err.value.body["problems"])
    assert client.files.list().data == before
    with pytest.raises(openai.APIStatusError) as err:              # over service.max_upload_mb (1 MB)
        client.files.create(file=("big.jsonl", b"x" * (2 * 2**20)), purpose="fine-tune")
    assert err.value.status_code == 413 and "max_upload_mb" in err.value.message
    assert client.files.list().data == before
    stored = sorted(p.name for p in (svc.root / ".tuneops" / "service" / "files").glob("*"))
    assert not [n for n in stored if n.endswith(".part")]


def test_openai_function_calling_file_uploads_and_a_bad_call_names_its_line(svc):
    """OpenAI's documented function-calling fine-tuning rows (tools, tool_calls without content, tool
    results, parallel_tool_calls, legacy functions) upload as they are (issue 32: they were refused with
    216 problems); arguments that break the function's schema are a 400 naming line, field and rule."""
    client = svc.client()
    fixture = (REPO / "tests" / "fixtures" / "openai" / "function_calling.jsonl").read_bytes()
    f = client.files.create(file=("function_calling.jsonl", fixture), purpose="fine-tune")
    assert f.status == "processed" and f.bytes == len(fixture)
    rows = fixture.splitlines()
    bad = json.loads(rows[1])
    bad["messages"][1]["tool_calls"][0]["function"]["arguments"] = json.dumps({"location": "Paris, France"})
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("calls.jsonl", b"\n".join(rows[:1] + [json.dumps(bad).encode()] + rows[2:]) + b"\n"),
                            purpose="fine-tune")
    assert "calls.jsonl:2: messages[1].tool_calls[0].function.arguments: arguments_schema: arguments do not " \
           "match the parameters of 'get_current_weather': 'format' is a required property" in err.value.body["message"]
    client.files.delete(f.id)


def test_job_requests_are_checked_before_anything_runs(svc):
    client = svc.client()
    f = client.files.create(file=("small.jsonl", _chat_jsonl(svc.cfg, 60)), purpose="fine-tune")
    for kwargs, param in (({"model": "gpt-4o"}, "model"),
                          ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
                          ({"suffix": "../etc"}, "suffix")):
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(**{"model": "tiny", "training_file": f.id, **kwargs})
        assert err.value.body["param"] == param
    few = client.files.create(file=("few.jsonl", _chat_jsonl(svc.cfg, 30)), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as err:            # 3 held out < validate.min_rows=5
        client.fine_tuning.jobs.create(model="tiny", training_file=few.id)
    assert err.value.body["param"] == "training_file" and "validate.min_rows=5" in err.value.body["message"]
    assert client.files.delete(few.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(few.id)
    with pytest.raises(openai.BadRequestError) as err:            # bob cannot train on alice's file
        svc.client("bob").fine_tuning.jobs.create(model="tiny", training_file=f.id)
    assert err.value.body["param"] == "training_file"
    assert client.fine_tuning.jobs.list().data == []


def test_a_job_runs_to_a_registered_model_through_an_api_restart(svc):
    client, bob = svc.client(), svc.client("bob")
    # chat rows plus OpenAI's documented function-calling rows (tools, tool_calls, tool results, legacy
    # functions): the same file an OpenAI user has trains here unchanged (issue 32)
    calls = (REPO / "tests" / "fixtures" / "openai" / "function_calling.jsonl").read_bytes()
    f = client.files.create(file=("chat.jsonl", _chat_jsonl(svc.cfg, 60) + calls), purpose="fine-tune")
    v = client.files.create(file=("held-out.jsonl", _chat_jsonl(svc.cfg, 12, skip=60)), purpose="fine-tune")
    assert f.status == "processed" and f.purpose == "fine-tune"
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, validation_file=v.id, suffix="smoke",
                                         seed=7)
    assert job.status in ("validating_files", "queued") and job.fine_tuned_model is None
    assert job.hyperparameters.batch_size == svc.cfg.select.global_batch_size

    # another token sees nothing of it
    for call in (lambda: bob.fine_tuning.jobs.retrieve(job.id), lambda: bob.fine_tuning.jobs.cancel(job.id),
                 lambda: bob.fine_tuning.jobs.list_events(job.id), lambda: bob.files.retrieve(f.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert bob.fine_tuning.jobs.list().data == [] and bob.files.list().data == []

    # restart the API while the job trains
    svc.wait_status(client, job.id, {"running"}, 300)
    svc.stop_api()
    svc.start_api()
    assert client.fine_tuning.jobs.retrieve(job.id).status in ("running", "succeeded")

    done = svc.wait_status(client, job.id, {"succeeded"}, 600)
    assert done.fine_tuned_model and done.fine_tuned_model.endswith(job.id[-8:]) and "smoke" in done.fine_tuned_model
    assert done.finished_at and done.trained_tokens > 0
    assert done.fine_tuned_model in [m.id for m in client.models.list()]
    assert done.fine_tuned_model not in [m.id for m in bob.models.list()]

    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert messages[0] == "The job has successfully completed"           # newest first
    steps = [m for m in messages if m.startswith("Step ")]
    assert len(steps) == 6 and "Step 6/6: training loss=" in steps[0]
    assert any(m.startswith("Stage train completed") for m in messages)
    assert any(m.startswith("New fine-tuned model created: " + done.fine_tuned_model) for m in messages)

    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in ckpts] == [6, 3]
    assert ckpts[0].fine_tuned_model_checkpoint.startswith(done.fine_tuned_model)

    results = client.files.content(done.result_files[0]).text.splitlines()
    assert results[0] == "step,train_loss,learning_rate" and len(results) == 7

    # the job ran in its own working directory, and the model is in MLflow with its lineage
    workdir = svc.root / ".tuneops" / "service" / "jobs" / job.id
    assert (workdir / "artifacts" / "register" / "registration.json").is_file()
    manifest = json.loads((workdir / "data" / "chat" / "manifest.json").read_text())
    n_calls = len(calls.splitlines())
    assert (manifest["train_rows"], manifest["eval_rows"]) == (60 + n_calls, 12)   # the validation file is the eval split
    # ... and keeps its own DVC record there: every stage in its dvc.lock, `dvc status` clean
    import yaml

    from tuneops.stages import STAGE_NAMES

    assert tuple(yaml.safe_load((workdir / "dvc.lock").read_text())["stages"]) == STAGE_NAMES
    status = subprocess.run(["dvc", "status"], cwd=workdir, capture_output=True, text=True, timeout=120)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout + status.stderr
    from mlflow import MlflowClient

    from tuneops.registry import tracking

    mv = MlflowClient(tracking.tracking_uri(svc.cfg)).get_model_version(done.fine_tuned_model, "1")
    assert mv.tags["tuneops.job.id"] == job.id and mv.tags["tuneops.job.training_file"] == f.id
    assert mv.tags["tuneops.job.validation_file"] == v.id
    assert mv.tags["data.remote"] == str(svc.cfg.state_dir / "dvc-remote")    # the job's data is shared

    # the API serves the model it made (issue 16): its owner chats with it, other tokens get 404
    hello = [{"role": "user", "content": "Hello"}]
    reply = client.chat.completions.create(model=done.fine_tuned_model, messages=hello, max_tokens=4, temperature=0)
    assert reply.model == done.fine_tuned_model and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 4 and reply.usage.prompt_tokens > 0
    streamed = client.chat.completions.create(model=done.fine_tuned_model, messages=hello, max_tokens=4,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply.choices[0].message.content
    # ... with tools and response_format (issue 32): a forced call is valid by construction, as is the JSON
    weather = json.loads(calls.splitlines()[0])["tools"][:1]       # the trained function, its strings bounded
    params = weather[0]["function"]["parameters"]              # as OpenAI's strict mode wants: no free keys
    params["properties"]["location"]["maxLength"], params["additionalProperties"] = 16, False
    name = weather[0]["function"]["name"]
    called = client.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=weather,
        tool_choice={"type": "function", "function": {"name": name}}, max_tokens=200, temperature=0)
    assert called.choices[0].message.tool_calls, called
    call = called.choices[0].message.tool_calls[0]
    assert called.choices[0].finish_reason == "tool_calls" and call.function.name == name and call.id
    import jsonschema

    jsonschema.validate(json.loads(call.function.arguments), weather[0]["function"]["parameters"])
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}
    shaped = client.chat.completions.create(
        model=done.fine_tuned_model, messages=hello, max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
    if shaped.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(shaped.choices[0].message.content), schema)
    for who in (bob, client):
        with pytest.raises(openai.NotFoundError) as err:
            who.chat.completions.create(model=done.fine_tuned_model if who is bob else "someone-elses-model",
                                        messages=hello, max_tokens=2)
        assert err.value.body["code"] == "model_not_found"


def _dpo_jsonl(n: int, skip: int = 0) -> bytes:
    """OpenAI DPO rows (input / preferred_output / non_preferred_output) from the bundled pairs."""
    from tuneops.data.chatterbot import preference_pairs

    rows = preference_pairs(seed=0)[0][skip:skip + n]
    return b"".join(json.dumps({k: r[k] for k in ("input", "preferred_output", "non_preferred_output")}).encode()
                    + b"\n" for r in rows)


def test_a_dpo_job_with_the_openai_client(svc):
    """Issue 33: an OpenAI DPO file uploads (checked by the preference format), bad methods and a bad
    beta are 400s naming the param, and method.type dpo runs to a model whose events and results file
    carry the rewards, margins and accuracies, and that answers through chat completions. Run by
    bob: his model and alice's (the first job) are two tokens' models of one base."""
    client = svc.client("bob")
    bad = _dpo_jsonl(1) + json.dumps({"input": {"messages": [{"role": "user", "content": "Hi"}]},
                                      "preferred_output": [{"role": "assistant", "content": "Hello."},
                                                           {"role": "assistant", "content": "Again."}],
                                      "non_preferred_output": [{"role": "assistant", "content": "Bye."}]}).encode()
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("bad-dpo.jsonl", bad), purpose="fine-tune")
    assert "bad-dpo.jsonl:2: preferred_output: one_assistant:" in err.value.body["message"]
    assert "format preference" in err.value.body["message"]
    f = client.files.create(file=("dpo.jsonl", _dpo_jsonl(60)), purpose="fine-tune")
    assert f.status == "processed"
    sft = client.files.create(file=("chat.jsonl", _chat_jsonl(svc.cfg, 60)), purpose="fine-tune")
    for method, param in (({"type": "reinforcement", "reinforcement": {}}, "method.type"),
                          ({"type": "dpo", "dpo": {"hyperparameters": {"beta": "high"}}},
                           "method.dpo.hyperparameters.beta"),
                          ({"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}}, "method.dpo.hyperparameters.beta")):
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method=method)
        assert err.value.status_code == 400 and err.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as err:            # a DPO job on SFT rows
        client.fine_tuning.jobs.create(model="tiny", training_file=sft.id, method={"type": "dpo"})
    assert err.value.body["param"] == "training_file" and "preference" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:            # an SFT job on DPO rows
        client.fine_tuning.jobs.create(model="tiny", training_file=f.id)
    assert err.value.body["param"] == "training_file"
    assert [j for j in client.fine_tuning.jobs.list().data if j.training_file == f.id] == []

    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=f.id, suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.5, "batch_size": "auto",
                                                           "learning_rate_multiplier": "auto", "n_epochs": "auto"}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.5
    done = svc.wait_status(client, job.id, {"succeeded"}, 900)
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    steps = [e for e in events if e.type == "metrics"]
    assert steps and all({"rewards_margins", "rewards_accuracies", "rewards_chosen", "rewards_rejected"}
                         <= set(e.data) for e in steps)
    assert "reward margin=" in steps[0].message
    evaluated = next(e for e in events if e.message.startswith("Evaluation:"))
    assert "preference_accuracy" in evaluated.data and "margin" in evaluated.data
    results = client.files.content(done.result_files[0]).text.splitlines()
    assert results[0] == "step,train_loss,learning_rate,rewards_chosen,rewards_rejected,rewards_margins," \
                         "rewards_accuracies"
    workdir = svc.root / ".tuneops" / "service" / "jobs" / job.id
    assert json.loads((workdir / "artifacts" / "train" / "metrics.json").read_text())["objective"] == "dpo"
    reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "Hello"}])
    assert reply.model == done.fine_tuned_model and reply.usage.completion_tokens <= 4

    # starting from a fine-tuned model (as OpenAI allows): trained further from it, and it is the reference
    with pytest.raises(openai.BadRequestError) as err:            # not someone else's model (nor their file)
        svc.client().fine_tuning.jobs.create(model=done.fine_tuned_model, training_file=f.id,
                                             method={"type": "dpo"})
    assert err.value.body["param"] in ("model", "training_file")
    again = client.fine_tuning.jobs.create(model=done.fine_tuned_model, training_file=f.id, method={"type": "dpo"})
    assert again.model == done.fine_tuned_model
    second = svc.wait_status(client, again.id, {"succeeded"}, 900)
    tm = json.loads((svc.root / ".tuneops" / "service" / "jobs" / again.id / "artifacts" / "train" / "metrics.json")
                    .read_text())
    assert tm["start_from"] == f"models:/{done.fine_tuned_model}/1"
    assert "'ref' adapter" in tm["reference"]["reference_model"]
    assert tm["first_loss"] == pytest.approx(0.6931, abs=1e-3)    # the start model is the reference at step 0
    assert second.fine_tuned_model.startswith("ft-tiny-")


def test_two_tokens_models_of_one_base_share_it_in_memory(svc):
    """Issue 35: every job's LoRA adapter is exported unmerged over the service's shared base graph
    (service.adapter_base), and the API serves each version as its adapter over that base: alice's and
    bob's models of the tiny base hold one base graph in memory. Each token still sees only its own."""
    from mlflow import MlflowClient

    from tuneops.registry import tracking

    alice, bob = svc.client(), svc.client("bob")
    theirs = {}
    for who, client in (("alice", alice), ("bob", bob)):
        done = [j for j in client.fine_tuning.jobs.list().data if j.status == "succeeded"]
        assert done, f"{who} has no succeeded job (the tests above make one each)"
        theirs[who] = done[0].fine_tuned_model
    hello = [{"role": "user", "content": "Hello"}]
    for who, client in (("alice", alice), ("bob", bob)):
        reply = client.chat.completions.create(model=theirs[who], messages=hello, max_tokens=3, temperature=0)
        assert reply.model == theirs[who]
    health = httpx.get(f"http://127.0.0.1:{svc.port}/health", timeout=10).json()
    assert health["models_loaded"] >= 2 and health["base_graphs_loaded"] == 1, health
    mlflow = MlflowClient(tracking.tracking_uri(svc.cfg))
    tags = [mlflow.get_model_version(theirs[w], "1").tags for w in ("alice", "bob")]
    assert tags[0]["adapter.base_md5"] == tags[1]["adapter.base_md5"] and tags[0]["adapter.base_quant"] == "fp32"
    assert all(t["adapter.accepted"] == "True" for t in tags)
    for client, other in ((alice, theirs["bob"]), (bob, theirs["alice"])):
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model=other, messages=hello, max_tokens=2)
        assert err.value.body["code"] == "model_not_found"


def test_cancel_stops_a_running_job(svc):
    client = svc.client()
    f = client.files.create(file=("chat2.jsonl", _chat_jsonl(svc.cfg, 60)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id,
                                         hyperparameters={"n_epochs": 40, "batch_size": 4})
    svc.wait_status(client, job.id, {"running"}, 300)
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    from prefect.client.orchestration import SyncPrefectClient

    from tuneops.service.db import Store
    from tuneops.service.app import database_url

    run_id = Store(database_url(svc.cfg)).job(job.id)["flow_run_id"]
    with SyncPrefectClient(svc.env["PREFECT_API_URL"]) as c:
        _wait(lambda: c.read_flow_run(run_id).state.type.value == "CANCELLED", 120,
              "the worker to stop the cancelled flow run", (svc.worker_log,))
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)


@pytest.mark.slow
def test_a_job_whose_worker_died_fails_with_the_reason(svc):
    """Last in the module: it kills the worker. SIGKILL of the worker and the job's process
    (a machine dying) while the API is down too -> no more heartbeats -> the Prefect
    automation crashes the flow run after service.dead_after_s -> the restarted API reports
    the job failed, code worker_died, never left running."""
    import psutil
    from prefect.client.orchestration import SyncPrefectClient

    from tuneops.service.app import database_url
    from tuneops.service.db import Store

    client = svc.client()
    f = client.files.create(file=("chat3.jsonl", _chat_jsonl(svc.cfg, 60)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id,
                                         hyperparameters={"n_epochs": 40, "batch_size": 4})
    _wait(lambda: any(e.message == "Stage train started" for e in client.fine_tuning.jobs.list_events(job.id)),
          300, "the job to train", (svc.worker_log,), 2.0)
    svc.stop_api()
    procs = [psutil.Process(svc.worker.pid), *psutil.Process(svc.worker.pid).children(recursive=True)]
    assert len(procs) >= 2, "the worker should be running the job's process"
    for p in procs:
        p.kill()
    killed = time.monotonic()
    run_id = Store(database_url(svc.cfg)).job(job.id)["flow_run_id"]
    with SyncPrefectClient(svc.env["PREFECT_API_URL"]) as c:
        state = _wait(lambda: (s := c.read_flow_run(run_id).state).type.value == "CRASHED" and s,
                      svc.cfg.service.dead_after_s + 120, "the automation to crash the silent run", (), 3.0)
    waited = time.monotonic() - killed
    assert "heartbeat" in state.message
    assert waited >= svc.cfg.service.dead_after_s - svc.cfg.service.heartbeat_s - 5
    svc.start_api()
    j = client.fine_tuning.jobs.retrieve(job.id)
    assert j.status == "failed" and j.error.code == "worker_died" and "dead_after_s" in j.error.message
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert messages[0].startswith("Fine-tuning job failed: no heartbeat")
    print(f"dead worker detected {waited:.0f} s after the kill (dead_after_s {svc.cfg.service.dead_after_s})")


def _fuzz_bodies(file_id: str) -> list[tuple[str, bytes]]:
    """Hostile job requests: non-finite and wrong-typed fields at every level, malformed
    bodies, trailing-newline names. Every one must be a 400 (none is a valid job)."""
    good = {"model": "tiny", "training_file": file_id}
    cases: list[tuple[str, bytes]] = []

    def add(label: str, body: dict) -> None:
        cases.append((label, json.dumps(body, allow_nan=True).encode()))

    nonfinite = {"NaN": "NaN", "Infinity": "Infinity", "-Infinity": "-Infinity", "1e400": "1e400", "-1e400": "-1e400"}
    for key in ("n_epochs", "batch_size", "learning_rate_multiplier"):
        for label, lit in nonfinite.items():
            for where in ("hyperparameters", "method"):
                hp = f'{{"{key}": {lit}}}'
                inner = hp if where == "hyperparameters" else \
                    f'{{"type": "supervised", "supervised": {{"hyperparameters": {hp}}}}}'
                raw = f'{{"model": "tiny", "training_file": "{file_id}", "{where}": {inner}}}'
                cases.append((f"{where}.{key}={label}", raw.encode()))
        for bad in (True, "3", [1], {"a": 1}, 2.5 if key != "learning_rate_multiplier" else 11.0, -1, 0, 10**30, ""):
            add(f"hyperparameters.{key}={bad!r}", {**good, "hyperparameters": {key: bad}})
    for bad in ([], "x", 5, True, [1, 2]):
        add(f"hyperparameters={bad!r}", {**good, "hyperparameters": bad})
        add(f"method={bad!r}", {**good, "method": bad})
        add(f"method.supervised={bad!r}", {**good, "method": {"type": "supervised", "supervised": bad}})
        add(f"method.supervised.hyperparameters={bad!r}",
            {**good, "method": {"type": "supervised", "supervised": {"hyperparameters": bad}}})
    add("method.type=dpo", {**good, "method": {"type": "dpo"}})
    add("method.type=5", {**good, "method": {"type": 5}})
    add("hyperparameters.unknown", {**good, "hyperparameters": {"epochs": 2}})
    for key in ("model", "training_file", "validation_file"):
        for bad in (5, [], {}, True, "x\n", "../../etc/passwd"):
            add(f"{key}={bad!r}", {**good, key: bad})
    for bad in ("x\n", "eve\n", "\nx", "a" * 41, "../etc", "a b", "", 5, ["x"], "é"):
        add(f"suffix={bad!r}", {**good, "suffix": bad})
    for bad in ("1", 1.5, -1, True, 2**31, 1e400, [1]):
        add(f"seed={bad!r}", {**good, "seed": bad})
    for bad in ([], "x", {"a": 1}, {str(i): "v" for i in range(17)}, {"k": "v" * 513}):
        add(f"metadata={str(bad)[:30]}", {**good, "metadata": bad})
    add("integrations=x", {**good, "integrations": "x"})
    add("integrations=[wandb]", {**good, "integrations": [{"type": "wandb"}]})
    add("unknown top-level key", {**good, "foo": 1})
    add("missing model", {"training_file": file_id})
    add("missing training_file", {"model": "tiny"})
    for label, raw in (("empty body", b""), ("truncated", b'{"model": '), ("not JSON", b"model=tiny"),
                       ("array", b"[]"), ("null", b"null"), ("number", b"1"), ("string", b'"x"'),
                       ("NaN body", b"NaN"), ("bad UTF-8", b'{"model": "\xff\xfe"}'),
                       ("deep nesting", b"[" * 100_000 + b"]" * 100_000),
                       ("duplicate keys", b'{"model": "tiny", "model": 5}'),
                       ("BOM", b'\xef\xbb\xbf{"model": "tiny"}')):
        cases.append((label, raw))
    return cases


def _announce_big_body(port: int, path: str, token: str | None) -> int:
    """POST with ``Content-Length: 200 MB`` and only 64 KB of body; the status line's code."""
    import socket

    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {200 * 2**20}\r\n" + (f"Authorization: Bearer {token}\r\n" if token else "") + "\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + b"{" + b" " * (64 * 1024))
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_fuzzed_job_requests_are_400s_in_openai_shape_and_leave_nothing(svc):
    """API fuzz (issue 18): every hostile body is a 4xx in OpenAI's error shape with a param
    where a field is to blame; zero 5xx; no job row, no job folder, no stored part file; no
    absolute server path in any message; an unauthenticated oversized body is refused before
    it is read (the API's memory does not grow by its size)."""
    client = svc.client()
    f = client.files.create(file=("fuzz.jsonl", _chat_jsonl(svc.cfg, 60)), purpose="fine-tune")
    jobs_dir = svc.root / ".tuneops" / "service" / "jobs"
    before = sorted(p.name for p in jobs_dir.iterdir()) if jobs_dir.is_dir() else []
    jobs_before = [j.id for j in client.fine_tuning.jobs.list().data]
    url = f"{svc.base_url}/fine_tuning/jobs"
    headers = {"Authorization": f"Bearer {svc.tokens['alice']}", "Content-Type": "application/json"}
    forbidden = [str(svc.root), str(REPO), "/root/", "/tmp/", "Traceback"]
    results, server_errors, unnamed = [], [], []
    cases = _fuzz_bodies(f.id)
    with httpx.Client(timeout=60) as http:
        for label, raw in cases:
            r = http.post(url, content=raw, headers=headers)
            results.append((label, r.status_code))
            if r.status_code >= 500:
                server_errors.append((label, r.status_code, r.text[:200]))
                continue
            assert 400 <= r.status_code < 500, (label, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert set(err) >= {"message", "type", "param", "code"}, (label, err)
            assert not any(s in err["message"] for s in forbidden), (label, err["message"])
            if label.split("=")[0].split(".")[0] in ("hyperparameters", "method", "suffix", "seed", "metadata",
                                                      "model", "training_file", "validation_file") and "=" in label:
                if err["param"] is None:
                    unnamed.append((label, err))
        # the param names the field, with the nesting the client sent
        r = http.post(url, content=b'{"model": "tiny", "training_file": "%s", "method": {"type": "supervised", '
                      b'"supervised": {"hyperparameters": {"batch_size": NaN}}}}' % f.id.encode(), headers=headers)
        assert r.json()["error"]["param"] == "method.supervised.hyperparameters.batch_size"
        r = http.post(url, json={"model": "tiny", "training_file": f.id, "suffix": "x\n"}, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    # oversized bodies: the headers announce 200 MB and only 64 KB follow; the answer must come
    # without the server waiting for (or buffering) the rest: 401 unauthenticated, 413 with a token
    rss = _rss_kb(svc.api.pid)
    for path, auth, expect in (("/v1/fine_tuning/jobs", None, 401), ("/v1/files", None, 401),
                               ("/v1/fine_tuning/jobs", svc.tokens["alice"], 413)):
        status = _announce_big_body(svc.port, path, auth)
        assert status == expect, (path, auth is not None, status)
        results.append((f"200 MB announced, POST {path}, {'with' if auth else 'no'} token", status))
    with httpx.Client(timeout=120) as http:                       # and 64 MB really sent without a token
        try:
            status = http.post(url, content=b"x" * (64 * 2**20),
                               headers={"Content-Type": "application/json"}).status_code
        except httpx.TransportError:                                 # the server stopped reading: refused
            status = 401
        assert status == 401
        results.append(("64 MB sent, no token", status))
    grown_mb = (_rss_kb(svc.api.pid) - rss) / 1024
    assert grown_mb < 32, f"the API grew by {grown_mb:.0f} MB on refused bodies"
    print(f"\nAPI fuzz: {len(results)} inputs, {len(server_errors)} 5xx, API memory {grown_mb:+.0f} MB after the "
          f"oversized bodies")
    assert not server_errors, server_errors
    assert not unnamed, unnamed
    assert [j.id for j in client.fine_tuning.jobs.list().data] == jobs_before           # no job recorded
    after = sorted(p.name for p in jobs_dir.iterdir()) if jobs_dir.is_dir() else []
    assert after == before                                                             # no folder left
    assert not list((svc.root / ".tuneops" / "service" / "files").glob("*.part"))
    # a token name with a trailing newline is refused by the CLI (one line, exit 2)
    out = svc.tuneops("api", "token", "create", "eve\n")
    assert out.returncode == 2 and out.stderr.startswith("tuneops: error: api token: NAME")
