"""The twin's Modbus face: the simulated machine's I/O modules as Modbus slaves (TCP and RTU).

One job: serve the register map (``plc.modbus.regmap``) of the real machine from the twin, so
the PLC's Modbus master (or mbpoll, or any other master) talks to the twin exactly as it would
to the machine's temperature module, power meter and digital I/O. The wire format is
``plc.modbus.pdu`` (one codec for both ends), the values are encoded and decoded by the map's
codec (``encode_registers`` / ``decode_registers`` / ``apply_bits``).

Rules (Modbus Application Protocol V1.1b3, Modbus over Serial Line V1.02, Messaging on TCP/IP
V1.0b):

- Tables per unit: coils, discrete inputs, holding and input registers of the map's points.
  A read may cover any address between the lowest and the highest mapped address of its unit
  and table (a device's register block; unmapped addresses inside it read 0, so a master may
  bridge gaps in one read); a write may touch only addresses of output points. Anything else
  is exception 2 (illegal data address); an unknown function is exception 1, a bad quantity 3.
- A unit the map does not have: no reply on RTU (nobody on the line has that address),
  exception 11 (gateway target failed to respond) on TCP. RTU broadcasts (unit 0) are ignored.
- Inputs (functions 1-4) come from ``twin.read_inputs()`` (``update_inputs``); outputs
  (5/6/15/16) are decoded from the coil and holding tables (``outputs``).
- Communication watchdog of an I/O module: once no request of its master has been served for
  ``comm_watchdog_s`` the outputs drop (all False) and the output tables are cleared, so only a
  new write turns an output on again. Before the first request the outputs are off. On TCP the
  master is a connection that has written outputs: a SCADA or a test that only reads (an
  observer) does not keep the outputs alive for a master that is gone; on RTU (one master per
  line) every request counts.
- TCP: MBAP framing, any number of clients, requests of one connection answered in order,
  TCP_NODELAY; a malformed MBAP header closes that connection.
- RTU: the serial device (a pty in tests) in raw mode; a frame is found by its request length
  and CRC; after garbage (unknown length, bad CRC) input is discarded until the line has been
  silent for 3.5 characters (``pdu.frame_gap_s``); a frame of an unknown function is taken as
  delimited by that silence (and answered with exception 1 if its CRC holds); a reply is sent
  no earlier than 3.5 characters after the request's last byte.

Faults (``SlaveFaults``, settable at run time, per unit or for every unit with ``None``):
silence (no reply), delay (a slow reply), exception responses on an address range, garbage
replies (random bytes, with or without a valid-looking MBAP header on TCP; a bad CRC on RTU),
and ``drop_connections()`` (every TCP connection closed now). ``served`` counts the requests
each unit processed and answered (normal, exception or garbled reply; a silenced request is not
counted, nor one to a unit the map does not have).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from plc.modbus import pdu
from plc.modbus.pdu import ExceptionResponse, FrameError, Request
from plc.modbus.codec import TABLE_OF_FUNCTION, Table, apply_bits, decode_registers, encode_registers
from plc.modbus.regmap import PointMap
from plc.modbus.transport import open_serial

from .plant import Twin

log = logging.getLogger(__name__)

_BIT_TABLES = (Table.COILS, Table.DISCRETE_INPUTS)
_MAX_RTU_ADU = 256


@dataclass
class SlaveFaults:
    """Faults of the slave's Modbus face. ``None`` as a unit means every unit.

    - ``silent_units``: units that do not answer at all.
    - ``delay_s``: unit -> seconds before the reply (a slow device).
    - ``exceptions``: ``(unit, function, first_address, last_address, code)``: a request of that
      unit and function (``None``: any) touching the address range is refused with ``code``.
    - ``garbage_units``: units that reply with garbage: random bytes on TCP (behind a valid MBAP
      header of the request's transaction when ``garbage_mbap``, else with no valid header),
      the right reply with a bad CRC on RTU. Writes are still carried out.
    """

    silent_units: set[int | None] = field(default_factory=set)
    delay_s: dict[int | None, float] = field(default_factory=dict)
    exceptions: list[tuple[int | None, int | None, int, int, int]] = field(default_factory=list)
    garbage_units: set[int | None] = field(default_factory=set)
    garbage_mbap: bool = True
    seed: int = 0
    _drop: Callable[[], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    # setters (plain attribute access works as well)
    def silence(self, unit: int | None = None) -> None:
        self.silent_units.add(unit)

    def delay(self, seconds: float, unit: int | None = None) -> None:
        self.delay_s[unit] = float(seconds)

    def refuse(self, first_address: int, last_address: int, code: int = 2, *,
               unit: int | None = None, function: int | None = None) -> None:
        self.exceptions.append((unit, function, first_address, last_address, code))

    def garble(self, unit: int | None = None, mbap: bool = True) -> None:
        self.garbage_units.add(unit)
        self.garbage_mbap = mbap

    def drop_connections(self) -> None:
        """Close every TCP connection of the slave now (clients see the connection end)."""
        if self._drop is not None:
            self._drop()

    def clear(self) -> None:
        self.silent_units.clear()
        self.delay_s.clear()
        self.exceptions.clear()
        self.garbage_units.clear()
        self.garbage_mbap = True

    # queries of the slave
    def is_silent(self, unit: int) -> bool:
        return unit in self.silent_units or None in self.silent_units

    def is_garbage(self, unit: int) -> bool:
        return unit in self.garbage_units or None in self.garbage_units

    def delay_for(self, unit: int) -> float:
        return self.delay_s.get(unit, self.delay_s.get(None, 0.0))

    def exception_for(self, unit: int, req: Request) -> int | None:
        last = req.address + req.count - 1
        for u, f, first, end, code in self.exceptions:
            if (u is None or u == unit) and (f is None or f == req.function) \
                    and req.address <= end and first <= last:
                return code
        return None


class _UnitTables:
    """The four tables of one unit: values by address, readable spans, writable addresses."""

    def __init__(self, points: Iterable[PointMap]):
        self.values: dict[Table, dict[int, int | bool]] = {}
        self.span: dict[Table, tuple[int, int]] = {}
        self.writable: dict[Table, set[int]] = {}
        for p in points:
            t = p.table
            zero = False if t in _BIT_TABLES else 0
            vals = self.values.setdefault(t, {})
            for a in range(p.address, p.address + p.width):
                vals[a] = zero
                if p.is_output:
                    self.writable.setdefault(t, set()).add(a)
        for t, vals in self.values.items():
            self.span[t] = (min(vals), max(vals))

    def read(self, req: Request) -> list:
        t = TABLE_OF_FUNCTION[req.function]
        lo, hi = self.span.get(t, (1, 0))
        if not (lo <= req.address and req.address + req.count - 1 <= hi):
            raise ExceptionResponse(req.function, 2)
        vals = self.values[t]
        zero = False if t in _BIT_TABLES else 0
        return [vals.get(a, zero) for a in range(req.address, req.address + req.count)]

    def write(self, req: Request) -> None:
        t = TABLE_OF_FUNCTION[req.function]
        ok = self.writable.get(t, set())
        if any(a not in ok for a in range(req.address, req.address + req.count)):
            raise ExceptionResponse(req.function, 2)
        vals = self.values[t]
        for i, v in enumerate(req.values):
            vals[req.address + i] = bool(v) if t in _BIT_TABLES else int(v)

    def clear_outputs(self) -> None:
        for t, addrs in self.writable.items():
            zero = False if t in _BIT_TABLES else 0
            for a in addrs:
                self.values[t][a] = zero


class RtuFramer:
    """Finds request frames in the bytes of a serial line (pure: time is passed in).

    ``feed(data, now_s)`` returns the complete frames (unit + PDU + CRC, CRC checked) that the
    bytes end; ``silence(now_s)`` is called once the line has been quiet for ``gap_s`` and
    returns a frame delimited by that silence (a request of an unknown function whose CRC
    holds), ending any resync. A partial frame older than the gap is dropped (a 3.5-character
    silence ends a frame)."""

    def __init__(self, gap_s: float):
        self.gap_s = gap_s
        self.buf = bytearray()
        self.last_rx_s = float("-inf")
        self.discarding = False     # after garbage: drop input until a silent gap
        self.unknown_len = False    # a function of unknown length: the gap ends the frame
        self.discarded_bytes = 0

    def feed(self, data: bytes, now_s: float) -> list[bytes]:
        frames: list[bytes] = []
        if now_s - self.last_rx_s >= self.gap_s:
            frames += self.silence(now_s)
        self.last_rx_s = now_s
        if self.discarding:
            self.discarded_bytes += len(data)
            return frames
        self.buf += data
        while not self.unknown_len and len(self.buf) >= 2:
            try:
                n = pdu.request_pdu_length(bytes(self.buf[1:]))
            except FrameError:
                self.unknown_len = True
                break
            if n is None:
                break
            total = 1 + n + 2
            if len(self.buf) < total:
                break
            adu = bytes(self.buf[:total])
            try:
                pdu.rtu_unframe(adu)
            except FrameError:
                self._discard()
                break
            frames.append(adu)
            del self.buf[:total]
        if len(self.buf) > _MAX_RTU_ADU:
            self._discard()
        return frames

    def silence(self, now_s: float) -> list[bytes]:
        frames: list[bytes] = []
        if self.unknown_len and len(self.buf) >= 4:
            try:
                pdu.rtu_unframe(bytes(self.buf))
                frames.append(bytes(self.buf))
            except FrameError:
                pass
        self.discarded_bytes += 0 if frames else len(self.buf)
        self.buf.clear()
        self.discarding = self.unknown_len = False
        return frames

    def _discard(self) -> None:
        self.discarded_bytes += len(self.buf)
        self.buf.clear()
        self.discarding = True


class TwinSlave:
    """The twin's I/O modules as Modbus slaves on the register map ``points``.

    ``clock`` (monotonic seconds) drives the communication watchdog and ``run``'s steps."""

    def __init__(self, twin: Twin, points: Sequence[PointMap], *, comm_watchdog_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        unknown = [p.name for p in points if not p.is_output and p.name not in Twin.INPUTS]
        unknown += [p.name for p in points if p.is_output and p.name not in Twin.OUTPUTS]
        if unknown:
            raise ValueError(f"points the twin does not have: {', '.join(unknown)}")
        self.twin = twin
        self.points = tuple(points)
        self.comm_watchdog_s = comm_watchdog_s
        self.faults = SlaveFaults(_drop=self.drop_connections)
        self._clock = clock
        by_unit: dict[int, list[PointMap]] = {}
        for p in self.points:
            by_unit.setdefault(p.unit, []).append(p)
        self._tables = {u: _UnitTables(ps) for u, ps in sorted(by_unit.items())}
        self._inputs = [p for p in self.points if not p.is_output]
        self._outputs = [p for p in self.points if p.is_output]
        self.served: dict[int, int] = dict.fromkeys(self._tables, 0)
        self._last_request_s: float | None = None
        self._outputs_live = False
        self.tcp_port: int | None = None
        self.rtu_device: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[asyncio.StreamWriter, asyncio.Task] = {}
        self._rtu_fd: int | None = None
        self._rtu_gap_s = 0.0
        self._rtu_framer: RtuFramer | None = None
        self._rtu_frames: asyncio.Queue[tuple[bytes, float]] | None = None
        self._rtu_task: asyncio.Task | None = None
        self._rtu_timer: asyncio.TimerHandle | None = None
        self.update_inputs()

    @property
    def units(self) -> tuple[int, ...]:
        return tuple(self._tables)

    @property
    def tcp_clients(self) -> int:
        """TCP connections open now."""
        return len(self._conns)

    # ------------------------------------------------------------------ process image

    def update_inputs(self) -> None:
        """Encode ``twin.read_inputs()`` into the input points' bits and registers."""
        values = self.twin.read_inputs()
        fresh: dict[tuple[int, Table, int], int | bool] = {}
        for p in self._inputs:
            v = values[p.name]
            if p.is_bit:
                fresh[(p.unit, p.table, p.address)] = bool(v)
            elif p.bits:  # a bool packed into a register shared with other points
                key = (p.unit, p.table, p.address)
                fresh[key] = apply_bits(p, int(fresh.get(key, 0)), bool(v))
            else:
                for i, r in enumerate(encode_registers(p, v)):
                    fresh[(p.unit, p.table, p.address + i)] = r
        for (unit, table, address), v in fresh.items():
            self._tables[unit].values[table][address] = v

    def outputs(self) -> dict[str, bool]:
        """The output image the modules drive: decoded from the coil and holding tables, all
        False once no request has come for ``comm_watchdog_s`` (or before the first one)."""
        out = dict.fromkeys(Twin.OUTPUTS, False)
        self._check_watchdog()
        if not self._outputs_live:
            return out
        for p in self._outputs:
            vals = self._tables[p.unit].values[p.table]
            if p.is_bit:
                out[p.name] = bool(vals[p.address])
            else:
                out[p.name] = bool(decode_registers(p, [vals[a] for a in range(p.address, p.address + p.width)]))
        return out

    def _check_watchdog(self) -> None:
        if self._outputs_live and self._clock() - self._last_request_s > self.comm_watchdog_s:
            self._outputs_live = False
            for t in self._tables.values():
                t.clear_outputs()
            log.warning("no request for %.3f s: outputs dropped (communication watchdog)",
                        self.comm_watchdog_s)

    # ------------------------------------------------------------------ requests

    def handle(self, unit: int, request_pdu: bytes, *, master: bool = True) -> bytes:
        """The reply PDU (normal or exception) of a mapped, non-silent ``unit`` to a request;
        carries out writes and, for a request of the ``master``, feeds the watchdog. No
        transport, no faults but exceptions."""
        self._check_watchdog()
        if master:
            self._last_request_s = self._clock()
            self._outputs_live = True
        self.served[unit] += 1
        try:
            req = pdu.decode_request(request_pdu)
            code = self.faults.exception_for(unit, req)
            if code is not None:
                raise ExceptionResponse(req.function, code)
            tables = self._tables[unit]
            if req.function in pdu.READ_FUNCTIONS:
                return pdu.encode_response(req, tables.read(req))
            tables.write(req)
            return pdu.encode_response(req)
        except ExceptionResponse as e:
            return pdu.encode_exception(e.function, e.code)
        except FrameError:  # an empty PDU: answer as to an unknown function
            return pdu.encode_exception(0, 1)

    async def _reply_pdu(self, unit: int, request_pdu: bytes, master: bool = True) -> bytes | None:
        """Faults applied: None for no reply, else the reply PDU after any delay."""
        if self.faults.is_silent(unit):
            return None
        delay = self.faults.delay_for(unit)
        if delay > 0:
            await asyncio.sleep(delay)
        if self.faults.is_silent(unit):  # silenced while waiting
            return None
        return self.handle(unit, request_pdu, master=master)

    def _garbage_pdu(self, request_pdu: bytes) -> bytes:
        rng = self.faults.rng
        f = request_pdu[0] if request_pdu else 0
        first = rng.choice([b for b in range(1, 256) if b not in (f, f | 0x80)])
        return bytes([first]) + rng.randbytes(rng.randint(3, 20))

    # ------------------------------------------------------------------ TCP

    async def start_tcp(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0: a free port, then in ``tcp_port``)."""
        self._server = await asyncio.start_server(self._serve_tcp, host, port)
        self.tcp_port = self._server.sockets[0].getsockname()[1]
        log.info("Modbus TCP slave on %s:%d, units %s", host, self.tcp_port, self.units)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns[writer] = asyncio.current_task()
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        master = False            # until this connection writes outputs
        try:
            while True:
                header = await reader.readexactly(pdu.MBAP_LEN)
                tid, unit, length = pdu.mbap_header(header)
                request_pdu = await reader.readexactly(length)
                master = master or (bool(request_pdu) and request_pdu[0] in pdu.WRITE_FUNCTIONS)
                reply = await self._tcp_reply(tid, unit, request_pdu, master)
                if reply is not None:
                    writer.write(reply)
                    await writer.drain()
        except FrameError as e:
            log.info("closing a TCP connection: %s", e.reason)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass     # close(): ending normally keeps asyncio's stream callback from logging it
        finally:
            self._conns.pop(writer, None)
            writer.close()

    async def _tcp_reply(self, tid: int, unit: int, request_pdu: bytes, master: bool = True) -> bytes | None:
        if unit not in self._tables:
            f = request_pdu[0] if request_pdu else 0
            return pdu.mbap_frame(tid, unit, pdu.encode_exception(f & 0x7F, 11))
        reply = await self._reply_pdu(unit, request_pdu, master)
        if reply is None:
            return None
        if self.faults.is_garbage(unit):
            junk = self._garbage_pdu(request_pdu)
            if self.faults.garbage_mbap:
                return pdu.mbap_frame(tid, unit, junk)
            return bytes([tid >> 8 & 0xFF, tid & 0xFF, 0xFF, 0xFF]) + junk  # protocol id != 0
        return pdu.mbap_frame(tid, unit, reply)

    def drop_connections(self) -> None:
        """Close every TCP connection now."""
        for writer in list(self._conns):
            writer.close()

    # ------------------------------------------------------------------ RTU

    async def start_rtu(self, device: str, baud: int = 19200, parity: str = "even",
                        stop_bits: int = 1) -> None:
        """Serve the line on ``device`` (parity ``none``/``even``/``odd``, 1 or 2 stop bits)."""
        if self._rtu_fd is not None:
            raise RuntimeError(f"already serving RTU on {self.rtu_device}")
        self._rtu_fd = open_serial(device, baud, parity, stop_bits)
        self.rtu_device = device
        self._rtu_gap_s = pdu.frame_gap_s(baud, parity, stop_bits)
        self._rtu_framer = RtuFramer(self._rtu_gap_s)
        self._rtu_frames = asyncio.Queue()
        loop = asyncio.get_running_loop()
        loop.add_reader(self._rtu_fd, self._on_rtu_readable)
        self._rtu_task = asyncio.create_task(self._serve_rtu())
        log.info("Modbus RTU slave on %s, %d baud, parity %s, %d stop bits, units %s",
                 device, baud, parity, stop_bits, self.units)

    def _on_rtu_readable(self) -> None:
        try:
            data = os.read(self._rtu_fd, 4096)
        except BlockingIOError:
            return
        except OSError as e:  # the other end of a pty went away: look again a little later
            log.debug("RTU read: %s", e)
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._rtu_fd)
            loop.call_later(0.2, self._resume_rtu_reader)
            return
        if not data:
            return
        now = self._clock()
        for adu in self._rtu_framer.feed(data, now):
            self._rtu_frames.put_nowait((adu, now))
        if self._rtu_timer is not None:
            self._rtu_timer.cancel()
        self._rtu_timer = asyncio.get_running_loop().call_later(self._rtu_gap_s, self._on_rtu_silence)

    def _resume_rtu_reader(self) -> None:
        if self._rtu_fd is not None:
            asyncio.get_running_loop().add_reader(self._rtu_fd, self._on_rtu_readable)

    def _on_rtu_silence(self) -> None:
        self._rtu_timer = None
        framer = self._rtu_framer
        now = self._clock()
        if now - framer.last_rx_s < framer.gap_s:  # bytes came meanwhile
            self._rtu_timer = asyncio.get_running_loop().call_later(
                framer.gap_s - (now - framer.last_rx_s), self._on_rtu_silence)
            return
        for adu in framer.silence(now):
            self._rtu_frames.put_nowait((adu, framer.last_rx_s))

    async def _serve_rtu(self) -> None:
        while True:
            adu, end_s = await self._rtu_frames.get()
            unit, request_pdu = pdu.rtu_unframe(adu)
            if unit not in self._tables:
                continue  # broadcast or another device's address
            reply = await self._reply_pdu(unit, request_pdu)
            if reply is None:
                continue
            frame = pdu.rtu_frame(unit, reply)
            if self.faults.is_garbage(unit):
                frame = frame[:-2] + bytes((frame[-2] ^ 0xFF, frame[-1] ^ 0x5A))
            wait = end_s + self._rtu_gap_s - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._rtu_write(frame)

    async def _rtu_write(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        while data:
            try:
                n = os.write(self._rtu_fd, data)
                data = data[n:]
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_writer(self._rtu_fd, ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_writer(self._rtu_fd)
            except OSError as e:
                log.debug("RTU write: %s", e)
                return

    # ------------------------------------------------------------------ life cycle

    async def run(self, stop: asyncio.Event, step_s: float = 0.05) -> None:
        """Real time: every ``step_s`` the twin steps by the elapsed time with ``outputs()``,
        then the inputs are encoded again; until ``stop`` is set."""
        last = self._clock()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), step_s)
            except asyncio.TimeoutError:
                pass
            now = self._clock()
            if now > last:
                self.twin.step(now - last, self.outputs())
                self.update_inputs()
                last = now

    async def close(self) -> None:
        """Stop serving: the listener, every connection and the serial line."""
        tasks = list(self._conns.values())
        if self._server is not None:
            self._server.close()
        self.drop_connections()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._rtu_fd is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._rtu_fd)
            if self._rtu_timer is not None:
                self._rtu_timer.cancel()
            self._rtu_task.cancel()
            await asyncio.gather(self._rtu_task, return_exceptions=True)
            os.close(self._rtu_fd)
            self._rtu_fd = None
