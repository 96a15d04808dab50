"""Backup, restore and migration of a machine, measured: ``tempering backup`` while the machine
runs a batch, the PLC's scan next to an idle window, ``tempering restore`` onto a new directory,
``tempering migrate`` of the shipped legacy machine.

    python -m bench.backup [--rows N] [--window-s S] [--priority P] [--json] [--keep DIR]

One run, in a temporary directory, on free loopback ports:

1. A machine directory (the default machine, ``machine.work_dir: .``) whose records database
   (``opcua_server.records``, SQLite) holds ``--rows`` (100,000) audit rows, as many alarm
   journal rows (alarm lifecycles through ``records.journal_values`` of real ``plc.alarms.Alarm``
   changes), ``--rows``/100 batch records (``tests.batch_samples.record`` with the four zones
   in three phases), the recipes and ``USERS`` users; inserted with SQLAlchemy Core, one
   transaction a table. The users' passwords are hashed at ``FAST_SCRYPT`` in this process only
   (the real cost is 0.5 s a hash); the machine's processes keep the real cost.
2. ``tempering run`` as ``bench.isolation.Run`` starts it (supervisor, the twin as a Modbus TCP
   slave, the PLC scanning at 100 ms with ``--scan-log`` and ``--priority``, the plant window
   with the OPC UA server and the historian), the default recipe auto-started from molten
   chocolate: a batch runs throughout. A technician's OPC UA client (SignAndEncrypt, in this
   process) writes the pump's Trim every ``WRITE_EVERY_S`` in both windows; the window answers
   a write after the scan's verdict and the audit row (``opcua_server.gate``), so its round trip
   shows a window slowed down or a records database held up. Windows of ``--window-s`` (15 s)
   each: ``idle`` (the writes only), then ``backup``: ``tempering backup FILE --config
   MACHINE`` (the real CLI, a process each time) back to back, from the first one's start to
   the last one's end. Per window: the scan's lateness p50/p99/max and overruns from the scan
   log (``bench.isolation.scan_stats``); the writes' round trip and status; the machine's own
   audit rows in the window (read after the stop: the rows past the generated ones, whose times
   must never go back in id order). The supervisor's output is searched for a child it restarted
   (died, or killed for a lapsed heartbeat) or found hung.
3. The machine stopped; ``tempering restore FILE --out DIR`` (a new machine directory): its
   duration; the restored machine started (``Run`` again): the seconds to "opc ua: serving" and
   to a Good read as the restored user over the restored trust list (the archive has no private
   key: the server makes a new certificate), then stopped.
4. ``tempering migrate config/legacy --out DIR``: its duration (it hashes the plain and the
   one-time passwords with the real scrypt cost, about 0.5 s each).

Each ``tempering`` command's duration includes the Python start-up and imports
(``cli_start_s``: ``tempering --help``, median of three). JSON (the last line with ``--json``):
backup_s_p50, backup_s_max, archive_mb, records_rows, rows_per_s (rows / backup_s_p50),
late_ms_{p50,p99,max}_{idle,backup}, overruns_{idle,backup}, late_p99_ratio_backup_to_idle,
write_ms_p99_{idle,backup}, write_ms_max_backup, restore_s, restored_serves (the "serving"
line), restored_good_read, migrate_s, window_restarts, plc_restarts, cli_start_s, and
``detail`` (everything measured).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml
from asyncua import ua
from sqlalchemy import insert

from opcua_server import batches as batch_model
from opcua_server import model
from opcua_server import records as records_module
from opcua_server.config import load
from opcua_server.records import Records, _batch_values, alarm_journal, audit_log, journal_values
from opcua_server.security import Pki
from plc.alarms import Alarm, Priority
from plc.commands import Event
from plc.interlocks import condition_ids
from plc.program import Program
from tests.batch_samples import record

from .common import emit, fmt
from .isolation import Run, _pct, good_read, scan_stats, wait_scan_log
from .opcua import USER, _free_port, _tempering, client_certificate, machine_files, secure_client

ROOT = Path(__file__).resolve().parent.parent
LEGACY = ROOT / "config" / "legacy"
FAST_SCRYPT = records_module.ScryptCost(2 ** 12, 8, 1)
USERS = 20
SPAN_S = 365 * 86400.0          # the generated history: a year up to now
WRITE_EVERY_S = 0.5             # the technician's Trim writes
SETTLE_S = 3.0                  # after the first Good read, before the idle window
PAUSE_S = 2.0                   # between the windows
CHUNK = 5000                    # rows per executemany
TRIM_TARGET = "Zones.Pump.Trim"
#: the supervisor's lines when a child died or hung (a hung one is killed, then restarted)
RESTART = re.compile(r"supervisor: (\w+) \(pid \d+\) (ended: .*; restarting|hung: .*)")


@dataclasses.dataclass(frozen=True)
class Site:
    """What ``bench.isolation``'s Run and good_read need of a machine: where ``tempering run``
    starts (its cwd, where it leaves run.stdout), the machine file, its state file and
    endpoint, the scan log, the server's certificate and the machine's namespace URI."""

    workdir: Path
    machine_file: Path
    state_file: Path
    scan_log: Path
    endpoint: str
    server_cert: Path
    machine_uri: str

    @classmethod
    def of(cls, machine_file: Path, workdir: Path) -> Site:
        cfg, _ = load(machine_file)
        workdir.mkdir(parents=True, exist_ok=True)
        return cls(workdir, machine_file, Path(cfg.machine.state_file), workdir / "scan.log",
                   cfg.opcua.endpoint, Path(cfg.opcua.pki_dir) / "own" / "cert.der",
                   model.MACHINE_URI_PREFIX + cfg.machine.id)


# -- the machine and its records -------------------------------------------------------------------


def machine_dir(directory: Path) -> Path:
    """The default machine's files in ``directory`` on free ports, its run-time paths under it
    (``machine.work_dir: .``). Returns the machine file."""
    path = machine_files(directory, _free_port(), _free_port())
    data = yaml.safe_load(path.read_text())
    data["machine"]["work_dir"] = "."
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _audit_rows(n: int, users: list[str], t0: float, rng: random.Random) -> list[dict]:
    """``n`` audit rows as the gate and the login limiter write them: writes of settings,
    method calls, logins (some refused), oldest first."""
    zones = ("tank_bottom", "tank_wall", "pump", "fountain")
    methods = ("StartRecipe", "Hold", "Resume", "Stop", "Abort", "Reset")
    rows = []
    for i in range(n):
        t = t0 + SPAN_S * i / n
        user = rng.choice(users)
        kind = rng.random()
        row = {"time": records_module._utc_text(t), "user_name": user, "old_value": "", "new_value": "",
               "result": "Good", "command_id": None, "origin": None, "peer": None, "certificate": None}
        if kind < 0.6:
            zone = rng.choice(zones)
            setting = rng.choice(("Trim", "Trim", "Kp", "Ki"))
            old = round(rng.uniform(-1, 1), 1)
            row.update(action="write", target=f"{zone}.{setting}", old_value=str(old),
                       new_value=str(round(old + 0.1, 1)), command_id=f"{i:012x}", origin="opcua")
            if rng.random() < 0.05:
                row["result"] = f"BadUserAccessDenied: {user} (operator) may not write {zone}.{setting}; needs technician"
        elif kind < 0.85:
            method = rng.choice(methods)
            row.update(action="call", target=f"Machine.{method}", new_value="recipe_id='dark-70'"
                       if method == "StartRecipe" else "", command_id=f"{i:012x}", origin="opcua")
            if rng.random() < 0.1:
                row["result"] = "BadInvalidState: not allowed in phase pouring"
        else:
            row.update(action="login", target="session", origin="opcua", new_value=rng.choice(("operator", "technician")),
                       peer=f"10.20.3.{rng.randrange(2, 250)}:{rng.randrange(40000, 60000)}",
                       certificate=secrets.token_hex(20))
            if rng.random() < 0.1:
                row["result"] = "BadUserAccessDenied: wrong password"
        rows.append(row)
    return rows


def _journal_rows(n: int, machine: str, alarm_ids: tuple[str, ...], users: list[str], t0: float,
                  rng: random.Random) -> list[dict]:
    """``n`` alarm journal rows: lifecycles of the machine's conditions (active, acknowledged,
    cleared, each a change of a ``plc.alarms.Alarm``) and now and then a PLC restart, made by
    ``records.journal_values`` as the window makes them."""
    rows: list[dict] = []
    seq = dict.fromkeys(alarm_ids, 0)
    episodes = n // 3 + 1
    for e in range(episodes):
        t = t0 + SPAN_S * e / episodes
        if e % 500 == 0:
            rows.append(journal_values(Event("alarm_system", t, "PLC started", (("transition", "restart"),)), machine))
        alarm_id = rng.choice(alarm_ids)
        priority = rng.choice((Priority.LOW, Priority.MEDIUM, Priority.HIGH))
        value = round(rng.uniform(20, 65), 1)
        user = rng.choice(users)
        steps = (("active", dict(active=True, acked=False, message=f"{alarm_id}: {value} beyond its limit")),
                 ("acknowledged", dict(active=True, acked=True, user=user, comment="seen, checking")),
                 ("cleared", dict(active=False, acked=True, message=f"{alarm_id}: back within its limit")))
        state = {"message": ""}
        for k, (transition, change) in enumerate(steps):
            seq[alarm_id] += 1
            state.update(change)
            alarm = Alarm(alarm_id, priority=priority, value=value, changed=t + 60.0 * k, seq=seq[alarm_id],
                          **state)
            rows.append(journal_values(Event("alarm", alarm.changed, alarm.message, (
                ("alarm_id", alarm_id), ("transition", transition), ("to", alarm.state),
                ("priority", priority), ("user", state.get("user", "")), ("comment", state.get("comment", "")),
                ("value", value), ("alarm", alarm))), machine))
    return rows[:n]


def _batch_rows(n: int, machine: str, now: float) -> list[dict]:
    """``n`` batch records of ``machine`` (numbers 1..n, one every 6 hours up to ``now``): the
    test suite's whole record, with every zone in every phase."""
    zones = ("tank_bottom", "tank_wall", "pump", "fountain")
    verdicts = ("PASS", "PASS", "PASS", "FAIL", "INCOMPLETE")
    out = []
    for i in range(n):
        start = now - (n - i) * 6 * 3600.0
        verdict = verdicts[i % len(verdicts)]
        stats = tuple(batch_model.ZonePhaseStats(phase, zone, 600 * (1 + j), 30.0 + j, 31.5 + j, 30.8 + j, 0.12, 4.0, 0.4)
                      for j, phase in enumerate(("heating", "cooling", "pouring")) for zone in zones)
        rec = record(i + 1, machine=machine, recipe="dark-70", start_s=start, verdict=verdict,
                     outcome="aborted" if verdict == "INCOMPLETE" else "completed",
                     reasons=() if verdict == "PASS" else ("pouring within ±0.5 K of 31.5 °C for 80 % of the time",),
                     zones=stats)
        out.append(_batch_values(rec))
    return out


