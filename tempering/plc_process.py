"""The PLC process: the scan, the field I/O links, state persistence and the hang watchdog —
nothing else. No OPC UA, SQL or InfluxDB library is imported here (``tests/test_isolation.py``
guards it): nothing a client, a database or a login does can take time from the scan.

    tempering plc --socket PATH [--heartbeat-fd N] [--scan-log FILE] [run options]

Started (and restarted) by the supervisor of ``tempering run``, never by hand. On start it asks
for a higher scheduling priority (``raise_priority``) and says what it got; it serves the plant
window on the Unix socket ``PATH`` (``plc.bridge.WindowPort``); after every scan it writes one
byte to the supervisor's heartbeat pipe (a PLC that stops scanning is killed and restarted).
SIGTERM or SIGINT: one last scan ends the batch, the links write the safe image, exit 0.

``--scan-log FILE`` appends one record per scan, ``<d d d`` = (wall time s, lateness s, logic
time s), written by a thread once a second: what ``bench/isolation.py`` measures.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import struct
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

SCAN_RECORD = struct.Struct("<ddd")
RT_PRIORITY = 10


def raise_priority(mode: str = "auto") -> str:
    """Ask for more CPU priority than the plant window: SCHED_RR (real time, needs root or
    CAP_SYS_NICE), else nice -10, else nothing. Returns what the process got, in words; the
    threads made after this call inherit it."""
    if mode == "none":
        return "normal (SCHED_OTHER, nice 0): not asked for (--priority none)"
    why = []
    if mode in ("auto", "realtime"):
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(RT_PRIORITY))
            return f"real time (SCHED_RR, priority {RT_PRIORITY})"
        except (OSError, AttributeError) as e:
            why.append(f"SCHED_RR refused: {getattr(e, 'strerror', None) or e}")
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
        return "raised (SCHED_OTHER, nice -10)" + (f"; {why[0]}" if why else "")
    except OSError as e:
        why.append(f"nice -10 refused: {e.strerror or e}")
    return (f"normal (SCHED_OTHER, nice {os.getpriority(os.PRIO_PROCESS, 0)}): could not raise it "
            f"({'; '.join(why)}); run as root or with CAP_SYS_NICE")


def die_with_parent(parent_pid: int) -> None:
    """SIGTERM this process when the supervisor dies (Linux PR_SET_PDEATHSIG): no orphan PLC
    or window after a kill -9 of ``tempering run``."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:       # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def stop_event(duration_s: float | None = None) -> asyncio.Event:
    """An event set by SIGINT, SIGTERM or after ``duration_s`` (on the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if duration_s:
        loop.call_later(duration_s, stop.set)
    return stop


class RecipeBookFile:
    """The recipe book the window last sent (its records are the book), kept next to the state
    file: a PLC restarted while its window is away still knows the recipe of an interrupted
    batch. Written by a thread (fsync stays off the scan's loop), only when it changed."""

    def __init__(self, path: Path):
        self.path = path
        self._last: dict | None = None

    def load(self) -> dict:
        from plc.config import Recipe
        from plc.persist import read

        data = read(self.path) or {}
        try:
            book = {rid: Recipe.model_validate(fields) for rid, fields in data.items()}
        except ValueError as e:
            log.error("%s: recipes not valid (%s); using the machine's recipe file", self.path, e)
            return {}
        self._last = data
        return book

    def save(self, recipes) -> None:
        from plc.persist import write_atomic

        data = {rid: r.model_dump() for rid, r in recipes.items()}
        if data != self._last:
            self._last = data
            threading.Thread(target=write_atomic, args=(self.path, data), name="recipes-writer",
                             daemon=True).start()


class ScanLog:
    """Per-scan (wall, lateness, logic time) records, appended to a file by a thread."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._buf: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scan-log", daemon=True)
        self._thread.start()

    def add(self, logic_s: float, late_s: float) -> None:
        self._buf.append(SCAN_RECORD.pack(time.time(), late_s, logic_s))

    def _flush(self) -> None:
        buf, self._buf = self._buf, []
        if buf:
            with open(self.path, "ab") as f:
                f.write(b"".join(buf))

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._flush()


def read_scan_log(path: str | Path) -> list[tuple[float, float, float]]:
    data = Path(path).read_bytes()
    n = len(data) // SCAN_RECORD.size
    return [SCAN_RECORD.unpack_from(data, i * SCAN_RECORD.size) for i in range(n)]


class Heartbeat:
    """One byte to the supervisor's pipe per scan; never blocks (a full pipe drops it)."""

    def __init__(self, fd: int | None):
        self.fd = fd
        if fd is not None:
            os.set_blocking(fd, False)

    def __call__(self, _result=None) -> None:
        if self.fd is not None:
            try:
                os.write(self.fd, b".")
            except (BlockingIOError, BrokenPipeError):
                pass


async def run_plc(args, cfg, book) -> int:
    from plc.bridge import WindowPort
    from plc.commands import Shutdown
    from plc.persist import StateStore
    from plc.program import Program
    from plc.runtime import Controller, MonotonicClock, Runtime, WatchdogSettings

    from .plant import PlantError, start_plant

    # SIGTERM from the start on: a stop that comes while the PLC starts ends it cleanly (its
    # last scan writes the safe image), never by the signal's default action
    stop = stop_event(args.duration_s)
    period_s = args.period_ms / 1000.0 if args.period_ms else cfg.period_s
    state_path = Path(args.state_file or cfg.machine.state_file)
    book_file = RecipeBookFile(state_path.with_suffix(".recipes.json"))
    program = Program.from_config(cfg, book, period_s=period_s)
    saved = book_file.load()
    if saved:                           # the window's book, as it was when the PLC stopped
        program = program.with_recipes(saved)
    try:
        plant = await start_plant(args.plant, cfg, seed=args.seed, initial_temp_c=args.initial_temp_c)
    except PlantError as e:
        print(f"plc: {e}", file=sys.stderr)
        return 2
    store = StateStore(state_path)
    controller = Controller(program, store)
    scheduling = args.scheduling

    def on_recipes(recipes) -> None:
        controller.set_recipes(recipes)
        book_file.save(recipes)
    port = WindowPort(args.socket, controller.submit, on_recipes=on_recipes,
                      on_batch_floor=controller.set_batch_floor,
                      links=plant.diagnostics, lost_after_s=args.window_lost_s,
                      info={"pid": os.getpid(), "scheduling": scheduling, "period_s": period_s,
                            "machine": cfg.machine.id, "plant": plant.description})
    controller.channel = port
    await port.start()
    s = controller.state
    print(f"plc: pid {os.getpid()}, scan {period_s * 1e3:.0f} ms, scheduling {scheduling}; "
          f"plant: {plant.description}; state {store.path}: phase {s.phase.value}"
          + (" (interrupted: resume or abort)" if s.interrupted else ""), flush=True)
    scan_log = ScanLog(args.scan_log) if args.scan_log else None
    if scan_log is not None:
        controller.stats.sink = scan_log.add
    runtime = Runtime(controller, plant.io, MonotonicClock(), WatchdogSettings(
        cfg.scan.watchdog_max_consecutive_overruns, cfg.scan.watchdog_max_cycle_factor),
        after_scan=Heartbeat(args.heartbeat_fd), window=port.status)
    import gc
    gc.collect()
    gc.freeze()        # what exists now lives as long as the process: no full collection over it
    try:
        await runtime.run(stop, final=[Shutdown(user="supervisor", origin="supervisor")])
    finally:
        await port.flush()
        await port.close()
        await plant.close()
        store.close()
        if scan_log is not None:
            scan_log.close()
    s = controller.state
    safe = not any(plant.outputs().values())
    print(f"plc stopped: phase {s.phase.value}, batch {s.batch_id or '-'}, outputs "
          f"{'safe (all off)' if safe else 'NOT SAFE'}, {controller.stats.scans} scans, "
          f"{controller.stats.overruns} overruns; state saved to {store.path}", flush=True)
    return 0 if safe else 1


def main(args, cfg, book) -> int:
    from .systemd import journal_logging

    if args.parent_pid:
        die_with_parent(args.parent_pid)
    journal_logging("plc", cfg.machine.id)       # under systemd: records to the journal
    args.scheduling = raise_priority(args.priority)
    return asyncio.run(run_plc(args, cfg, book))
