"""The bounded queue in front of the models (``tuneops serve``, the jobs API's model endpoints):
``Scheduler`` admits a request (``Ticket``) or refuses it (``Busy`` -> 429, ``Closed`` -> 503 while
the server stops); a ticket holds a generation slot only while it runs, and ``Ticket.cancel``
(the client went away, the server is stopping) ends its wait or its generation at the next token
(``Cancelled``)."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator


class Busy(Exception):
    """The bounded queue is full."""


class Closed(Exception):
    """The server is shutting down: no new requests (503)."""


class Cancelled(Exception):
    """A request cancelled before or while it ran (its client went away, or the server is stopping)."""


class Scheduler:
    """A bounded queue in front of the model: at most ``max_concurrent`` generations run at once
    and ``max_queue`` more wait; ``admit()`` refuses the rest (``Busy`` -> 429).

    Every admitted request holds a ``Ticket`` until it is released (once, by whoever ran it), and
    a slot only while it runs (``Ticket.running``). ``Ticket.cancel`` (a client went away, the
    server is stopping) wakes a request waiting for a slot (``Cancelled``) and stops a running
    generation at its next token, so the counters never wait for garbage collection. ``close``
    cancels every admitted request and refuses new ones (``Closed`` -> 503)."""

    def __init__(self, max_concurrent: int = 1, max_queue: int = 16):
        self.max_concurrent = max_concurrent
        self.capacity = max_concurrent + max_queue
        self.admitted = 0            # running + waiting for a slot
        self.running = 0             # holding a slot
        self.cancelled = 0           # requests cancelled before they finished (since start)
        self.closed = False
        self.progress_at = time.monotonic()    # the last token produced, or slot taken / given back
        self._cond = threading.Condition()
        self._tickets: set[Ticket] = set()

    def admit(self) -> "Ticket":
        with self._cond:
            if self.closed:
                raise Closed("the server is shutting down")
            if self.admitted >= self.capacity:
                raise Busy(f"{self.admitted} requests are running or queued (serve.max_concurrent + "
                           f"serve.max_queue = {self.capacity}); retry later")
            self.admitted += 1
            ticket = Ticket(self)
            self._tickets.add(ticket)
        return ticket

    def close(self, reason: str = "the server is shutting down") -> None:
        """Refuse new requests and cancel the admitted ones (SIGINT / SIGTERM)."""
        with self._cond:
            self.closed = True
            tickets = list(self._tickets)
        for ticket in tickets:
            ticket.cancel(reason)

    def stalled_s(self) -> float:
        """Seconds every slot has been held with no token produced and no slot given back (0 while
        a slot is free): how long a new request could not have had one."""
        with self._cond:
            if self.running < self.max_concurrent:
                return 0.0
            return time.monotonic() - self.progress_at

    def state(self) -> dict[str, Any]:
        with self._cond:
            return {"running": self.running, "waiting": self.admitted - self.running,
                    "max_concurrent": self.max_concurrent, "capacity": self.capacity,
                    "cancelled": self.cancelled, "closed": self.closed}


class Ticket:
    """One admitted request (see ``Scheduler``)."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler, self.done = scheduler, False
        self.reason = ""                        # why it was cancelled
        self.cancelled = threading.Event()      # set by ``cancel``; generation looks at it every token

    def cancel(self, reason: str = "the client went away") -> None:
        """Stop this request: a wait for a slot ends in ``Cancelled``, a generation at its next
        token. Nothing happens to a released ticket."""
        s = self.scheduler
        with s._cond:
            if self.done or self.cancelled.is_set():
                return
            self.reason = reason
            self.cancelled.set()
            s.cancelled += 1
            s._cond.notify_all()

    @contextmanager
    def running(self) -> Iterator[None]:
        """Hold a slot (waiting for one; ``Cancelled`` if cancelled first)."""
        s = self.scheduler
        with s._cond:
            while not self.cancelled.is_set() and s.running >= s.max_concurrent:
                s._cond.wait()
            if self.cancelled.is_set():
                raise Cancelled(self.reason)
            s.running += 1
            s.progress_at = time.monotonic()
        try:
            yield
        finally:
            with s._cond:
                s.running -= 1
                s.progress_at = time.monotonic()
                s._cond.notify_all()

    def beat(self) -> None:
        """A token was produced (``Scheduler.stalled_s``)."""
        self.scheduler.progress_at = time.monotonic()

    def release(self) -> None:
        s = self.scheduler
        with s._cond:
            if not self.done:
                self.done = True
                s.admitted -= 1
                s._tickets.discard(self)
                s._cond.notify_all()