def fill_records(machine_file: Path, rows: int, password: str) -> dict:
    """The machine's records: recipes, USERS users (USER a technician with ``password``),
    ``rows`` audit and journal rows, ``rows // 100`` batches. Returns counts and seconds."""
    cfg, book = load(machine_file)
    program = Program.from_config(cfg, book)
    rng = random.Random(1)
    t_start = time.perf_counter()
    saved, records_module.SCRYPT_COST = records_module.SCRYPT_COST, FAST_SCRYPT
    r = Records(cfg.opcua.records_url)
    try:
        r.seed_recipes(book)
        names = [USER] + [f"user{i:02d}" for i in range(1, USERS)]
        for i, name in enumerate(names):
            role = "technician" if name == USER else ("admin" if i == 1 else "operator")
            r.add_user(name, password if name == USER else secrets.token_urlsafe(12), role)
        t0 = time.time() - SPAN_S - 3600.0
        audit = _audit_rows(rows, names, t0, rng)
        journal = _journal_rows(rows, cfg.machine.id, condition_ids(program), names, t0, rng)
        batch = _batch_rows(rows // 100, cfg.machine.id, time.time() - 3600.0)
        made_s = time.perf_counter() - t_start
        for table, values in ((audit_log, audit), (alarm_journal, journal), (records_module.batches, batch)):
            with r.engine.begin() as db:
                for i in range(0, len(values), CHUNK):
                    db.execute(insert(table), values[i:i + CHUNK])
    finally:
        records_module.SCRYPT_COST = saved
        r.close()
    return {"audit": len(audit), "journal": len(journal), "batches": len(batch), "users": len(names),
            "make_s": made_s, "fill_s": time.perf_counter() - t_start,
            "db_mb": Path(load(machine_file)[0].opcua.records_url.removeprefix("sqlite:///")).stat().st_size / 1e6}


def own_rows(url: str, first_audit_id: int, first_journal_id: int) -> tuple[list, list]:
    """The audit and journal rows the running machine wrote (ids past the generated ones):
    (id, time s, user, action, target, result) and (id, time s, alarm_id, kind)."""
    from sqlalchemy import create_engine, select

    engine = create_engine(url)
    try:
        with engine.connect() as db:
            a, j = audit_log.c, alarm_journal.c
            audit = [(r.id, datetime.fromisoformat(r.time).timestamp(), r.user_name, r.action, r.target, r.result)
                     for r in db.execute(select(a.id, a.time, a.user_name, a.action, a.target, a.result)
                                         .where(a.id >= first_audit_id).order_by(a.id))]
            journal = [(r.id, datetime.fromisoformat(r.time).timestamp(), r.alarm_id, r.kind)
                       for r in db.execute(select(j.id, j.time, j.alarm_id, j.kind)
                                           .where(j.id >= first_journal_id).order_by(j.id))]
    finally:
        engine.dispose()
    return audit, journal


# -- the windows -----------------------------------------------------------------------------------


class TrimWriter:
    """The technician's client: the pump's Trim written every WRITE_EVERY_S (0.0, 0.1, 0.0 ...),
    each write's (wall start, round trip s, status name) kept."""

    def __init__(self, site: Site, cert: Path, key: Path, password: str):
        self.site, self.cert, self.key, self.password = site, cert, key, password
        self.writes: list[tuple[float, float, str]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.client = await secure_client(self.site.endpoint, self.cert, self.key, self.site.server_cert,
                                          self.password, timeout_s=10.0)
        await self.client.connect()
        ns = await self.client.get_namespace_index(self.site.machine_uri)
        self.node = self.client.get_node(ua.NodeId(f"{model.ROOT}.{TRIM_TARGET}", ns))
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        k = 0
        next_s = time.monotonic()
        while not self._stop.is_set():
            wall, t = time.time(), time.monotonic()
            try:
                await self.node.write_value(ua.DataValue(ua.Variant(0.1 * (k % 2), ua.VariantType.Double)))
                status = "Good"
            except ua.UaStatusCodeError as e:
                status = ua.StatusCode(e.code).name
            except (asyncio.TimeoutError, OSError, ua.UaError) as e:
                status = type(e).__name__
            self.writes.append((wall, time.monotonic() - t, status))
            k += 1
            next_s += WRITE_EVERY_S
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, next_s - time.monotonic()))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        with contextlib.suppress(Exception):
            await self.client.disconnect()

    def stats(self, t0: float, t1: float) -> dict:
        sel = [(rt, st) for wall, rt, st in self.writes if t0 <= wall <= t1]
        rt_ms = [rt * 1e3 for rt, _ in sel]
        statuses: dict[str, int] = {}
        for _, st in sel:
            statuses[st] = statuses.get(st, 0) + 1
        return {"writes": len(sel), "good": statuses.get("Good", 0), "statuses": statuses,
                "write_ms_p50": _pct(rt_ms, 50), "write_ms_p99": _pct(rt_ms, 99),
                "write_ms_max": max(rt_ms) if rt_ms else None}


