"""An alarm flood through the whole alarm path: scan -> alarm events -> window -> Part 9 clients.

    python -m bench.alarms [--seconds N] [--clients N] [--cycle-s S] [--idle-s N]
                           [--priority auto|realtime|nice|none] [--json]

What runs, on loopback, three processes as ``tempering run`` has them:

- the PLC (``--plc-worker``, a child): the real Controller, scan and Runtime (100 ms, absolute
  deadlines, ``--priority`` as ``tempering run`` asks for it) serving the window on a Unix
  socket (``plc.bridge.WindowPort``), its scans logged as ``tempering plc --scan-log`` does
  (``tempering.plc_process.ScanLog``). Its plant is a scripted input image (``FloodIo``): a
  healthy machine at 40 degC, or, while flooding, every condition the inputs can raise toggled
  once per ``--cycle-s`` (1 s; at least 7 scans, so that every step lasts a scan or more),
  staggered over the scans of the cycle: each zone's temperature
  goes over its limit, back, under its limit, back, to a bad sensor, back; the e-stop chain
  opens; each motor's current goes over its limit; phase L1 is lost (phase loss and voltage),
  the frequency and then the total current leave their limits; the pedal's input turns
  uncertain; and the window status the scan is given says the window is lost (the
  ``plc.window`` alarm). That raises 22 of the machine's 39 conditions. The others cannot
  follow an input image: deviation_warning, deviation_error, above_working_max and no_progress
  of each zone need a batch running (at its goal, tempered, heating for ``no_progress_s``),
  which any trip of the flood ends; plc.watchdog is the runtime's own verdict on its scans.
  Those 17 are scripted in the PLC process: its ``plc.interlocks.evaluate`` is wrapped
  (``FloodIo.evaluate``) so that each is active half of its own cycle, and the scan's alarm
  lifecycle, the bridge and the window take them as any other. Every condition toggles
  (``conditions_active``, ``conditions_changing``: every condition with a reported change). The machine's ``alarm_delay_s`` is 0 for the flood (the
  on-delay would hide the delayed grid and motor conditions at this cycle).
- the plant window (this process): the real TemperingServer (SignAndEncrypt Basic256Sha256,
  users and passwords) on the PLC's snapshots over the bridge (``plc.bridge.PlcClient``), its
  conditions (``opcua_server.conditions``), and the window's alarm journal task
  (``tempering.window_process.journal_task``) into the records on SQLite in a temporary directory.
  It keeps its priority (``tempering run``'s window lowers its own, ``--window-nice``; the
  clients, children of this process, would inherit that).
- ``--clients`` (10) asyncua clients (``--clients-worker``, a child, as a SCADA elsewhere would
  be), each in its own session with a subscription (100 ms publishing) on the events of the
  Server object with a Part 9 filter: the condition fields and the ConditionId, OfType
  AlarmConditionType, a queue of ``QUEUE_SIZE`` events.

The run: the clients subscribe; idle (``--idle-s`` / 2); flood (``--seconds``, 60); idle again
(``--idle-s`` / 2; the flooded conditions are left unacknowledged, so retained); each client in
turn calls ConditionRefresh. Measured:

- ``events_per_s``: condition events the clients received of the flood (those of its last
  scans arrive within ``DRAIN_S`` after it), summed over the clients, per second of flood;
  next to it ``transitions_per_s`` (alarm events of the scans, from the snapshots),
  ``server_events_per_s`` (events the condition server sent) and ``delivered_ratio``
  (received / sent x clients: 1.0 when no event was lost).
- ``event_latency_ms_p50`` / ``_p99`` / ``_max``: from the event's Time (the wall time of the
  scan that made the transition: ``Alarm.changed``) to its receipt by the client (the client's
  wall clock when its subscription hands the event over; same machine, same clock). It includes
  up to one publishing interval (100 ms) of waiting in the server.
- ``refresh_ms``: ConditionRefresh by one client with the retained conditions (``retained``:
  the events between its RefreshStartEvent and RefreshEndEvent), from the call to the
  RefreshEndEvent received (the wait for the subscription's next publication included); the
  median of the clients, one after the other (``refresh_ms_max``: the slowest).
- ``journal_rows_per_s``: ``Records.journal_alarms`` on SQLite in a temporary directory, fed the
  flood's own alarm events in batches of the size the window's journal task hands in at the
  flood's rate (the events of ``JOURNAL_EVERY_S``), the median of passes over at least
  ``JOURNAL_MIN_S``; ``journal_rows_per_s_one_per_call``: one event per call (a transaction
  each), on the first ``ONE_PER_CALL_EVENTS``. Side by side with
  the flood's ``transitions_per_s``; ``journal_rows_flood`` / ``journal_complete``: what the
  window's task stored of the flood's transitions.
- ``late_ms_p99_flood`` / ``late_ms_p99_idle`` (and p50, max): the scan's lateness (wake-up minus
  its absolute deadline, per scan, from the PLC's scan log) during the flood and while idle (the
  two idle windows pooled), same run; ``logic_ms_p99_*``: the scan's own time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from datetime import timezone
from pathlib import Path

import numpy as np
from asyncua import ua

from opcua_server.config import load
from opcua_server.records import Records
from opcua_server.server import TemperingServer
from plc.bridge import PlcClient, WindowPort
from plc.contract import INPUT_SPECS, MOTORS, ZONES
from plc.image import Point, ProcessImage, Quality
from plc import interlocks
from plc.interlocks import condition_ids
from plc.program import Program
from plc.runtime import Controller, MonotonicClock, Runtime, WatchdogSettings
from tempering.plc_process import ScanLog, die_with_parent, raise_priority, read_scan_log
from tempering.window_process import JOURNAL_EVERY_S, journal_task

from .common import emit, fmt
from .opcua import USER, _pct, secure_client, secure_machine

O = ua.ObjectIds
PERIOD_S = 0.1
PUBLISHING_MS = 100.0
QUEUE_SIZE = 10_000              # events a monitored item keeps between two publications
SETTLE_S = 2.0
DRAIN_S = 2.0                    # after the flood: the last events reach the clients
ONE_PER_CALL_EVENTS = 500
JOURNAL_MIN_S = 2.0              # of writing, for each journal figure
JOURNAL_MAX_PASSES = 20
STEP_LIMIT_S = 120.0
HEALTHY_TEMP_C = 40.0
OVER_TEMP_C = 66.0               # above every zone's limit (abs_max_heat 65), below the sensor's 70
UNDER_TEMP_C = 2.0               # below abs_min_heat 5, above the sensor's -20
SCRIPTED_ZONE_CONDITIONS = (".deviation_warning", ".deviation_error", ".above_working_max", ".no_progress")
FIELDS = ("EventId", "EventType", "Time", "ConditionName", "Retain", "ActiveState/Id",
          "AckedState/Id", "")   # "": the ConditionId

# -- the flood: a scripted input image ----------------------------------------------------------


def flood_program(cfg, book) -> Program:
    """The machine's program with no alarm on-delay (the flood toggles faster than it)."""
    p = Program.from_config(cfg, book, period_s=PERIOD_S)
    return replace(p, limits=replace(p.limits, alarm_delay_s=0.0))


