"""The ``tempering`` command: the application's composition root.

    tempering run [--config FILE] [--recipe ID] [--no-start] [--period-ms N] [--duration-s S]
                  [--plant modbus-twin|modbus|inprocess] [--priority auto|realtime|nice|none]
    tempering check-config [FILE]
    tempering simulate [--config FILE] [--recipe ID] [--hours H] [--no-record]
    tempering twin [--config FILE] [--tcp HOST:PORT] [--rtu DEVICE] [--baud N] [--parity P]
                   [--stop-bits N] [--initial-temp-c T] [--seed N]
    tempering import-mapping CSV [-o OUT] [--link NAME] [--unit N]
    tempering users add NAME --role ROLE [--password-stdin] | list | passwd NAME [--password-stdin]
                    | role NAME ROLE | delete NAME                 [--config FILE] [--data-dir DIR]
    tempering pki list | trust THUMBPRINT|FILE | reject THUMBPRINT|FILE [--config FILE] [--data-dir DIR]
    tempering export-nodeset FILE [--config FILE]
    tempering alarms journal [--since T] [--until T] [--alarm ID] [--batch ID] [--limit N] [--json]
                             [--config FILE] [--data-dir DIR]
    tempering batches list [--since T] [--until T] [--verdict PASS|FAIL|INCOMPLETE] [--limit N] [--json]
                    | show ID [--json] | export --csv FILE [--since T] [--until T] [--verdict V]
                                                                  [--config FILE] [--data-dir DIR]
    tempering batches report ID -o FILE.png|.pdf|.html             [--config FILE] [--data-dir DIR]
    tempering autotune ZONE... [--recipe ID] [--amplitude PCT] [--seed N] [--write FILE] [--json]
                                                                   [--config FILE]
    tempering autotune ZONE... --server opc.tcp://HOST:PORT --user NAME [--amplitude PCT]
                               [--accept | --accept-pending | --reject-pending] [--json]
                                                                   [--config FILE] [--data-dir DIR]
    tempering backup FILE [--include-keys]                         [--config FILE] [--data-dir DIR]
    tempering restore FILE [--config FILE | --out DIR] [--force] [--database-url URL]

``run`` starts and supervises the PLC process and the plant-window process (``supervisor``)
and, by default, the twin as a Modbus TCP slave on loopback in a process of its own; ``plc``
and ``window`` are those processes (started by ``run``, not by hand). Ctrl-C (or SIGTERM, or
``--duration-s``) stops it cleanly: one last scan ends the batch and the outputs go safe. ``check-config`` validates a machine file and its recipes and exits 1 with one
message per problem. ``simulate`` runs a whole tempering cycle in virtual time and prints it.
``twin`` runs the twin in real time as a Modbus slave (TCP and/or RTU) on the config's register
map until SIGINT/SIGTERM. ``import-mapping`` turns a legacy Mapping.csv into a register-map
file (stdout without ``-o``); on any problem it prints one message per problem, exits 1 and
writes nothing. ``users`` and ``pki`` manage the OPC UA server's users (in its records database)
and certificates (``<opcua.data_dir>/pki``: trust a client certificate the server rejected);
passwords are read from standard input (``--password-stdin``, one line) or asked twice on the
terminal, never taken from the command line. ``export-nodeset`` builds the machine's OPC UA
address space (in a server that is set up but never started: no PLC, no sockets) and writes its
instances as a NodeSet2 file that requires the types model ``nodesets/Tempering.Types.NodeSet2.xml``.
``alarms journal`` prints the alarm journal of the records database (every alarm transition and
PLC start, oldest first) as a table, or with ``--json`` one JSON object per line with every
field; ``T`` is an ISO 8601 time (UTC unless it has an offset) or a time ago (``90s``, ``10m``,
``2h``, ``1d``); ``--limit N`` keeps the newest N. Bad arguments: a message and exit code 2.
``batches`` reads the batch records of the records database: ``list`` one line a batch (oldest
first; the same T, ``--limit N`` the newest N) or ``--json`` one object a line; ``show`` one
whole record (header with the verdict and its reasons, the checks, phases, per-zone figures,
interruptions, alarms, operator actions, energy) or ``--json`` the record; ``export`` one CSV
row a batch (a header row; UTF-8, ISO 8601 UTC times, the summary and the figures of the
historian's ``batch`` line), written atomically. ``report`` draws one batch
(``opcua_server.report``: the zones over time, phases, pouring band, alarms and actions, the
verdict) from its record and the zone history of the config's historian sink (the local store,
or InfluxDB), as a PNG, a PDF or an HTML page, and prints the file's path. Bad arguments (an
unknown batch, an empty interval, a file that cannot be written): a message, exit code 2,
nothing written.
``autotune`` identifies zones and proposes their PID gains (``plc.autotune``). Without
``--server``, on the machine's twin in virtual time (``twin.autotune``: a batch of the recipe
heated and held, the zones one after the other): a table of the models, the proposed and the
previous gains and the predicted figures; ``--write FILE`` puts the proposed gains into that
machine file (only those numbers change). With ``--server``, on the running machine over OPC UA
(the zone's ``Autotune`` object; a technician; the password from ``TEMPERING_PASSWORD``, else
asked): Start, the progress every second (Ctrl-C aborts the experiment), the proposal, then
Accept with ``--accept`` or when confirmed on a terminal (no terminal: left pending for
``--accept-pending`` / ``--reject-pending``). The command line's client certificate is made on
first use in ``<opcua.data_dir>/cli/own`` and trusted in the server's PKI when that is here and
writable. Exit 0 when every zone got a proposal, 1 otherwise (with the reason), 2 for bad
arguments (an unknown zone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from opcua_server.config import DEFAULT_CONFIG, load
from plc.commands import StartRecipe, Stop
from plc.config import ConfigError


def _load(path):
    """The validated config, or None after printing one message per problem to stderr."""
    try:
        return load(path)
    except ConfigError as e:
        print("\n".join(e.messages), file=sys.stderr)
        return None


def cmd_check_config(args) -> int:
    path = args.file or DEFAULT_CONFIG
    loaded = _load(path)
    if loaded is None:
        return 1
    cfg, book = loaded
    fieldbus = cfg.fieldbus
    field_io = (f", fieldbus: {len(fieldbus.links)} link(s), {len(fieldbus.points)} points"
                if fieldbus else "")
    print(f"{path}: ok (machine {cfg.machine.id}, {len(book)} recipes: {', '.join(book.ids)}, "
          f"scan period {cfg.period_ms} ms{field_io})")
    return 0


def cmd_run(args) -> int:
    loaded = _load(args.config)
    if loaded is None:
        return 1
    cfg, book = loaded
    if args.recipe and args.recipe not in book:
        print(f"unknown recipe {args.recipe!r} (known: {', '.join(book.ids)})", file=sys.stderr)
        return 2
    from opcua_server.records import SchemaTooNew, check_schema
    try:                              # a newer program's records: refused before anything starts
        check_schema(cfg.opcua.records_url)
    except SchemaTooNew as e:
        print(f"tempering run: {e}", file=sys.stderr)
        return 2
    from .supervisor import run
    return asyncio.run(run(args, cfg))


def cmd_plc(args) -> int:
    loaded = _load(args.config)
    if loaded is None:
        return 1
    from .plc_process import main as plc_main
    return plc_main(args, *loaded)


def cmd_window(args) -> int:
    loaded = _load(args.config)
    if loaded is None:
        return 1
    from .window_process import main as window_main
    return window_main(args, *loaded)


SIMULATE_REPORTS = "var/reports"      # where simulate draws its batch's report (working directory)


def cmd_simulate(args) -> int:
    """A whole cycle on the twin in virtual time, its machine time starting now: the batch
    record and verdict go to the records database and the zone history to the historian's local
    store, as a real batch's would, and its report is drawn in SIMULATE_REPORTS (``--no-record``:
    none of them)."""
    from historian.local import LocalStore
    from historian.schema import Sampler
    from opcua_server.batches import BatchRecorder, EnergyModel
    from plc.program import Program
    from plc.runtime import Controller, run_virtual
    from twin import Twin
    from twin.inprocess import InProcessTwinIo

    loaded = _load(args.config)
    if loaded is None:
        return 1
    cfg, book = loaded
    program = Program.from_config(cfg, book)
    recipe = args.recipe or cfg.machine.default_recipe
    if recipe not in program.recipes:
        print(f"unknown recipe {recipe!r} (known: {', '.join(sorted(program.recipes))})", file=sys.stderr)
        return 2
    start_wall = time.time()
    twin = Twin(cfg.twin, seed=args.seed)
    io = InProcessTwinIo(twin, wall=lambda: start_wall + twin.time_s)
    c = Controller(program)
    records = store = None
    if not args.no_record:
        from opcua_server.server import open_records
        records, _ = open_records(cfg.opcua, book, machine=cfg.machine.id)
        c.set_batch_floor(records.next_batch_seq(cfg.machine.id) - 1)
        if cfg.historian.sink.kind == "local":
            store = LocalStore(Path(cfg.historian.sink.path), cfg.historian.sink.retention_days)
    sampler = Sampler(cfg.machine.id, cfg.historian.sample_interval_ms / 1000.0, cfg.historian.deadband_c,
                      cfg.historian.max_silence_s)
    recorder = BatchRecorder(cfg.machine.id, program, dict(book.recipes),
                             EnergyModel.from_twin(cfg.twin, program.limits.phase_count))
    from plc.channel import SnapshotChannel
    c.channel = SnapshotChannel()
    sub = c.channel.subscribe(maxlen=100_000)
    done: list = []
    c.submit(StartRecipe(recipe, user="simulate"))
    released: list[float] = []

    def show(r) -> None:
        for e in r.events:
            if e.kind in ("phase", "pouring_released", "trip", "command_refused", "batch_end"):
                print(f"{twin.time_s:8.1f} s  {e.kind:<17} {e.message}   "
                      f"(pouring point {twin.pouring_temp_c():.2f} degC)")
            if e.kind == "pouring_released":
                released.append(twin.time_s)

    def observe() -> None:
        lines: list[str] = []
        for snap in sub.drain():
            lines += sampler.lines(snap)
            record = recorder.feed(snap)
            if record is not None:
                done.append(record)
        if store is not None and lines:
            store.write_lines(lines)

    t0 = time.perf_counter()
    step = int(60 / program.period_s)
    t, limit = start_wall, start_wall + args.hours * 3600
    while t < limit and not released:
        t = run_virtual(c, io, io.advance, step, show, start_s=t)
        observe()
    if released:  # hold a quarter of an hour of pouring, then stop
        t = run_virtual(c, io, io.advance, int(900 / program.period_s), show, start_s=t)
        observe()
        c.submit(Stop(user="simulate"))
        t = run_virtual(c, io, io.advance, 1, show, start_s=t)
        observe()
    wall = time.perf_counter() - t0
    print(f"simulated {(t - start_wall) / 60:.1f} min of machine time in {wall:.1f} s "
          f"({(t - start_wall) / wall:.0f}x real time), final phase {c.state.phase.value}")
    for record in done:
        print(f"batch {record.batch_id} ({record.recipe_id}) {record.outcome}: {record.verdict}"
              + (f": {'; '.join(record.reasons)}" if record.reasons else ""))
        if records is not None:
            records.save_batch(record)
            print(f"  recorded in {cfg.opcua.records_url}")
        if store is not None:
            from opcua_server.report import StoreHistory, render
            Path(SIMULATE_REPORTS).mkdir(parents=True, exist_ok=True)
            out = render(record, StoreHistory(store, cfg.machine.id, record.batch_id),
                         Path(SIMULATE_REPORTS) / f"{record.batch_id}.png")
            print(f"  report: {out} (again: tempering batches report {record.batch_id} -o FILE)")
    if store is not None:
        store.close()
    if records is not None:
        records.close()
    return 0 if released else 1


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def cmd_twin(args) -> int:
    from twin.serve import Endpoints, serve

    loaded = _load(args.config)
    if loaded is None:
        return 1
    cfg, _ = loaded
    want = Endpoints(args.tcp, args.rtu, args.baud, args.parity, args.stop_bits)
    try:
        asyncio.run(serve(cfg, want, seed=args.seed, initial_temp_c=args.initial_temp_c))
    except (ValueError, OSError) as e:
        print(f"tempering twin: {e}", file=sys.stderr)
        return 2
    return 0


def _write_atomic(out: Path, text: str, newline: str | None = None) -> None:
    """``text`` into ``out`` atomically: a reader sees the old file or the whole new one, never
    a part (a temporary file beside it, then ``os.replace``). OSError if it cannot."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def cmd_import_mapping(args) -> int:
    from plc.modbus.legacy import dump_register_map, import_mapping

    try:
        points = import_mapping(args.csv, default_link=args.link, default_unit=args.unit)
    except ConfigError as e:
        print("\n".join(e.messages), file=sys.stderr)
        return 1
    text = dump_register_map(points, source=args.csv)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.output)
    try:
        _write_atomic(out, text)
    except OSError as e:
        print(f"{out}: cannot write: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"{out}: {len(points)} points from {args.csv}")
    return 0


def _opcua_settings(args, cfg=None):
    """The config's ``opcua`` section (of ``cfg``, else of the loaded ``--config``), ``--data-dir``
    applied; None after printing problems."""
    loaded = (cfg,) if cfg is not None else _load(args.config)
    if loaded is None:
        return None
    settings = loaded[0].opcua
    return settings.model_copy(update={"data_dir": args.data_dir}) if args.data_dir else settings


def _read_password(args) -> str | None:
    """A new password: one line of stdin with --password-stdin, else asked twice on the
    terminal. None after printing why not."""
    if args.password_stdin:
        return sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not sys.stdin.isatty():
        print("tempering users: no terminal to ask the password on; give it on standard input "
              "with --password-stdin", file=sys.stderr)
        return None
    import getpass
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        print("tempering users: the two passwords differ; nothing changed", file=sys.stderr)
        return None
    return first


def cmd_users(args) -> int:
    from opcua_server.records import RecordsError

    records = _records(args)          # users are plant-wide: every machine on the database's
    if records is None:
        return 1
    try:
        if args.action == "list":
            users = records.list_users()
            pending = records.must_change_users()
            for name, role in users:
                print(f"{name:<32} {role}" + ("  (must set a new password)" if name in pending else ""))
            if not users:
                print("no users yet (tempering users add NAME --role admin)")
            return 0
        known = records.role_of(args.name) is not None
        if args.action == "add" and known:
            print(f"tempering users: user {args.name!r} exists already", file=sys.stderr)
            return 1
        if args.action != "add" and not known:
            print(f"tempering users: no such user {args.name!r}", file=sys.stderr)
            return 1
        if args.action in ("add", "passwd"):
            password = _read_password(args)
            if password is None:
                return 1
            if args.action == "add":
                records.add_user(args.name, password, args.role)
                print(f"user {args.name} added (role {args.role})")
            else:
                records.set_password(args.name, password)     # and no new one is asked for any more
                print(f"password of {args.name} changed")
        elif args.action == "role":
            records.set_role(args.name, args.role)
            print(f"{args.name} is now {args.role}")
        else:
            records.delete_user(args.name)
            print(f"user {args.name} deleted")
        return 0
    except RecordsError as e:
        print(f"tempering users: {e}", file=sys.stderr)
        return 1
    finally:
        records.close()


def cmd_pki(args) -> int:
    from opcua_server.security import Pki, PkiError

    settings = _opcua_settings(args)
    if settings is None:
        return 1
    pki = Pki(settings.pki_dir)
    try:
        if args.action == "list":
            entries = pki.list()
            if not any(e.state == "own" for e in entries):
                print(f"own      (none yet: made on the server's first start in {pki.own_dir})")
            for e in entries:
                print(f"{e.state:<8} {e.thumbprint}  {e.subject}  {e.path}")
            return 0
        entry = pki.trust(args.id) if args.action == "trust" else pki.reject(args.id)
        print(f"{entry.state} {entry.thumbprint}  {entry.subject}  {entry.path}")
        return 0
    except PkiError as e:
        print(f"tempering pki: {e}", file=sys.stderr)
        return 1


_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _journal_time(text: str) -> datetime:
    """``--since``/``--until``: ISO 8601 (UTC unless it has an offset) or a time ago (10m)."""
    ago = _AGO.match(text.strip())
    if ago:
        return datetime.now(timezone.utc) - timedelta(seconds=float(ago[1]) * _UNIT_S[ago[2]])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time such as 2026-03-01T09:30 (UTC unless it has an offset) or "
            f"a time ago such as 90s, 10m, 2h, 1d; got {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return n


JOURNAL_COLUMNS = ("time", "alarm", "kind", "state", "user", "comment", "message")


def _journal_table(rows) -> list[str]:
    """The journal as text lines: one header, one line a row, columns as wide as their widest
    cell (the message last, as long as it is)."""
    return _table(JOURNAL_COLUMNS, [
        (r.time.strftime("%Y-%m-%d %H:%M:%S.") + f"{r.time.microsecond // 1000:03d}Z",
         r.alarm_id or "-", r.kind, r.state or "-", r.user or "-", r.comment or "-", r.message)
        for r in rows])


def _table(header, cells) -> list[str]:
    """Text lines: the header, one line a row, columns as wide as their widest cell."""
    rows = [tuple(header), *(tuple(c) for c in cells)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _empty_interval(cmd: str, since: datetime | None, until: datetime | None) -> bool:
    """True (after saying so) if ``--since`` is not before ``--until``."""
    if since and until and since >= until:
        print(f"tempering {cmd}: --since ({since.isoformat()}) must be before --until "
              f"({until.isoformat()})", file=sys.stderr)
        return True
    return False


def cmd_alarms(args) -> int:
    if _empty_interval("alarms journal", args.since, args.until):
        return 2
    records = _records(args)
    if records is None:
        return 1
    try:
        rows = records.alarm_journal(since=args.since, until=args.until, alarm_id=args.alarm,
                                     batch_id=args.batch, limit=args.limit, newest=True)
    finally:
        records.close()
    if args.json:
        for r in rows:
            print(json.dumps(r.as_dict()))
    elif rows:
        print("\n".join(_journal_table(rows)))
    else:
        print("no alarm journal entries" + (" match" if any(
            v is not None for v in (args.since, args.until, args.alarm, args.batch)) else " yet"))
    return 0


# --------------------------------------------------------------------------- batch records


def _records(args, every_machine: bool = False):
    """The records database of the config (``--data-dir`` applied) as the config's machine sees
    it (``--all-machines`` or ``every_machine``: every machine's rows); None after printing why."""
    from opcua_server.records import Records, SchemaTooNew

    loaded = _load(args.config)
    if loaded is None:
        return None
    settings = _opcua_settings(args, loaded[0])
    machine = None if every_machine or getattr(args, "all_machines", False) else loaded[0].machine.id
    try:
        return Records(settings.records_url, machine=machine, recipe_library=settings.recipe_library)
    except SchemaTooNew as e:
        print(f"tempering {args.cmd}: {e}", file=sys.stderr)
        return None


def _utc(time_s: float, sep: str = " ") -> str:
    """``2026-03-01 09:30:00Z``: seconds since the epoch as ISO 8601 UTC, to the second."""
    return (datetime.fromtimestamp(time_s, timezone.utc).isoformat(sep=sep, timespec="seconds")
            .replace("+00:00", "Z"))


def _hms(seconds: float) -> str:
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


BATCH_COLUMNS = ("batch", "recipe", "started", "duration", "outcome", "verdict", "reasons")


def cmd_batches_list(args) -> int:
    if _empty_interval("batches list", args.since, args.until):
        return 2
    records = _records(args)
    if records is None:
        return 1
    try:
        rows = records.batches(since=args.since, until=args.until, verdict=args.verdict, limit=args.limit)
    finally:
        records.close()
    if args.json:
        for r in rows:
            print(json.dumps(r.as_dict(), ensure_ascii=False))
    elif rows:
        print("\n".join(_table(BATCH_COLUMNS, [
            (r.batch_id, r.recipe_id, _utc(r.started_at), _hms(r.duration_s), r.outcome, r.verdict,
             "; ".join(r.reasons) or "-") for r in rows])))
    else:
        print("no batch records" + (" match" if any(
            v is not None for v in (args.since, args.until, args.verdict)) else " yet"))
    return 0


def _record_text(rec) -> list[str]:
    """A batch record for a reader: the header with the verdict and its reasons, then the
    checks, phases, per-zone figures, interruptions, alarms, operator actions and energy."""
    name = rec.recipe.get("name") if isinstance(rec.recipe, dict) else None
    out = [f"batch {rec.batch_id}   machine {rec.machine_id}   recipe {rec.recipe_id}"
           + (f" ({name})" if name else ""),
           f"started {_utc(rec.started_at)} by {rec.started_by or '?'}, ended {_utc(rec.ended_at)} "
           f"({_hms(rec.ended_at - rec.started_at)}): {rec.outcome}"
           + (f", first-out {rec.first_out}" if rec.first_out else ""),
           f"verdict {rec.verdict}"]
    out += [f"  - {reason}" for reason in rec.reasons]
    if rec.checks:
        out += ["", "checks"] + ["  " + line for line in _table(
            ("", "criterion", "figure"), [("ok" if c.passed else "FAILED", c.name, c.text) for c in rec.checks])]
    out += ["", "phases"] + ["  " + line for line in _table(
        ("phase", "start", "end", "running"),
        [(p.phase, _utc(p.start), _utc(p.end), _hms(p.duration_s)) for p in rec.phases])]
    if rec.zones:
        out += ["", "zones (°C; outside: time off the set-point by more than the tolerance)"]
        out += ["  " + line for line in _table(
            ("phase", "zone", "samples", "min", "max", "mean", "std", "outside", "max dev K"),
            [(z.phase, z.zone, str(z.samples), _num(z.min_c, 2), _num(z.max_c, 2), _num(z.mean_c, 2),
              _num(z.std_c, 2), _hms(z.outside_s), _num(z.max_dev_k, 2)) for z in rec.zones])]
    if rec.interruptions:
        out += ["", "interruptions"] + ["  " + line for line in _table(
            ("from", "to", "gap", "phase"),
            [(_utc(i.start), _utc(i.end), _hms(i.gap_s), i.phase) for i in rec.interruptions])]
    out += ["", "alarms" + ("" if rec.alarms else ": none")]
    if rec.alarms:
        out += ["  " + line for line in _table(("time", "alarm", "priority", "message"), [
            (_utc(a.time), a.alarm_id, str(a.priority), a.message) for a in rec.alarms])]
    out += ["", "operator actions" + ("" if rec.actions else ": none")]
    if rec.actions:
        out += ["  " + line for line in _table(("time", "user", "action", "detail"), [
            (_utc(a.time), a.user or "-", a.action, a.detail or "-") for a in rec.actions])]
    per_kg = f", {rec.energy_kwh_per_kg:.3f} kWh/kg" if rec.energy_kwh_per_kg is not None else ""
    out += ["", f"energy {rec.energy_kwh:.2f} kWh (rated)"
            + (f", {rec.metered_kwh:.2f} kWh metered" if rec.metered_kwh is not None else "")
            + (f", {rec.chocolate_kg:g} kg of chocolate" if rec.chocolate_kg is not None else "") + per_kg]
    if rec.criteria:
        out.append("judged by " + ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}"
                                            for k, v in rec.criteria.items()))
    return out


