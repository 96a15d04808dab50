"""The runtime: the only loop. Runs the pure scan on absolute deadlines and does its I/O.

    deadline = now + period
    loop: sleep until deadline -> read latest inputs -> scan -> write outputs -> publish snapshot
          -> measure logic time and lateness -> deadline += period

Rules: the scan never awaits the network (``io.read_inputs`` returns the latest
values, ``io.write_outputs`` stores the output image for the drivers); observers get snapshots
through a non-blocking channel; persistence is handed to a writer thread.

Watchdog (configurable): ``max_consecutive_overruns`` scans in a row that finish after their
next deadline, or one scan whose logic takes longer than ``max_cycle_factor`` x period, fault the
PLC: the outputs are forced safe at once through ``io.force_safe()`` and the next scan latches
the ``plc.watchdog`` trip. A separate thread (``HangWatchdog``) forces the outputs safe when no
scan completes for ``max_cycle_factor`` x period at all (a hung scan cannot protect itself, and
a blocked event loop never runs it); the first scan after it fired latches the same trip.

Two clocks: ``MonotonicClock`` (real time) and ``VirtualClock`` (scans back to back, time only
advances when the loop sleeps), so the same loop runs in virtual time for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Protocol

import numpy as np

from .autotune import View as AutotuneView
from .autotune import view as autotune_view
from .channel import Snapshot, SnapshotChannel
from .commands import Command
from .image import ProcessImage
from .persist import StateStore
from .program import Program
from .scan import ScanContext, ScanResult, scan
from .sequencer import with_batch_floor
from .state import PlcState, restored


class PlantIo(Protocol):
    def read_inputs(self) -> ProcessImage: ...
    def write_outputs(self, outputs: ProcessImage) -> None: ...
    def force_safe(self) -> None: ...
    def sever(self, reason: str) -> None: ...   # from another thread: reach the machine without the loop


class Clock(Protocol):
    def now(self) -> float: ...            # monotonic seconds, for deadlines
    def wall(self) -> float: ...           # timestamps (s since the epoch, or virtual seconds)
    async def sleep_until(self, t: float) -> None: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep_until(self, t: float) -> None:
        await asyncio.sleep(max(0.0, t - time.monotonic()))


class VirtualClock:
    """Time advances only when someone sleeps; scans run back to back."""

    def __init__(self, start_s: float = 0.0):
        self.t = start_s

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.t

    async def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)
        await asyncio.sleep(0)


#: Upper bounds (s) of the scan histograms: cumulative counts per bound since the start, for
#: Prometheus (``tempering_scan_lateness_seconds``, ``tempering_scan_logic_seconds``).
SCAN_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def bucket_key(what: str, le_s: float) -> str:
    """The summary's key of a histogram bucket: ``bucket_key("late", 0.001)`` -> "late_s_le_0.001"."""
    return f"{what}_s_le_{le_s:g}"


class ScanStats:
    """Per-scan logic time and lateness over a sliding window, overrun counters, and histograms
    since the start (counts per bucket of ``SCAN_BUCKETS_S``, sums): one bisect per figure."""

    def __init__(self, window: int = 3000):
        self.sink: Callable[[float, float], None] | None = None   # (logic_s, late_s) of each scan
        self.logic_s: deque[float] = deque(maxlen=window)
        self.late_s: deque[float] = deque(maxlen=window)
        self.scans = 0
        self.overruns = 0
        self.consecutive_overruns = 0
        self.skipped_deadlines = 0
        self.max_logic_s = 0.0
        self.max_late_s = 0.0
        self.late_counts = [0] * (len(SCAN_BUCKETS_S) + 1)     # the last one: above every bound
        self.logic_counts = [0] * (len(SCAN_BUCKETS_S) + 1)
        self.late_sum_s = 0.0
        self.logic_sum_s = 0.0

    def record(self, logic_s: float, late_s: float, overrun: bool) -> None:
        self.scans += 1
        self.late_counts[bisect.bisect_left(SCAN_BUCKETS_S, late_s)] += 1
        self.logic_counts[bisect.bisect_left(SCAN_BUCKETS_S, logic_s)] += 1
        self.late_sum_s += late_s
        self.logic_sum_s += logic_s
        self.logic_s.append(logic_s)
        self.late_s.append(late_s)
        self.max_logic_s = max(self.max_logic_s, logic_s)
        self.max_late_s = max(self.max_late_s, late_s)
        if self.sink is not None:
            self.sink(logic_s, late_s)
        if overrun:
            self.overruns += 1
            self.consecutive_overruns += 1
        else:
            self.consecutive_overruns = 0

    def summary(self) -> dict[str, float]:
        out = {"scans": float(self.scans), "overruns": float(self.overruns),
               "skipped_deadlines": float(self.skipped_deadlines),
               "logic_ms_max": self.max_logic_s * 1e3, "late_ms_max": self.max_late_s * 1e3,
               "late_s_sum": self.late_sum_s, "logic_s_sum": self.logic_sum_s}
        for what, counts in (("late", self.late_counts), ("logic", self.logic_counts)):
            n = 0
            for le_s, count in zip(SCAN_BUCKETS_S, counts):
                n += count
                out[bucket_key(what, le_s)] = float(n)
        if self.logic_s:
            lg = np.fromiter(self.logic_s, float) * 1e3
            lt = np.fromiter(self.late_s, float) * 1e3
            out.update(logic_ms_last=float(lg[-1]), logic_ms_p50=float(np.percentile(lg, 50)),
                       logic_ms_p99=float(np.percentile(lg, 99)),
                       late_ms_p50=float(np.percentile(lt, 50)),
                       late_ms_p99=float(np.percentile(lt, 99)))
        return out


