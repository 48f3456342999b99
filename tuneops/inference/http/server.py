"""The server process of both servers (``tuneops serve``, ``tuneops api``): readiness
(``GET /health``) and uvicorn with a graceful shutdown."""
from __future__ import annotations

import threading
from typing import Any

from ..scheduler import Scheduler
from .errors import ApiError, server_error, shutting_down


def not_ready(scheduler: Scheduler, settings: Any) -> ApiError | None:
    """Why ``GET /health`` should answer 503: shutting down, or every slot held with no token
    produced for over ``serve.stall_s`` (a wedged generation: no new request could run)."""
    if scheduler.closed:
        return shutting_down()
    stalled = scheduler.stalled_s()
    if stalled > settings.stall_s:
        return server_error(f"not ready: every generation slot has been busy for {stalled:.0f} s with no token "
                            f"produced (serve.stall_s = {settings.stall_s:g})", 503, "not_ready")
    return None


def run_server(app: Any, host: str, port: int, schedulers: list[Scheduler], settings: Any) -> None:
    """uvicorn until SIGINT / SIGTERM. At the signal every admitted request is cancelled (running
    generations stop at their next token, streams end with an error event and ``[DONE]``, new
    requests get 503), and responses still being written get ``serve.shutdown_s`` seconds (a
    client that stops reading cannot hold the server up longer)."""
    import logging

    import uvicorn

    from ... import log

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # not in the signal handler itself: it may have interrupted a thread holding a scheduler lock
            threading.Thread(target=lambda: [s.close() for s in schedulers], daemon=True).start()
            super().handle_exit(sig, frame)

    # uvicorn's own logs (the access log is INFO) follow tuneops' level: -q leaves warnings and errors
    level = logging.getLevelName(log.log.getEffectiveLevel()).lower()
    Server(uvicorn.Config(app, host=host, port=port, log_level=level,
                          timeout_graceful_shutdown=settings.shutdown_s)).run()
