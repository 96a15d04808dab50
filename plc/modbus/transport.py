"""The master's two transports: Modbus TCP (MBAP over a socket) and RTU (a serial line).

One job: carry one request to one unit and bring back its reply or a precise failure. Policy
(retries, demotion, qualities) lives in ``link.py``; the wire format in ``pdu.py``.

``transact(unit, request, timeout_s)`` returns the bits or registers of a read (``()`` for a
write) or raises one of:

    LinkError
    ├── LinkDown        the connection or the port is gone (refused, reset, closed, EOF)
    └── DeviceTimeout   no complete reply within the timeout (.unit, .timeout_s)
    pdu.FrameError      a reply that is not a valid reply to this request (garbage)
    pdu.ExceptionResponse  the device refused with exception code N

``send_blocking(requests, timeout_s)`` and ``sever(reason)`` are the two exceptions to "one
event loop owns the transport": both may be called from another thread while that loop is
blocked (the hang watchdog's emergency path, ``Link.sever``). ``send_blocking`` carries
requests synchronously within one time budget and returns one outcome per request (``None``,
or the exception above that ended it); it never touches the loop's state. ``sever`` shuts the
live TCP connection down (``shutdown(SHUT_RDWR)``, so the device sees it end and its
communication watchdog drops its outputs); the loop, when it runs again, reads the end of the
connection, the link goes down with "connection severed: <reason>" and reconnects as after any
connection loss. On RTU there is no connection to end: ``sever`` leaves the port open (closing
it from another thread could close a descriptor number the loop reuses meanwhile, and closes
a pty pair made by socat for good); the device's own watchdog sees the silence.

TCP: one connection, TCP_NODELAY, a reader task that matches replies to requests by
transaction id; a late reply to a timed-out request is dropped (counted in ``late_replies``)
and never taken for the reply to a later one. A malformed MBAP header means the stream is out
of step: the connection is closed and the link reconnects.

RTU (Modbus over Serial Line V1.02 §2.5.1.1): the line is silent for at least 3.5 characters
(1.75 ms above 19200 baud) before each request; the reply's length is known from the request,
so the frame ends when its bytes are in, and its CRC and unit are checked. Whatever arrives
outside a transaction (a late reply of a silent device, noise) is discarded before the next
request so that it cannot be taken for another device's reply.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import termios
import time
import tty
from typing import Protocol, Sequence

from . import pdu
from .pdu import FrameError, Request


class LinkError(Exception):
    """Base of the transport failures (``.link`` names the link)."""

    def __init__(self, link: str, message: str):
        super().__init__(message)
        self.link = link


class LinkDown(LinkError):
    """The connection or serial port is not usable."""


class DeviceTimeout(LinkError):
    def __init__(self, link: str, unit: int, timeout_s: float):
        super().__init__(link, f"no reply from unit {unit} within {timeout_s * 1000:.0f} ms")
        self.unit = unit
        self.timeout_s = timeout_s


#: the outcome of one request of ``send_blocking``: None (accepted), or why not
Outcome = Exception | None


class Transport(Protocol):
    name: str
    late_replies: int

    @property
    def connected(self) -> bool: ...
    @property
    def severed(self) -> str: ...   # the reason of a sever the loop has not seen yet, or ""
    async def connect(self, timeout_s: float) -> None: ...
    async def transact(self, unit: int, req: Request, timeout_s: float) -> tuple: ...
    async def close(self) -> None: ...
    def send_blocking(self, requests: Sequence[tuple[int, Request]],
                      timeout_s: float) -> list[Outcome]: ...
    def sever(self, reason: str) -> bool: ...


def _check_reply(unit: int, req: Request, reply_unit: int, body: bytes) -> None:
    """Raise FrameError / ExceptionResponse unless ``body`` is ``unit``'s reply to ``req``."""
    if reply_unit != unit:
        raise FrameError(f"reply from unit {reply_unit} to a request to unit {unit}")
    pdu.decode_response(req, body)