async def tempering_cmd(*args: str, cwd: Path | None = None) -> tuple[float, int, str]:
    """``tempering ARGS``: (seconds, exit code, output)."""
    t = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*_tempering(), *args, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return time.monotonic() - t, proc.returncode, out.decode(errors="replace")


def _cli_start_s() -> float:
    times = []
    for _ in range(3):
        t = time.monotonic()
        subprocess.run([*_tempering(), "--help"], stdout=subprocess.DEVNULL, check=True)
        times.append(time.monotonic() - t)
    return statistics.median(times)


def _archive_rows(path: Path) -> int:
    with tarfile.open(path, "r:gz") as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    return sum(manifest["records"].values())


def _restarts(run: Run, t0: float = 0.0, t1: float = float("inf")) -> list[str]:
    """The supervisor's restart and hang lines between the wall times ``t0`` and ``t1``."""
    return [line for wall, line in run.lines if t0 <= wall <= t1 and RESTART.search(line)]


def _count_restarts(lines: list[str], child: str) -> int:
    return sum(1 for line in lines if (m := RESTART.search(line)) and m.group(1) == child
               and m.group(2).endswith("restarting"))


async def measure(args) -> dict:
    out: dict = {"cores": os.cpu_count(), "rows_asked": args.rows, "window_s": args.window_s}
    with tempfile.TemporaryDirectory(prefix="bench-backup-") as tmp:
        tmp = Path(tmp)
        try:
            await _measure(tmp, args, out)
        finally:
            if args.keep:
                shutil.copytree(tmp, args.keep, dirs_exist_ok=True)
    return out


