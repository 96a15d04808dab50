"""``tempering run`` as a systemd service: the notify protocol (sd_notify(3)) and log records
to the journal in its native protocol (systemd-journald.service(8), "Native Journal Protocol").
No libsystemd: each is one AF_UNIX datagram per message, sent without blocking.

Who talks to systemd (the design). The unit's main process is the supervisor, and it alone
sends notifications (``NotifyAccess=main``); the PLC process never does:

- ``READY=1`` once the PLC has scanned and the plant window serves (both have beaten their
  heartbeat pipes: the window starts beating only once its OPC UA server is up);
- ``STATUS=`` a line saying what runs (sent when it changes);
- ``WATCHDOG=1`` every ``WATCHDOG_USEC``/2, and only while the PLC's scan heartbeat is fresh
  (a beat younger than ``WATCHDOG_USEC``/2): each ping vouches that the scan ran since the
  previous one. A hung PLC stops the pings at once; the supervisor kills and restarts it after
  ``--plc-hang-s`` (2 s), and the pings come back with the new PLC's first scan. With
  ``WatchdogSec=`` longer than that restart (the unit has 15 s), systemd steps in only when the
  supervisor cannot revive the PLC (it keeps failing or hanging) or when the supervisor itself
  hangs (its loop sends the pings);
- ``STOPPING=1`` when the stop begins.

Why the supervisor and not the PLC (``NotifyAccess=all``, the PLC pinging after its scans):
the supervisor already receives the PLC's heartbeat from the scan path and is the one process
whose hang nobody else watches; pinging from it covers both a dead PLC and a dead supervisor
with one rule, adds nothing to the scan (not even a rate-limited send), keeps the PLC process
free of service-manager concerns, and lets systemd trust only the main PID. The children get
an environment without ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``
(``Notifier.from_environ`` takes them out), so nothing else can talk in the service's name.
``WATCHDOG_PID`` naming another process means the watchdog is not ours: no pings.

Journal: when stderr is the journal's stream (``JOURNAL_STREAM`` equals stderr's
``device:inode``, as systemd sets it for ``StandardError=journal``), or when
``TEMPERING_JOURNAL_SOCKET`` names a socket, ``journal_logging`` replaces the root logger's
handlers with a ``JournalHandler``: each record one datagram of fields MESSAGE, PRIORITY
(syslog levels), SYSLOG_IDENTIFIER=tempering, TEMPERING_PROCESS (plc, window, supervisor),
TEMPERING_MACHINE, CODE_FILE, CODE_LINE, CODE_FUNC, LOGGER; a value with a newline goes in the
binary-safe form (name, newline, 64-bit little-endian length, bytes, newline); a record too big
for a datagram goes in a sealed memfd passed with SCM_RIGHTS. Otherwise logging stays as it is.
A send that fails (journald away, its buffer full) drops the record: logging never blocks.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Iterable, MutableMapping

log = logging.getLogger(__name__)

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "tempering"
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _address(name: str) -> str | None:
    """A socket address from ``NOTIFY_SOCKET``: a path, or ``@name`` for an abstract name."""
    if name.startswith("/"):
        return name
    if name.startswith("@") and len(name) > 1:
        return "\0" + name[1:]
    return None                     # vsock: and the like are not spoken here


def _datagram_socket() -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    s.setblocking(False)
    return s


class Notifier:
    """sd_notify without libsystemd. ``address`` None: not under a service manager, every call
    does nothing. ``watchdog_s``: the watchdog interval asked for (``WATCHDOG_USEC``), or None."""

    def __init__(self, address: str | None, watchdog_s: float | None = None):
        self.address = address
        self.watchdog_s = watchdog_s if address else None
        self._sock = _datagram_socket() if address else None
        self._failing = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *, pid: int | None = None,
                     unset: bool = True) -> "Notifier":
        """The notifier systemd asked for in ``environ`` (default ``os.environ``); with ``unset``
        the three variables are taken out, so the processes started later do not inherit them."""
        env = os.environ if environ is None else environ
        pid = os.getpid() if pid is None else pid
        raw = env.get("NOTIFY_SOCKET", "")
        usec, wpid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if unset:
            for name in NOTIFY_VARIABLES:
                env.pop(name, None)
        address = _address(raw) if raw else None
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%s: not a path or an abstract name; not notifying", raw)
        watchdog_s = None
        if usec.isdigit() and int(usec) > 0 and (not wpid or (wpid.isdigit() and int(wpid) == pid)):
            watchdog_s = int(usec) / 1e6
        return cls(address, watchdog_s)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *assignments: str) -> bool:
        """One datagram of ``KEY=value`` lines; False if not sent (never raises, never blocks)."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as e:
            if not self._failing:            # once per outage, then quietly
                log.warning("notify socket %s: %s", self.address.replace("\0", "@"), e.strerror or e)
            self._failing = True
            return False
        self._failing = False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class ServiceState:
    """What the supervisor tells systemd, from what it knows of its children; ``update`` is
    called from its loop (every 50 ms), with monotonic times in seconds."""

    def __init__(self, notifier: Notifier):
        self.notifier = notifier
        self.ready = False
        self.stopping = False
        self.status = ""
        self.last_ping_s: float | None = None
        self.pings = 0

    @property
    def ping_every_s(self) -> float | None:
        w = self.notifier.watchdog_s
        return None if w is None else w / 2

    def update(self, now_s: float, *, plc_beat_s: float | None, window_beat_s: float | None,
               status: str) -> None:
        if not self.notifier.enabled or self.stopping:
            return
        if status != self.status:
            self.status = status
            self.notifier.send("STATUS=" + status.replace("\n", " "))
        if not self.ready and plc_beat_s is not None and window_beat_s is not None:
            self.ready = True
            self.notifier.send("READY=1", "STATUS=" + status.replace("\n", " "))
        every = self.ping_every_s
        if every is None or plc_beat_s is None or now_s - plc_beat_s >= every:
            return                          # the scan did not run lately: no word for systemd
        if self.last_ping_s is None or now_s - self.last_ping_s >= every:
            if self.notifier.send("WATCHDOG=1"):
                self.pings += 1
            self.last_ping_s = now_s

    def stop(self, status: str = "stopping") -> None:
        if self.notifier.enabled and not self.stopping:
            self.stopping = True
            self.notifier.send("STOPPING=1", "STATUS=" + status)


