"""The plant-window process: OPC UA server, publisher, gate, records, historian, live view.

    tempering window --socket PATH [--heartbeat-fd N] [--start RECIPE] [run options]

Started (and restarted) by the supervisor of ``tempering run``. It connects to the PLC process
(``plc.bridge.PlcClient``, reconnecting whenever the PLC restarts), republishes its snapshots to
the publisher, the historian and the live view, and sends every command — OPC UA writes and
calls, the live view's keys, the auto-start (``--start``) — through ``Gate.command`` / the gate,
which waits for the scan's verdict and audits it. Every ``HEARTBEAT_S`` it writes one byte to the
supervisor's pipe from its event loop: a window whose loop hangs is killed and restarted.

SIGTERM: stop cleanly (exit 0). SIGINT is the supervisor's to handle (ignored here). The ``q``
key of the live view ends the whole ``tempering run``: exit code ``QUIT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

QUIT = 3
HEARTBEAT_S = 0.25


async def _heartbeat(fd: int | None, stop: asyncio.Event) -> None:
    if fd is None:
        return
    os.set_blocking(fd, False)
    while not stop.is_set():
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(fd, b".")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), HEARTBEAT_S)


async def run_window(args, cfg, book) -> int:
    from opcua_server.gate import Gate
    from opcua_server.server import open_records, recipe_book
    from plc.bridge import PlcClient
    from plc.commands import StartRecipe
    from plc.program import Program

    from .console import Console

    program = Program.from_config(cfg, book)
    plc = PlcClient(args.socket, lost_after_s=max(1.0, 10 * program.period_s))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    async with contextlib.AsyncExitStack() as undo:      # one way out, also when cancelled
        tasks: list[asyncio.Task] = []

        async def end_tasks():
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        undo.push_async_callback(end_tasks)
        from opcua_server.records import SchemaTooNew
        try:
            records, note = await asyncio.to_thread(open_records, cfg.opcua, book, machine=cfg.machine.id)
        except SchemaTooNew as e:                 # never write into a newer program's tables
            print(f"records: {e}", file=sys.stderr, flush=True)
            return 2
        undo.callback(records.close)
        if note:
            print(f"opc ua: {note}", flush=True)
        # batch ids unique for the machine's life: the PLC numbers above the records' highest
        plc.set_batch_floor(await asyncio.to_thread(records.next_batch_seq, cfg.machine.id) - 1)
        history = None
        if cfg.historian.enabled and not args.no_history:
            from historian.service import Historian
            from historian.spool import SpoolLocked
            try:
                history = Historian(cfg.historian, cfg.machine.id, plc.channel)
            except SpoolLocked as e:
                print(f"history: {e} (another `tempering run` on this directory?); stop it, or run "
                      f"with --no-history", file=sys.stderr)
                return 2
            history.start()
            undo.push_async_callback(asyncio.to_thread, history.stop, 2.0)
            print(f"history: {history.sink.name}, spool {cfg.historian.spool_dir}", flush=True)
        diagnostics = history.diagnostics if history else (lambda: None)
        opc = None
        if not args.no_opcua:
            from opcua_server.history_influx import history_store
            from opcua_server.server import start_server
            try:
                opc = await start_server(cfg, plc, records, program=program, history=diagnostics,
                                         link_names=tuple(cfg.fieldbus.links) if cfg.fieldbus else (),
                                         history_store=history_store(cfg.historian.sink, history.store)
                                         if history else None)
            except (OSError, ValueError) as e:
                print(f"opc ua: cannot start the server at {cfg.opcua.endpoint}: {e}", file=sys.stderr)
                return 2
            undo.push_async_callback(opc.stop)
            print(f"opc ua: serving {cfg.opcua.endpoint} (policies "
                  f"{', '.join(cfg.opcua.security_policies)}; Sign and SignAndEncrypt; user and "
                  f"password)", flush=True)
        if opc is None:               # the records are the recipe book (the server sends it too)
            plc.set_recipes(await asyncio.to_thread(recipe_book, records))
        gate = opc.gate if opc is not None else Gate(None, plc, records)
        metrics = _start_monitoring(cfg, program, plc, diagnostics, opc)
        if metrics is not None:
            undo.push_async_callback(asyncio.to_thread, metrics.stop)
        recipe = args.recipe or cfg.machine.default_recipe
        quit_asked = asyncio.Event()
        console = Console(plc.channel, f"{cfg.machine.id} ({cfg.machine.name})", gate.command, recipe,
                          quit_asked, links=plc.links, history=diagnostics)
        tasks.append(asyncio.create_task(console.run()))
        # the heartbeat once started up: building the address space may hold the loop for
        # seconds (the supervisor gives a start its own, longer, time before the first beat)
        tasks.append(asyncio.create_task(_heartbeat(args.heartbeat_fd, stop)))
        tasks.append(asyncio.create_task(journal_task(plc.channel, plc.channel.subscribe(maxlen=4096),
                                                  records, cfg.machine.id, stop)))
        from opcua_server.batches import BatchRecorder, EnergyModel
        recorder = BatchRecorder(cfg.machine.id, program,
                                 opc.book if opc is not None else await asyncio.to_thread(recipe_book, records),
                                 EnergyModel.from_twin(cfg.twin, program.limits.phase_count))
        tasks.append(asyncio.create_task(batches_task(plc.channel, plc.channel.subscribe(maxlen=4096), recorder,
                                                  records, history, opc.batches if opc else None, stop,
                                                  stored=plc.set_batch_floor,
                                                  judged=metrics.sources.judged if metrics else None)))
        # connect once every observer (publisher, historian, live view) is subscribed: the first
        # snapshot carries the events of the time this window was away (alarms, verdicts)
        tasks.append(asyncio.create_task(plc.run(stop)))
        for t in tasks:
            t.add_done_callback(_log_failure)
        if args.start:
            tasks.append(asyncio.create_task(_auto_start(plc, gate, StartRecipe(
                args.start, user="operator", origin="auto-start"))))
        loop.add_signal_handler(signal.SIGTERM, stop.set)     # running: stop cleanly
        quitting = asyncio.create_task(quit_asked.wait())
        stopping = asyncio.create_task(stop.wait())
        tasks += [quitting, stopping]
        await asyncio.wait({quitting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        quit_asked.set()
        return QUIT if not stop.is_set() else 0


def _start_monitoring(cfg, program, plc, history, opc):
    """``/metrics`` and ``/healthz`` (``tempering.monitoring``) on the ``monitoring:`` address;
    None when disabled or when the address cannot be bound (said once: the window goes on)."""
    if not cfg.monitoring.enabled:
        return None
    from .monitoring import MetricsServer, Sources

    sources = Sources(cfg.machine.id, cfg.machine.name, program.period_s, snapshot=lambda: plc.latest,
                      plc_status=plc.status, plc_pid=lambda: plc.info.get("pid"),
                      plc_dropped=lambda: plc.plc_dropped, links=plc.links, history=history,
                      sessions=opc.sessions if opc is not None else None)
    server = MetricsServer(sources, cfg.monitoring.host, cfg.monitoring.port)
    try:
        url = server.start()
    except OSError as e:
        print(f"metrics: cannot listen on {cfg.monitoring.listen}: {e.strerror or e}; the machine "
              f"runs without /metrics and /healthz", file=sys.stderr, flush=True)
        return None
    print(f"metrics: {url}/metrics (health: {url}/healthz)", flush=True)
    return server


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_coro().__qualname__, exc_info=task.exception())


JOURNAL_EVERY_S = 0.25
JOURNAL_MAX_WAITING = 100_000


async def journal_task(channel, sub, records, machine: str, stop: asyncio.Event) -> None:
    """Every "alarm" and "alarm_system" event of every snapshot into the records' alarm journal,
    a batch every ``JOURNAL_EVERY_S``, written on a thread (the database may be a PostgreSQL
    across the plant). Events the PLC hands in again (a new window gets those its predecessor did
    not acknowledge) are stored once: the journal skips an event it has. While the database
    fails, the events wait (at most JOURNAL_MAX_WAITING, the oldest dropped), logged once per
    outage. On stop: one last batch."""
    from opcua_server.records import JOURNAL_KINDS

    waiting: list = []
    failing = False
    try:
        while True:
            stopping = stop.is_set()
            waiting += [e for snap in sub.drain() for e in snap.events if e.kind in JOURNAL_KINDS]
            if waiting:
                try:
                    await asyncio.to_thread(records.journal_alarms, waiting, machine)
                    waiting, failing = [], False
                except Exception:
                    if not failing:
                        log.exception("alarm journal: cannot write %d events (they wait)", len(waiting))
                    failing = True
                    del waiting[:-JOURNAL_MAX_WAITING]
            if stopping:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), JOURNAL_EVERY_S)
    finally:
        channel.unsubscribe(sub)


BATCHES_EVERY_S = 0.5


async def batches_task(channel, sub, recorder, records, history, view, stop: asyncio.Event,
                   stored=lambda seq: None, judged=None) -> None:
    """Every snapshot into the batch recorder (``opcua_server.batches``); each finished record
    judged, stored in the records (on a thread), written to the historian as a ``batch`` line,
    shown to the OPC UA clients (``view``: Batches/Last and a BatchCompletedEventType event) and
    printed; the batch in progress in Batches/Current every ``BATCHES_EVERY_S``. A record that
    cannot be stored is logged and kept for the next round. ``stored(seq)``: the number of each
    record stored (the PLC's batch floor: ``PlcClient.set_batch_floor``)."""
    from historian.schema import batch_line
    from opcua_server.records import batch_seq_of

    unsaved: list = []
    try:
        while True:
            stopping = stop.is_set()
            last = None
            for snap in sub.drain():
                last = snap
                try:
                    record = recorder.feed(snap)
                except Exception:             # a bad snapshot must not stop the records
                    log.exception("batch record: snapshot of scan %s", snap.tick)
                    continue
                if record is not None:
                    unsaved.append(record)
                    if judged is not None:          # the metrics' batch counts
                        judged(record)
                    print(f"batch {record.batch_id} ({record.recipe_id}) {record.outcome}: {record.verdict}"
                          + (f": {'; '.join(record.reasons)}" if record.reasons else ""), flush=True)
                    if history is not None:
                        history.add_lines([batch_line(record)])
                    if view is not None:
                        await view.completed(record)
            while unsaved:
                try:
                    await asyncio.to_thread(records.save_batch, unsaved[0])
                except Exception:
                    log.exception("batch record %s: cannot store it (kept for the next round)",
                                  unsaved[0].batch_id)
                    break
                done = unsaved.pop(0)
                if (seq := batch_seq_of(done.batch_id, done.machine_id)) is not None:
                    stored(seq)
            if view is not None and last is not None:
                await view.running(recorder.current(), last.time_s)
            if stopping:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), BATCHES_EVERY_S)
    finally:
        channel.unsubscribe(sub)


