"""The historian as a service of the application: snapshots in, durable lines out, never in
the scan's way.

    PLC scan --publish--> SnapshotChannel --(bounded subscription)--> sampler thread
        --Sampler.lines--> Spool.append (disk) --> Forwarder thread --> sink

The scan only publishes a snapshot (O(1), never waits). The sampler thread drains the
subscription every ``drain_s`` (well before it can fill, so no event is missed; any snapshot the
subscription had to drop is counted in ``snapshots_dropped``), turns snapshots into lines and
appends them to the spool; the forwarder thread sends them on. Disk and network work happen
only in these two threads.

``diagnostics()`` gives backlog, write rate, last error, spool fill and the spool alarm: on at
80 % full (logged once), off again below 70 % (so that a full spool dropping its oldest segment
does not make it flap).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from plc.channel import SnapshotChannel

from .config import HistorianSettings
from .forwarder import Forwarder
from .local import LocalStore
from .schema import Sampler
from .sinks import LocalSink, make_sink
from .spool import Spool

log = logging.getLogger(__name__)

SPOOL_ALARM_FILL = 0.8
SPOOL_ALARM_CLEAR = 0.7     # hysteresis: drop_oldest makes the fill saw-tooth near full


@dataclass(frozen=True, slots=True)
class HistorianDiagnostics:
    sink: str
    state: str                  # idle | sending | retrying (the forwarder's)
    backlog_lines: int
    spool_fill: float           # 0..1 of spool_max_mb
    spool_alarm: bool           # on at 80 % full, off below 70 %
    appended_total: int
    delivered_total: int
    set_aside_total: int
    dropped_total: int          # lost to the spool-full policy
    snapshots_dropped: int      # snapshots the sampler missed (should stay 0)
    rate_lines_per_s: float
    last_error: str
    last_success_wall: float


class Historian:
    def __init__(self, settings: HistorianSettings, machine_id: str, channel: SnapshotChannel,
                 *, base_dir: str | Path = ".", drain_s: float = 0.1):
        base = Path(base_dir)
        self.settings = settings
        self.spool = Spool(base / settings.spool_dir, max_bytes=int(settings.spool_max_mb * 2**20),
                           when_full=settings.spool_when_full,
                           fsync_interval_s=settings.fsync_interval_ms / 1000.0)
        self.store: LocalStore | None = None
        if settings.sink.kind == "local":
            self.store = LocalStore(base / settings.sink.path, settings.sink.retention_days)
            self.sink = LocalSink(self.store)
        else:
            self.sink = make_sink(settings.sink)
        self.forwarder = Forwarder(self.spool, self.sink, batch_max_lines=settings.batch_max_lines,
                                   retry_max_s=settings.retry_max_s)
        self.sampler = Sampler(machine_id, settings.sample_interval_ms / 1000.0,
                               settings.deadband_c, settings.max_silence_s)
        self.sub = channel.subscribe(maxlen=4096)
        self.channel = channel
        self.drain_s = drain_s
        self._stop = threading.Event()
        self._extra: list[str] = []            # lines handed in by ``add_lines``, under _extra_lock
        self._extra_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._alarm = False
        self._disk_error = ""
        self.lost_to_disk = 0
        self.sample_errors = 0

    def start(self) -> None:
        self.forwarder.start()
        self._thread = threading.Thread(target=self._run, name="historian-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.drain_s):
            self.drain()
        self.drain()

    def add_lines(self, lines: list[str]) -> None:
        """Line-protocol lines made elsewhere (the window's batch records: ``schema.batch_line``),
        appended to the spool with the next samples, by the sampler's thread."""
        with self._extra_lock:
            self._extra += lines

    def drain(self) -> int:
        """Sample every pending snapshot into the spool; the number of lines appended."""
        with self._extra_lock:
            lines, self._extra = self._extra, []
        for snap in self.sub.drain():
            try:
                lines += self.sampler.lines(snap)
            except Exception:      # a bad snapshot must not stop the history of the next ones
                self.sample_errors += 1
                log.exception("historian: could not sample the snapshot of scan %s", snap.tick)
        if lines:
            try:
                self.spool.append(lines)
                if self._disk_error:
                    log.warning("historian: spool writable again (%s)", self.spool.directory)
                self._disk_error = ""
            except OSError as e:     # disk full or gone: say it once per outage, keep sampling
                self.lost_to_disk += len(lines)
                if not self._disk_error:
                    log.error("historian: cannot append to the spool %s: %s; samples are lost "
                              "until it is writable", self.spool.directory, e)
                self._disk_error = str(e)
        self._check_fill()
        return len(lines)

    def _check_fill(self) -> None:
        fill = self.spool.stats().fill
        if fill >= SPOOL_ALARM_FILL and not self._alarm:
            self._alarm = True
            log.warning("historian: spool %.0f %% full (%s); the sink %s is not keeping up",
                        fill * 100, self.spool_path, self.sink.name)
        elif fill < SPOOL_ALARM_CLEAR and self._alarm:
            self._alarm = False
            log.warning("historian: spool alarm cleared (%.0f %% full)", fill * 100)

    @property
    def spool_path(self) -> Path:
        return self.spool.directory

    def stop(self, drain_s: float = 2.0) -> None:
        """Sample what is left, give the forwarder up to ``drain_s`` to send it, then stop.
        Whatever is not sent stays in the spool for the next start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.channel.unsubscribe(self.sub)
        self.forwarder.stop(drain_s)
        self.spool.close()
        self.sink.close()
        if self.store is not None:
            self.store.close()

    def diagnostics(self) -> HistorianDiagnostics:
        f = self.forwarder.stats()
        sp = f.spool
        return HistorianDiagnostics(
            self.sink.name, f.state, sp.backlog_lines, sp.fill, self._alarm,
            sp.appended_total, f.delivered_total, f.set_aside_total, sp.dropped_total,
            self.sub.dropped, f.rate_lines_per_s, f.last_error, f.last_success_wall)