class FloodIo:
    """The PLC's plant (``plc.runtime.PlantIo``): a healthy input image, or while ``flooding``
    the flood of the module docstring, a function of the scan's index in the flood. Outputs are
    taken and dropped. ``window()``: the scripted plant-window status (lost in half the cycle)."""

    def __init__(self, program: Program, cycle_scans: int, wall=time.time):
        self.cycle = cycle_scans
        self.wall = wall
        self.flooding = False
        self.k = 0                               # scans since the flood started
        self._values: dict[str, object] = {}     # this scan's flooded values
        lim = program.limits
        self.healthy = {**{f"temp_{z}": HEALTHY_TEMP_C for z in ZONES},
                        **{f"current_{m}": 1.0 for m in MOTORS}, "current_total": 8.0,
                        "grid_v_l1": 230.0, "grid_v_l2": 230.0, "grid_v_l3": 230.0,
                        "grid_freq": lim.frequency_hz, "estop_ok": True, "pedal": False}
        # (input, its flooded value, from, to): the fraction of the cycle it is flooded
        bad = Point(0.0, Quality.BAD, 0.0, "bench: open circuit")
        self.items: list[tuple[str, object, float, float]] = [("estop_ok", False, 0.0, 0.5)]
        for m in MOTORS:
            self.items.append((f"current_{m}", lim.motor_current_a[m] + 1.0, 0.0, 0.5))
        self.items += [("grid_v_l1", lim.voltage_low_v / 4, 0.0, 0.3),        # phase loss, voltage
                       ("grid_freq", lim.frequency_hz + 2 * lim.frequency_tol_hz, 0.3, 0.6),
                       ("current_total", lim.current_total_a + 5.0, 0.6, 0.9),
                       ("pedal", Point(False, Quality.UNCERTAIN, 0.0, "bench: stale"), 0.0, 0.5),
                       ("window", "bench: plant window lost (scripted)", 0.0, 0.5)]
        self.zone_steps = ((0.0, OVER_TEMP_C), (0.2, HEALTHY_TEMP_C), (0.35, UNDER_TEMP_C),
                           (0.55, HEALTHY_TEMP_C), (0.7, bad), (0.85, HEALTHY_TEMP_C))
        # the conditions no input image can raise (see the module docstring): scripted, active
        # in the first half of their cycle
        self.scripted = [cid for cid in condition_ids(program) if cid == "plc.watchdog"
                         or cid.endswith(SCRIPTED_ZONE_CONDITIONS)]
        names = [*(n for n, *_ in self.items), *ZONES, *self.scripted]
        self.offsets = {name: i / len(names) for i, name in enumerate(names)}

    def min_cycle_scans(self) -> int:
        """The shortest cycle, in scans, in which every flooded step lasts a scan or more."""
        starts = [start for start, _ in self.zone_steps] + [1.0]
        shortest = min([b - a for *_, a, b in self.items] + [b - a for a, b in zip(starts, starts[1:])])
        return math.ceil(round(1.0 / shortest, 6))

    def _phase(self, name: str) -> float:
        return ((self.k / self.cycle) + self.offsets[name]) % 1.0

    def _flooded(self) -> dict[str, object]:
        values: dict[str, object] = {}
        for name, value, a, b in self.items:
            if a <= self._phase(name) < b:
                values[name] = value
        for z in ZONES:
            f = self._phase(z)
            values[f"temp_{z}"] = [v for start, v in self.zone_steps if start <= f][-1]
        return values

    def scripted_conditions(self) -> dict[str, bool]:
        """This scan's state of each scripted condition (read after ``read_inputs``)."""
        if not self.flooding:
            return {}
        k = self.k - 1
        return {cid: ((k / self.cycle) + self.offsets[cid]) % 1.0 < 0.5 for cid in self.scripted}

    def evaluate(self, real):
        """``plc.interlocks.evaluate`` with the scripted conditions put in: the scan, the alarm
        lifecycle, the bridge and the window downstream are the real ones."""
        def evaluate(*args, **kw):
            conditions, timers = real(*args, **kw)
            forced = self.scripted_conditions()
            return [replace(c, active=forced[c.id], suppressed=False,
                            message=f"{c.id}: {'scripted by the flood' if forced[c.id] else 'back to normal'}")
                    if c.id in forced else c for c in conditions], timers
        return evaluate

    def start(self) -> None:
        self.flooding, self.k = True, 0

    def stop(self) -> None:
        self.flooding = False

    def window(self) -> str:
        return str(self._values.get("window", "")) if self.flooding else ""

    def read_inputs(self) -> ProcessImage:
        ts = self.wall()
        values = dict(self.healthy)
        if self.flooding:
            self._values = self._flooded()
            self.k += 1
            values.update((n, v) for n, v in self._values.items() if n in INPUT_SPECS)
        return ProcessImage.build(INPUT_SPECS, {
            n: (replace(v, timestamp_s=ts) if isinstance(v, Point) else Point(v, Quality.GOOD, ts))
            for n, v in values.items()})

    def write_outputs(self, outputs: ProcessImage) -> None:
        pass

    def force_safe(self) -> None:
        pass

    def sever(self, reason: str) -> None:
        pass


