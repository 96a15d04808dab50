"""The forwarder: moves line-protocol batches from the spool to a sink, in its own thread.

One job: every line in the spool reaches the sink once it can, in order, or is set aside with the
server's reason; nothing is acknowledged in the spool before the sink has taken it.

Loop (``step`` is one turn, callable without the thread in tests)::

    read_batch (<= batch_max_lines, <= batch_max_bytes) -> sink.write -> spool.ack

- ``SinkUnavailable`` (network, 5xx, credentials, missing database) and any unexpected exception
  from the sink or the spool: keep the batch, wait ``backoff_s``, then send it again. Logged once
  per outage, and once when delivery resumes. The wait is drawn with *equal jitter* from the
  exponential backoff b (``retry_min_s``, doubling up to ``retry_max_s``, back to nothing after
  a success): uniform in [b/2, b], so machines that lose their InfluxDB together spread their
  retries over half the backoff instead of coming back in lock-step, while none retries sooner
  than half of it (full jitter, uniform in [0, b], would let some hammer a database that just
  came back). A server that says when to come back (``Retry-After`` on 429 / 503:
  ``SinkUnavailable.retry_after_s``) is obeyed instead: the next wait is exactly that, capped by
  ``retry_max_s``. ``rng`` (a ``random.Random``) draws the jitter: seed it for repeatable tests.
- ``SinkRejected`` (400 / 413 / 422: the data itself is refused): a batch of n > 1 lines is split
  in halves and each half sent, recursively, so the good lines get through and each bad one is
  isolated in about 2·log2(n) requests. A single refused line is set aside
  (``spool.set_aside``, one file per distinct server message in the batch) and logged; the batch
  is acknowledged once every line in it was delivered or set aside. An outage in the middle of a
  bisection keeps the parts still to send; the parts already delivered are not sent again (after
  a crash they are: the server stores a replayed point once).

Time comes from the injected ``clock`` (monotonic seconds: backoff, rate) and ``wall`` (epoch
seconds: the ``last_*_wall`` fields); the thread only sleeps between steps.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from historian.sinks import Sink, SinkError, SinkRejected, SinkUnavailable
from historian.spool import Batch, Spool, SpoolStats

log = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0
IDLE_WAIT_S = 1.0
STATES = ("idle", "sending", "retrying")


@dataclass(frozen=True)
class ForwarderStats:
    state: str                       # idle | sending | retrying
    delivered_total: int             # lines the sink took
    batches_total: int               # batches acknowledged in the spool
    set_aside_total: int             # lines refused by the server and set aside
    retries_total: int               # failed attempts (each one is retried)
    last_error: str | None           # the sink's message (credentials already redacted)
    last_error_wall: float | None    # epoch s
    last_success_wall: float | None  # epoch s
    rate_lines_per_s: float          # lines delivered over the last 10 s, / 10
    backoff_s: float                 # the current wait between attempts, 0 when not retrying
    spool: SpoolStats


class Forwarder:
    def __init__(self, spool: Spool, sink: Sink, *, batch_max_lines: int = 5000,
                 retry_min_s: float = 0.5, retry_max_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, batch_max_bytes: int = 4 * 2**20,
                 rng: random.Random | None = None):
        if batch_max_lines < 1 or batch_max_bytes < 1:
            raise ValueError("batch_max_lines and batch_max_bytes must be >= 1")
        if not 0 < retry_min_s <= retry_max_s:
            raise ValueError(f"need 0 < retry_min_s <= retry_max_s (got {retry_min_s}, {retry_max_s})")
        self.spool, self.sink = spool, sink
        self.batch_max_lines, self.batch_max_bytes = batch_max_lines, batch_max_bytes
        self.retry_min_s, self.retry_max_s = retry_min_s, retry_max_s
        self._clock, self._wall = clock, wall
        self._rng = rng if rng is not None else random.Random()
        self._lock = threading.Lock()                 # guards what stats() reads
        self._pending: Batch | None = None            # read, not yet acknowledged
        self._todo: list[tuple[int, int]] = []        # [lo, hi) ranges of it still to send
        self._refused: list[tuple[str, str]] = []     # (line, server message) to set aside
        self._state = "idle"
        self._backoff_s = 0.0                         # the wait drawn for this retry
        self._base_s = 0.0                            # the exponential backoff it is drawn from
        self._next_attempt = float("-inf")
        self._delivered = self._batches = self._set_aside = self._retries = 0
        self._last_error: str | None = None
        self._last_error_wall: float | None = None
        self._last_success_wall: float | None = None
        self._recent: deque[tuple[float, int]] = deque()
        self._outage_since: float | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._drain_until: float | None = None

    # ---------------------------------------------------------------- one step
    def step(self) -> bool:
        """One attempt: send the pending batch (or read the next one) unless a backoff is
        running. True if lines were delivered or set aside; never raises."""
        if self._clock() < self._next_attempt:
            return False
        try:
            return self._attempt()
        except Exception as e:   # noqa: BLE001  (a sink's bug or the spool's disk: retry)
            self._failed(e)
            return False

    def _attempt(self) -> bool:
        if self._pending is None:
            batch = self.spool.read_batch(self.batch_max_lines, self.batch_max_bytes)
            if batch is None:
                self._set_state("idle")
                return False
            self._pending, self._todo, self._refused = batch, [(0, len(batch.lines))], []
        self._set_state("sending")
        lines = self._pending.lines
        progressed = False
        while self._todo:
            lo, hi = self._todo[0]
            try:
                self.sink.write(lines[lo:hi])
            except SinkRejected as e:
                if hi - lo > 1:                       # isolate the bad line(s)
                    mid = (lo + hi) // 2
                    self._todo[0:1] = [(lo, mid), (mid, hi)]
                else:
                    self._todo.pop(0)
                    self._refused.append((lines[lo], e.message))
                    log.warning("%s refused a line, set aside: %s | %.300s", self.sink.name,
                                e.message, lines[lo])
                    progressed = True
                continue
            except SinkUnavailable as e:
                self._failed(e)
                return progressed
            self._todo.pop(0)
            self._delivered_now(hi - lo)
            progressed = True
        self._finish_batch()
        return True

    def _finish_batch(self) -> None:
        assert self._pending is not None
        by_reason: dict[str, list[str]] = {}
        for line, reason in self._refused:
            by_reason.setdefault(reason, []).append(line)
        for reason, lines in by_reason.items():
            self.spool.set_aside(lines, reason)
            self._refused = [r for r in self._refused if r[1] != reason]   # done: not twice
            with self._lock:
                self._set_aside += len(lines)
        self.spool.ack(self._pending)
        self._pending = None
        with self._lock:
            self._batches += 1
            self._backoff_s = self._base_s = 0.0
            self._next_attempt = float("-inf")
            self._last_success_wall = self._wall()
        if self._outage_since is not None:
            log.warning("%s: delivering again after %.1f s", self.sink.name,
                        self._clock() - self._outage_since)
            self._outage_since = None

    def _delivered_now(self, n: int) -> None:
        now = self._clock()
        with self._lock:
            self._delivered += n
            self._recent.append((now, n))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] <= now - RATE_WINDOW_S:
            self._recent.popleft()

    def _failed(self, e: Exception) -> None:
        now = self._clock()
        message = str(e) if isinstance(e, SinkError) else f"{type(e).__name__}: {e}"
        with self._lock:
            self._base_s = (self.retry_min_s if self._base_s == 0
                            else min(self._base_s * 2, self.retry_max_s))
            self._backoff_s = self.next_wait_s(self._base_s, getattr(e, "retry_after_s", None))
            self._next_attempt = now + self._backoff_s
            self._retries += 1
            self._last_error, self._last_error_wall = message, self._wall()
            self._state = "retrying"
        if self._outage_since is None:               # once per outage, then quietly
            self._outage_since = now
            log.warning("%s: cannot deliver (%s); the spool keeps the lines, retrying up to every "
                        "%.1f s", self.sink.name, message, self.retry_max_s,
                        exc_info=not isinstance(e, SinkError))
        else:
            log.debug("%s: still cannot deliver: %s", self.sink.name, message)

    def next_wait_s(self, base_s: float, retry_after_s: float | None = None) -> float:
        """The wait before the next attempt: the server's ``Retry-After`` (capped by
        ``retry_max_s``) if it gave one, else uniform in [base_s / 2, base_s] (equal jitter)."""
        if retry_after_s is not None:
            return min(max(0.0, retry_after_s), self.retry_max_s)
        return self._rng.uniform(base_s / 2, base_s)

    def _set_state(self, state: str) -> None:
        with self._lock:
            self._state = state

    # ---------------------------------------------------------------- the thread
    def start(self) -> None:
        """Run ``step`` in a daemon thread until ``stop``."""
        if self._thread is not None:
            raise RuntimeError("forwarder already started")
        self._thread = threading.Thread(target=self._run, name="historian-forwarder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._should_end():
            if self.step():
                continue
            try:
                self._pause()
            except Exception as e:   # noqa: BLE001  (never out of the thread)
                self._failed(e)
                self._wake.wait(self._backoff_s)

    def _pause(self) -> None:
        """Sleep until the backoff ends, something is appended, or ``stop``."""
        now = self._clock()
        limit = IDLE_WAIT_S if self._drain_until is None else max(0.0, self._drain_until - now)
        if self._state == "retrying":
            self._wake.wait(min(max(0.0, self._next_attempt - now), limit))
            self._wake.clear()
        elif not self._stopping.is_set():
            self.spool.wait(limit)

    def _should_end(self) -> bool:
        if not self._stopping.is_set():
            return False
        if self._drain_until is None or self._clock() >= self._drain_until:
            return True
        return self._pending is None and self.spool.stats().backlog_lines == 0

    def stop(self, drain_s: float = 0.0, *, timeout_s: float = 15.0) -> None:
        """Stop the thread; with ``drain_s`` > 0 it keeps sending (and retrying) up to that long
        while anything is left. Waits at most ``drain_s + timeout_s`` for a write in flight
        (bounded by the sink's own timeout). What is not sent stays in the spool."""
        self._drain_until = self._clock() + drain_s if drain_s > 0 else None
        self._stopping.set()
        self._wake.set()
        self.spool.interrupt()
        if self._thread is not None:
            self._thread.join(max(0.0, drain_s) + timeout_s)
            if self._thread.is_alive():
                log.warning("%s: forwarder still busy in a write after %.1f s; left behind",
                            self.sink.name, drain_s + timeout_s)

    # ---------------------------------------------------------------- observing
    def stats(self) -> ForwarderStats:
        spool = self.spool.stats()
        now = self._clock()
        with self._lock:
            self._trim(now)
            return ForwarderStats(
                state=self._state, delivered_total=self._delivered, batches_total=self._batches,
                set_aside_total=self._set_aside, retries_total=self._retries,
                last_error=self._last_error, last_error_wall=self._last_error_wall,
                last_success_wall=self._last_success_wall,
                rate_lines_per_s=sum(n for _, n in self._recent) / RATE_WINDOW_S,
                backoff_s=self._backoff_s if self._state == "retrying" else 0.0, spool=spool)
