"""``tuneops`` command line: one sub-command per stage (what dvc.yaml runs), ``run``
for the whole pipeline as a Prefect flow, and ``plan`` for the memory planner.

Every command takes ``--params FILE`` and repeated ``--set KEY=VALUE`` (dotted keys,
values parsed as YAML), before or after the command name. Heavy libraries are
imported only by the command that needs them, so ``tuneops --help`` is instant.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from . import stages
from .data import FORMATS
from .errors import InvalidInput, TuneopsError

TOKEN_NAME = r"[A-Za-z0-9_-]{1,64}"   # full match (re.fullmatch): no trailing newline


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--params", default=argparse.SUPPRESS, metavar="FILE",
                   help="params file (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=argparse.SUPPRESS, metavar="KEY=VALUE",
                   help="override one param, e.g. --set train.max_steps=10 (repeatable)")
    p.add_argument("-q", "--quiet", action="count", default=argparse.SUPPRESS,
                   help="warnings and errors only")
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help="debug logs and third-party warnings")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="machine-readable output (JSON) instead of the summary")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="tuneops", parents=[common],
        description="Fine-tune language models: validate -> select -> train -> evaluate -> optimize -> register.",
        epilog="Stages run alone (as dvc.yaml does) or all together with `tuneops run` (Prefect flow).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for spec in stages.STAGES:
        stage = sub.add_parser(spec.name, parents=[common], help=f"stage: {spec.help}")
        if spec.name == "validate":
            stage.add_argument("data", nargs="*", metavar="DATA",
                               help="validate this file (TRAIN [EVAL]: also leakage) instead of running the stage")
            stage.add_argument("--format", dest="data_format", choices=FORMATS, default=None,
                               help="record format of DATA (default: data.format in params)")
    data = sub.add_parser("data", parents=[common],
                          help="datasets: `data add PATH --format F [--eval EVAL_PATH]`, `data checkout MODEL@ALIAS`")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    add = data_sub.add_parser("add", parents=[common],
                              help="validate a dataset, copy it to data/user/, `dvc add` it and point params at it")
    add.add_argument("path", metavar="PATH", help="JSONL, CSV or Parquet file")
    add.add_argument("--format", dest="data_format", choices=FORMATS, required=True)
    add.add_argument("--name", default=None, help="dataset name (default: the file's name)")
    add.add_argument("--eval", dest="eval_path", default=None, metavar="EVAL_PATH",
                     help="held-out file of the same format (default: data.eval_fraction of PATH is held out)")
    checkout = data_sub.add_parser("checkout", parents=[common],
                                   help="restore the train/eval data a registered version was trained on")
    checkout.add_argument("ref", metavar="MODEL@ALIAS|MODEL@VERSION", help="e.g. tuneops-chat@champion")
    run = sub.add_parser("run", parents=[common], help="the whole pipeline as one Prefect flow")
    run.add_argument("--from", dest="start", choices=stages.STAGE_NAMES, help="skip the stages before this one")
    sub.add_parser("plan", parents=[common], add_help=False,
                   help="memory planner: method, ZeRO stage, batch and predicted peak memory (--help for flags)")
    sub.add_parser("params", parents=[common], help="print the validated params as JSON")
    _orchestration_parsers(sub, common)
    gen = sub.add_parser("generate", parents=[common],
                         help="chat with an ONNX variant (ONNX Runtime, KV cache), tokens streamed")
    gen.add_argument("prompt", help="the user's message")
    gen.add_argument("--model", default=None,
                     help="ONNX folder/file or models:/NAME@ALIAS (default: this project's optimize output)")
    gen.add_argument("--variant", default=None, help="fp32 | int8 | int4 | ... (default: the default variant)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="the prompt as plain text, no chat turn")
    cls = sub.add_parser("classify", parents=[common], help="classify texts with an ONNX classifier")
    cls.add_argument("texts", nargs="+", metavar="TEXT")
    cls.add_argument("--model", required=True, help="folder with model.onnx, labels.json and the tokenizer")
    srv = sub.add_parser("serve", parents=[common],
                         help="OpenAI-compatible chat (and /v1/classify) server for one model (foreground)")
    srv.add_argument("model", nargs="?", default=None,
                     help="models:/NAME@ALIAS, models:/NAME/VERSION or an exported folder "
                          "(default: serve.model, else models:/<register.model_name>@champion)")
    srv.add_argument("--host", default=None, help="listen address (default: serve.host)")
    srv.add_argument("--port", type=int, default=None, help="port (default: serve.port)")
    return parser


def _orchestration_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    server = sub.add_parser("server", parents=[common], help="Prefect server (and MLflow server): start|stop|status")
    server.add_argument("action", choices=("start", "stop", "status"))
    server.add_argument("--port", type=int, default=None, help="Prefect port (default: orchestrate.prefect_port)")
    server.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=None,
                        help="also start an MLflow tracking server (default: orchestrate.mlflow_server)")
    deploy_p = sub.add_parser("deploy", parents=[common],
                              help="create the fine-tuning (cron + data-change trigger) and data-watch deployments")
    deploy_p.add_argument("--image", default=None, metavar="IMAGE",
                          help="run from this tuneops image on a Docker / Kubernetes work pool (orchestrate.work_pool)")
    sub.add_parser("worker", parents=[common], help="run a process worker for orchestrate.work_pool (foreground)")
    export = sub.add_parser("export", parents=[common], help="the plan as another platform's jobs: kaito | azureml")
    export.add_argument("platform", choices=("kaito", "azureml"),
                        help="kaito: Workspace + ConfigMap; azureml: command (+ finetuning) job YAML")
    sub.add_parser("watch", parents=[common],
                   help="data watcher, once: compare dataset md5s with the last trained version, emit the event")
    models = sub.add_parser("models", parents=[common], help="registry: list|show|promote|rollback")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    ls = msub.add_parser("list", parents=[common], help="versions with aliases and eval perplexity")
    ls.add_argument("name", nargs="?", default="default", help="registered model (default: register.model_name)")
    show = msub.add_parser("show", parents=[common], help="one version: tags and model card")
    show.add_argument("ref", metavar="NAME@ALIAS|NAME@VERSION")
    promote = msub.add_parser("promote", parents=[common],
                              help="make a version champion if it passes the evaluation gate (else exit 1)")
    promote.add_argument("ref", metavar="NAME@VERSION|NAME@challenger")
    rollback = msub.add_parser("rollback", parents=[common], help="give champion back to the previous champion")
    rollback.add_argument("name", nargs="?", default="default")
    lineage = sub.add_parser("lineage", parents=[common],
                             help="where a registered version came from: code, data md5s, params, plan, metrics")
    lineage.add_argument("ref", metavar="NAME@ALIAS", help="e.g. default@champion (default = register.model_name)")
    api = sub.add_parser("api", parents=[common],
                         help="the OpenAI-compatible fine-tuning jobs API: serve (default) | worker | token")
    asub = api.add_subparsers(dest="api_command", metavar="ACTION")
    serve = asub.add_parser("serve", parents=[common], help="serve the API (foreground; needs `tuneops server start`)")
    for p in (api, serve):
        p.add_argument("--host", default=None, help="listen address (default: service.host)")
        p.add_argument("--port", type=int, default=None, help="port (default: service.port)")
    asub.add_parser("worker", parents=[common], help="run a process worker for service.work_pool (foreground)")
    tok = asub.add_parser("token", parents=[common], help="API tokens: create NAME | list | revoke NAME")
    tok.add_argument("token_action", choices=("create", "list", "revoke"))
    tok.add_argument("name", nargs="?", default=None, help="token name (the owner of its files, jobs and models)")
    report = sub.add_parser("report", parents=[common], help="rebuild the HTML run report from the stage outputs")
    report.add_argument("--out", default=None, help="file to write (default: <register_dir>/report.html)")


# -- handlers: one per command (COMMANDS below maps each command to its handler) ------------

def _stage(cfg: Any, args: argparse.Namespace) -> int:
    """``tuneops <stage>``: run one stage (what dvc.yaml runs); a summary line (with its wall time
    and peak RSS), or --json."""
    from . import log, preflight, resources

    from .orchestrate.lock import project_lock

    # this stage's params and the later stages' (what `dvc repro` runs next), before any compute
    preflight.check(cfg, args.command, list(getattr(args, "overrides", []) or []))
    with resources.measure() as usage, project_lock(cfg):      # one writer per project
        result = stages.get(args.command).load()(cfg)
    return _result(args, result, log.stage_summary(args.command, result, usage.wall_s, usage.peak_rss_bytes))


def _result(args: argparse.Namespace, result: Any, summary: str) -> int:
    print(json.dumps(result, indent=2, default=str) if getattr(args, "json", False) else summary)
    return 0


def _validate(cfg: Any, args: argparse.Namespace) -> int:
    if not args.data:
        return _stage(cfg, args)
    from .data.cli import validate_command

    return validate_command(cfg, args.data, args.data_format)


def _data(cfg: Any, args: argparse.Namespace) -> int:
    if args.data_command == "add":
        from .data.cli import add_command
        from .orchestrate.lock import project_lock

        with project_lock(cfg):
            return add_command(cfg, args.path, args.data_format, args.name, args.eval_path)
    from .registry.remote import checkout

    out = checkout(cfg, args.ref)
    files = ", ".join(f"{f['path']} (md5 {f['md5']})" for f in out["files"])
    return _result(args, out, f"{out['model']} v{out['version']}: restored {files} from {out['remote']}")


def _run(cfg: Any, args: argparse.Namespace) -> int:
    import time

    from . import log, preflight

    from .orchestrate.lock import project_lock

    overrides = list(getattr(args, "overrides", []) or [])
    preflight.check(cfg, args.start, overrides)   # before Prefect starts (the flow checks again: deployments)
    t0 = time.perf_counter()
    with project_lock(cfg):                       # before Prefect starts; the flow re-enters it
        result = stages.load_entry("finetune")(params_file=cfg.source, overrides=overrides, start=args.start)
    ran = [name for name in result if name in stages.STAGE_NAMES]      # not the "resources" entry
    lines = [log.stage_summary(name, result[name]) for name in ran]
    took = f"tuneops run: {len(ran)} stages in {time.perf_counter() - t0:.1f} s (Prefect start-up included)"
    return _result(args, result, "\n".join([*lines, "", log.resources_table(result["resources"]), took]))


def _params(cfg: Any, args: argparse.Namespace) -> int:
    print(json.dumps(cfg.raw, indent=2))
    return 0


def _infer(cfg: Any, args: argparse.Namespace) -> int:
    from .inference import commands as infer

    try:
        getattr(infer, args.command)(cfg, args)
    except FileNotFoundError as exc:
        raise InvalidInput(str(exc)) from exc
    return 0


def _server(cfg: Any, args: argparse.Namespace) -> int:
    from .orchestrate import server

    if args.action == "start":
        out = server.start(cfg, prefect_port=args.port, mlflow=args.mlflow)
        for name, rec in out.items():
            state = "already running" if rec.get("already_running") else f"started in {rec['startup_s']} s"
            print(f"{name}: {rec['url']} ({state}; pid {rec['pid']}, log {rec['log']})")
        print(f"export PREFECT_API_URL={out['prefect']['url']}")
    elif args.action == "stop":
        out = server.stop(cfg)
        print("\n".join(f"{n}: stopped (pid {r['pid']})" for n, r in out.items()) or "no server running")
    else:
        out = server.status(cfg)
        print("\n".join(f"{n}: {'running' if r['running'] else 'not running'} at {r['url']} (pid {r['pid']})"
                        for n, r in out.items()) or "no server started")
        return 0 if out and all(r["running"] for r in out.values()) else 3
    return 0


def _prefect_api(cfg: Any) -> None:
    import os

    from .orchestrate import server

    os.environ["PREFECT_API_URL"] = server.api_url(cfg)


def _deploy(cfg: Any, args: argparse.Namespace) -> int:
    from .orchestrate.deploy import deploy

    _prefect_api(cfg)
    print(json.dumps(deploy(cfg, cfg.source, list(getattr(args, "overrides", []) or []), image=args.image), indent=2))
    return 0


def _run_worker(cfg: Any, pool: str) -> int:
    """A Prefect process worker as this command's child: SIGTERM/SIGINT stop it and the flow runs it
    started (tuneops.procs), so stopping the command leaves no worker polling the pool."""
    import os

    from . import procs
    from .orchestrate.deploy import worker_command

    _prefect_api(cfg)
    os.environ["PREFECT_HOME"] = str(cfg.state_dir / "prefect")
    return procs.run(worker_command(pool))


def _worker(cfg: Any, args: argparse.Namespace) -> int:
    return _run_worker(cfg, cfg.orchestrate.work_pool)


def _watch(cfg: Any, args: argparse.Namespace) -> int:
    _prefect_api(cfg)
    watch = stages.load_entry("watch")
    print(json.dumps(watch(params_file=cfg.source, overrides=list(getattr(args, "overrides", []) or [])),
                     indent=2, default=str))
    return 0


def _models_list(cfg: Any, args: argparse.Namespace) -> int:
    from . import registry

    rows = registry.list_versions(cfg, args.name)
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"v{r['version']:<4} {','.join(r['aliases']) or '-':<20} ppl {r['eval_perplexity']!s:<10} "
              f"{r['created']}  {r['promotion_reason'] or ''}")
    return 0


def _models_show(cfg: Any, args: argparse.Namespace) -> int:
    from . import registry

    out = registry.show(cfg, args.ref)
    print(json.dumps(out, indent=2) if getattr(args, "json", False) else out["model_card"] or json.dumps(out, indent=2))
    return 0


def _models_promote(cfg: Any, args: argparse.Namespace) -> int:
    from . import registry

    out = registry.promote(cfg, args.ref)
    print(f"{out['name']} v{out['version']} is champion: {out['reason']}")
    return 0


def _models_rollback(cfg: Any, args: argparse.Namespace) -> int:
    from . import registry

    out = registry.rollback(cfg, args.name)
    print(f"{out['name']}: champion is v{out['champion']} again (was v{out['rolled_back']})")
    return 0


MODELS_ACTIONS = {"list": _models_list, "show": _models_show, "promote": _models_promote,
                  "rollback": _models_rollback}


def _models(cfg: Any, args: argparse.Namespace) -> int:
    return MODELS_ACTIONS[args.models_command](cfg, args)


def _lineage(cfg: Any, args: argparse.Namespace) -> int:
    from . import registry

    out = registry.lineage(cfg, args.ref)
    if getattr(args, "json", False):
        print(json.dumps(out, indent=2, default=str))
    else:
        _print_lineage(out)
    return 0


def _port(port: int | None) -> int | None:
    """``--port`` of ``serve`` / ``api``: a TCP port, else one clear line (uvicorn would raise a traceback)."""
    if port is not None and not 1 <= port <= 65535:
        raise InvalidInput(f"--port {port}: expected a port number from 1 to 65535")
    return port


def _serve(cfg: Any, args: argparse.Namespace) -> int:
    from .inference.http.app import serve

    serve(cfg, args.model, args.host, _port(args.port))
    return 0


def _export(cfg: Any, args: argparse.Namespace) -> int:
    import importlib

    from .platforms import PLATFORMS, PlatformError

    if args.platform not in PLATFORMS:
        raise PlatformError(f"export: unknown platform {args.platform!r}; choose one of {', '.join(PLATFORMS)}")
    print(json.dumps(importlib.import_module(f"tuneops.platforms.{args.platform}").export(cfg), indent=2))
    return 0


def _report(cfg: Any, args: argparse.Namespace) -> int:
    from pathlib import Path

    from .registry import report

    print(report.write(cfg, out=None if args.out is None else Path(args.out)))
    return 0


def _api_token(cfg: Any, args: argparse.Namespace) -> int:
    import re

    from .service.app import database_url
    from .service.db import Store

    store = Store(database_url(cfg))
    if args.token_action == "list":
        for t in store.list_tokens():
            print(f"{t['name']}  created {t['created_at']}")
        return 0
    if not args.name or not re.fullmatch(TOKEN_NAME, args.name):
        raise InvalidInput("api token: NAME must be 1-64 characters of A-Z a-z 0-9 _ -")
    if args.token_action == "revoke":
        if not store.revoke_token(args.name):
            raise TuneopsError(f"no token named {args.name!r}")
        print(f"revoked {args.name}")
        return 0
    try:
        token = store.create_token(args.name)
    except ValueError as exc:
        raise TuneopsError(str(exc)) from exc
    print(token)
    print(f"tuneops: token for {args.name!r}: shown once, only its SHA-256 is stored", file=sys.stderr)
    return 0


def _api_serve(cfg: Any, args: argparse.Namespace) -> int:
    from .service.app import serve

    port = _port(args.port)
    _prefect_api(cfg)
    serve(cfg, args.host, port)
    return 0


API_ACTIONS = {"serve": _api_serve, "worker": lambda cfg, args: _run_worker(cfg, cfg.service.work_pool),
               "token": _api_token}


def _api(cfg: Any, args: argparse.Namespace) -> int:
    """api [serve] / api worker / api token create|list|revoke."""
    return API_ACTIONS[args.api_command or "serve"](cfg, args)


def _print_lineage(out: dict[str, Any]) -> None:
    m = out["model"]
    print(f"{m['name']} v{m['version']} ({', '.join(m['aliases']) or 'no alias'})  {m['uri']}")
    print(f"  git commit      {out['git_commit']}")
    for d in out["datasets"]:
        match = {True: "matches dvc.lock", False: "DIFFERS from dvc.lock", None: "not in dvc.lock"}[d["matches_dvc_lock"]]
        print(f"  data {d['split']:<5}      {d['path']}  md5 {d['md5']}  ({match})")
    print(f"  params hash     {out['params']['hash']}")
    v = out["validation"]
    print(f"  validation      success={v['success']} {v['scenario']}/{v['format']} policy {v['policy']} "
          + " ".join(f"{s}: {c['accepted']}/{c['read']}" for s, c in v["counts"].items()))
    print(f"  base model      {out['base_model']['id']}  hash {out['base_model']['hash']}")
    p = out["plan"]
    print(f"  plan            {p.get('method')} ZeRO {p.get('zero_stage')} micro-batch {p.get('micro_batch_size')} "
          f"x {p.get('grad_accum')}")
    mt = out["metrics"]
    print(f"  metrics         eval perplexity {mt.get('eval_perplexity')} (base {mt.get('eval_base_perplexity')})")
    for n, var in out["onnx"]["variants"].items():
        print(f"  onnx {n:<10} {'accepted' if var.get('accepted') else 'rejected'} ({var.get('gate')})")
    print(f"  prefect run     {out['prefect_flow_run_id']}")
    print(f"  mlflow run      {out['mlflow_run_id']}")


def _config(args: argparse.Namespace) -> Any:
    from .config import load_config
    from .env import configure

    cfg = load_config(getattr(args, "params", "params.yaml"), getattr(args, "overrides", []) or [])
    configure(cfg.state_dir)
    return cfg


def _plan(args: argparse.Namespace, rest: list[str]) -> int:
    from .planner import main as plan_main

    cfg = _config(args)
    defaults = {**cfg.section("select"), "seq_len": cfg.model.max_seq_len,
                "model_path": str(cfg.path("base_model_dir"))}
    return plan_main(rest + (["--json"] if getattr(args, "json", False) else []), defaults=defaults)


# The one table from command to handler (stages: tuneops.stages.STAGES; ``plan`` is handled
# before the config is read, it takes the planner's own flags).
COMMANDS: dict[str, Callable[[Any, argparse.Namespace], int]] = {
    **{spec.name: _stage for spec in stages.STAGES},
    "validate": _validate, "data": _data, "run": _run, "params": _params,
    "generate": _infer, "classify": _infer,
    "server": _server, "deploy": _deploy, "worker": _worker, "watch": _watch,
    "models": _models, "lineage": _lineage, "report": _report, "api": _api, "export": _export,
    "serve": _serve,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "plan":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "validate" and args.data_format and not args.data:
        parser.error("validate: --format goes with DATA (the stage validates data.format)")
    from . import log, procs

    log.setup(getattr(args, "verbose", 0) - getattr(args, "quiet", 0))
    procs.exit_on_sigterm()      # SIGTERM unwinds like Ctrl-C: children stopped, exit hooks run
    try:
        if args.command == "plan":
            return _plan(args, rest)
        return COMMANDS[args.command](_config(args), args)
    except TuneopsError as exc:
        print(f"tuneops: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
