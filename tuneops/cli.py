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
from typing import Any

from . import stages
from .data import FORMATS
from .errors import EXIT_INVALID_INPUT, InvalidInput, TuneopsError

ORCHESTRATION_COMMANDS = ("server", "deploy", "worker", "watch", "models", "lineage", "report")
TOKEN_NAME = r"[A-Za-z0-9_-]{1,64}"


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--params", default=argparse.SUPPRESS, metavar="FILE",
                   help="params file (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=argparse.SUPPRESS, metavar="KEY=VALUE",
                   help="override one param, e.g. --set train.max_steps=10 (repeatable)")
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
    data = sub.add_parser("data", parents=[common], help="datasets: `data add PATH --format F`")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    add = data_sub.add_parser("add", parents=[common],
                              help="validate a dataset, copy it to data/user/, `dvc add` it and point params at it")
    add.add_argument("path", metavar="PATH", help="JSONL, CSV or Parquet file")
    add.add_argument("--format", dest="data_format", choices=FORMATS, required=True)
    add.add_argument("--name", default=None, help="dataset name (default: the file's name)")
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
    return parser


def _orchestration_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    server = sub.add_parser("server", parents=[common], help="Prefect server (and MLflow server): start|stop|status")
    server.add_argument("action", choices=("start", "stop", "status"))
    server.add_argument("--port", type=int, default=None, help="Prefect port (default: orchestrate.prefect_port)")
    server.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=None,
                        help="also start an MLflow tracking server (default: orchestrate.mlflow_server)")
    sub.add_parser("deploy", parents=[common],
                   help="create the fine-tuning (cron + data-change trigger) and data-watch deployments")
    sub.add_parser("worker", parents=[common], help="run a process worker for orchestrate.work_pool (foreground)")
    sub.add_parser("watch", parents=[common],
                   help="data watcher, once: compare dataset md5s with the last trained version, emit the event")
    models = sub.add_parser("models", parents=[common], help="registry: list|show|promote|rollback")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    ls = msub.add_parser("list", parents=[common], help="versions with aliases and eval perplexity")
    ls.add_argument("name", nargs="?", default="default", help="registered model (default: register.model_name)")
    ls.add_argument("--json", action="store_true")
    show = msub.add_parser("show", parents=[common], help="one version: tags and model card")
    show.add_argument("ref", metavar="NAME@ALIAS|NAME@VERSION")
    show.add_argument("--json", action="store_true")
    promote = msub.add_parser("promote", parents=[common],
                              help="make a version champion if it passes the evaluation gate (else exit 1)")
    promote.add_argument("ref", metavar="NAME@VERSION|NAME@challenger")
    rollback = msub.add_parser("rollback", parents=[common], help="give champion back to the previous champion")
    rollback.add_argument("name", nargs="?", default="default")
    lineage = sub.add_parser("lineage", parents=[common],
                             help="where a registered version came from: code, data md5s, params, plan, metrics")
    lineage.add_argument("ref", metavar="NAME@ALIAS", help="e.g. default@champion (default = register.model_name)")
    lineage.add_argument("--json", action="store_true")
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


def _orchestration(cfg: Any, args: argparse.Namespace) -> int:
    """server / deploy / worker / watch / models / lineage / report."""
    import os

    cmd = args.command
    if cmd == "server":
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
    if cmd in ("deploy", "worker", "watch"):
        from .orchestrate import server

        os.environ["PREFECT_API_URL"] = server.api_url(cfg)
        overrides = list(getattr(args, "overrides", []) or [])
        if cmd == "deploy":
            from .orchestrate.deploy import deploy

            print(json.dumps(deploy(cfg, cfg.source, overrides), indent=2))
        elif cmd == "worker":
            from .orchestrate.deploy import worker_command

            os.environ["PREFECT_HOME"] = str(cfg.state_dir / "prefect")
            cmd = worker_command(cfg.orchestrate.work_pool)
            os.execvp(cmd[0], cmd)
        else:
            from flows.watch import watch

            print(json.dumps(watch(params_file=cfg.source, overrides=overrides), indent=2, default=str))
        return 0
    from . import registry

    if cmd == "models":
        action = args.models_command
        if action == "list":
            rows = registry.list_versions(cfg, args.name)
            if args.json:
                print(json.dumps(rows, indent=2))
            for r in [] if args.json else rows:
                print(f"v{r['version']:<4} {','.join(r['aliases']) or '-':<20} ppl {r['eval_perplexity']!s:<10} "
                      f"{r['created']}  {r['promotion_reason'] or ''}")
        elif action == "show":
            out = registry.show(cfg, args.ref)
            print(json.dumps(out, indent=2) if args.json else out["model_card"] or json.dumps(out, indent=2))
        elif action == "promote":
            out = registry.promote(cfg, args.ref)
            print(f"{out['name']} v{out['version']} is champion: {out['reason']}")
        else:
            out = registry.rollback(cfg, args.name)
            print(f"{out['name']}: champion is v{out['champion']} again (was v{out['rolled_back']})")
        return 0
    if cmd == "lineage":
        out = registry.lineage(cfg, args.ref)
        if args.json:
            print(json.dumps(out, indent=2, default=str))
        else:
            _print_lineage(out)
        return 0
    from . import report

    print(report.write(cfg, out=None if args.out is None else __import__("pathlib").Path(args.out)))
    return 0