STATS_EVERY = 10


class Controller:
    """The scan around its state: commands in, scan, persistence and snapshots out.

    Shared by the real-time ``Runtime`` and the virtual-time ``run_virtual`` so both run the
    very same code path.
    """

    def __init__(self, program: Program, store: StateStore | None = None,
                 channel: SnapshotChannel | None = None, state: PlcState | None = None):
        self.program = program
        self.store = store
        self.channel = channel
        if state is None:   # a start: the first scan reports the alarm system it came up with
            state = replace(restored(store.load() if store else None, program.recipes,
                                     tuple(z.name for z in program.zones)), restarted=True)
        self.state = state
        self.tick = 0
        self._commands: deque[Command] = deque()
        self._batch_floor = 0
        self.stats = ScanStats()
        self.last: ScanResult | None = None
        self._summary: dict[str, float] | None = None

    def set_recipes(self, recipes) -> None:
        """Replace the recipe book the scans use (from the next scan on). The caller refuses to
        change or delete a recipe a running batch uses."""
        self.program = self.program.with_recipes(recipes)

    def set_batch_floor(self, floor: int) -> None:
        """The highest batch number the records know (``Records.next_batch_seq`` - 1): the next
        batch is numbered above it whatever this PLC's own count (``with_batch_floor``), from
        the next scan on, and the raised count is persisted with the state. Only ever raises."""
        self._batch_floor = max(self._batch_floor, int(floor))

    def submit(self, cmd: Command) -> None:
        """Queue a command for the next scan (safe from any thread: deque.append is atomic)."""
        self._commands.append(cmd)

    def _drain(self) -> list[Command]:
        out = []
        while self._commands:
            out.append(self._commands.popleft())
        return out

    def cycle(self, inputs: ProcessImage, now_s: float, watchdog: str = "",
              window: str = "", wall_s: float | None = None) -> ScanResult:
        """One scan at ``now_s``; ``wall_s`` (epoch s, default ``now_s``) stamps the alarms."""
        ctx = ScanContext(self.tick, self.program.period_s, now_s, watchdog, window, wall_s)
        if self._batch_floor > self.state.batch_seq:
            self.state = with_batch_floor(self.state, self._batch_floor)
        result = scan(self.program, self.state, inputs, self._drain(), ctx)
        self.state = result.state
        self.last = result
        if self.store is not None:
            self.store.save(result.state.persistent())
        if self.channel is not None:
            self.channel.publish(self.snapshot(result, inputs, now_s))
        self.tick += 1
        return result

    def snapshot(self, r: ScanResult, inputs: ProcessImage, now_s: float) -> Snapshot:
        s = r.state
        alarms = tuple(a for _, a in sorted(s.alarms.items()))
        return Snapshot(self.tick, now_s, s.phase.value, s.held, s.interrupted, s.recipe_id,
                        s.batch_id, s.phase_time_s, s.tempered, s.pouring_released, r.zones,
                        inputs, r.outputs, alarms, tuple(sorted(s.trips)), s.first_out, r.events,
                        self._stats_summary(), self._settings(s), self._autotune(s))

    def _settings(self, s: PlcState) -> dict[str, dict[str, float]]:
        """The writable settings as the scan has them now: trim, gains, manual output."""
        out = {}
        for z in self.program.zones:
            gains = s.tuning.get(z.name, {})
            values = {"Trim": s.trims.get(z.name, 0.0), "Kp": gains.get("kp", z.tuning.kp),
                      "Ki": gains.get("ki", z.tuning.ki), "Kd": gains.get("kd", z.tuning.kd)}
            if z.name in s.manual:
                values["ManualOutput"] = s.manual[z.name]
            out[z.name] = values
        return out

    def _autotune(self, s: PlcState) -> dict[str, AutotuneView]:
        """Each zone's autotune as observers see it (stage, progress, the last outcome)."""
        cfg = self.program.autotune
        return {z.name: autotune_view(z.name, s.autotune, s.autotune_outcomes.get(z.name), cfg)
                for z in self.program.zones}

    def _stats_summary(self) -> dict[str, float]:
        """Scan statistics for observers, recomputed every STATS_EVERY scans (percentiles over
        the window are not worth computing on every scan of the hot path)."""
        if self._summary is None or self.tick % STATS_EVERY == 0:
            self._summary = self.stats.summary()
        return self._summary


@dataclass(frozen=True)
class WatchdogSettings:
    max_consecutive_overruns: int = 5
    max_cycle_factor: float = 10.0