async def _stdin_lines():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        yield line.decode().strip()


async def plc_worker(spec: dict) -> None:
    """The PLC process: "ready" once it serves; then stdin "flood", "steady", "quit"."""
    die_with_parent(os.getppid())
    scheduling = raise_priority(spec["priority"])
    cfg, book = load()
    program = flood_program(cfg, book)
    controller = Controller(program)
    io = FloodIo(program, spec["cycle_scans"])
    interlocks.evaluate = io.evaluate(interlocks.evaluate)      # this process only: the flood's
    port = WindowPort(spec["socket"], controller.submit, on_recipes=controller.set_recipes,
                      info={"pid": os.getpid(), "scheduling": scheduling, "period_s": PERIOD_S,
                            "machine": cfg.machine.id, "plant": "bench.alarms flood"})
    controller.channel = port
    await port.start()
    scan_log = ScanLog(spec["scan_log"])
    controller.stats.sink = scan_log.add
    runtime = Runtime(controller, io, MonotonicClock(), WatchdogSettings(
        cfg.scan.watchdog_max_consecutive_overruns, cfg.scan.watchdog_max_cycle_factor),
        window=lambda: port.status() or io.window())
    stop = asyncio.Event()

    async def commands() -> None:
        async for line in _stdin_lines():
            if line == "flood":
                io.start()
            elif line == "steady":
                io.stop()
            elif line == "quit":
                break
        stop.set()

    reader = asyncio.create_task(commands())
    print(json.dumps({"ready": True, "scheduling": scheduling}), flush=True)
    gc.collect()
    gc.freeze()
    try:
        await runtime.run(stop)
    finally:
        reader.cancel()
        await port.flush()
        await port.close()
        scan_log.close()
    s = controller.stats
    print(json.dumps({"scans": s.scans, "overruns": s.overruns, "trips": sorted(controller.state.trips),
                      "alarms": len(controller.state.alarms)}), flush=True)


