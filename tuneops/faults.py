"""Named kill points for fault-injection tests.

``point(name)`` does nothing unless the environment variable ``TUNEOPS_KILL_AT`` names it
(comma-separated list allowed); then the process SIGKILLs itself right there, as an OOM kill,
a lost machine or ``kill -9`` would. The pipeline calls it at each stage boundary
(``before:<stage>``, ``after:<stage>``) and inside ``register`` between its writes
(``register:<step>``); ``POINTS`` lists them all (the tests iterate over it).
"""
from __future__ import annotations

import os
import signal

ENV = "TUNEOPS_KILL_AT"

REGISTER_POINTS = (
    "register:logged",          # the run's metrics, artifacts and the pyfunc model are logged
    "register:version",         # the model version (with its tags and gate decision) exists
    "register:card",            # the model card is the version's description
    "register:alias",           # the alias has moved
    "register:history",         # champion history and the version's champion tag are written
    "register:record",          # registration.json is written
)


def stage_points(stage_names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p for name in stage_names for p in (f"before:{name}", f"after:{name}"))


def point(name: str) -> None:
    wanted = os.environ.get(ENV)
    if wanted and name in wanted.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