class TcpTransport:
    def __init__(self, name: str, host: str, port: int):
        self.name, self.host, self.port = name, host, port
        self.late_replies = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._tid = 0
        self._sock = None            # the live connection's socket (asyncio's TransportSocket)
        self._severed = ""           # set by sever() from another thread; cleared by connect()

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    @property
    def severed(self) -> str:
        return self._severed

    async def connect(self, timeout_s: float) -> None:
        await self.close()
        self._severed = ""
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except TimeoutError:
            raise LinkDown(self.name, f"connect to {self.host}:{self.port} timed out") from None
        except OSError as e:
            raise LinkDown(self.name, f"connect to {self.host}:{self.port}: "
                                      f"{e.strerror or e}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader, self._writer, self._sock = reader, writer, sock
        self._task = asyncio.create_task(self._read_loop(reader))

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        error: LinkError | FrameError
        try:
            while True:
                header = await reader.readexactly(pdu.MBAP_LEN)
                tid, unit, length = pdu.mbap_header(header)
                body = await reader.readexactly(length)
                fut = self._pending.pop(tid, None)
                if fut is None or fut.done():
                    self.late_replies += 1
                else:
                    fut.set_result((unit, body))
        except FrameError as e:
            error = FrameError(f"garbage from {self.host}:{self.port}: {e.reason}; reconnecting")
        except asyncio.IncompleteReadError:
            error = LinkDown(self.name, f"connection severed: {self._severed}" if self._severed
                             else f"connection closed by {self.host}:{self.port}")
        except OSError as e:
            error = LinkDown(self.name, f"connection severed: {self._severed}" if self._severed
                             else f"connection to {self.host}:{self.port}: {e.strerror or e}")
        except asyncio.CancelledError:
            error = LinkDown(self.name, "connection closed")
        self._drop(error)

    def _drop(self, error: Exception) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
        if self._writer is not None:
            self._writer.close()
        self._writer = self._sock = None

    async def transact(self, unit: int, req: Request, timeout_s: float) -> tuple:
        if self._severed and self._writer is not None:
            self._drop(LinkDown(self.name, f"connection severed: {self._severed}"))
        if not self.connected:
            raise LinkDown(self.name, f"connection severed: {self._severed}" if self._severed
                           else "not connected")
        self._tid = (self._tid + 1) & 0xFFFF
        tid = self._tid
        fut = asyncio.get_running_loop().create_future()
        self._pending[tid] = fut
        try:
            self._writer.write(pdu.mbap_frame(tid, unit, pdu.encode_request(req)))
            async with asyncio.timeout(timeout_s):
                reply_unit, body = await fut
        except TimeoutError:
            raise DeviceTimeout(self.name, unit, timeout_s) from None
        except OSError as e:
            self._drop(LinkDown(self.name, str(e)))
            raise LinkDown(self.name, f"send to {self.host}:{self.port}: {e.strerror or e}") from None
        finally:
            self._pending.pop(tid, None)
        if reply_unit != unit:
            raise FrameError(f"reply from unit {reply_unit} to a request to unit {unit}")
        return pdu.decode_response(req, body)

    # -- from another thread (see the module docstring) -------------------------------------

    def send_blocking(self, requests: Sequence[tuple[int, Request]],
                      timeout_s: float) -> list[Outcome]:
        """Send ``(unit, request)`` one after the other on a new blocking connection to the
        endpoint, each reply awaited, all within ``timeout_s`` (connect included); one
        outcome per request. Never raises for the network."""
        if not requests:
            return []
        deadline = time.monotonic() + timeout_s
        outcomes: list[Outcome] = []
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout_s) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for tid, (unit, req) in enumerate(requests, start=1):
                    outcomes.append(self._exchange_blocking(s, tid, unit, req, deadline, timeout_s))
                    if isinstance(outcomes[-1], LinkError):
                        break          # out of time, or the connection is gone
        except socket.timeout:
            outcomes.append(LinkDown(self.name, f"connect to {self.host}:{self.port} timed out"))
        except OSError as e:
            outcomes.append(LinkDown(self.name, f"connect to {self.host}:{self.port}: "
                                                f"{e.strerror or e}"))
        last = outcomes[-1] if outcomes else None
        outcomes += [last] * (len(requests) - len(outcomes))     # the ones never sent
        return outcomes

    def _exchange_blocking(self, s: socket.socket, tid: int, unit: int, req: Request,
                           deadline: float, timeout_s: float) -> Outcome:
        try:
            s.settimeout(max(deadline - time.monotonic(), 1e-3))
            s.sendall(pdu.mbap_frame(tid, unit, pdu.encode_request(req)))
            while True:
                header = _recv_exactly(s, pdu.MBAP_LEN, deadline)
                reply_tid, reply_unit, length = pdu.mbap_header(header)
                body = _recv_exactly(s, length, deadline)
                if reply_tid == tid:
                    _check_reply(unit, req, reply_unit, body)
                    return None
        except socket.timeout:
            return DeviceTimeout(self.name, unit, timeout_s)
        except (FrameError, pdu.ExceptionResponse) as e:
            return e
        except OSError as e:
            return LinkDown(self.name, f"{self.host}:{self.port}: {e.strerror or e}")

    def sever(self, reason: str) -> bool:
        """Shut the live connection down (both directions) without touching the loop's
        objects; True if there was one. The loop sees the end of the connection when it runs."""
        sock = self._sock
        if sock is None:
            return False
        self._severed = reason or "severed"
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:          # already closed by the peer or the loop
            return False
        return True

    async def close(self) -> None:
        task, self._task = self._task, None
        writer = self._writer
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
        self._writer = self._sock = None


