"""One link (a TCP endpoint, or a serial port shared by several units): its polling task.

One job: keep the input slots fresh and the devices' outputs equal to the output slot, and
say precisely what went wrong when it cannot. It never raises into the scan: every failure
becomes a quality with a reason on the points concerned, and a count in the diagnostics.

Each poll (at most every ``poll_ms``; back to back when the line is slower) reads the planned
blocks unit by unit, then writes each output block whose value changed, plus every block at
least every ``refresh_ms`` (and at once after a reconnect or a unit's return). A change of the
output slot wakes the link between polls, so outputs go out without waiting for the next poll.

Failures and what they do (per block, reason on every point of the block):
- no reply within the unit's timeout, after its retries: BAD "communication error: no reply ..."
- exception response N: BAD "device rejected ... exception code N (name)"; not retried, the
  other blocks of the unit are still read
- garbage (bad CRC, wrong length, mismatched reply): BAD "communication error: garbage ...";
  retried like a timeout
- connection lost or refused: BAD "communication error: link ... down ..." on every point of the
  link, reconnect after a backoff doubling from 100 ms up to ``reconnect_max_ms``
- a unit with ``demote_after`` consecutive polls without any valid reply is demoted: tried once
  (no retries) every ``demoted_poll_ms`` so that it cannot starve the other units of a shared
  RS-485 line; it is promoted again (and polled in full, outputs rewritten) when it answers.

``Link.sever(reason, safe, timeout_s)`` is the one method meant for another thread, while this
link's event loop may be blocked (the hang watchdog): it writes the safe image itself, blocking,
within ``timeout_s`` (``transport.send_blocking``: TCP on a new connection, RTU on the open
port), then shuts the live TCP connection down (``transport.sever``) so that the devices'
communication watchdogs drop their outputs even if the write failed. It takes no lock and
touches none of the task's state; when the loop runs again the task meets the closed
connection ("link ... down: connection severed: <reason>") and reconnects with its backoff.
Counted in ``LinkDiagnostics.severs``; what was done in ``last_sever``; it never raises.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from plc.image import Point, Quality

from .pdu import ExceptionResponse, FrameError
from .codec import Block, decode_block, encode_block
from .regmap import LinkSettings, PointMap, plan_reads, plan_writes
from .transport import DeviceTimeout, LinkDown, LinkError, RtuTransport, TcpTransport, Transport

ERROR_KINDS = ("timeout", "exception", "garbage", "disconnect")


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


@dataclass
class _Counters:
    requests: int = 0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_KINDS, 0))
    last_error: str = ""
    last_error_wall: float = 0.0
    rtt_s: deque = field(default_factory=lambda: deque(maxlen=2000))

    def error(self, kind: str, message: str, wall: float) -> None:
        self.errors[kind] += 1
        self.last_error, self.last_error_wall = message, wall


@dataclass(frozen=True, slots=True)
class _Failure:
    kind: str       # one of ERROR_KINDS
    reason: str     # the quality's reason


@dataclass(frozen=True, slots=True)
class DeviceDiagnostics:
    unit: int
    state: str                 # connected | demoted | down
    requests: int
    errors: Mapping[str, int]  # by kind: timeout, exception, garbage, disconnect
    last_error: str
    last_error_wall: float
    rtt_ms_p50: float
    rtt_ms_p99: float
    consecutive_failures: int


@dataclass(frozen=True, slots=True)
class LinkDiagnostics:
    name: str
    transport: str             # tcp | rtu
    endpoint: str              # host:port or device
    state: str                 # connected | down
    requests: int
    errors: Mapping[str, int]
    last_error: str
    rtt_ms_p50: float
    rtt_ms_p99: float
    requests_per_poll: int     # requests of the last complete poll (reads and writes)
    polls: int
    reconnects: int
    late_replies: int
    devices: tuple[DeviceDiagnostics, ...]
    severs: int = 0            # Link.sever calls (the hang watchdog's emergency path)
    last_sever: str = ""       # what the last one did; "" if none
    last_sever_wall: float = 0.0


@dataclass
class _Device:
    unit: int
    timeout_s: float
    attempts: int
    reads: tuple[Block, ...]
    writes: tuple[Block, ...]
    state: str = "down"
    failures: int = 0              # consecutive polls without a valid reply
    next_try: float = 0.0          # monotonic; when demoted
    counters: _Counters = field(default_factory=_Counters)
    written: dict[int, tuple] = field(default_factory=dict)      # block index -> payload
    written_at: dict[int, float] = field(default_factory=dict)


class InputSlots:
    """Latest value of every input point: (point, monotonic time of the read). Written by the
    links, read by ``ModbusPlantIo.read_inputs`` (same event loop, no locking needed)."""

    def __init__(self, names: Sequence[str], initial_reason: str):
        self.points: dict[str, Point] = {n: Point(0.0, Quality.BAD, 0.0, initial_reason) for n in names}
        self.read_at: dict[str, float] = dict.fromkeys(names, float("-inf"))

    def good(self, name: str, value, wall: float, mono: float) -> None:
        self.points[name] = Point(value, Quality.GOOD, wall, "")
        self.read_at[name] = mono

    def bad(self, name: str, reason: str, wall: float) -> None:
        old = self.points[name]
        self.points[name] = Point(old.value, Quality.BAD, wall, reason)


class OutputSlot:
    """The latest output image the scan produced; the links write it to the devices."""

    def __init__(self, safe: Mapping[str, bool]):
        self.values: dict[str, bool] = dict(safe)
        self.changed = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None    # the links' loop, once running

    def put(self, values: Mapping[str, bool]) -> None:
        """Any thread: from outside the links' loop the wake-up goes through the loop."""
        if dict(values) != self.values:
            self.values = dict(values)
            loop = self.loop
            if loop is None or _running_loop() is loop:
                self.changed.set()
            else:
                try:
                    loop.call_soon_threadsafe(self.changed.set)
                except RuntimeError:       # the loop is closed: nobody waits any more
                    pass


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Link:
    def __init__(self, name: str, settings, points: Sequence[PointMap], inputs: InputSlots,
                 outputs: OutputSlot, *, naive: bool = False,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.name, self.settings = name, settings
        self.inputs, self.outputs = inputs, outputs
        self.clock, self.wall = clock, wall
        mine = [p for p in points if p.link == name]
        reads = plan_reads(mine, settings, naive=naive)
        # naive (the benchmark's baseline): one request per point, as simple pollers do
        writes = tuple(b for p in mine for b in plan_writes([p])) if naive else plan_writes(mine)
        units = sorted({b.unit for b in reads} | {b.unit for b in writes})
        self.devices = {u: _Device(u, settings.timeout_s(u), 1 + settings.retries_for(u),
                                   tuple(b for b in reads if b.unit == u),
                                   tuple(b for b in writes if b.unit == u)) for u in units}
        if settings.transport == "tcp":
            self.transport: Transport = TcpTransport(name, settings.host, settings.port)
            self.endpoint = f"{settings.host}:{settings.port}"
        else:
            self.transport = RtuTransport(name, settings.device, settings.baud_rate,
                                          settings.parity, settings.stop_bits)
            self.endpoint = settings.device
        self.counters = _Counters()
        self.polls = 0
        self.reconnects = 0
        self.requests_per_poll = 0
        self._poll_requests = 0
        self._connected_once = False
        self.severs = 0
        self.last_sever = ""
        self.last_sever_wall = 0.0

    # -- diagnostics ----------------------------------------------------------------------

    def diagnostics(self) -> LinkDiagnostics:
        c = self.counters
        rtt = list(c.rtt_s)
        devices = tuple(DeviceDiagnostics(
            d.unit, d.state, d.counters.requests, dict(d.counters.errors), d.counters.last_error,
            d.counters.last_error_wall, _percentile(list(d.counters.rtt_s), 0.5) * 1000,
            _percentile(list(d.counters.rtt_s), 0.99) * 1000, d.failures)
            for d in self.devices.values())
        state = "down" if not self.transport.connected else \
            "severed" if self.transport.severed else "connected"
        return LinkDiagnostics(
            self.name, self.settings.transport, self.endpoint, state, c.requests, dict(c.errors),
            c.last_error, _percentile(rtt, 0.5) * 1000, _percentile(rtt, 0.99) * 1000,
            self.requests_per_poll, self.polls, self.reconnects, self.transport.late_replies,
            devices, self.severs, self.last_sever, self.last_sever_wall)

    # -- one request ------------------------------------------------------------------------

    def _fail(self, dev: _Device, kind: str, message: str) -> _Failure:
        wall = self.wall()
        dev.counters.error(kind, message, wall)
        self.counters.error(kind, message, wall)
        return _Failure(kind, message)

    async def _request(self, dev: _Device, block: Block, values: tuple = (),
                       attempts: int | None = None) -> tuple | _Failure:
        """The block's data, or why it could not be had. LinkDown propagates."""
        req = block.request(values)
        what = f"unit {dev.unit} function {block.function} address {block.address}"
        failure = _Failure("timeout", "")
        for attempt in range(attempts or dev.attempts):
            t0 = self.clock()
            self.counters.requests += 1
            dev.counters.requests += 1
            self._poll_requests += 1
            try:
                data = await self.transport.transact(dev.unit, req, dev.timeout_s)
            except DeviceTimeout as e:
                failure = self._fail(dev, "timeout", f"communication error: {e} "
                                     f"({attempt + 1} attempt{'s' if attempt else ''}; {what})")
                continue
            except FrameError as e:
                failure = self._fail(dev, "garbage", f"communication error: garbage reply from "
                                     f"{what}: {e.reason}")
                if not self.transport.connected:
                    raise LinkDown(self.name, failure.reason) from None
                continue
            except ExceptionResponse as e:
                return self._fail(dev, "exception", f"device rejected the request: {what} "
                                  f"answered exception code {e.code} ({e.name})")
            rtt = self.clock() - t0
            self.counters.rtt_s.append(rtt)
            dev.counters.rtt_s.append(rtt)
            return data
        return failure

    # -- one poll ---------------------------------------------------------------------------

    def _set_bad(self, blocks: Sequence[Block], reason: str) -> None:
        wall = self.wall()
        for b in blocks:
            for p in b.points:
                self.inputs.bad(p.name, reason, wall)

    async def _poll_unit(self, dev: _Device, now: float) -> None:
        demoted = dev.state == "demoted"
        if demoted and now < dev.next_try:
            return
        answered = False
        for i, block in enumerate(dev.reads):
            result = await self._request(dev, block, attempts=1 if demoted else None)
            if isinstance(result, _Failure):
                self._set_bad([block], result.reason)
                if result.kind == "exception":
                    answered = True        # the device is there; it refused this block
                elif demoted:
                    self._set_bad(dev.reads[i + 1:], f"{result.reason}; unit demoted, next try "
                                  f"in {self.settings.demoted_poll_ms} ms")
                    break
                continue
            answered = True
            wall, mono = self.wall(), self.clock()
            for name, value in decode_block(block, result).items():
                self.inputs.good(name, value, wall, mono)
        if not dev.reads and dev.writes:
            answered = await self._write_unit(dev, force=demoted) and True
        if answered:
            if dev.state != "connected":
                dev.written.clear()            # back (or first time): rewrite every output
            dev.state, dev.failures = "connected", 0
        else:
            dev.failures += 1
            if dev.failures >= self.settings.demote_after:
                if dev.state != "demoted":
                    note = (f"unit {dev.unit} demoted after {dev.failures} failed polls: "
                            f"{dev.counters.last_error}")
                    dev.counters.last_error = self.counters.last_error = note
                dev.state = "demoted"
                dev.next_try = self.clock() + self.settings.demoted_poll_ms / 1000.0

    async def _write_unit(self, dev: _Device, force: bool = False) -> bool:
        """Write the unit's changed (or due) output blocks. True if every write was accepted."""
        ok = True
        now = self.clock()
        refresh_s = self.settings.refresh_ms / 1000.0
        for i, block in enumerate(dev.writes):
            payload = encode_block(block, self.outputs.values)
            due = now - dev.written_at.get(i, float("-inf")) >= refresh_s
            if not force and not due and dev.written.get(i) == payload:
                continue
            result = await self._request(dev, block, payload)
            if isinstance(result, _Failure):
                dev.written.pop(i, None)
                ok = False
            else:
                dev.written[i], dev.written_at[i] = payload, self.clock()
        return ok

    async def poll(self) -> None:
        """One full poll: every unit's reads, then its writes."""
        self._poll_requests = 0
        now = self.clock()
        for dev in self.devices.values():
            await self._poll_unit(dev, now)
            if dev.state == "connected" and dev.reads:
                await self._write_unit(dev)
        self.requests_per_poll = self._poll_requests
        self.polls += 1

    async def write_changed(self) -> None:
        for dev in self.devices.values():
            if dev.state == "connected":
                await self._write_unit(dev)

    # -- the task ---------------------------------------------------------------------------

    def _down(self, reason: str) -> None:
        message = f"communication error: link {self.name} ({self.endpoint}) down: {reason}"
        wall = self.wall()
        self.counters.error("disconnect", message, wall)
        for dev in self.devices.values():
            dev.state = "down"
            dev.written.clear()
            dev.counters.error("disconnect", message, wall)
            self._set_bad(dev.reads, message)

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set; then write the output slot once more and close."""
        self.outputs.loop = asyncio.get_running_loop()
        backoff_s = 0.1
        cap_s = self.settings.reconnect_max_ms / 1000.0
        poll_s = self.settings.poll_ms / 1000.0
        while not stop.is_set():
            if not self.transport.connected:
                try:
                    await self.transport.connect(max(self.settings.timeout_ms / 1000.0, 1.0))
                except LinkDown as e:
                    self._down(str(e))
                    await _wait(stop, backoff_s)
                    backoff_s = min(backoff_s * 2, cap_s)
                    continue
                if self._connected_once:
                    self.reconnects += 1
                self._connected_once = True
                backoff_s = 0.1
            started = self.clock()
            try:
                await self.poll()
                # between polls, a change of the outputs is written at once
                while not stop.is_set():
                    left = started + poll_s - self.clock()
                    if left <= 0:
                        break
                    self.outputs.changed.clear()
                    if await _wait_event(self.outputs.changed, stop, left):
                        await self.write_changed()
            except LinkDown as e:
                self._down(str(e))
                await self.transport.close()
                await _wait(stop, backoff_s)
                backoff_s = min(backoff_s * 2, cap_s)
        await self.flush()

    # -- from another thread ----------------------------------------------------------------

    def sever(self, reason: str, safe: Mapping[str, bool], timeout_s: float = 0.2) -> str:
        """Write ``safe`` to every output block now, blocking, within ``timeout_s``; then shut
        the live connection down. Safe from any thread while the loop is blocked; never
        raises. What was done (also in ``last_sever``)."""
        t0 = time.monotonic()
        try:
            requests = [(dev.unit, block.request(encode_block(block, safe)))
                        for dev in self.devices.values() for block in dev.writes]
            outcomes = self.transport.send_blocking(requests, timeout_s)
            failed = [o for o in outcomes if o is not None]
            wrote = f"safe outputs written: {len(requests) - len(failed)} of {len(requests)} " \
                    f"requests"
            if failed:
                wrote += f" ({_what(failed[0])})"
        except Exception as e:          # a bug must not stop step 2 nor reach the watchdog
            wrote = f"safe outputs not written: {_what(e)}"
        try:
            closed = "live connection shut down" if self.transport.sever(reason) else \
                "no live connection to close" if self.settings.transport == "tcp" else \
                "serial line left open"
        except Exception as e:
            closed = f"live connection not closed: {_what(e)}"
        text = f"severed ({reason}) in {(time.monotonic() - t0) * 1000:.0f} ms: {wrote}; {closed}"
        self.last_sever, self.last_sever_wall = text, self.wall()
        self.severs += 1
        return text

    async def flush(self) -> None:
        """Write every output block once (the last image, normally safe), then close."""
        try:
            if self.transport.connected:
                for dev in self.devices.values():
                    if dev.state != "down":
                        await self._write_unit(dev, force=True)
        except LinkError:
            pass
        finally:
            await self.transport.close()


def _what(e: BaseException) -> str:
    return getattr(e, "reason", None) or str(e) or type(e).__name__


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        pass


async def _wait_event(event: asyncio.Event, stop: asyncio.Event, seconds: float) -> bool:
    """Wait for ``event`` (True) or ``stop`` or the time (False)."""
    waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(stop.wait())]
    try:
        done, _ = await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    return event.is_set() and not stop.is_set()