def _batch_record(args, command: str):
    """The record ``args.id`` from the records database of the config: (record, exit code) — the
    record, or None and 1 (no database) or 2 (no such batch, said on stderr). Any machine's: a
    batch id names its machine (``<machine>-NNNNNN``)."""
    records = _records(args, every_machine=True)
    if records is None:
        return None, 1
    try:
        rec = records.batch(args.id)
    finally:
        records.close()
    if rec is None:
        print(f"tempering batches {command}: no batch record {args.id!r} (tempering batches list "
              f"shows the batches)", file=sys.stderr)
        return None, 2
    return rec, 0


def cmd_batches_show(args) -> int:
    rec, code = _batch_record(args, "show")
    if rec is None:
        return code
    print(json.dumps(rec.to_dict(), ensure_ascii=False) if args.json else "\n".join(_record_text(rec)))
    return 0


#: ``batches export``'s columns: the summary, then the figures of the historian's batch line.
EXPORT_COLUMNS = ("batch_id", "machine", "recipe_id", "started_at", "ended_at", "started_by",
                  "outcome", "verdict", "reasons", "duration_s", "heating_s", "cooling_s",
                  "pouring_s", "pouring_in_band_share", "energy_kwh", "metered_kwh",
                  "chocolate_kg", "energy_kwh_per_kg", "alarms", "interruptions", "first_out")