def _recv_exactly(s: socket.socket, n: int, deadline: float) -> bytes:
    """``n`` bytes from blocking ``s`` by ``deadline`` (socket.timeout after it; OSError on EOF)."""
    data = bytearray()
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        s.settimeout(left)
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError(0, "connection closed by the device")
        data += chunk
    return bytes(data)


_BAUD = {b: getattr(termios, f"B{b}") for b in (1200, 2400, 4800, 9600, 19200, 38400, 57600,
                                                 115200, 230400) if hasattr(termios, f"B{b}")}


def open_serial(device: str, baud: int, parity: str, stop_bits: int) -> int:
    """Open a serial device (or pty) raw, 8 data bits, non-blocking; the file descriptor."""
    if baud not in _BAUD:
        raise ValueError(f"unsupported baud rate {baud} (supported: {sorted(_BAUD)})")
    fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        tty.setraw(fd)
        attrs = termios.tcgetattr(fd)
        cflag = attrs[2] & ~(termios.PARENB | termios.PARODD | termios.CSTOPB | termios.CSIZE)
        cflag |= termios.CS8 | termios.CLOCAL | termios.CREAD
        if parity != "none":
            cflag |= termios.PARENB | (termios.PARODD if parity == "odd" else 0)
        if stop_bits == 2:
            cflag |= termios.CSTOPB
        attrs[2] = cflag
        attrs[4] = attrs[5] = _BAUD[baud]
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        termios.tcflush(fd, termios.TCIOFLUSH)
    except Exception:
        os.close(fd)
        raise
    return fd


