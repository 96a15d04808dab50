"""Real-time scan loop next to a bare asyncio loop, in the same process and the same run.

    python -m bench.scan [--seconds N] [--json]

Shared machines are noisy, so absolute figures mean little on their own; what matters is how
much later the PLC's scan wakes up than a loop that does nothing, measured moments apart.

For each period (100 ms, then 10 ms):
- **plc**: the real ``Runtime`` with ``MonotonicClock`` on the in-process twin (stepped by
  ``InProcessTwinIo.run_realtime`` in its own task), the default recipe started, and one
  snapshot subscriber drained every 50 ms by another task (an observer, as in production).
  Logic time is what the runtime itself measures per scan (read inputs, scan, persistence
  hand-off, snapshot publish, write outputs); lateness is wake-up time minus the absolute
  deadline. Every sample of the run is kept (``ScanStats`` sized to hold the whole run); the
  runtime's extra final scan on stop is left out.
- **bare**: the same absolute-deadline loop (``asyncio.sleep(max(0, deadline - now))``,
  ``deadline += period``, missed deadlines skipped on the grid as the runtime does) doing
  nothing, lateness measured the same way.
- Interleaved bare (half the duration) -> plc (full duration) -> bare (second half), so a drift in
  the machine's load during the run weighs on both sides alike; the bare figures pool both halves.

Durations: ``--seconds`` for both periods, else 20 s at 100 ms and 10 s at 10 ms (each doubled by
the bare loop: about a minute in all). Then the pure core in virtual time: ``run_virtual`` for
20,000 scans of the default recipe on the twin (no channel, no persistence), reported as
``virtual_scans_per_s`` (the whole loop, twin stepping included) and
``virtual_core_scans_per_s`` (the twin's stepping time taken out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import numpy as np

from opcua_server.config import load
from plc.channel import SnapshotChannel
from plc.commands import StartRecipe
from plc.program import Program
from plc.runtime import Controller, Runtime, ScanStats, WatchdogSettings, run_virtual
from twin import Twin
from twin.inprocess import InProcessTwinIo

from .common import emit, fmt

PERIODS = (("100ms", 0.1, 20.0), ("10ms", 0.01, 10.0))
VIRTUAL_SCANS = 20_000
OBSERVER_POLL_S = 0.05


def _pct(xs_s: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs_s) * 1e3, q)) if xs_s else float("nan")


async def bare_loop(period_s: float, seconds: float) -> list[float]:
    """The runtime's scheduling without the scan: returns the lateness of every wake-up (s)."""
    late: list[float] = []
    start = time.monotonic()
    deadline = start + period_s
    while time.monotonic() - start < seconds:
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        late.append(max(0.0, time.monotonic() - deadline))
        deadline += period_s
        now = time.monotonic()
        if now > deadline:  # same re-anchoring as Runtime.run
            deadline += (int((now - deadline) / period_s) + 1) * period_s
    return late


async def observer(sub, stop: asyncio.Event, seen: list[int]) -> None:
    while not stop.is_set():
        await asyncio.sleep(OBSERVER_POLL_S)
        seen[0] += len(sub.drain())


async def plc_loop(cfg, book, period_s: float, seconds: float, seed: int = 7) -> dict:
    program = Program.from_config(cfg, book, period_s=period_s)
    twin = Twin(cfg.twin, seed=seed)
    io = InProcessTwinIo(twin, wall=time.time)
    channel = SnapshotChannel()
    sub = channel.subscribe(64)
    c = Controller(program, channel=channel)
    expected = int(seconds / period_s) + 100
    c.stats = ScanStats(window=max(3000, 2 * expected))  # keep every sample of the run
    wd = WatchdogSettings(cfg.scan.watchdog_max_consecutive_overruns,
                          cfg.scan.watchdog_max_cycle_factor)
    rt = Runtime(c, io, watchdog=wd)
    c.submit(StartRecipe(cfg.machine.default_recipe, user="bench"))
    stop = asyncio.Event()
    seen = [0]
    tasks = [asyncio.create_task(io.run_realtime(stop)),
             asyncio.create_task(observer(sub, stop, seen))]

    async def timer() -> None:
        await asyncio.sleep(seconds)
        stop.set()

    tasks.append(asyncio.create_task(timer()))
    await rt.run(stop)
    stop.set()
    await asyncio.gather(*tasks)
    st = c.stats
    logic = list(st.logic_s)[:-1]  # the last sample is the final scan on stop: no deadline
    late = list(st.late_s)[:-1]
    return {"logic": logic, "late": late, "overruns": st.overruns, "scans": len(late),
            "skipped": st.skipped_deadlines, "phase": c.state.phase.value,
            "trips": sorted(c.state.trips), "observed": seen[0], "dropped": sub.dropped}