async def _auto_start(plc, gate, cmd) -> None:
    """The recipe of ``tempering run`` (unless --no-start), once the PLC is there; through the
    same path as any operator command, audited with origin ``auto-start``."""
    try:
        await asyncio.wait_for(plc.connected_event.wait(), 60.0)
    except asyncio.TimeoutError:
        print("auto-start: no PLC connected within 60 s; recipe not started", file=sys.stderr, flush=True)
        return
    ok, text = await gate.command(cmd, target="StartRecipe")
    print(f"auto-start: StartRecipe {cmd.recipe_id}: {'accepted' if ok else 'refused: ' + text}",
          flush=True)


async def _until_terminated(args, cfg, book) -> int:
    """``run_window``, cancelled by SIGTERM while it is still starting (building the address
    space takes seconds; a stop asked meanwhile must not wait for it)."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    window = asyncio.create_task(run_window(args, cfg, book))
    try:
        return await asyncio.shield(window)
    except asyncio.CancelledError:
        if window.done():
            return window.result()
        window.cancel()              # still starting: give up what is half built
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await window
        return 0


def main(args, cfg, book) -> int:
    from .plc_process import die_with_parent

    if args.parent_pid:
        die_with_parent(args.parent_pid)
    from .systemd import journal_logging
    journal_logging("window", cfg.machine.id)    # under systemd: records to the journal
    if args.nice:                     # always allowed: the PLC comes first even without privileges
        try:
            os.nice(args.nice)
        except OSError as e:
            print(f"window: could not lower its priority (nice {args.nice}): {e.strerror or e}",
                  file=sys.stderr)
    return asyncio.run(_until_terminated(args, cfg, book))