def _api(cfg: Any, args: argparse.Namespace) -> int:
    """api [serve] / api worker / api token create|list|revoke."""
    import os
    import re

    action = args.api_command or "serve"
    if action == "token":
        from .service.app import database_url
        from .service.db import Store

        store = Store(database_url(cfg))
        if args.token_action == "list":
            for t in store.list_tokens():
                print(f"{t['name']}  created {t['created_at']}")
            return 0
        if not args.name or not re.fullmatch(TOKEN_NAME, args.name):
            print("tuneops: error: api token: NAME must be 1-64 characters of A-Z a-z 0-9 _ -", file=sys.stderr)
            return EXIT_INVALID_INPUT
        if args.token_action == "revoke":
            if not store.revoke_token(args.name):
                print(f"tuneops: error: no token named {args.name!r}", file=sys.stderr)
                return 1
            print(f"revoked {args.name}")
            return 0
        try:
            token = store.create_token(args.name)
        except ValueError as exc:
            print(f"tuneops: error: {exc}", file=sys.stderr)
            return 1
        print(token)
        print(f"tuneops: token for {args.name!r}: shown once, only its SHA-256 is stored", file=sys.stderr)
        return 0
    from .orchestrate import server

    os.environ["PREFECT_API_URL"] = server.api_url(cfg)
    if action == "worker":
        from .orchestrate.deploy import worker_command

        os.environ["PREFECT_HOME"] = str(cfg.state_dir / "prefect")
        cmd = worker_command(cfg.service.work_pool)
        os.execvp(cmd[0], cmd)
    from .service.app import serve

    serve(cfg, args.host, args.port)
    return 0


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
    return plan_main(rest, defaults=defaults)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "plan":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "validate" and args.data_format and not args.data:
        parser.error("validate: --format goes with DATA (the stage validates data.format)")

    try:
        if args.command == "plan":
            return _plan(args, rest)
        cfg = _config(args)
        if args.command == "validate" and args.data:
            from .data.cli import validate_command

            return validate_command(cfg, args.data, args.data_format)
        if args.command == "data":
            from .data.cli import add_command

            from .orchestrate.lock import project_lock

            with project_lock(cfg):
                return add_command(cfg, args.path, args.data_format, args.name)
        if args.command in ("generate", "classify"):
            from . import infer

            try:
                getattr(infer, args.command)(cfg, args)
            except FileNotFoundError as exc:
                raise InvalidInput(str(exc)) from exc
            return 0
        if args.command == "params":
            print(json.dumps(cfg.raw, indent=2))
            return 0
        if args.command in ORCHESTRATION_COMMANDS:
            return _orchestration(cfg, args)
        if args.command == "api":
            return _api(cfg, args)
        from .orchestrate.lock import project_lock

        with project_lock(cfg):          # one writer per project (the flow takes it again, re-entrant)
            if args.command == "run":
                from flows.pipeline import finetune

                result = finetune(params_file=cfg.source, overrides=list(getattr(args, "overrides", []) or []),
                                  start=args.start)
            else:
                result = stages.get(args.command).load()(cfg)
        print(json.dumps(result, indent=2, default=str))
        return 0
    except TuneopsError as exc:
        print(f"tuneops: error: {exc}", file=sys.stderr)
        return exc.exit_code

if __name__ == "__main__":
    sys.exit(main())