# -- the clients ----------------------------------------------------------------------------------


def part9_filter() -> ua.EventFilter:
    """The condition fields and the ConditionId, OfType AlarmConditionType (Part 4 §7.22.3,
    Part 9 §5.5.2)."""
    f = ua.EventFilter()
    for path in FIELDS:
        op = ua.SimpleAttributeOperand()
        op.TypeDefinitionId = ua.NodeId(O.ConditionType if not path else O.BaseEventType)
        op.BrowsePath = [ua.QualifiedName(x, 0) for x in path.split("/")] if path else []
        op.AttributeId = ua.AttributeIds.Value if path else ua.AttributeIds.NodeId
        f.SelectClauses.append(op)
    el = ua.ContentFilterElement()
    el.FilterOperator = ua.FilterOperator.OfType
    el.FilterOperands = [ua.LiteralOperand(Value=ua.Variant(ua.NodeId(O.AlarmConditionType)))]
    f.WhereClause = ua.ContentFilter(Elements=[el])
    return f


class Watcher:
    """One client's subscription: counts and latencies of the condition events while
    ``counting``; the refresh markers."""

    START, END = ua.NodeId(O.RefreshStartEventType), ua.NodeId(O.RefreshEndEventType)

    def __init__(self, client):
        self.client = client
        self.counting = False
        self.count = 0
        self.latency_s: list[float] = []
        self.in_refresh = False
        self.refreshed: list[str] = []
        self.refresh_end = asyncio.Event()

    async def open(self) -> None:
        await self.client.connect()
        self.sub = await self.client.create_subscription(PUBLISHING_MS, None, queue_maxsize=1_000_000)
        aiter(self.sub)                                    # the queue exists before the first publish
        self.task = asyncio.create_task(self._consume())
        await self.sub.subscribe_events(self.client.get_node(ua.NodeId(O.Server)), evfilter=part9_filter(),
                                        queuesize=QUEUE_SIZE)

    async def _consume(self) -> None:
        async for item in self.sub:
            ev = getattr(item, "event", None)
            if ev is None:
                continue
            now = time.time()
            etype = getattr(ev, "EventType", None)
            if etype == self.START:
                self.in_refresh, self.refreshed = True, []
            elif etype == self.END:
                self.in_refresh = False
                self.refresh_end.set()
            elif self.in_refresh:
                self.refreshed.append(ev.ConditionName)
            elif self.counting:
                t = ev.Time if ev.Time.tzinfo else ev.Time.replace(tzinfo=timezone.utc)
                self.count += 1
                self.latency_s.append(now - t.timestamp())

    async def refresh(self) -> float:
        self.refresh_end.clear()
        t0 = time.perf_counter()
        await self.client.get_node(ua.NodeId(O.ConditionType)).call_method(
            ua.NodeId(O.ConditionType_ConditionRefresh), ua.Variant(self.sub.subscription_id, ua.VariantType.UInt32))
        await asyncio.wait_for(self.refresh_end.wait(), 30.0)
        return time.perf_counter() - t0