async def measure(cfg, book, period_s: float, seconds: float) -> dict:
    bare = await bare_loop(period_s, seconds / 2)
    plc = await plc_loop(cfg, book, period_s, seconds)
    bare += await bare_loop(period_s, seconds / 2)
    bare_p99 = _pct(bare, 99)
    late_p99 = _pct(plc["late"], 99)
    return {
        "logic_ms_p50": _pct(plc["logic"], 50), "logic_ms_p99": _pct(plc["logic"], 99),
        "late_ms_p50": _pct(plc["late"], 50), "late_ms_p99": late_p99,
        "late_ms_max": max(plc["late"]) * 1e3,
        "bare_late_ms_p50": _pct(bare, 50), "bare_late_ms_p99": bare_p99,
        "bare_late_ms_max": max(bare) * 1e3,
        "late_p99_ratio": late_p99 / bare_p99 if bare_p99 > 0 else None,
        "overruns": plc["overruns"], "skipped_deadlines": plc["skipped"], "scans": plc["scans"],
        "bare_scans": len(bare), "seconds": seconds, "phase_at_end": plc["phase"],
        "trips": plc["trips"], "snapshots_observed": plc["observed"],
        "snapshots_dropped": plc["dropped"],
    }


def virtual(cfg, book, scans: int = VIRTUAL_SCANS, seed: int = 7) -> dict:
    program = Program.from_config(cfg, book)
    twin = Twin(cfg.twin, seed=seed)
    io = InProcessTwinIo(twin)
    c = Controller(program)
    c.submit(StartRecipe(cfg.machine.default_recipe, user="bench"))
    twin_s = [0.0]

    def advance(dt_s: float) -> None:
        t = time.perf_counter()
        io.advance(dt_s)
        twin_s[0] += time.perf_counter() - t

    t0 = time.perf_counter()
    run_virtual(c, io, advance, scans)
    wall = time.perf_counter() - t0
    return {"virtual_scans_per_s": scans / wall,
            "virtual_core_scans_per_s": scans / (wall - twin_s[0]),
            "virtual_phase_at_end": c.state.phase.value}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="machine configuration file (default: the embedded machine)")
    ap.add_argument("--seconds", type=float,
                    help="plc run per period (default 20 s at 100 ms, 10 s at 10 ms)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    cfg, book = load(args.config)
    result: dict = {}
    rows = []
    for key, period_s, default_s in PERIODS:
        r = asyncio.run(measure(cfg, book, period_s, args.seconds or default_s))
        result[key] = r
        rows.append((key, fmt(r["logic_ms_p50"]), fmt(r["logic_ms_p99"]), fmt(r["late_ms_p50"]),
                     fmt(r["late_ms_p99"]), fmt(r["late_ms_max"]), fmt(r["bare_late_ms_p50"]),
                     fmt(r["bare_late_ms_p99"]), fmt(r["bare_late_ms_max"]),
                     fmt(r["late_p99_ratio"], 2), str(r["overruns"]), str(r["scans"])))
    result.update(virtual(cfg, book))
    print("Scan loop on the in-process twin vs a bare asyncio loop on the same deadlines (ms)")
    emit(rows, ("period", "logic p50", "logic p99", "late p50", "late p99", "late max",
                "bare p50", "bare p99", "bare max", "p99 ratio", "overruns", "scans"),
         result, as_json=False)
    print(f"virtual time: {result['virtual_scans_per_s']:.0f} scans/s with the twin, "
          f"{result['virtual_core_scans_per_s']:.0f} scans/s core only "
          f"({VIRTUAL_SCANS} scans, {cfg.machine.default_recipe})")
    for key, *_ in PERIODS:
        r = result[key]
        print(f"{key}: phase at end {r['phase_at_end']}, trips {r['trips'] or 'none'}, "
              f"skipped deadlines {r['skipped_deadlines']}, snapshots observed "
              f"{r['snapshots_observed']}, dropped {r['snapshots_dropped']}")
    if args.json:  # after the extra lines, so the JSON stays the last line
        sys.stdout.flush()
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