async def _measure(tmp: Path, args, out: dict) -> None:
    out["cli_start_s"] = await asyncio.to_thread(_cli_start_s)
    cert, key = client_certificate(tmp / "client-pki")
    password = secrets.token_urlsafe(12)
    machine_file = machine_dir(tmp / "machine")
    filled = await asyncio.to_thread(fill_records, machine_file, args.rows, password)
    out["generated"] = filled
    cfg, _ = load(machine_file)
    Pki(cfg.opcua.pki_dir).trust(cert)
    site = Site.of(machine_file, tmp / "run-original")
    archive = tmp / "backups" / "tempering-01.tgz"
    await _run_original(site, machine_file, archive, cert, key, password, args, out)

    # the rows the running machine wrote itself: the generated ones came first
    audit, journal = own_rows(cfg.opcua.records_url, filled["audit"] + 1, filled["journal"] + 1)
    times = [t for _, t, *_ in audit]
    out["own_audit_rows"] = len(audit)
    out["own_audit_in_order"] = all(a <= b + 1e-3 for a, b in zip(times, times[1:]))
    kinds: dict[str, int] = {}
    for _, _, _, kind in journal:
        kinds[kind] = kinds.get(kind, 0) + 1
    out["own_journal_rows"] = kinds
    for w in out["windows"].values():
        w["audit_trim_rows"] = sum(1 for _, t, user, action, target, _ in audit
                                   if w["t0"] <= t <= w["t1"] and user == USER and action == "write")

    if archive.exists():
        await _restore(tmp, archive, cert, key, password, out)
    dt, code, text = await tempering_cmd("migrate", str(LEGACY), "--out", str(tmp / "migrated"))
    out["migrate_s"], out["migrate_exit"] = dt, code
    out["migrate_users"] = [line.strip() for line in text.splitlines()
                            if re.match(r"\s+Users\.csv:\d+: \S+ \(\w+\): ", line)]


