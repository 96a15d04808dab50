"""The link between the PLC process and the plant-window process: snapshots out, commands in,
verdicts back.

    PLC process                                          plant-window process
    Controller ─publish(snapshot)─► WindowPort ══unix══► PlcClient ─► SnapshotChannel
               (latest wins, never waits)       socket             (publisher, historian, console)
    next scan ◄──── submit(command) ─ WindowPort ◄══════ PlcClient.command(cmd) ─► Verdict
    scan's verdict event ───────────► WindowPort ══════► the caller's future (OPC UA, console, ...)

Wire: a Unix stream socket (in a private directory the supervisor makes, mode 0700), frames of a
4-byte big-endian length and a pickle — both ends are this program, on this machine, under one
user. Messages are tuples:

    PLC -> window   ("hello", info)              on connect: pid, scheduling, period, machine
                    ("snap", snapshot, extra)    latest wins; ``extra``: link diagnostics (every
                                                 second), snapshots dropped so far
                    ("verdict", Verdict)         each command's verdict; never dropped
    window -> PLC   ("cmd", command)             queued for the next scan
                    ("recipes", book)            the records' recipe book (on connect, on change)
                    ("batch_floor", n)           the records' highest batch number (on connect,
                                                 after each batch record): the PLC numbers its
                                                 next batch above it
                    ("beat", tick)               the window is alive, every ``BEAT_S``, and has
                                                 taken every snapshot up to ``tick``

Rules:
- The scan only calls ``WindowPort.publish``: O(events), never waits, never pickles. A snapshot
  not yet sent is replaced by a newer one; the events of the one dropped travel with its
  successor (an alarm transition or a verdict is not lost), and the drop is counted. Events
  sent are kept until the window's beat acknowledges their snapshot: a window that hangs or dies
  with them unread (in its socket buffer) does not lose them, its successor gets them again (at
  least once). At most ``MAX_CARRIED_EVENTS`` wait (the oldest beyond are dropped, counted).
- Pickling and sending run on the PLC's loop between scans; at most one frame is in the
  transport beyond its small high-water mark, so a slow or stopped window costs the PLC nothing
  but dropped snapshots.
- A window that is gone, or silent for ``lost_after_s``, is reported by ``WindowPort.status()``,
  which the runtime hands to the scan as the ``plc.window`` alarm; the PLC goes on controlling.
- ``PlcClient.status()`` says the same of the PLC, seen from the window (no snapshot for
  ``lost_after_s``, or no connection): the window shows every process value as Bad then.

Errors (window side): PlcUnavailable (no PLC connected: the command was not sent),
PlcTimeout (sent, no verdict within the timeout: the command may still run).
"""

from __future__ import annotations

import asyncio
import copyreg
import itertools
import logging
import os
import pickle
import struct
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from .channel import Snapshot, SnapshotChannel
from .commands import Command

log = logging.getLogger(__name__)



def _read_only(d: dict) -> MappingProxyType:
    return MappingProxyType(d)


copyreg.pickle(MappingProxyType, lambda m: (_read_only, (dict(m),)))   # read-only maps of the image
_LEN = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024
BEAT_S = 0.25
MAX_CARRIED_EVENTS = 2000      # events of dropped snapshots carried to the next one, at most
LINKS_EVERY_S = 1.0
HIGH_WATER = 64 * 1024         # bytes queued in the transport before a sender waits


class PlcUnavailable(Exception):
    """No PLC is connected: the command was not sent."""


class PlcTimeout(Exception):
    """The command was sent but no verdict came back in time; it may still be applied."""


@dataclass(frozen=True, slots=True)
class Verdict:
    command_id: str
    command: str
    accepted: bool
    reason: str = ""
    code: str = ""       # a refusal's OPC UA status code name (e.g. BadConditionAlreadyShelved)


def encode(msg: tuple) -> bytes:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


async def read_message(reader: asyncio.StreamReader) -> tuple:
    """One message; IncompleteReadError at the end of the stream."""
    n, = _LEN.unpack(await reader.readexactly(_LEN.size))
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes (> {MAX_FRAME})")
    return pickle.loads(await reader.readexactly(n))


