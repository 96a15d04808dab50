"""The forwarder against a fake sink and a real spool in ``tmp_path``.

Virtual time: ``step()`` is driven by hand with a fake clock (no thread, no sleep) for the logic
(order, ack only after success, backoff, outage, bisection, stats); a few tests run the real
thread to check start / stop / drain.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import pytest

from historian.forwarder import Forwarder
from historian.sinks import SinkRejected, SinkUnavailable, error_for_status, retry_after_seconds
from historian.spool import Spool


def line(i: int) -> str:
    return f"zone,machine=m1,zone=tank seq={i}i,temp_c=21.5 {1_700_000_000_000_000_000 + i}"


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeSink:
    """All or raise, like a real sink. ``down``: every write is unavailable; a line containing
    ``bad`` makes the whole write rejected (as InfluxDB's 400 does)."""

    name = "fake http://sink"

    def __init__(self) -> None:
        self.down = False
        self.fail_with: Callable[[], Exception] | None = None
        self.written: list[str] = []
        self.calls: list[int] = []          # batch sizes, accepted or not
        self.lock = threading.Lock()

    def write(self, lines: Sequence[str]) -> None:
        with self.lock:
            self.calls.append(len(lines))
            if self.fail_with is not None:
                raise self.fail_with()
            if self.down:
                raise SinkUnavailable(self.name, "connection refused")
            bad = [x for x in lines if "bad" in x]
            if bad:
                raise SinkRejected(self.name, f'unable to parse "{bad[0]}": invalid field',
                                   status=400)
            self.written.extend(lines)

    def close(self) -> None:
        pass


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    sp = Spool(tmp_path / "spool", fsync_interval_s=0, segment_bytes=4096)
    yield sp
    sp.close()


def make(spool: Spool, sink: FakeSink, clock: FakeClock | None = None, **kw: object) -> Forwarder:
    clock = clock or FakeClock()
    return Forwarder(spool, sink, clock=clock, wall=lambda: 1_700_000_000.0 + clock.t, **kw)


# ------------------------------------------------------------------ order and acknowledgement
def test_delivers_in_order_in_batches(spool: Spool) -> None:
    sink = FakeSink()
    fw = make(spool, sink, batch_max_lines=40)
    spool.append([line(i) for i in range(100)])
    assert fw.step() and fw.step() and fw.step()
    assert not fw.step()                                 # empty: idle
    assert sink.written == [line(i) for i in range(100)]
    assert sink.calls == [40, 40, 20]
    st = fw.stats()
    assert (st.state, st.delivered_total, st.batches_total, st.spool.backlog_lines) == \
        ("idle", 100, 3, 0)


def test_batch_bytes_are_bounded_too(spool: Spool) -> None:
    sink = FakeSink()
    fw = make(spool, sink, batch_max_bytes=10 * (len(line(100)) + 1))   # same length to 999
    spool.append([line(i) for i in range(100, 125)])
    while fw.step():
        pass
    assert sink.calls == [10, 10, 5] and sink.written == [line(i) for i in range(100, 125)]


def test_nothing_is_acknowledged_before_the_sink_took_it(spool: Spool) -> None:
    sink = FakeSink()
    sink.down = True
    fw = make(spool, sink)
    spool.append([line(i) for i in range(10)])
    assert not fw.step()
    assert spool.stats().backlog_lines == 10 and spool.stats().acked_total == 0
    sink.fail_with = lambda: RuntimeError("a bug in the sink")   # unexpected: also kept
    fw._next_attempt = float("-inf")
    assert not fw.step()
    assert spool.stats().backlog_lines == 10
    assert fw.stats().last_error == "RuntimeError: a bug in the sink"
    # and the spool survives a restart of the process in between: nothing was acked
    spool.close()
    sp2 = Spool(spool.directory, fsync_interval_s=0)
    try:
        sink2 = FakeSink()
        fw2 = make(sp2, sink2)
        assert fw2.step()
        assert sink2.written == [line(i) for i in range(10)]
    finally:
        sp2.close()


# ------------------------------------------------------------------ backoff
def test_backoff_doubles_up_to_the_cap_and_resets_after_a_success(spool: Spool) -> None:
    clock = FakeClock()
    sink = FakeSink()
    sink.down = True
    fw = make(spool, sink, clock, retry_min_s=0.5, retry_max_s=4.0, rng=NoJitter())
    spool.append([line(0)])
    seen = []
    for _ in range(6):
        calls = len(sink.calls)
        assert not fw.step()
        assert len(sink.calls) == calls + 1
        b = fw.stats().backoff_s
        seen.append(b)
        clock.t += b - 0.01
        assert not fw.step()                             # still waiting: the sink is not called
        assert len(sink.calls) == calls + 1
        clock.t += 0.01
    assert seen == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    st = fw.stats()
    assert (st.state, st.retries_total, st.last_error) == \
        ("retrying", 6, "fake http://sink: connection refused")
    sink.down = False
    assert fw.step()
    assert fw.stats().backoff_s == 0.0 and fw.stats().state == "sending"
    sink.down = True
    spool.append([line(1)])
    assert not fw.step()
    assert fw.stats().backoff_s == 0.5                   # a new outage starts from the minimum


class NoJitter(random.Random):
    """Draws the top of every jitter range: the wait is the backoff itself."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_the_wait_is_drawn_with_equal_jitter_and_a_seed_repeats_it(spool: Spool) -> None:
    def waits(seed: int) -> list[float]:
        clock, sink = FakeClock(), FakeSink()
        sink.down = True
        fw = make(spool, sink, clock, retry_min_s=1.0, retry_max_s=8.0, rng=random.Random(seed))
        spool.append([line(0)])
        out = []
        for _ in range(8):
            assert not fw.step()
            out.append(fw.stats().backoff_s)
            clock.t += out[-1]
        return out
    first = waits(1)
    for wait, backoff in zip(first, [1, 2, 4, 8, 8, 8, 8, 8]):
        assert backoff / 2 <= wait <= backoff
    assert waits(1) == first and waits(2) != first


@pytest.mark.parametrize("status, header, now_s, expected", [
    (503, "7", 0.0, 7.0),
    (429, "120", 0.0, 120.0),
    (503, "Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0, 10.0),     # an HTTP date: 10 s on
    (503, "Wed, 21 Oct 2015 07:28:00 GMT", 1445412490.0, 0.0),      # already past: at once
    (503, "soon", 0.0, None),
    (503, None, 0.0, None),
    (500, "7", 0.0, None),                                          # only on 429 and 503
])
def test_retry_after_in_seconds_or_an_http_date(status, header, now_s, expected) -> None:
    if status in (429, 503) and header and header[0].isalpha():
        assert retry_after_seconds(header, now_s) == expected
    else:
        e = error_for_status("sink", status, "busy", header)
        assert isinstance(e, SinkUnavailable) and e.retry_after_s == expected


def test_retry_after_is_the_next_wait_capped_by_retry_max(spool: Spool) -> None:
    clock, sink = FakeClock(), FakeSink()
    fw = make(spool, sink, clock, retry_min_s=0.5, retry_max_s=30.0, rng=random.Random(0))
    spool.append([line(0)])
    for retry_after_s, wait_s in ((7.0, 7.0), (300.0, 30.0), (0.0, 0.0)):
        sink.fail_with = lambda r=retry_after_s: SinkUnavailable(sink.name, "HTTP 503: busy", 503, r)
        calls = len(sink.calls)
        assert not fw.step()
        assert fw.stats().backoff_s == wait_s
        clock.t += wait_s - 0.01
        if wait_s:
            assert not fw.step() and len(sink.calls) == calls + 1    # not before the server said
        clock.t += 0.01
    sink.fail_with = None
    assert fw.step() and sink.written == [line(0)]


def test_twenty_machines_losing_their_database_together_do_not_retry_in_lock_step(
        tmp_path: Path) -> None:
    """20 forwarders, one outage starting at the same instant, in virtual time: their retries
    spread over the backoff instead of landing at the same moments."""
    clock = FakeClock()
    machines = []
    for i in range(20):
        sp = Spool(tmp_path / f"spool-{i}", fsync_interval_s=0, segment_bytes=4096)
        sink = FakeSink()
        sink.down = True
        sp.append([line(0)])
        machines.append((sp, sink, make(sp, sink, clock, retry_min_s=0.5, retry_max_s=30.0,
                                        rng=random.Random(i))))
    attempts: list[list[float]] = [[] for _ in machines]
    while clock.t < 1000.0 + 300.0:                    # 5 minutes of outage, 10 ms steps
        for (_, sink, fw), times in zip(machines, attempts):
            before = len(sink.calls)
            fw.step()
            if len(sink.calls) > before:
                times.append(clock.t)
        clock.t = round(clock.t + 0.01, 2)
    for sp, _, _ in machines:
        sp.close()
    for k in range(3, 12):                             # the k-th retry of each machine
        at = sorted(times[k] for times in attempts)
        backoff_s = min(0.5 * 2 ** (k - 1), 30.0)
        assert at[-1] - at[0] > backoff_s / 4          # spread over the backoff, not lock-step
        assert max(at.count(t) for t in at) <= 2       # hardly two at the same 10 ms
    # without jitter they would all be at the very same instants
    assert len({tuple(times[:8]) for times in attempts}) == 20


def test_invalid_retry_settings_are_refused(spool: Spool) -> None:
    with pytest.raises(ValueError):
        Forwarder(spool, FakeSink(), retry_min_s=5.0, retry_max_s=1.0)
    with pytest.raises(ValueError):
        Forwarder(spool, FakeSink(), batch_max_lines=0)


def test_outage_then_recovery_delivers_every_line_exactly_once(spool: Spool) -> None:
    clock = FakeClock()
    sink = FakeSink()
    fw = make(spool, sink, clock, batch_max_lines=50, retry_min_s=0.5, retry_max_s=8.0)
    n = 0
    # 60 virtual seconds: 7 lines appended per 0.1 s; the sink is down from 10 s to 40 s
    for tick in range(600):
        clock.t = 1000.0 + tick * 0.1
        sink.down = 100 <= tick < 400
        spool.append([line(i) for i in range(n, n + 7)])
        n += 7
        fw.step()
        if tick == 399:
            assert spool.stats().backlog_lines > 30 * 10 * 7 - 50
    for _ in range(1000):
        clock.t += 1.0
        if not fw.step() and spool.stats().backlog_lines == 0:
            break
    assert sink.written == [line(i) for i in range(n)]
    st = fw.stats()
    assert st.delivered_total == n and st.spool.acked_total == n and st.spool.backlog_lines == 0
    assert st.retries_total >= 5 and st.state == "idle"


# ------------------------------------------------------------------ bisection
def test_bisection_isolates_one_bad_line_among_5000(spool: Spool) -> None:
    sink = FakeSink()
    fw = make(spool, sink, batch_max_lines=5000)
    lines = [line(i) for i in range(5000)]
    lines[3210] = "zone,machine=m1,zone=tank temp_c=bad 1"
    spool.append(lines)
    assert fw.step()
    good = lines[:3210] + lines[3211:]
    assert sink.written == good                          # exactly once, in order
    assert len(sink.calls) <= 2 * 13 + 1                 # about 2·log2(5000) requests
    st = fw.stats()
    assert (st.delivered_total, st.set_aside_total, st.batches_total) == (4999, 1, 1)
    assert st.spool.backlog_lines == 0 and st.spool.set_aside_total == 1
    rejected = sorted((spool.directory / "rejected").glob("*.lp"))
    assert len(rejected) == 1
    assert rejected[0].read_text() == lines[3210] + "\n"
    reason = rejected[0].with_suffix(".reason.txt").read_text()
    assert "invalid field" in reason


def test_bad_lines_with_the_same_message_share_one_file(spool: Spool) -> None:
    sink = FakeSink()
    fw = make(spool, sink)
    lines = [line(i) for i in range(64)]
    for k in (0, 1, 63):
        lines[k] = "zone,machine=m1,zone=tank temp_c=bad 1"
    lines[30] = "zone,machine=m1,zone=pump temp_c=bad 2"
    spool.append(lines)
    assert fw.step()
    assert sink.written == [x for x in lines if "bad" not in x]
    files = sorted((spool.directory / "rejected").glob("*.lp"))
    assert sorted(len(f.read_text().splitlines()) for f in files) == [1, 3]
    assert fw.stats().set_aside_total == 4


def test_an_outage_during_bisection_keeps_what_is_left_to_send(spool: Spool) -> None:
    clock = FakeClock()
    sink = FakeSink()
    fw = make(spool, sink, clock, batch_max_lines=16)
    lines = [line(i) for i in range(16)]
    lines[12] = "zone,machine=m1,zone=tank temp_c=bad 1"
    spool.append(lines)
    real_write = sink.write
    accepted = []

    def flaky(batch: Sequence[str]) -> None:              # down after the first good half
        if accepted:
            raise SinkUnavailable(sink.name, "timed out")
        real_write(batch)
        accepted.append(len(batch))
    sink.write = flaky
    assert fw.step()                                      # the left half (0..7) got through
    assert sink.written == lines[:8] and spool.stats().backlog_lines == 16   # not acked yet
    sink.write = real_write
    clock.t += 10
    assert fw.step()
    assert sink.written == lines[:12] + lines[13:]        # nothing sent twice
    assert spool.stats().backlog_lines == 0 and fw.stats().set_aside_total == 1


# ------------------------------------------------------------------ stats
def test_stats_rate_over_the_last_10_s_and_wall_times(spool: Spool) -> None:
    clock = FakeClock(t=50.0)
    sink = FakeSink()
    fw = make(spool, sink, clock, batch_max_lines=100)
    st = fw.stats()
    assert (st.state, st.last_success_wall, st.last_error_wall, st.rate_lines_per_s) == \
        ("idle", None, None, 0.0)
    for k in range(10):                                    # 100 lines per second for 10 s
        clock.t = 50.0 + k
        spool.append([line(i) for i in range(100 * k, 100 * k + 100)])
        assert fw.step()
    assert fw.stats().rate_lines_per_s == pytest.approx(100.0)
    assert fw.stats().last_success_wall == 1_700_000_059.0
    clock.t = 65.0                                         # 5 s later: half the window is empty
    assert fw.stats().rate_lines_per_s == pytest.approx(40.0)
    clock.t = 80.0
    assert fw.stats().rate_lines_per_s == 0.0
    sink.down = True
    spool.append([line(1000)])
    fw.step()
    st = fw.stats()
    assert st.last_error_wall == 1_700_000_080.0 and st.spool.backlog_lines == 1
    assert (st.delivered_total, st.batches_total, st.retries_total) == (1000, 10, 1)


# ------------------------------------------------------------------ the thread
def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_thread_delivers_what_is_appended_and_stops_promptly(spool: Spool) -> None:
    sink = FakeSink()
    fw = Forwarder(spool, sink, batch_max_lines=500, retry_min_s=0.01, retry_max_s=0.05)
    fw.start()
    try:
        for k in range(20):
            spool.append([line(i) for i in range(k * 250, k * 250 + 250)])
        assert wait_for(lambda: spool.stats().backlog_lines == 0)
    finally:
        started = time.monotonic()
        fw.stop()
    assert time.monotonic() - started < 2.0               # woken from its idle wait
    assert sink.written == [line(i) for i in range(5000)]


def test_stop_wakes_a_long_backoff(spool: Spool) -> None:
    sink = FakeSink()
    sink.down = True
    fw = Forwarder(spool, sink, retry_min_s=60.0, retry_max_s=60.0)
    spool.append([line(0)])
    fw.start()
    assert wait_for(lambda: fw.stats().state == "retrying")
    started = time.monotonic()
    fw.stop()
    assert time.monotonic() - started < 2.0
    assert spool.stats().backlog_lines == 1               # kept for the next start


def test_stop_with_drain_keeps_retrying_until_delivered(spool: Spool) -> None:
    sink = FakeSink()
    sink.down = True
    fw = Forwarder(spool, sink, batch_max_lines=100, retry_min_s=0.02, retry_max_s=0.05)
    spool.append([line(i) for i in range(1000)])
    fw.start()
    assert wait_for(lambda: fw.stats().retries_total >= 2)
    threading.Timer(0.2, lambda: setattr(sink, "down", False)).start()
    fw.stop(drain_s=10.0)
    assert sink.written == [line(i) for i in range(1000)]
    assert spool.stats().backlog_lines == 0