async def _run_original(site: Site, machine_file: Path, archive: Path, cert: Path, key: Path, password: str,
                        args, out: dict) -> None:
    """The machine running its batch: the idle window, then the backups' window."""
    run = Run(site, args.priority)
    writer = TrimWriter(site, cert, key, password)
    windows: dict[str, dict] = {}
    backups: list[float] = []
    try:
        await run.start()
        await run.wait_line(r"opc ua: serving", 0, 90.0)
        if await good_read(site, cert, key, password, 90.0) is None:
            raise RuntimeError("no Good read of the fountain's temperature within 90 s of the start")
        out["plc_scheduling"] = run.line_text(r"^plc: pid").partition("scheduling ")[2].partition(";")[0]
        await writer.start()
        await asyncio.sleep(SETTLE_S)

        t0 = time.time()
        await asyncio.sleep(args.window_s)
        windows["idle"] = {"t0": t0, "t1": time.time()}
        await asyncio.sleep(PAUSE_S)

        t0 = time.time()
        while time.time() - t0 < args.window_s:
            dt, code, text = await tempering_cmd("backup", str(archive), "--config", str(machine_file))
            if code != 0:
                out["backup_failure"] = text.strip()
                break
            backups.append(dt)
            out["backup_output"] = text.strip().splitlines()
        windows["backup"] = {"t0": t0, "t1": time.time()}
        await asyncio.sleep(1.0)
        await writer.stop()
        recs = await wait_scan_log(site, windows["backup"]["t1"])
        for w in windows.values():
            w.update(scan_stats(recs, w["t0"], w["t1"]))
            w["trim"] = writer.stats(w["t0"], w["t1"])
            w["restart_lines"] = _restarts(run, w["t0"], w["t1"])
    finally:
        await writer.stop()
        await run.stop()
    out["restart_lines"] = _restarts(run)
    if out["restart_lines"]:            # what the children said, for the why
        with contextlib.suppress(OSError):
            out["run_stderr_tail"] = (site.workdir / "run.stderr").read_text(errors="replace").splitlines()[-40:]
    out["run_exit"] = run.proc.returncode if run.proc else None
    out["windows"] = windows
    out["backup_s"] = backups
    out["archive_bytes"] = archive.stat().st_size if archive.exists() else None
    out["records_rows"] = _archive_rows(archive) if archive.exists() else None


