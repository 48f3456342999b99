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

EXIT_INVALID_INPUT = 2
EXIT_INVALID_DATA = 1


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

    from .config import ConfigError

    try:
        if args.command == "plan":
            return _plan(args, rest)
        cfg = _config(args)
        if args.command == "validate" and args.data:
            from .data.cli import validate_command

            return validate_command(cfg, args.data, args.data_format)
        if args.command == "data":
            from .data.cli import add_command

            return add_command(cfg, args.path, args.data_format, args.name)
        if args.command in ("generate", "classify"):
            from . import infer

            try:
                getattr(infer, args.command)(cfg, args)
            except (infer.InferError, FileNotFoundError) as exc:
                print(f"tuneops: error: {exc}", file=sys.stderr)
                return EXIT_INVALID_INPUT
            return 0
        if args.command == "params":
            print(json.dumps(cfg.raw, indent=2))
            return 0
        if args.command == "run":
            from flows.pipeline import finetune

            result = finetune(params_file=cfg.source, overrides=list(getattr(args, "overrides", []) or []),
                              start=args.start)
        else:
            result = stages.get(args.command).load()(cfg)
        print(json.dumps(result, indent=2, default=str))
        return 0
    except ConfigError as exc:
        print(f"tuneops: error: {exc}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    except Exception as exc:  # noqa: BLE001 - map known user-facing errors to clean exits
        from tasks.validate import DataValidationError

        if isinstance(exc, DataValidationError):
            print(f"tuneops: {exc}", file=sys.stderr)
            return EXIT_INVALID_DATA
        from .planner import PlanError

        if isinstance(exc, PlanError):
            print(f"tuneops: error: {exc}", file=sys.stderr)
            return EXIT_INVALID_INPUT
        raise


if __name__ == "__main__":
    sys.exit(main())
