"""Pipeline stages, one module each: ``run(cfg) -> dict`` over paths + typed params.

The same functions run under the ``tuneops`` CLI (and so ``dvc repro``) and inside
the Prefect flow (flows/pipeline.py wraps each one as a task).
"""