async def clients_worker(spec: dict) -> None:
    """The clients' process: "ready" once every client is subscribed; then stdin "count" (the
    flood's window opens), "stop" (it closes: counts and latencies printed), "refresh" (each
    client in turn: times and retained conditions printed), "quit"."""
    die_with_parent(os.getppid())
    cert, key, server_cert = Path(spec["cert"]), Path(spec["key"]), Path(spec["server_cert"])
    watchers = [Watcher(await secure_client(spec["endpoint"], cert, key, server_cert, spec["password"],
                                            timeout_s=30.0)) for _ in range(spec["clients"])]
    await asyncio.gather(*(w.open() for w in watchers))
    await asyncio.sleep(SETTLE_S)
    print(json.dumps({"ready": True}), flush=True)
    t0 = 0.0
    async for line in _stdin_lines():
        if line == "count":
            t0 = time.monotonic()
            for w in watchers:
                w.counting = True
        elif line == "stop":
            seconds = time.monotonic() - t0
            for w in watchers:
                w.counting = False
            latency = [x for w in watchers for x in w.latency_s]
            print(json.dumps({"seconds": seconds, "per_client": [w.count for w in watchers],
                              "latency_ms_p50": _pct(latency, 50), "latency_ms_p99": _pct(latency, 99),
                              "latency_ms_max": max(latency) * 1e3 if latency else None}), flush=True)
        elif line == "refresh":
            times = []
            for w in watchers:
                times.append(await w.refresh())
            print(json.dumps({"refresh_s": times, "retained": [len(w.refreshed) for w in watchers]}),
                  flush=True)
        elif line == "quit":
            break
    for w in watchers:
        w.task.cancel()
    await asyncio.gather(*(w.client.disconnect() for w in watchers), return_exceptions=True)


# -- the run ----------------------------------------------------------------------------------------