class HangWatchdog:
    """A thread that makes the outputs safe if no scan completes in time.

    It must reach the machine without the event loop it watches (a hung loop runs no link
    task): after putting the safe image in the output slot it calls ``io.sever(reason)`` where
    the plant I/O has it, which writes the safe image itself over a connection of its own where
    the transport allows and then closes the field connections, so that the I/O modules'
    communication watchdog drops the outputs whatever happens next."""

    def __init__(self, io: PlantIo, timeout_s: float):
        self.io = io
        self.timeout_s = timeout_s
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self.fired = 0
        self._thread = threading.Thread(target=self._run, name="scan-hang-watchdog", daemon=True)

    def start(self) -> None:
        self._beat = time.monotonic()
        self._thread.start()

    def beat(self) -> None:
        self._beat = time.monotonic()

    def _run(self) -> None:
        armed = True
        while not self._stop.wait(self.timeout_s / 4):
            late = time.monotonic() - self._beat > self.timeout_s
            if late and armed:
                self.fired += 1
                self.io.force_safe()
                self.io.sever(f"no scan completed for {self.timeout_s * 1e3:.0f} ms")
            armed = not late

    def stop(self) -> None:
        self._stop.set()


class Runtime:
    def __init__(self, controller: Controller, io: PlantIo, clock: Clock | None = None,
                 watchdog: WatchdogSettings = WatchdogSettings(),
                 after_scan: Callable[[ScanResult], None] | None = None,
                 window: Callable[[], str] = lambda: ""):
        """``window()``: '' while the plant window is there, else why it is lost (the
        ``plc.window`` alarm of this scan)."""
        self.window = window
        self.c = controller
        self.io = io
        self.clock = clock or MonotonicClock()
        self.wd = watchdog
        self.after_scan = after_scan
        self.watchdog_reason = ""

    async def run(self, stop: asyncio.Event, max_scans: int | None = None,
                  final: Iterable[Command] = ()) -> None:
        """Scan until ``stop`` is set (or ``max_scans``); then one last scan with ``final``."""
        period = self.c.program.period_s
        clock = self.clock
        hang = None
        if isinstance(clock, MonotonicClock):
            hang = HangWatchdog(self.io, period * self.wd.max_cycle_factor)
            hang.start()
        deadline = clock.now() + period
        n = 0
        fired = 0
        try:
            while not stop.is_set() and (max_scans is None or n < max_scans):
                await clock.sleep_until(deadline)
                if hang and hang.fired != fired:  # outputs were forced safe behind our back:
                    fired = hang.fired            # latch it in this very scan
                    self.watchdog_reason = self.watchdog_reason or (
                        f"no scan completed for {hang.timeout_s * 1e3:.0f} ms")
                self._one(deadline, period)
                if hang:
                    hang.beat()
                n += 1
                deadline += period
                now = clock.now()
                if now > deadline:  # re-anchor on the grid: missed deadlines are skipped, counted
                    missed = int((now - deadline) / period) + 1
                    deadline += missed * period
                    self.c.stats.skipped_deadlines += missed
        finally:
            if hang:
                hang.stop()
            try:
                for cmd in final:
                    self.c.submit(cmd)
                self._one(clock.now(), period)
            finally:  # even when the loop or the last scan failed
                self.io.force_safe()

    def _one(self, deadline: float, period: float) -> None:
        clock = self.clock
        start = clock.now()
        late = max(0.0, start - deadline)
        reason, self.watchdog_reason = self.watchdog_reason, ""
        wall = clock.wall()
        result = self.c.cycle(self.io.read_inputs(), wall, reason, self.window(), wall)
        self.io.write_outputs(result.outputs)
        if self.after_scan:
            self.after_scan(result)
        end = clock.now()
        logic = end - start
        overrun = end > deadline + period
        self.c.stats.record(logic, late, overrun)
        if logic > self.wd.max_cycle_factor * period:
            self.watchdog_reason = (f"one scan took {logic * 1e3:.0f} ms "
                                    f"(> {self.wd.max_cycle_factor:g} x {period * 1e3:.0f} ms)")
        elif self.c.stats.consecutive_overruns >= self.wd.max_consecutive_overruns:
            self.watchdog_reason = f"{self.c.stats.consecutive_overruns} consecutive overruns"
        if self.watchdog_reason:
            self.io.force_safe()


def run_virtual(controller: Controller, io: PlantIo, advance: Callable[[float], None],
                scans: int, on_scan: Callable[[ScanResult], None] | None = None,
                start_s: float = 0.0) -> float:
    """Run ``scans`` scans back to back in virtual time; ``advance(dt)`` moves the plant.

    Same order as the real-time loop: read, scan, write, then the plant runs for one period.
    Returns the virtual time reached.
    """
    period = controller.program.period_s
    t = start_s
    for _ in range(scans):
        result = controller.cycle(io.read_inputs(), t)
        io.write_outputs(result.outputs)
        if on_scan:
            on_scan(result)
        advance(period)
        t += period
    return t