def _export_row(rec) -> list[str]:
    from historian.schema import batch_fields

    figures = batch_fields(rec)
    values = {**figures, "batch_id": rec.batch_id, "machine": rec.machine_id,
              "recipe_id": rec.recipe_id, "started_at": _utc(rec.started_at, "T"),
              "ended_at": _utc(rec.ended_at, "T"), "started_by": rec.started_by,
              "outcome": rec.outcome, "verdict": rec.verdict, "reasons": "; ".join(rec.reasons),
              "metered_kwh": rec.metered_kwh, "chocolate_kg": rec.chocolate_kg,
              "first_out": rec.first_out}
    return ["" if values.get(k) is None else
            (format(round(values[k], 4), "f").rstrip("0").rstrip(".") if isinstance(values[k], float)
             else str(values[k]))
            for k in EXPORT_COLUMNS]


def cmd_batches_export(args) -> int:
    import csv
    import io

    if _empty_interval("batches export", args.since, args.until):
        return 2
    out = Path(args.csv)
    if out.is_dir() or not (out.parent if str(out.parent) else Path(".")).is_dir():
        print(f"tempering batches export: {out}: cannot write: "
              + ("it is a directory" if out.is_dir() else f"no directory {out.parent}"), file=sys.stderr)
        return 2
    records = _records(args)
    if records is None:
        return 1
    try:
        summaries = records.batches(since=args.since, until=args.until, verdict=args.verdict)
        rows = [rec for rec in (records.batch(s.batch_id) for s in summaries) if rec is not None]
    finally:
        records.close()
    text = io.StringIO()
    writer = csv.writer(text)               # RFC 4180: CRLF line ends, quotes where needed
    writer.writerow(EXPORT_COLUMNS)
    writer.writerows(_export_row(rec) for rec in rows)
    try:
        _write_atomic(out, text.getvalue(), newline="")
    except OSError as e:
        print(f"tempering batches export: {out}: cannot write: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"{out}: {len(rows)} batch{'es' if len(rows) != 1 else ''}")
    return 0


def _batches_parser(sub, where: argparse.ArgumentParser):
    """``tempering batches ...``; returns its subparsers, where each command sets its own
    ``func`` (list, show, export here; more can join, e.g. report)."""
    from opcua_server.batches import VERDICTS     # pure: the PLC process parses this command line too

    b = sub.add_parser("batches", help="the batch records: list, show, export")
    actions = b.add_subparsers(dest="action", required=True)
    when = argparse.ArgumentParser(add_help=False)
    when.add_argument("--since", type=_journal_time, metavar="T",
                      help="batches started from this time on: ISO 8601 (UTC unless it has an "
                           "offset) or a time ago (10m, 2h, 1d)")
    when.add_argument("--until", type=_journal_time, metavar="T", help="started before this time (same forms)")
    when.add_argument("--verdict", choices=VERDICTS, help="only the batches with this verdict")
    when.add_argument("--all-machines", action="store_true",
                      help="every machine's batches in the database (default: the config's machine's)")
    x = actions.add_parser("list", parents=[where, when], help="list the batches, oldest first")
    x.add_argument("--limit", type=_positive_int, metavar="N", help="only the newest N batches")
    x.add_argument("--json", action="store_true", help="one JSON object per line")
    x.set_defaults(func=cmd_batches_list)
    x = actions.add_parser("show", parents=[where], help="one batch record, whole")
    x.add_argument("id", metavar="ID", help="the batch id (e.g. tempering-01-000042)")
    x.add_argument("--json", action="store_true", help="the record as one JSON object")
    x.set_defaults(func=cmd_batches_show)
    x = actions.add_parser("export", parents=[where, when], help="the batches as a CSV file, one row each")
    x.add_argument("--csv", required=True, metavar="FILE", help="the CSV file to write")
    x.set_defaults(func=cmd_batches_export)
    return actions


def cmd_batches_report(args) -> int:
    from opcua_server.report import HistoryUnavailable, history_for, render

    out = Path(args.output)
    if out.suffix.lower() not in (".png", ".pdf", ".html", ".htm"):
        print(f"tempering batches report: {out}: the report is a .png, .pdf or .html file",
              file=sys.stderr)
        return 2
    if not out.parent.is_dir():
        print(f"tempering batches report: {out}: cannot write: no directory {out.parent}",
              file=sys.stderr)
        return 2
    loaded = _load(args.config)
    if loaded is None:
        return 1
    rec, code = _batch_record(args, "report")
    if rec is None:
        return code
    history = history_for(loaded[0].historian.sink, rec.machine_id, rec.batch_id)
    try:
        render(rec, history, out)
    except HistoryUnavailable as e:
        print(f"tempering batches report: the zone history: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"tempering batches report: {out}: cannot write: {e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        for owner in (history, getattr(history, "store", None)):   # a client, a store opened here
            if hasattr(owner, "close"):
                owner.close()
    print(out)
    return 0


def _report_parser(actions, where: argparse.ArgumentParser) -> None:
    """``tempering batches report ID -o FILE``."""
    x = actions.add_parser("report", parents=[where],
                           help="draw one batch: a PNG, PDF or HTML page from its record and zone history")
    x.add_argument("id", metavar="ID", help="the batch id (e.g. tempering-01-000042)")
    x.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="the report to write: FILE.png, FILE.pdf or FILE.html")
    x.set_defaults(func=cmd_batches_report)


async def _export_nodeset(path: Path, cfg, book) -> int:
    from asyncua import Server

    from plc.interlocks import condition_ids
    from plc.program import Program

    from opcua_server.model import MACHINE_URI_PREFIX, build_machine, export_nodeset

    server = Server()
    await server.init()
    links = tuple(cfg.fieldbus.links) if cfg.fieldbus is not None else ()
    nodes = await build_machine(server, cfg, book, condition_ids(Program.from_config(cfg, book)), links)
    await export_nodeset(server, path)
    count = sum(1 for nid in server.iserver.aspace.keys() if nid.NamespaceIndex == nodes.namespace_index)
    print(f"{path}: {count} nodes of machine {cfg.machine.id} ({MACHINE_URI_PREFIX}{cfg.machine.id}; "
          f"{len(book)} recipes, {len(nodes.conditions)} alarms, {len(links)} link(s))")
    return 0


def cmd_export_nodeset(args) -> int:
    loaded = _load(args.config)
    if loaded is None:
        return 1
    cfg, book = loaded
    path = Path(args.file)
    if not path.parent.is_dir():
        print(f"{path}: cannot write: no directory {path.parent}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_export_nodeset(path, cfg, book))
    except OSError as e:
        print(f"{path}: cannot write: {e.strerror or e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="tempering", description="Soft-PLC of a chocolate tempering machine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="machine file (default: the embedded default machine)")
    common.add_argument("--period-ms", type=int, help="scan period override, ms")
    common.add_argument("--recipe", help="recipe to start (default: the machine's default recipe)")
    plant = argparse.ArgumentParser(add_help=False)
    plant.add_argument("--state-file", help="persisted PLC state (default: machine.state_file)")
    plant.add_argument("--initial-temp-c", type=float, help="twin's starting temperature (default: ambient, solid)")
    plant.add_argument("--seed", type=int, default=0, help="twin's noise seed")
    plant.add_argument("--priority", choices=("auto", "realtime", "nice", "none"), default="auto",
                       help="scheduling of the PLC process: auto (real time SCHED_RR if allowed, "
                            "else nice -10), realtime, nice, none")
    plant.add_argument("--scan-log", metavar="FILE", help="append each scan's (time, lateness, logic "
                                                          "time) to FILE (benchmarks)")
    plant.add_argument("--window-lost-s", type=float, default=3.0,
                       help="plant window silent this long: the PLC raises plc.window")
    window = argparse.ArgumentParser(add_help=False)
    window.add_argument("--no-history", action="store_true", help="run without the historian")
    window.add_argument("--no-opcua", action="store_true", help="run without the OPC UA server")
    r = sub.add_parser("run", parents=[common, plant, window],
                       help="run the machine: PLC and plant-window processes, the twin, a live view")
    r.add_argument("--no-start", action="store_true", help="do not start a recipe (press s to start)")
    r.add_argument("--duration-s", type=float, help="stop cleanly after this many seconds")
    r.add_argument("--plant", choices=("modbus-twin", "modbus", "inprocess"),
                   help="modbus-twin: the twin as a Modbus TCP slave on loopback, a process of its "
                        "own (the default with one Modbus TCP link); modbus: the links only (a real "
                        "machine, or `tempering twin`); inprocess: the twin in the PLC process, no "
                        "Modbus (the default otherwise: no fieldbus, or RTU lines)")
    r.add_argument("--plc-hang-s", type=float, default=2.0,
                   help="PLC heartbeat silent this long: the supervisor kills and restarts it")
    r.add_argument("--window-hang-s", type=float, default=5.0,
                   help="window heartbeat silent this long: the supervisor kills and restarts it")
    r.add_argument("--window-nice", type=int, default=10,
                   help="the plant window runs this much below normal priority (0: normal)")
    inner = argparse.ArgumentParser(add_help=False)
    inner.add_argument("--socket", required=True, help="the PLC's Unix socket for the plant window")
    inner.add_argument("--heartbeat-fd", type=int, help="pipe to the supervisor")
    inner.add_argument("--parent-pid", type=int, help="the supervisor (this process dies with it)")
    x = sub.add_parser("plc", parents=[common, plant, inner],
                       help="(started by `tempering run`) the PLC process")
    x.add_argument("--plant", choices=("modbus", "inprocess"), default="modbus")
    x.add_argument("--duration-s", type=float, help=argparse.SUPPRESS)
    x.set_defaults(func=cmd_plc)
    x = sub.add_parser("window", parents=[common, window, inner],
                       help="(started by `tempering run`) the plant-window process")
    x.add_argument("--nice", type=int, default=0, help="lower the process's priority by this much")
    x.add_argument("--start", metavar="RECIPE", help="start this recipe once the PLC is there")
    x.set_defaults(func=cmd_window)
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("check-config", help="validate a machine file and its recipes")
    c.add_argument("file", nargs="?", help="machine file (default: the embedded default machine)")
    c.set_defaults(func=cmd_check_config)
    s = sub.add_parser("simulate", help="run a whole tempering cycle in virtual time")
    s.add_argument("--config")
    s.add_argument("--recipe")
    s.add_argument("--hours", type=float, default=3.0, help="give up after this much machine time")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-record", action="store_true",
                   help="keep neither the batch record nor the zone history")
    s.set_defaults(func=cmd_simulate)
    t = sub.add_parser("twin", help="run the twin in real time as a Modbus slave (TCP and/or RTU)")
    t.add_argument("--config", help="machine file with the fieldbus section (default: the embedded default machine)")
    t.add_argument("--tcp", type=_host_port, metavar="HOST:PORT",
                   help="listen here (default: the config's TCP link, unless --rtu alone is given)")
    t.add_argument("--rtu", metavar="DEVICE", help="serve a serial line (or pty) too")
    t.add_argument("--baud", type=int, help="RTU baud rate (default: the config's RTU link, else 19200)")
    t.add_argument("--parity", choices=("none", "even", "odd"), help="RTU parity (default: even)")
    t.add_argument("--stop-bits", type=int, choices=(1, 2), help="RTU stop bits (default: 1)")
    t.add_argument("--initial-temp-c", type=float, help="twin's starting temperature (default: ambient, solid)")
    t.add_argument("--seed", type=int, default=0, help="twin's noise seed")
    t.set_defaults(func=cmd_twin)
    m = sub.add_parser("import-mapping", help="turn a legacy Mapping.csv into a register-map file")
    m.add_argument("csv", metavar="CSV", help="the legacy Mapping.csv")
    m.add_argument("-o", "--output", metavar="OUT", help="register-map file to write (default: stdout)")
    m.add_argument("--link", default="io", help="link of rows without a Link column (default: io)")
    m.add_argument("--unit", type=int, default=1, help="unit id of rows without a UnitId (default: 1)")
    m.set_defaults(func=cmd_import_mapping)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--config", help="machine file (default: the embedded default machine)")
    where.add_argument("--data-dir", help="override opcua.data_dir (pki/ and the SQLite records)")
    roles = "viewer, operator, technician or admin"
    u = sub.add_parser("users", help="manage the OPC UA server's users")
    u.set_defaults(func=cmd_users)
    us = u.add_subparsers(dest="action", required=True)
    x = us.add_parser("add", parents=[where], help="add a user (the password is asked for)")
    x.add_argument("name")
    x.add_argument("--role", required=True, help=roles)
    x.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    us.add_parser("list", parents=[where], help="list the users and their roles, and who must set a new "
                  "password at the next login")
    x = us.add_parser("passwd", parents=[where], help="change a user's password (a new one is then no "
                      "longer asked of the user)")
    x.add_argument("name")
    x.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    x = us.add_parser("role", parents=[where], help="change a user's role")
    x.add_argument("name")
    x.add_argument("role", help=roles)
    x = us.add_parser("delete", parents=[where], help="delete a user")
    x.add_argument("name")
    k = sub.add_parser("pki", help="the OPC UA server's certificates: own, trusted, rejected")
    k.set_defaults(func=cmd_pki)
    ka = k.add_subparsers(dest="action", required=True)
    ka.add_parser("list", parents=[where], help="list the certificates with their thumbprints")
    for action, text in (("trust", "trust a rejected client certificate (or a certificate file)"),
                         ("reject", "stop trusting a client certificate")):
        x = ka.add_parser(action, parents=[where], help=text)
        x.add_argument("id", metavar="THUMBPRINT|FILE", help="thumbprint (or a unique start of it) or a file")
    e = sub.add_parser("export-nodeset", help="write the machine's OPC UA address space as NodeSet2 XML")
    e.add_argument("file", metavar="FILE", help="NodeSet2 file to write")
    e.add_argument("--config", help="machine file (default: the embedded default machine)")
    e.set_defaults(func=cmd_export_nodeset)
    a = sub.add_parser("alarms", help="the alarm journal")
    a.set_defaults(func=cmd_alarms)
    aa = a.add_subparsers(dest="action", required=True)
    x = aa.add_parser("journal", parents=[where], help="print the alarm journal, oldest first")
    x.add_argument("--since", type=_journal_time, metavar="T",
                   help="from this time on: ISO 8601 (UTC unless it has an offset) or a time ago (10m, 2h, 1d)")
    x.add_argument("--until", type=_journal_time, metavar="T", help="before this time (same forms)")
    x.add_argument("--alarm", metavar="ID", help="only this alarm (e.g. zone.tank.over_temp)")
    x.add_argument("--batch", metavar="ID", help="only the entries of this batch")
    x.add_argument("--limit", type=_positive_int, metavar="N", help="only the newest N entries")
    x.add_argument("--json", action="store_true", help="one JSON object per line, every field")
    x.add_argument("--all-machines", action="store_true",
                   help="every machine's entries in the database (default: the config's machine's)")
    _report_parser(_batches_parser(sub, where), where)
    from .autotune_cli import add_parser as _autotune_parser   # its module imports this one
    _autotune_parser(sub, where)
    from .backup import add_parser as _backup_parser
    _backup_parser(sub, where)
    from .migrate_cli import add_parser as _migrate_parser
    _migrate_parser(sub, where)
    from .export_legacy import add_parser as _export_legacy_parser
    _export_legacy_parser(sub, where)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # the supervisor starts its children as ``python -m tempering.cli``
    raise SystemExit(main())