class Worker:
    """A child process of this module (``--plc-worker`` / ``--clients-worker``) spoken to by
    lines: commands on its stdin, one JSON object per answer on its stdout."""

    def __init__(self, proc, name: str):
        self.proc, self.name = proc, name

    @classmethod
    async def start(cls, flag: str, spec_file: Path, log_file: Path) -> "Worker":
        with log_file.open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.alarms", flag, str(spec_file),
                cwd=Path(__file__).resolve().parent.parent, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=err)
        return cls(proc, flag)

    async def answer(self, timeout_s: float = STEP_LIMIT_S) -> dict:
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        if not line:
            raise RuntimeError(f"{self.name} ended (exit {await self.proc.wait()}); see its log")
        return json.loads(line)

    def tell(self, command: str) -> None:
        self.proc.stdin.write(command.encode() + b"\n")

    async def end(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                self.tell("quit")
                await asyncio.wait_for(self.proc.wait(), 20.0)
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def _window(records, since: float, until: float) -> list[tuple[float, float, float]]:
    return [r for r in records if since <= r[0] < until]


def journal_capacity(events: list, batch: int, machine: str, min_s: float = JOURNAL_MIN_S) -> float:
    """Rows per second of ``Records.journal_alarms`` on SQLite, ``events`` handed in ``batch`` at
    a time into a fresh database in a temporary directory; passes repeated (each on a new
    database) until ``min_s`` of writing, at most JOURNAL_MAX_PASSES: the median pass (an fsync
    takes from one to tens of milliseconds here)."""
    rates: list[float] = []
    total_s = 0.0
    with tempfile.TemporaryDirectory(prefix="bench-alarms-journal-") as tmp:
        while total_s < min_s and len(rates) < JOURNAL_MAX_PASSES:
            records = Records(f"sqlite:///{Path(tmp) / f'journal-{len(rates)}.db'}")
            try:
                t0 = time.perf_counter()
                rows = sum(records.journal_alarms(events[i:i + batch], machine)
                           for i in range(0, len(events), batch))
                seconds = time.perf_counter() - t0
            finally:
                records.close()
            total_s += seconds
            rates.append(rows / seconds)
    return float(np.median(rates))


async def run(cfg, book, tmp: Path, *, seconds: float, clients: int, cycle_s: float, idle_s: float,
              priority: str) -> dict:
    cfg, password, records, pki, cert, key = secure_machine(cfg, book, tmp)
    settings = cfg.opcua
    program = flood_program(cfg, book)
    scan_log = tmp / "scans.bin"
    (tmp / "plc.json").write_text(json.dumps({"socket": str(tmp / "plc.sock"), "scan_log": str(scan_log),
                                              "priority": priority,
                                              "cycle_scans": round(cycle_s / PERIOD_S)}))
    plc_proc = await Worker.start("--plc-worker", tmp / "plc.json", tmp / "plc.log")
    clients_proc: Worker | None = None
    server = None
    stop = asyncio.Event()
    tasks: list[asyncio.Task] = []
    transitions: list = []                             # the flood's alarm events, as the scan made them
    windows: dict[str, list[tuple[float, float]]] = {"idle": [], "flood": []}
    try:
        hello = await plc_proc.answer()
        plc = PlcClient(tmp / "plc.sock")
        server = TemperingServer(cfg, plc, records, program=program, pki=pki)
        await server.start()
        journal_sub = plc.channel.subscribe(maxlen=4096)
        events_sub = plc.channel.subscribe(maxlen=4096)
        tasks += [asyncio.create_task(plc.run(stop)),
                  asyncio.create_task(journal_task(plc.channel, journal_sub, records, cfg.machine.id, stop))]
        flooding = False

        async def collect() -> None:
            while not stop.is_set():
                got = [e for snap in events_sub.drain() for e in snap.events if e.kind == "alarm"]
                if flooding:
                    transitions.extend(got)
                await asyncio.sleep(JOURNAL_EVERY_S)
        tasks.append(asyncio.create_task(collect()))
        await asyncio.wait_for(plc.connected_event.wait(), 30.0)
        await asyncio.sleep(SETTLE_S)

        spec = {"endpoint": settings.endpoint, "cert": str(cert), "key": str(key),
                "server_cert": str(pki.cert_path), "password": password, "clients": clients}
        (tmp / "clients.json").write_text(json.dumps(spec))
        clients_proc = await Worker.start("--clients-worker", tmp / "clients.json", tmp / "clients.log")
        await clients_proc.answer()
        subscriptions = server.sessions()[1]

        async def idle(span_s: float) -> None:
            a = time.time()
            await asyncio.sleep(span_s)
            windows["idle"].append((a, time.time()))

        await idle(idle_s / 2)
        sent0 = server.conditions.events_sent
        clients_proc.tell("count")
        plc_proc.tell("flood")
        events_sub.drain()
        flooding = True
        a = time.time()
        await asyncio.sleep(seconds)
        plc_proc.tell("steady")
        windows["flood"].append((a, time.time()))
        await asyncio.sleep(DRAIN_S)                   # the flood's last events reach the clients
        flooding = False
        sent = server.conditions.events_sent - sent0
        clients_proc.tell("stop")
        delivered = await clients_proc.answer()
        await idle(idle_s / 2)
        clients_proc.tell("refresh")
        refreshed = await clients_proc.answer()
        retained_on_server = sum(1 for c in server.conditions.conditions.values()
                                 if c.alarm is not None and c.alarm.retain)
        await clients_proc.end()
        plc_proc.tell("quit")
        plc_end = await plc_proc.answer(30.0)
    finally:
        if clients_proc is not None:
            await clients_proc.end()
        await plc_proc.end()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.stop()
    flood_a, flood_b = windows["flood"][0]
    stored = {(r.alarm_id, r.kind, r.event_id) for r in records.alarm_journal()}
    records.close()

    scans = read_scan_log(scan_log)
    idle_scans = [r for a, b in windows["idle"] for r in _window(scans, a, b)]
    flood_scans = _window(scans, flood_a, flood_b)
    flood_s = flood_b - flood_a
    rate = len(transitions) / flood_s
    batch = max(1, round(rate * JOURNAL_EVERY_S))
    received = sum(delivered["per_client"])
    changing = {dict(e.data)["alarm_id"] for e in transitions}
    active = {dict(e.data)["alarm_id"] for e in transitions if dict(e.data)["transition"] == "active"}
    journaled = sum(1 for e in transitions if (dict(e.data)["alarm_id"], dict(e.data)["transition"],
                                               dict(e.data)["alarm"].event_id.hex()) in stored)
    return {
        "events_per_s": received / flood_s,
        "events_per_client_per_s": [n / flood_s for n in delivered["per_client"]],
        "event_latency_ms_p50": delivered["latency_ms_p50"], "event_latency_ms_p99": delivered["latency_ms_p99"],
        "event_latency_ms_max": delivered["latency_ms_max"],
        "server_events_per_s": sent / flood_s, "transitions_per_s": rate,
        "delivered_ratio": received / (sent * clients) if sent else float("nan"),
        "transitions": len(transitions), "server_events": sent, "events_received": received,
        "conditions": len(condition_ids(program)), "conditions_active": len(active),
        "conditions_changing": len(changing),
        "refresh_ms": _pct(refreshed["refresh_s"], 50), "refresh_ms_max": max(refreshed["refresh_s"]) * 1e3,
        "retained": refreshed["retained"][0], "retained_per_client": refreshed["retained"],
        "retained_on_server": retained_on_server,
        "journal_rows_per_s": journal_capacity(transitions, batch, cfg.machine.id), "journal_batch": batch,
        "journal_rows_per_s_one_per_call": journal_capacity(transitions[:ONE_PER_CALL_EVENTS], 1, cfg.machine.id),
        "journal_rows_flood": journaled, "journal_complete": journaled == len(transitions),
        "late_ms_p99_flood": _pct([r[1] for r in flood_scans], 99), "late_ms_p99_idle": _pct([r[1] for r in idle_scans], 99),
        "late_ms_p50_flood": _pct([r[1] for r in flood_scans], 50), "late_ms_p50_idle": _pct([r[1] for r in idle_scans], 50),
        "late_ms_max_flood": _pct([r[1] for r in flood_scans], 100), "late_ms_max_idle": _pct([r[1] for r in idle_scans], 100),
        "logic_ms_p99_flood": _pct([r[2] for r in flood_scans], 99), "logic_ms_p99_idle": _pct([r[2] for r in idle_scans], 99),
        "scans_flood": len(flood_scans), "scans_idle": len(idle_scans), "overruns": plc_end["overruns"],
        "plc_scheduling": hello["scheduling"], "clients": clients, "subscriptions_seen": subscriptions,
        "seconds": flood_s, "cycle_s": cycle_s, "idle_s": idle_s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="the flood (default 60 s)")
    ap.add_argument("--clients", type=int, default=10, help="subscribed clients (default 10)")
    ap.add_argument("--cycle-s", type=float, default=1.0,
                    help="each flooded condition goes active and clears once per cycle (default 1 s, "
                         "at least 0.7 s: 7 scans)")
    ap.add_argument("--idle-s", type=float, default=10.0,
                    help="idle before and after the flood, together (default 10 s)")
    ap.add_argument("--priority", choices=("auto", "realtime", "nice", "none"), default="auto",
                    help="the PLC's scheduling, as `tempering run --priority` (default auto)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--plc-worker", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--clients-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    for flag, worker in ((args.plc_worker, plc_worker), (args.clients_worker, clients_worker)):
        if flag:
            asyncio.run(worker(json.loads(Path(flag).read_text())))
            return 0
    cfg, book = load()
    shortest = FloodIo(flood_program(cfg, book), 1).min_cycle_scans()
    if round(args.cycle_s / PERIOD_S) < shortest:
        ap.error(f"--cycle-s: at least {shortest * PERIOD_S:g} s (every step of the flood lasts a scan "
                 f"or more), got {args.cycle_s:g}")
    with tempfile.TemporaryDirectory(prefix="bench-alarms-") as tmp:
        r = asyncio.run(run(cfg, book, Path(tmp), seconds=args.seconds, clients=args.clients,
                            cycle_s=args.cycle_s, idle_s=args.idle_s, priority=args.priority))
    print(f"Alarm flood: {r['conditions_active']} of the machine's {r['conditions']} conditions active and "
          f"cleared every {args.cycle_s:g} s ({r['conditions_changing']} changing) for {fmt(r['seconds'], 1)} s; "
          f"{r['clients']} Part 9 clients on the "
          f"Server object (SignAndEncrypt Basic256Sha256); PLC in its own process, "
          f"{r['plc_scheduling']}; {os.cpu_count()} cores")
    emit([(f"events/s delivered to {r['clients']} clients", fmt(r["events_per_s"], 0),
           f"server sent {fmt(r['server_events_per_s'], 1)}/s to each (scan: "
           f"{fmt(r['transitions_per_s'], 1)} transitions/s); delivered {fmt(100 * r['delivered_ratio'], 1)}%"),
          ("event latency p50, ms (scan -> client)", fmt(r["event_latency_ms_p50"], 1),
           f"p99 {fmt(r['event_latency_ms_p99'], 1)}, max {fmt(r['event_latency_ms_max'], 1)} "
           f"({PUBLISHING_MS:g} ms publishing)"),
          (f"ConditionRefresh, ms ({r['retained']} retained)", fmt(r["refresh_ms"], 1),
           f"max of {r['clients']} clients {fmt(r['refresh_ms_max'], 1)}"),
          (f"journal rows/s (SQLite, {r['journal_batch']} a call)", fmt(r["journal_rows_per_s"], 0),
           f"flood {fmt(r['transitions_per_s'], 1)}/s; one a call {fmt(r['journal_rows_per_s_one_per_call'], 0)}/s; "
           f"window stored {r['journal_rows_flood']} of {r['transitions']}"
           f"{'' if r['journal_complete'] else ' (INCOMPLETE)'}"),
          ("scan lateness p99, ms (100 ms scan)", fmt(r["late_ms_p99_flood"]), f"idle {fmt(r['late_ms_p99_idle'])}"),
          ("scan lateness p50, ms", fmt(r["late_ms_p50_flood"]), f"idle {fmt(r['late_ms_p50_idle'])}"),
          ("scan lateness max, ms", fmt(r["late_ms_max_flood"]), f"idle {fmt(r['late_ms_max_idle'])}"),
          ("scan logic p99, ms", fmt(r["logic_ms_p99_flood"]), f"idle {fmt(r['logic_ms_p99_idle'])}")],
         ("measure", "flood", "for comparison"), r, as_json=False)
    print(f"scans: {r['scans_flood']} flooded, {r['scans_idle']} idle, {r['overruns']} overruns; "
          f"subscriptions on the server: {r['subscriptions_seen']}; retained conditions on the server "
          f"{r['retained_on_server']}")
    if args.json:
        sys.stdout.flush()
        print(json.dumps(r, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