def verdicts_of(events) -> list[Verdict]:
    """The verdicts in a scan's events (``command_accepted`` / ``command_refused`` of commands
    that carry an id)."""
    out = []
    for e in events:
        if e.kind in ("command_accepted", "command_refused"):
            data = dict(e.data)
            cid = data.get("command_id")
            if cid:
                out.append(Verdict(str(cid), str(data.get("command", "")),
                                   e.kind == "command_accepted", str(data.get("reason", "")),
                                   str(data.get("code", ""))))
    return out


# --------------------------------------------------------------------------- PLC side


class WindowPort:
    """The PLC's end: a Unix socket server for one plant window at a time (a new connection
    replaces the old one: a restarted window takes over at once).

    ``publish(snapshot)`` is the controller's snapshot channel (``Controller(channel=port)``);
    ``status()`` is the runtime's ``window`` callable. ``submit`` queues a command for the
    next scan; ``on_recipes(book)`` replaces the program's recipe book; ``on_batch_floor(n)``
    raises the batch numbering's floor (``Controller.set_batch_floor``)."""

    def __init__(self, path: str | Path, submit: Callable[[Command], None], *,
                 on_recipes: Callable[[Mapping[str, Any]], None] = lambda book: None,
                 on_batch_floor: Callable[[int], None] = lambda floor: None,
                 info: Mapping[str, Any] | None = None,
                 links: Callable[[], tuple] = lambda: (),
                 lost_after_s: float = 3.0, first_connect_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.submit = submit
        self.on_recipes = on_recipes
        self.on_batch_floor = on_batch_floor
        self.info = dict(info or {})
        self.links = links
        self.lost_after_s = lost_after_s
        self.first_connect_s = first_connect_s
        self.clock = clock
        self.started_s = clock()
        self.last: Snapshot | None = None
        self.dropped = 0               # snapshots replaced before they were sent
        self.events_dropped = 0        # events beyond MAX_CARRIED_EVENTS while no window read
        self.connects = 0
        self.commands = 0
        self._pending: Snapshot | None = None
        self._unacked: deque[tuple[int, tuple]] = deque()     # (tick, events) sent, not yet taken
        self._unacked_events = 0
        self._verdicts: list[Verdict] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._last_rx_s: float | None = None
        self._lost_since_s: float | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._links_at = -LINKS_EVERY_S

    # -- the scan's side (synchronous, O(1)) ----------------------------------------------------

    def publish(self, snap: Snapshot) -> None:
        self.last = snap
        if self._writer is not None:        # nobody waits for a verdict while no window is there
            self._verdicts += verdicts_of(snap.events)
        if self._pending is not None:
            self.dropped += 1
            carried = self._pending.events + snap.events
            if len(carried) > MAX_CARRIED_EVENTS:
                self.events_dropped += len(carried) - MAX_CARRIED_EVENTS
                carried = carried[-MAX_CARRIED_EVENTS:]
            snap = snap.with_events(carried)
        self._pending = snap
        self._wake.set()

    def status(self) -> str:
        """'' while a window is connected and heard from; else why not (for the scan's alarm)."""
        now = self.clock()
        if self._writer is None:
            if self._lost_since_s is None:           # never connected yet
                waited = now - self.started_s
                return (f"no plant window connected for {waited:.0f} s since the PLC started"
                        if waited > self.first_connect_s else "")
            return f"plant window disconnected {now - self._lost_since_s:.0f} s ago"
        silent = now - (self._last_rx_s or now)
        if silent > self.lost_after_s:
            return f"plant window silent for {silent:.1f} s (hung?)"
        return ""

    # -- the loop's side ------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._writer is not None:       # ends the session's read loop, which ends its sender
            self._writer.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def flush(self, timeout_s: float = 0.5) -> None:
        """Send what is pending (the final snapshot and verdicts) before the PLC stops."""
        w = self._writer
        if w is None:
            return
        try:
            self._send_pending(w)
            await asyncio.wait_for(w.drain(), timeout_s)
        except (OSError, asyncio.TimeoutError, ConnectionError):
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        old, self._writer = self._writer, writer
        if old is not None:
            old.close()
        self.connects += 1
        self._last_rx_s = self.clock()
        writer.transport.set_write_buffer_limits(high=HIGH_WATER)
        sender = asyncio.create_task(self._send(writer))
        self._tasks.add(sender)
        try:
            writer.write(encode(("hello", self.info)))
            while True:
                msg = await read_message(reader)
                self._last_rx_s = self.clock()
                kind = msg[0]
                if kind == "cmd":
                    self.commands += 1
                    self.submit(msg[1])
                elif kind == "recipes":
                    self.on_recipes(msg[1])
                elif kind == "batch_floor":
                    self.on_batch_floor(int(msg[1]))
                elif kind == "beat":
                    self._acked(msg[1] if len(msg) > 1 else -1)
                else:
                    log.warning("plant window sent an unknown message %r", kind)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except Exception:
            log.exception("plant window link")
        finally:
            sender.cancel()
            self._tasks.discard(sender)
            self._tasks.discard(task)
            if self._writer is writer:
                self._writer = None
                self._lost_since_s = self.clock()
            writer.close()

    def _acked(self, tick: int) -> None:
        while self._unacked and self._unacked[0][0] <= tick:
            self._unacked_events -= len(self._unacked.popleft()[1])

    def _send_pending(self, writer: asyncio.StreamWriter) -> None:
        snap, self._pending = self._pending, None
        if snap is not None:
            if snap.events:
                self._unacked.append((snap.tick, snap.events))
                self._unacked_events += len(snap.events)
                while self._unacked_events > MAX_CARRIED_EVENTS:
                    lost = len(self._unacked.popleft()[1])
                    self._unacked_events -= lost
                    self.events_dropped += lost
            extra: dict[str, Any] = {"dropped": self.dropped, "events_dropped": self.events_dropped}
            now = self.clock()
            if now - self._links_at >= LINKS_EVERY_S:
                self._links_at = now
                extra["links"] = self.links()
            writer.write(encode(("snap", snap, extra)))
        verdicts, self._verdicts = self._verdicts, []   # after their scan's snapshot: a caller
        for v in verdicts:                               # that has its verdict sees its effect
            writer.write(encode(("verdict", v)))

    async def _send(self, writer: asyncio.StreamWriter) -> None:
        try:
            # a new window gets the state at once, with the events its predecessor did not take
            replay = tuple(e for _, events in self._unacked for e in events)
            self._unacked.clear()
            self._unacked_events = 0
            if self._pending is not None:
                self._pending = self._pending.with_events(replay + self._pending.events)
            elif self.last is not None:
                self._pending = self.last.with_events(replay)
            while True:
                await self._wake.wait()
                self._wake.clear()
                self._send_pending(writer)
                await writer.drain()       # meanwhile newer snapshots replace the pending one
        except (ConnectionError, OSError):
            pass


# --------------------------------------------------------------------------- window side


class PlcClient:
    """The window's end: connects (and reconnects) to the PLC, republishes its snapshots on a
    local ``SnapshotChannel`` and sends commands, each answered by the scan's verdict.

    ``latest`` is the last snapshot (None before the first); ``links()`` the last link
    diagnostics; ``info`` the PLC's hello (pid, scheduling)."""

    def __init__(self, path: str | Path, *, lost_after_s: float = 1.0, verdict_timeout_s: float = 3.0,
                 clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.lost_after_s = lost_after_s
        self.verdict_timeout_s = verdict_timeout_s
        self.clock = clock
        self.channel = SnapshotChannel()
        self.latest: Snapshot | None = None
        self.info: dict[str, Any] = {}
        self.plc_dropped = 0
        self.connects = 0
        self._links: tuple = ()
        self._book: Mapping[str, Any] | None = None
        self._batch_floor: int | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._last_snap_s: float | None = None
        self._taken_tick = -1
        self._futures: dict[str, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]
        self.connected_event = asyncio.Event()

    # -- what the window reads ------------------------------------------------------------------

    def links(self) -> tuple:
        return self._links

    def status(self) -> str:
        """'' while the PLC is connected and its snapshots arrive; else why not."""
        if self._writer is None:
            return "PLC not connected"
        now = self.clock()
        if self._last_snap_s is None:
            return "" if self.connects else "PLC not connected"
        silent = now - self._last_snap_s
        return f"no snapshot from the PLC for {silent:.1f} s" if silent > self.lost_after_s else ""

    # -- commands -------------------------------------------------------------------------------

    def new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    async def command(self, cmd: Command, timeout_s: float | None = None) -> tuple[Command, Verdict]:
        """Send ``cmd`` (given an id if it has none) and wait for the scan's verdict.
        Returns (the command as sent, its verdict); PlcUnavailable, PlcTimeout."""
        if not cmd.id:
            cmd = replace(cmd, id=self.new_id())
        writer = self._writer
        if writer is None or self.status():
            raise PlcUnavailable(self.status() or "PLC not connected")
        fut = asyncio.get_running_loop().create_future()
        self._futures[cmd.id] = fut
        try:
            writer.write(encode(("cmd", cmd)))
            return cmd, await asyncio.wait_for(fut, timeout_s or self.verdict_timeout_s)
        except asyncio.TimeoutError:
            raise PlcTimeout(f"no verdict from the PLC within {timeout_s or self.verdict_timeout_s:g} s "
                             f"(command {cmd.id})") from None
        finally:
            self._futures.pop(cmd.id, None)

    def set_recipes(self, book: Mapping[str, Any]) -> None:
        """The recipe book the PLC must use: sent now and on every reconnection."""
        self._book = dict(book)
        if self._writer is not None:
            self._writer.write(encode(("recipes", self._book)))

    def set_batch_floor(self, floor: int) -> None:
        """The highest batch number the records know (``Records.next_batch_seq`` - 1): the PLC
        numbers its next batch above it. Sent now and on every reconnection; never lowered."""
        self._batch_floor = max(self._batch_floor or 0, int(floor))
        if self._writer is not None:
            self._writer.write(encode(("batch_floor", self._batch_floor)))

    # -- the task -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, retry_s: float = 0.1) -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path))
            except (OSError, ConnectionError):
                try:
                    await asyncio.wait_for(stop.wait(), retry_s)
                except asyncio.TimeoutError:
                    pass
                continue
            await self._session(reader, writer, stop)

    async def _session(self, reader, writer, stop: asyncio.Event) -> None:
        self._writer = writer
        self._last_snap_s = None
        self._taken_tick = -1          # ticks of this PLC process, acknowledged in the beats
        self.connects += 1
        if self._book is not None:
            writer.write(encode(("recipes", self._book)))
        if self._batch_floor is not None:
            writer.write(encode(("batch_floor", self._batch_floor)))
        beat = asyncio.create_task(self._beat(writer))
        reading = asyncio.create_task(self._read(reader))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (beat, reading, stopping):
                t.cancel()
            self._writer = None
            writer.close()
            for fut in self._futures.values():
                if not fut.done():
                    fut.set_exception(PlcUnavailable("the PLC connection was lost before its verdict"))
            self.connected_event.clear()

    async def _beat(self, writer) -> None:
        try:
            while True:
                writer.write(encode(("beat", self._taken_tick)))
                await asyncio.sleep(BEAT_S)
        except (ConnectionError, OSError):
            pass

    async def _read(self, reader) -> None:
        try:
            while True:
                msg = await read_message(reader)
                kind = msg[0]
                if kind == "snap":
                    snap, extra = msg[1], msg[2]
                    self.latest = snap
                    self._taken_tick = snap.tick
                    self._last_snap_s = self.clock()
                    self.plc_dropped = extra.get("dropped", self.plc_dropped)
                    if "links" in extra:
                        self._links = tuple(extra["links"])
                    self.channel.publish(snap)
                    self.connected_event.set()
                elif kind == "verdict":
                    fut = self._futures.get(msg[1].command_id)
                    if fut is not None and not fut.done():
                        fut.set_result(msg[1])
                elif kind == "hello":
                    self.info = dict(msg[1])
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
