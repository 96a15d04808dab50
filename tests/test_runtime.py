"""plc.runtime: the loop around the pure scan, on the in-process twin.

Virtual time (``VirtualClock``, ``run_virtual``) everywhere, except the two places where the
runtime itself must run in real time (the hang watchdog thread, and a blocked event loop); those
wait on events or poll, never sleep blindly.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from opcua_server.config import load
from plc.channel import SnapshotChannel
from plc.commands import Reset, Resume, Shutdown, StartRecipe
from plc.image import ProcessImage
from plc.persist import StateStore
from plc.program import Program
from plc.runtime import (Controller, HangWatchdog, MonotonicClock, Runtime, VirtualClock,
                         WatchdogSettings, run_virtual)
from plc.scan import ScanResult
from plc.state import RUNNING, Phase
from twin import Twin
from twin.inprocess import InProcessTwinIo

RECIPE = "dark-70"


@pytest.fixture(scope="module")
def app():
    return load()


@pytest.fixture(scope="module")
def program(app) -> Program:
    cfg, book = app
    return Program.from_config(cfg, book)


class Io(InProcessTwinIo):
    """The twin as plant I/O, with a log of calls, ``force_safe`` counted, and optional slow
    reads: ``slow[k] = s`` makes the k-th ``read_inputs`` (0-based) advance ``clock`` by s."""

    def __init__(self, twin: Twin, clock: VirtualClock | None = None):
        super().__init__(twin)
        self.clock = clock
        self.slow: dict[int, float] = {}
        self.reads = 0
        self.log: list[str] = []
        self.safe_calls = 0
        self.safe_event = threading.Event()

    def read_inputs(self) -> ProcessImage:
        if self.clock is not None and self.reads in self.slow:
            self.clock.t += self.slow[self.reads]
        self.reads += 1
        self.log.append("read")
        return super().read_inputs()

    def write_outputs(self, outputs: ProcessImage) -> None:
        self.log.append("write")
        super().write_outputs(outputs)

    def force_safe(self) -> None:
        self.safe_calls += 1
        self.log.append("safe")
        super().force_safe()
        self.safe_event.set()


def rig(app, program, seed: int = 7, clock: VirtualClock | None = None, **kw):
    cfg, _ = app
    io = Io(Twin(cfg.twin, seed=seed), clock)
    return Controller(program, **kw), io


def heaters_on(program: Program, r: ScanResult) -> bool:
    return any(r.outputs.get_point(n).value for z in program.zones for n in z.heating_outputs)


def heating(program: Program, results: list[ScanResult]) -> bool:
    """Some heater on within the last PWM window of ``results`` (a heater at partial duty is
    off for part of each window)."""
    return any(heaters_on(program, r) for r in results[-program.pwm_window_ticks:])


def any_on(r: ScanResult) -> bool:
    return any(p.value for p in r.outputs.values())


# --- virtual time ------------------------------------------------------------------------------

async def test_virtual_clock_runs_n_scans_back_to_back(app, program):
    clock = VirtualClock(0.0)
    c, io = rig(app, program, clock=clock)
    c.submit(StartRecipe(RECIPE, user="t"))
    n = 500
    t0 = time.perf_counter()
    await Runtime(c, io, clock=clock).run(asyncio.Event(), max_scans=n)
    assert time.perf_counter() - t0 < 5.0          # back to back, no real waiting
    assert clock.now() == pytest.approx(n * program.period_s, abs=1e-9)
    assert c.tick == n + 1                           # n scans and the final one on stop
    assert c.stats.scans == n + 1
    assert max(c.stats.late_s) == 0.0 and c.stats.max_late_s == 0.0
    assert c.stats.overruns == 0 and c.stats.skipped_deadlines == 0
    assert io.safe_calls == 1                        # only the final force_safe on stop


def test_same_seed_same_run(app, program):
    runs = []
    for _ in range(2):
        c, io = rig(app, program, seed=3)
        c.submit(StartRecipe(RECIPE, user="t"))
        images: list[dict] = []
        run_virtual(c, io, io.advance, 3000,
                    on_scan=lambda r: images.append({n: (p.value, p.quality, p.timestamp_s)
                                                     for n, p in r.outputs.items()}))
        runs.append((images, c.state.persistent(), c.state.phase))
    (a, pa, phase), (b, pb, _) = runs
    assert phase in RUNNING and any(any(v[0] for v in img.values()) for img in a)
    assert len(a) == len(b) == 3000
    for k, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"output images differ at scan {k}"
    assert pa == pb


# --- watchdog ----------------------------------------------------------------------------------

async def run_with_slow_reads(app, program, slow: dict[int, float], scans: int = 200,
                              reset_at: int | None = None):
    """Run a started batch in virtual time; returns (controller, io, results by scan)."""
    clock = VirtualClock(0.0)
    c, io = rig(app, program, clock=clock)
    io.slow = slow
    c.submit(StartRecipe(RECIPE, user="t"))
    results: list[ScanResult] = []
    logs: list[int] = []

    def after(r: ScanResult) -> None:
        results.append(r)
        logs.append(len(io.log))
        if reset_at is not None and len(results) == reset_at:
            c.submit(Reset(user="operator"))

    rt = Runtime(c, io, clock=clock, after_scan=after,
                 watchdog=WatchdogSettings(max_consecutive_overruns=5, max_cycle_factor=10.0))
    await rt.run(asyncio.Event(), max_scans=scans)
    return c, io, results, logs


def assert_latched_at(program, io, results, logs, k: int) -> None:
    """Scan k was the faulty one: safe forced right after it, trip latched by scan k + 1."""
    assert any_on(results[k - 1]) and heating(program, results[:k])
    assert "plc.watchdog" not in results[k].state.trips
    assert io.log[logs[k]] == "safe"                 # at once, before the next read
    nxt = results[k + 1]
    assert "plc.watchdog" in nxt.state.trips
    assert nxt.state.phase is Phase.FAULT
    assert not any_on(nxt)
    assert any(e.kind == "trip" and e.get("alarm_id") == "plc.watchdog" for e in nxt.events)


async def test_one_slow_scan_trips_the_watchdog(app, program):
    k = 150                                          # heaters are on by then (mixer delay 10 s)
    c, io, results, logs = await run_with_slow_reads(
        app, program, {k: 11 * program.period_s}, scans=260, reset_at=k + 20)
    assert_latched_at(program, io, results, logs, k)
    assert results[k + 1].state.first_out == "plc.watchdog"
    # the Reset is accepted: the watchdog condition does not stay active
    ev = results[k + 20].events
    assert any(e.kind == "command_accepted" and e.get("command") == "Reset" for e in ev), ev
    assert not results[k + 20].state.trips
    # ... and nothing restarts by itself
    after = results[k + 1:]
    assert not any(heaters_on(program, r) for r in after)
    assert all(r.state.phase not in RUNNING for r in after)


async def test_a_slow_scan_under_the_factor_does_not_trip(app, program):
    k = 150
    _, _, results, _ = await run_with_slow_reads(app, program, {k: 9 * program.period_s}, 170)
    assert all(not r.state.trips for r in results)
    assert results[-1].state.phase is Phase.HEATING


@pytest.mark.parametrize("overruns, trips", [(4, False), (5, True)])
async def test_consecutive_overruns_trip_the_watchdog(app, program, overruns, trips):
    k = 150
    slow = {k + i: 1.5 * program.period_s for i in range(overruns)}   # each an overrun, < factor
    c, io, results, logs = await run_with_slow_reads(app, program, slow, 200, reset_at=k + 30)
    if not trips:
        assert all(not r.state.trips for r in results)
        assert results[-1].state.phase is Phase.HEATING
        assert c.stats.overruns == overruns
        return
    last = k + overruns - 1
    assert_latched_at(program, io, results, logs, last)
    assert all("plc.watchdog" not in r.state.trips for r in results[:last + 1])
    assert any(e.kind == "command_accepted" and e.get("command") == "Reset"
               for e in results[k + 30].events)
    assert not any(heaters_on(program, r) for r in results[last + 1:])
    assert all(r.state.phase not in RUNNING for r in results[last + 1:])


def test_hang_watchdog_forces_safe_without_beats(app, program):
    _, io = rig(app, program)
    wd = HangWatchdog(io, timeout_s=0.05)
    t0 = time.monotonic()
    wd.start()
    try:
        assert io.safe_event.wait(0.5), "hang watchdog did not force the outputs safe"
        assert time.monotonic() - t0 >= 0.05
        assert wd.fired == 1
    finally:
        wd.stop()


def test_hang_watchdog_stays_quiet_while_beaten(app, program):
    _, io = rig(app, program)
    wd = HangWatchdog(io, timeout_s=0.05)
    wd.start()
    try:
        end = time.monotonic() + 0.2
        while time.monotonic() < end:
            wd.beat()
            time.sleep(0.005)
        assert wd.fired == 0 and io.safe_calls == 0
    finally:
        wd.stop()


async def test_blocked_event_loop_latches_the_watchdog(app):
    """Real time: another task blocks the loop longer than the hang timeout; the scan itself is
    fast, but the hang watchdog forced the outputs safe, so the next scan must latch the trip
    instead of switching the outputs back on."""
    cfg, book = app
    p = Program.from_config(cfg, book, period_s=0.01)    # hang timeout 10 x 10 ms = 100 ms
    c = Controller(p)
    io = Io(Twin(cfg.twin, seed=1))
    c.submit(StartRecipe(RECIPE, user="t"))
    stop = asyncio.Event()
    seen: list[ScanResult] = []

    async def blocker() -> None:
        while c.tick < 20:                             # poll until the batch runs
            await asyncio.sleep(0.005)
        assert any_on(c.last) and io.safe_calls == 0
        io.safe_event.clear()
        time.sleep(0.3)                                # blocks the event loop
        assert io.safe_event.is_set()                  # forced safe from the watchdog thread
        n = c.tick
        while c.tick < n + 3:
            await asyncio.sleep(0.005)
        stop.set()

    rt = Runtime(c, io, clock=MonotonicClock(), after_scan=seen.append)
    await asyncio.wait_for(asyncio.gather(rt.run(stop), blocker()), 5.0)
    assert "plc.watchdog" in c.state.trips
    assert c.state.phase is Phase.FAULT
    first = next(r for r in seen if "plc.watchdog" in r.state.trips)
    assert not any_on(first)                            # the first scan after the block is safe


# --- stop, restart, observers --------------------------------------------------------------------

async def test_final_scan_on_stop_ends_the_batch(app, program):
    clock = VirtualClock(0.0)
    c, io = rig(app, program, clock=clock)
    c.submit(StartRecipe(RECIPE, user="t"))
    stop = asyncio.Event()

    def after(r: ScanResult) -> None:
        if c.tick >= 150:
            stop.set()

    await Runtime(c, io, clock=clock, after_scan=after).run(stop, final=[Shutdown(user="op")])
    assert c.tick == 151
    ends = [e for e in c.last.events if e.kind == "batch_end"]
    assert len(ends) == 1 and ends[0].get("batch_id") == c.state.batch_id
    assert c.state.phase is Phase.STOPPED
    assert io.log[-1] == "safe" and io.safe_calls == 1
    assert not any(io.outputs.values())


async def test_force_safe_even_when_the_io_fails(app, program):
    clock = VirtualClock(0.0)
    c, io = rig(app, program, clock=clock)

    def broken() -> ProcessImage:
        raise OSError("bus gone")

    io.read_inputs = broken
    with pytest.raises(OSError):
        await Runtime(c, io, clock=clock).run(asyncio.Event(), max_scans=5)
    assert io.safe_calls == 1


def test_restart_comes_up_interrupted_and_safe(app, program, tmp_path):
    path = tmp_path / "plc-state.json"
    store = StateStore(path)
    c, io = rig(app, program, store=store)
    c.submit(StartRecipe(RECIPE, user="t"))
    seen: list[ScanResult] = []
    run_virtual(c, io, io.advance, 150, on_scan=seen.append)
    assert c.state.phase is Phase.HEATING and heating(program, seen)
    store.close()

    store2 = StateStore(path)
    try:
        c2 = Controller(program, store=store2)
        assert c2.state.phase is Phase.HEATING
        assert c2.state.interrupted
        assert c2.state.batch_id == c.state.batch_id
        after: list[ScanResult] = []
        t = run_virtual(c2, io, io.advance, 100, on_scan=after.append)
        assert all(not any_on(r) for r in after)
        assert c2.state.phase is Phase.HEATING and c2.state.interrupted

        c2.submit(Resume(user="op"))
        resumed: list[ScanResult] = []
        run_virtual(c2, io, io.advance, 150, on_scan=resumed.append, start_s=t)
        assert any(e.kind == "command_accepted" and e.get("command") == "Resume"
                   for e in resumed[0].events)
        assert resumed[0].outputs.get_point("mixer").value        # the mixer starts at once
        first_heat = next(k for k, r in enumerate(resumed) if heaters_on(program, r))
        assert first_heat * program.period_s >= program.sequence.mixer_delay_s - 1e-9
    finally:
        store2.close()


async def test_slow_observer_loses_snapshots_never_blocks(app, program):
    clock = VirtualClock(0.0)
    channel = SnapshotChannel()
    slow = channel.subscribe(maxlen=4)               # never drained
    fast = channel.subscribe(maxlen=4)
    c, io = rig(app, program, clock=clock, channel=channel)
    c.submit(StartRecipe(RECIPE, user="t"))
    got: list[int] = []

    def after(_: ScanResult) -> None:
        got.extend(s.tick for s in fast.drain())

    n = 200
    await Runtime(c, io, clock=clock, after_scan=after).run(asyncio.Event(), max_scans=n)
    assert c.tick == n + 1
    assert slow.dropped == n + 1 - 4
    assert [s.tick for s in slow.drain()] == list(range(n - 3, n + 1))
    assert fast.dropped == 0 and got == list(range(n + 1))    # every snapshot, in order
    assert c.stats.overruns == 0 and c.stats.max_late_s == 0.0