class RtuTransport:
    def __init__(self, name: str, device: str, baud: int, parity: str = "even", stop_bits: int = 1):
        self.name, self.device = name, device
        self.baud, self.parity, self.stop_bits = baud, parity, stop_bits
        self.char_s = pdu.char_time_s(baud, parity, stop_bits)
        self.gap_s = pdu.frame_gap_s(baud, parity, stop_bits)
        self.late_replies = 0
        self._fd: int | None = None
        self._buf = bytearray()
        self._data = asyncio.Event()
        self._last_rx = 0.0      # monotonic time of the last byte received
        self._last_tx_end = 0.0  # when our last frame has left the line
        self._closed_reason = ""

    @property
    def connected(self) -> bool:
        return self._fd is not None

    @property
    def severed(self) -> str:
        return ""                # a serial line has no connection to sever (module docstring)

    async def connect(self, timeout_s: float) -> None:
        await self.close()
        try:
            fd = open_serial(self.device, self.baud, self.parity, self.stop_bits)
        except (OSError, termios.error) as e:
            msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise LinkDown(self.name, f"open {self.device}: {msg}") from None
        self._fd = fd
        self._buf.clear()
        asyncio.get_running_loop().add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError as e:   # the other end of a pty went away, or the adapter was unplugged
            self._closed_reason = e.strerror or str(e)
            self._detach()
            self._data.set()
            return
        if not data:
            self._closed_reason = "end of file"
            self._detach()
        else:
            self._buf += data
            self._last_rx = time.monotonic()
        self._data.set()

    def _detach(self) -> None:
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    async def _wait_silence(self) -> None:
        """Let the line be quiet for one frame gap, then drop whatever came in meanwhile."""
        while True:
            quiet_since = max(self._last_rx, self._last_tx_end)
            wait = quiet_since + self.gap_s - time.monotonic()
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        if self._buf:
            self.late_replies += 1
            self._buf.clear()

    async def transact(self, unit: int, req: Request, timeout_s: float) -> tuple:
        if self._fd is None:
            raise LinkDown(self.name, f"{self.device} not open" +
                           (f" ({self._closed_reason})" if self._closed_reason else ""))
        await self._wait_silence()
        frame = pdu.rtu_frame(unit, pdu.encode_request(req))
        try:
            os.write(self._fd, frame)
        except OSError as e:
            self._closed_reason = e.strerror or str(e)
            self._detach()
            raise LinkDown(self.name, f"write {self.device}: {self._closed_reason}") from None
        sent = time.monotonic()
        self._last_tx_end = sent + len(frame) * self.char_s
        expected = 1 + pdu.response_pdu_length(req) + 2
        # the timeout runs from the end of our frame to the end of the reply on the line
        deadline = self._last_tx_end + timeout_s + expected * self.char_s
        while True:
            if self._fd is None:
                raise LinkDown(self.name, f"{self.device}: {self._closed_reason}")
            if len(self._buf) >= 2 and self._buf[1] == req.function | 0x80:
                expected = 5
            if len(self._buf) >= expected:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                got = len(self._buf)
                self._buf.clear()
                if got:
                    raise FrameError(f"incomplete reply from unit {unit}: {got} of {expected} bytes")
                raise DeviceTimeout(self.name, unit, timeout_s)
            self._data.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._data.wait()
            except TimeoutError:
                pass
        adu = bytes(self._buf[:expected])
        extra = len(self._buf) - expected
        self._buf.clear()
        if extra:
            raise FrameError(f"{extra} unexpected bytes after the reply of unit {unit}")
        reply_unit, body = pdu.rtu_unframe(adu)
        if reply_unit != unit:
            raise FrameError(f"reply from unit {reply_unit} to a request to unit {unit}")
        return pdu.decode_response(req, body)

    # -- from another thread (see the module docstring) -------------------------------------

    def send_blocking(self, requests: Sequence[tuple[int, Request]],
                      timeout_s: float) -> list[Outcome]:
        """Write ``(unit, request)`` frames on the open port one after the other, each reply
        awaited, all within ``timeout_s``; one outcome per request. Only while the loop that
        owns the port is blocked (nobody else writes): whatever is on the line first is
        discarded after a frame gap of silence. Never raises for the line."""
        fd = self._fd
        if fd is None:
            down = LinkDown(self.name, f"{self.device} not open")
            return [down] * len(requests)
        deadline = time.monotonic() + timeout_s
        outcomes: list[Outcome] = []
        try:
            self._drain_blocking(fd, deadline)
            for unit, req in requests:
                outcomes.append(self._exchange_blocking(fd, unit, req, deadline, timeout_s))
                if isinstance(outcomes[-1], LinkError):
                    break
        except OSError as e:
            outcomes.append(LinkDown(self.name, f"{self.device}: {e.strerror or e}"))
        last = outcomes[-1] if outcomes else None
        outcomes += [last] * (len(requests) - len(outcomes))
        self._last_tx_end = time.monotonic()     # the loop keeps a frame gap after us
        return outcomes

    def _drain_blocking(self, fd: int, deadline: float) -> None:
        """Read and drop input until the line has been silent for one frame gap."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], min(self.gap_s, left))[0]:
                return
            try:
                if not os.read(fd, 4096):
                    return
            except BlockingIOError:
                pass

    def _exchange_blocking(self, fd: int, unit: int, req: Request, deadline: float,
                           timeout_s: float) -> Outcome:
        frame = pdu.rtu_frame(unit, pdu.encode_request(req))
        while frame:
            left = deadline - time.monotonic()
            if left <= 0:
                return DeviceTimeout(self.name, unit, timeout_s)
            try:
                frame = frame[os.write(fd, frame):]
            except BlockingIOError:
                select.select([], [fd], [], left)
        expected = 1 + pdu.response_pdu_length(req) + 2
        buf = bytearray()
        while len(buf) < expected:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                if buf:
                    return FrameError(f"incomplete reply from unit {unit}: {len(buf)} of "
                                      f"{expected} bytes")
                return DeviceTimeout(self.name, unit, timeout_s)
            try:
                chunk = os.read(fd, expected - len(buf))
            except BlockingIOError:
                continue
            if not chunk:
                return LinkDown(self.name, f"{self.device}: end of file")
            buf += chunk
            if len(buf) >= 2 and buf[1] == req.function | 0x80:
                expected = 5                     # an exception reply: unit, function, code, CRC
        try:
            reply_unit, body = pdu.rtu_unframe(bytes(buf[:expected]))
            _check_reply(unit, req, reply_unit, body)
        except (FrameError, pdu.ExceptionResponse) as e:
            return e
        time.sleep(self.gap_s)                   # the silence before the next frame
        return None

    def sever(self, reason: str) -> bool:
        """Nothing to close on a serial line (see the module docstring): False."""
        return False

    async def close(self) -> None:
        if self._fd is not None:
            self._detach()
        self._buf.clear()