# -- the journal ------------------------------------------------------------------------------

PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level: 2 crit, 3 err, 4 warning, 6 info, 7 debug."""
    for level, prio in PRIORITY:
        if levelno >= level:
            return prio
    return 7


def encode_fields(fields: Iterable[tuple[str, str | bytes]]) -> bytes:
    """The journal's native protocol: ``KEY=value\\n``, or for a value with a newline
    ``KEY\\n`` + its length as 64-bit little-endian + the bytes + ``\\n``."""
    out = bytearray()
    for key, value in fields:
        data = value.encode("utf-8", "replace") if isinstance(value, str) else value
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def under_journal(environ: MutableMapping[str, str] | None = None, fd: int = 2) -> bool:
    """True if ``fd`` (stderr) is the journal's stream: ``JOURNAL_STREAM`` is its device:inode."""
    stream = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class JournalHandler(logging.Handler):
    """Log records as journal entries with the fields of this module's docstring."""

    def __init__(self, process: str, machine: str, path: str = JOURNAL_SOCKET,
                 level: int = logging.NOTSET):
        super().__init__(level)
        self.path = path
        self.constant = [("SYSLOG_IDENTIFIER", IDENTIFIER), ("TEMPERING_PROCESS", process),
                         ("TEMPERING_MACHINE", machine)]
        self._sock = _datagram_socket()

    def fields(self, record: logging.LogRecord) -> list[tuple[str, str]]:
        return [("MESSAGE", self.format(record)), ("PRIORITY", str(syslog_priority(record.levelno))),
                *self.constant, ("CODE_FILE", record.pathname), ("CODE_LINE", str(record.lineno)),
                ("CODE_FUNC", record.funcName), ("LOGGER", record.name)]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = encode_fields(self.fields(record))
            try:
                self._sock.sendto(data, self.path)
            except OSError as e:
                if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    return                  # journald away or busy: the record is dropped
                self._send_memfd(data)
        except Exception:
            self.handleError(record)

    def _send_memfd(self, data: bytes) -> None:
        """A record too big for one datagram: the same bytes in a sealed memfd (the protocol's
        way for large entries)."""
        import fcntl

        fd = os.memfd_create("tempering-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            with contextlib.suppress(OSError):
                self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         struct.pack("i", fd))], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()
        super().close()


def journal_logging(process: str, machine: str, environ: MutableMapping[str, str] | None = None,
                    fd: int = 2) -> JournalHandler | None:
    """Under systemd (or ``TEMPERING_JOURNAL_SOCKET`` set): the root logger writes to the
    journal instead of stderr. Returns the handler, or None if logging stays as it is."""
    env = os.environ if environ is None else environ
    path = env.get("TEMPERING_JOURNAL_SOCKET") or (JOURNAL_SOCKET if under_journal(env, fd) else None)
    if path is None:
        return None
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = JournalHandler(process, machine, path)
    root.addHandler(handler)
    return handler