async def _restore(tmp: Path, archive: Path, cert: Path, key: Path, password: str, out: dict) -> None:
    """The archive restored into a new machine directory, started there until a Good read."""
    restored = tmp / "restored"
    dt, code, text = await tempering_cmd("restore", str(archive), "--out", str(restored))
    out["restore_s"], out["restore_exit"] = dt, code
    out["restore_output"] = text.strip().splitlines()
    out["restored_serving_s"] = out["restored_good_read_s"] = None
    if code != 0:
        return
    site = Site.of(restored / "tempering-machine.yaml", tmp / "run-restored")
    run = Run(site)
    try:
        started = time.time()
        await run.start()
        with contextlib.suppress(RuntimeError):
            wall, _ = await run.wait_line(r"opc ua: serving", 0, 90.0)
            out["restored_serving_s"] = wall - started
            good = await good_read(site, cert, key, password, 60.0)
            out["restored_good_read_s"] = None if good is None else time.time() - started
    finally:
        await run.stop()
    out["restored_restart_lines"] = _restarts(run)


def result(out: dict) -> dict:
    """The JSON keys of the README, from the measurement."""
    w = out.get("windows", {})
    idle, bk = w.get("idle", {}), w.get("backup", {})
    backups = out.get("backup_s") or []
    p50 = statistics.median(backups) if backups else None
    rows = out.get("records_rows")

    def r(x, d=3):
        return None if x is None else round(x, d)

    ratio = (bk["late_ms_p99"] / idle["late_ms_p99"]
             if bk.get("late_ms_p99") is not None and idle.get("late_ms_p99") else None)
    return {
        "backup_s_p50": r(p50), "backup_s_max": r(max(backups) if backups else None), "backups": len(backups),
        "archive_mb": r(out["archive_bytes"] / 1e6 if out.get("archive_bytes") else None),
        "records_rows": rows, "rows_per_s": r(rows / p50 if rows and p50 else None, 0),
        "late_ms_p50_idle": r(idle.get("late_ms_p50")), "late_ms_p50_backup": r(bk.get("late_ms_p50")),
        "late_ms_p99_idle": r(idle.get("late_ms_p99")), "late_ms_p99_backup": r(bk.get("late_ms_p99")),
        "late_ms_max_idle": r(idle.get("late_ms_max")), "late_ms_max_backup": r(bk.get("late_ms_max")),
        "overruns_idle": idle.get("overruns"), "overruns_backup": bk.get("overruns"),
        "late_p99_ratio_backup_to_idle": r(ratio, 2),
        "write_ms_p99_idle": r(idle.get("trim", {}).get("write_ms_p99"), 1),
        "write_ms_p99_backup": r(bk.get("trim", {}).get("write_ms_p99"), 1),
        "write_ms_max_backup": r(bk.get("trim", {}).get("write_ms_max"), 1),
        "restore_s": r(out.get("restore_s")),
        "restored_serves": out.get("restored_serving_s") is not None,
        "restored_good_read": out.get("restored_good_read_s") is not None,
        "migrate_s": r(out.get("migrate_s")),
        "window_restarts": _count_restarts(out["restart_lines"], "window") if "restart_lines" in out else None,
        "plc_restarts": _count_restarts(out["restart_lines"], "plc") if "restart_lines" in out else None,
        "cli_start_s": r(out.get("cli_start_s")),
        "detail": out,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000,
                    help="audit rows and alarm journal rows each; batches: a hundredth (default 100000)")
    ap.add_argument("--window-s", type=float, default=15.0, help="length of the idle and the backup window")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--priority", choices=("auto", "realtime", "nice", "none"), default="auto",
                    help="the PLC process's scheduling, passed to tempering run (default auto)")
    ap.add_argument("--keep", metavar="DIR", help="copy the temporary directory (logs, archive) here at the end")
    args = ap.parse_args(argv)
    error = None
    out: dict = {}
    try:
        out = asyncio.run(measure(args))
    except Exception as e:                          # noqa: BLE001 - reported with what was measured
        error = f"{type(e).__name__}: {e}"
    res = result(out)
    if error:
        res["error"] = error
    w = out.get("windows", {})
    g = out.get("generated", {})

    def scan_row(name: str) -> tuple[str, ...]:
        s = w.get(name, {})
        t = s.get("trim", {})
        return (f"scan lateness, {name} window ({fmt(s.get('window_s'), 1)} s, {s.get('scans', '-')} scans)",
                f"p50 {fmt(s.get('late_ms_p50'))} / p99 {fmt(s.get('late_ms_p99'))} / max {fmt(s.get('late_ms_max'))} ms",
                f"{s.get('overruns', '-')} overruns; Trim writes {t.get('good', '-')}/{t.get('writes', '-')} Good, "
                f"p99 {fmt(t.get('write_ms_p99'), 1)} ms, max {fmt(t.get('write_ms_max'), 1)} ms; "
                f"{s.get('audit_trim_rows', '-')} audit rows")

    rows = [
        ("records generated", f"{g.get('audit', '-')} audit, {g.get('journal', '-')} journal, "
                              f"{g.get('batches', '-')} batches, {g.get('users', '-')} users",
         f"{fmt(g.get('db_mb'), 1)} MB SQLite, made and inserted in {fmt(g.get('fill_s'), 1)} s"),
        scan_row("idle"),
        scan_row("backup"),
        ("late p99 ratio backup / idle", fmt(res["late_p99_ratio_backup_to_idle"], 2),
         f"PLC scheduling: {out.get('plc_scheduling') or '?'}"),
        ("tempering backup (while running), s", f"p50 {fmt(res['backup_s_p50'], 2)} / max {fmt(res['backup_s_max'], 2)}",
         f"{res['backups']} back to back; CLI start alone {fmt(res['cli_start_s'], 2)} s"),
        ("archive", f"{fmt(res['archive_mb'], 1)} MB",
         f"{res['records_rows'] or '-'} rows, {fmt(res['rows_per_s'], 0)} rows/s (p50)"),
        ("restarts by the supervisor: window, plc", f"{res['window_restarts']}, {res['plc_restarts']}",
         "; ".join(out.get("restart_lines", [])) or "no restart or hang line"),
        ("rows the running machine wrote", f"{out.get('own_audit_rows', '-')} audit, "
                                           f"{sum(out.get('own_journal_rows', {}).values())} journal",
         f"audit in time order: {out.get('own_audit_in_order', '-')}; journal kinds "
         + (", ".join(f"{k} {n}" for k, n in sorted(out.get("own_journal_rows", {}).items())) or "none")),
        ("tempering restore --out DIR, s", fmt(res["restore_s"], 2),
         f"exit {out.get('restore_exit', '-')}"),
        ("restored machine serves", str(res["restored_serves"]),
         f"'opc ua: serving' after {fmt(out.get('restored_serving_s'), 1)} s, Good read as the restored user "
         f"after {fmt(out.get('restored_good_read_s'), 1)} s"),
        ("tempering migrate config/legacy, s", fmt(res["migrate_s"], 2),
         f"exit {out.get('migrate_exit', '-')}; 2 scrypt hashes at the real cost (~0.5 s each)"),
    ]
    print(f"Backup, restore, migration: tempering run (twin over Modbus TCP, 100 ms scan, a batch running), "
          f"{out.get('cores')} cores")
    emit(rows, ("measure", "value", "note"), res, as_json=False)
    if error:
        print(f"error: {error}")
    if args.json:
        sys.stdout.flush()
        print(json.dumps(res, sort_keys=True, default=str))
    return 1 if error else 0


if __name__ == "__main__":
    raise SystemExit(main())
