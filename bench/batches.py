"""Batch records and reports: a 3-hour batch's record and report, listing 10,000 stored batches.

    python -m bench.batches [--hours H] [--batches N] [--png FILE] [--json]

One run:

- simulates a batch of ``--hours`` (3) of machine time in virtual time, as ``tempering
  simulate`` does (``Controller``, ``run_virtual``, the in-process twin, the default machine and
  its default recipe), started by an operator, with the operator trimming the fountain and
  holding and resuming the machine while pouring, stopped at the end; every snapshot goes
  through the historian's ``Sampler`` into a ``LocalStore`` (zone lines every second, as ``make
  run`` records them) and through the ``BatchRecorder``;
- ``record_s``: the seconds the ``BatchRecorder`` spent on the batch's snapshots (every scan's,
  108,000 at 100 ms for 3 hours): the cost of building the record. The recorder builds the
  record from the snapshots only (the history holds no alarms, actions or outputs);
- ``report_s``: the seconds ``opcua_server.report.render`` takes to draw the record over the
  stored history into a PNG (reading the four zones' series from the local store included);
- ``list_ms``: ``Records.batches()`` (every summary, newest first) over ``--batches`` (10,000)
  stored batches, median of 5 calls, on SQLite in a temporary directory and on PostgreSQL (a
  real server started as the tests start it, ``tests.conftest.PostgresServer``), side by side;
  ``save_ms``: the mean time of one ``Records.save_batch`` while filling them.

``--png FILE`` keeps the report of the simulated batch (``make`` does not; the README's
``docs/batch-report.png`` is made with it).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import emit, fmt
from historian.local import LocalStore
from historian.schema import Sampler
from opcua_server.batches import BatchRecorder, EnergyModel
from opcua_server.config import DEFAULT_CONFIG, load
from opcua_server.report import StoreHistory, render
from plc.channel import SnapshotChannel
from plc.commands import Hold, Resume, SetTrim, StartRecipe, Stop
from plc.program import Program
from plc.runtime import Controller, run_virtual
from twin import Twin
from twin.inprocess import InProcessTwinIo

#: The batch starts at a plausible morning (epoch s, 2026-03-02 06:00 UTC), not at 1970.
START_S = 1772431200.0
LINES_PER_WRITE = 5000


@dataclasses.dataclass
class Simulated:
    record: object
    record_s: float           # time spent in BatchRecorder.feed
    snapshots: int
    lines: int
    simulate_s: float         # wall time of the whole simulation


def simulate(store: LocalStore, hours: float = 3.0, seed: int = 0,
             config: str | Path = DEFAULT_CONFIG) -> Simulated:
    """One batch of ``hours`` machine time into ``store``; the record the recorder made."""
    cfg, book = load(config)
    program = Program.from_config(cfg, book)
    machine = cfg.machine.id
    twin = Twin(cfg.twin, seed=seed)
    io = InProcessTwinIo(twin, wall=lambda: START_S + twin.time_s)
    channel = SnapshotChannel()
    sub = channel.subscribe(maxlen=1_000_000)
    c = Controller(program, channel=channel)
    sampler = Sampler(machine, interval_s=cfg.historian.sample_interval_ms / 1000.0)
    recorder = BatchRecorder(machine, program, dict(book.recipes),
                             EnergyModel.from_twin(cfg.twin, program.limits.phase_count))
    pending: list[str] = []
    out = {"record": None, "record_s": 0.0, "snapshots": 0, "lines": 0}

    def observe(_result) -> None:
        for snap in sub.drain():
            pending.extend(sampler.lines(snap))
            t = time.perf_counter()
            record = recorder.feed(snap)
            out["record_s"] += time.perf_counter() - t
            out["snapshots"] += 1
            if record is not None:
                out["record"] = record
        if len(pending) >= LINES_PER_WRITE:
            flush()

    def flush() -> None:
        if pending:
            store.write_lines(pending)
            out["lines"] += len(pending)
            pending.clear()

    def run_until(t_end: float, t: float) -> float:
        return run_virtual(c, io, io.advance, max(1, round((t_end - t) / program.period_s)),
                           observe, start_s=t)

    started = time.perf_counter()
    end = START_S + hours * 3600.0
    t = START_S
    c.submit(StartRecipe(cfg.machine.default_recipe, user="anna"))
    released = None
    while t < end and released is None:
        t = run_until(t + 60.0, t)
        if c.state.pouring_released:
            released = t
    if released is not None:   # the operator's morning: a trim, then a short hold
        remaining = end - t
        t = run_until(t + 0.15 * remaining, t)
        c.submit(SetTrim("fountain", 0.2, user="anna"))
        t = run_until(t + 0.35 * remaining, t)
        c.submit(Hold(user="ben"))
        t = run_until(t + 240.0, t)
        c.submit(Resume(user="ben"))
        t = run_until(end - program.period_s, t)
    c.submit(Stop(user="anna"))
    t = run_until(t + 5 * program.period_s, t)
    flush()
    return Simulated(out["record"], out["record_s"], out["snapshots"], out["lines"],
                     time.perf_counter() - started)


def _many(record, n: int) -> list:
    """``n`` records like ``record``, one a batch id, a batch every 3 hours back in time."""
    machine = record.machine_id
    verdicts = ("PASS", "PASS", "PASS", "FAIL", "INCOMPLETE")
    out = []
    for i in range(n):
        shift = (n - i) * 3 * 3600.0
        out.append(dataclasses.replace(
            record, batch_id=f"{machine}-{i + 1:06d}", started_at=record.started_at - shift,
            ended_at=record.ended_at - shift, verdict=verdicts[i % len(verdicts)]))
    return out


def list_ms(url: str, records: list, saves: int = 200) -> tuple[float, float, int]:
    """(median ms of Records.batches() over ``records``, mean ms of one save_batch, rows
    listed). The first ``saves`` records go through ``save_batch`` (one transaction each, as the
    window stores a finished batch); the rest are inserted in one transaction with the very
    values save_batch writes (``records._batch_values``): 10,000 transactions with a sync each
    would only time the disk."""
    from sqlalchemy import insert

    from opcua_server.records import Records, _batch_values, batches

    r = Records(url)
    try:
        t = time.perf_counter()
        for rec in records[:saves]:
            r.save_batch(rec)
        save_ms = (time.perf_counter() - t) * 1000.0 / max(1, min(saves, len(records)))
        with r.engine.begin() as db:
            rest = [_batch_values(rec) for rec in records[saves:]]
            for i in range(0, len(rest), 1000):
                db.execute(insert(batches), rest[i:i + 1000])
        times, rows = [], 0
        for _ in range(5):
            t = time.perf_counter()
            rows = len(r.batches())
            times.append((time.perf_counter() - t) * 1000.0)
        return statistics.median(times), save_ms, rows
    finally:
        r.close()


def postgres_url():
    """A fresh database on a real PostgreSQL started the way the tests start it, in a directory
    of its own (as root it runs as ``postgres``, which must reach it): (url, server); (None,
    reason) when PostgreSQL cannot be started here."""
    directory = None
    try:
        from tests.conftest import PostgresServer, find_free_port
        directory = Path(tempfile.mkdtemp(prefix="bench-batches-pg-"))
        server = PostgresServer(directory, find_free_port())
        server.start()
    except BaseException as e:          # pytest.fail() raises an outcome, not an Exception
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            raise
        return None, f"PostgreSQL not started: {e}"
    return server.url(server.create_database()), server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=3.0, help="machine time of the batch")
    ap.add_argument("--batches", type=int, default=10_000, help="stored batches to list")
    ap.add_argument("--png", metavar="FILE", help="keep the batch's PNG report here")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-batches-"))
    server = None
    try:
        # Retention far beyond the simulated morning: the store would prune it as too old.
        store = LocalStore(work / "history.sqlite", retention_days=36500)
        sim = simulate(store, args.hours)
        if sim.record is None:
            print("the simulated batch produced no record", file=sys.stderr)
            return 1
        history = StoreHistory(store, sim.record.machine_id, sim.record.batch_id)
        png = Path(args.png) if args.png else work / "report.png"
        t = time.perf_counter()
        render(sim.record, history, png)
        report_s = time.perf_counter() - t
        store.close()

        many = _many(sim.record, args.batches)
        sqlite_ms, sqlite_save_ms, sqlite_rows = list_ms(f"sqlite:///{work / 'records.db'}", many)
        pg_url, server = postgres_url()
        pg = list_ms(pg_url, many) if pg_url else (None, None, 0)
        if pg_url is None:
            print(server, file=sys.stderr)
            server = None
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.directory, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    rec = sim.record
    result = {"hours": args.hours, "snapshots": sim.snapshots, "history_lines": sim.lines,
              "simulate_s": round(sim.simulate_s, 2), "record_s": round(sim.record_s, 3),
              "record_us_per_snapshot": round(sim.record_s / max(1, sim.snapshots) * 1e6, 2),
              "report_s": round(report_s, 3), "verdict": rec.verdict, "batches": args.batches,
              "list_ms_sqlite": round(sqlite_ms, 1), "list_rows_sqlite": sqlite_rows,
              "save_ms_sqlite": round(sqlite_save_ms, 2),
              "list_ms_postgresql": None if pg[0] is None else round(pg[0], 1),
              "list_rows_postgresql": pg[2],
              "save_ms_postgresql": None if pg[1] is None else round(pg[1], 2)}
    emit([(f"record_s: BatchRecorder over a {args.hours:g} h batch ({sim.snapshots} snapshots)",
           fmt(sim.record_s), f"{result['record_us_per_snapshot']} us/snapshot"),
          (f"report_s: PNG report from the local store ({sim.lines} zone lines)", fmt(report_s),
           f"verdict {rec.verdict}"),
          (f"list_ms: Records.batches() over {args.batches} batches, SQLite", fmt(sqlite_ms, 1),
           f"{sqlite_rows} rows; save_batch {fmt(sqlite_save_ms, 2)} ms"),
          (f"list_ms: Records.batches() over {args.batches} batches, PostgreSQL", fmt(pg[0], 1),
           f"{pg[2]} rows; save_batch {fmt(pg[1], 2)} ms")],
         ("measure", "value", "note"), result, args.json)
    if args.png:
        print(f"report: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
