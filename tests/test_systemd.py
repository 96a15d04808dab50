"""``tempering run`` as a systemd service (``tempering/systemd.py``, ``config/systemd``).

The notify protocol is checked against AF_UNIX datagram sockets this test binds (a path and an
abstract name), with a real ``tempering run`` that believes it runs under systemd
(``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` in its environment); each datagram's sender is read from
its credentials (SO_PASSCRED), so "only the main process talks" is checked too. The journal
handler is checked against a datagram socket decoded with the native protocol's rules. The unit
is verified by ``systemd-analyze verify`` when the machine has it.
"""

from __future__ import annotations

import array
import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from runs import ROOT, TemperingRun, machine_dir, stopped

from tempering.systemd import (JournalHandler, Notifier, ServiceState, encode_fields,
                               journal_logging, syslog_priority, under_journal)

UNIT = ROOT / "config" / "systemd" / "tempering.service"
UCRED = struct.Struct("iII")            # pid, uid, gid


class Listener:
    """A datagram socket bound at ``address`` (a path, or ``\\0name``), read by a thread:
    ``messages`` is a list of (monotonic time s, sender pid, text)."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
            except socket.timeout:
                continue
            pid = next((UCRED.unpack(d[:UCRED.size])[0] for level, kind, d in anc
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), -1)
            self.messages.append((time.monotonic(), pid, data.decode()))

    def wait_for(self, line: str, timeout_s: float = 60.0, after_s: float = 0.0) -> float:
        """The time of the first message (sent after ``after_s``) that has ``line`` in it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for t, _pid, text in list(self.messages):
                if t >= after_s and line in text.split("\n"):
                    return t
            time.sleep(0.05)
        raise AssertionError(f"no {line!r} within {timeout_s:g} s: {self.messages[-20:]}")

    def times(self, line: str, start_s: float = 0.0, end_s: float = float("inf")) -> list[float]:
        return [t for t, _pid, text in list(self.messages) if start_s <= t < end_s and line in text.split("\n")]

    def statuses(self) -> list[str]:
        return [ln[len("STATUS="):] for _t, _p, text in list(self.messages)
                for ln in text.split("\n") if ln.startswith("STATUS=")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.sock.close()


# -- the unit -----------------------------------------------------------------------------------

def _settings(text: str) -> dict[str, str]:
    return dict(ln.split("=", 1) for ln in text.splitlines() if "=" in ln and not ln.startswith("#"))


def test_unit_declares_the_service():
    s = _settings(UNIT.read_text())
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["ExecStart"].startswith("/opt/tempering/.venv/bin/tempering run --config /var/lib/tempering/")
    assert (s["User"], s["Group"], s["SupplementaryGroups"]) == ("tempering", "tempering", "dialout")
    assert s["Restart"] == "on-failure" and s["ProtectSystem"] == "strict"
    assert s["ReadWritePaths"] == "/var/lib/tempering" and s["StateDirectory"] == "tempering"
    assert s["AmbientCapabilities"] == "CAP_SYS_NICE" and int(s["LimitRTPRIO"]) >= 10
    assert s["KillMode"] == "mixed"
    # the supervisor revives a hung PLC (2 s + a restart) before systemd's watchdog fires
    assert int(s["WatchdogSec"].rstrip("s")) >= 10


def test_unit_verifies(tmp_path):
    """``systemd-analyze verify``: syntax, known keys. The ExecStart binary is checked to exist,
    so the copy verified runs this checkout's ``tempering`` (the only change)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    exe = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "tempering"
    exe = exe if exe.exists() else ROOT / ".venv" / "bin" / "tempering"
    unit = tmp_path / "tempering.service"
    unit.write_text(UNIT.read_text().replace("/opt/tempering/.venv/bin/tempering", str(exe)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                       timeout=30, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "tempering.service" not in r.stderr + r.stdout, r.stderr + r.stdout


# -- the notify protocol, pure parts ------------------------------------------------------------

def test_notifier_reads_and_takes_the_environment():
    env = {"NOTIFY_SOCKET": "@svc", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "42", "PATH": "/bin"}
    n = Notifier.from_environ(env, pid=42)
    assert (n.address, n.watchdog_s) == ("\0svc", 3.0)
    assert env == {"PATH": "/bin"}                      # the children inherit none of it
    n.close()
    n = Notifier.from_environ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "3000000",
                               "WATCHDOG_PID": "41"}, pid=42)
    assert (n.address, n.watchdog_s) == ("/run/x", None)  # another process's watchdog
    n.close()
    assert not Notifier.from_environ({}, pid=1).enabled
    assert not Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:9"}, pid=1).enabled


class Recorder(Notifier):
    def __init__(self, watchdog_s):
        super().__init__(None)
        self.watchdog_s, self.sent = watchdog_s, []

    enabled = True

    def send(self, *assignments):
        self.sent.append(assignments)
        return True


@pytest.mark.parametrize("beats, pings", [
    # (time of the PLC's last beat at each 50 ms tick, or None) -> times of WATCHDOG=1
    (lambda t: t - t % 0.1, [0.0, 0.5, 1.0, 1.5]),          # scanning: every interval/2
    (lambda t: None, []),                                     # never scanned: no ping
    (lambda t: min(t, 0.6) - min(t, 0.6) % 0.1, [0.0, 0.5]),  # hung at 0.6 s: pings stop
])
def test_watchdog_pings_only_while_the_scan_runs(beats, pings):
    state = ServiceState(Recorder(watchdog_s=1.0))
    sent = []
    for i in range(40):                                       # 2 s in 50 ms ticks
        t = i * 0.05
        before = state.pings
        state.update(t, plc_beat_s=beats(t), window_beat_s=0.0, status="s")
        if state.pings > before:
            sent.append(round(t, 2))
    assert sent == pings


def test_ready_once_both_beat_then_stopping():
    rec = Recorder(watchdog_s=None)
    state = ServiceState(rec)
    state.update(0.0, plc_beat_s=None, window_beat_s=None, status="PLC starting")
    state.update(0.1, plc_beat_s=0.1, window_beat_s=None, status="PLC scanning")
    assert not any("READY=1" in m for m in rec.sent)
    state.update(0.2, plc_beat_s=0.2, window_beat_s=0.2, status="all")
    state.update(0.3, plc_beat_s=0.3, window_beat_s=0.3, status="all")
    state.stop()
    state.update(0.4, plc_beat_s=0.4, window_beat_s=0.4, status="after")
    assert rec.sent == [("STATUS=PLC starting",), ("STATUS=PLC scanning",), ("STATUS=all",),
                        ("READY=1", "STATUS=all"), ("STOPPING=1", "STATUS=stopping")]


# -- the notify protocol with a real `tempering run` ------------------------------------------

def test_run_notifies_a_path_socket_and_pings_while_the_plc_scans(tmp_path):
    """READY=1 after the PLC scans and the window serves OPC UA, WATCHDOG=1 every 0.5 s
    (WATCHDOG_USEC 1 s), all from the supervisor. A PLC stopped with SIGSTOP: the pings stop
    within the interval; the supervisor kills it after --plc-hang-s (2 s) and starts a new one;
    the pings come back with its first scan (systemd, with a watchdog longer than that pause,
    never steps in). SIGTERM: STOPPING=1, exit 0."""
    listener = Listener(str(tmp_path / "notify.sock"))
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    try:
        with TemperingRun(machine_dir(tmp_path), "--no-start", "--no-history", env=env) as run:
            ready = listener.wait_for("READY=1", 60)
            run.wait_for(r"^plc: pid \d+, scan")              # printed before the first scan
            run.wait_for(r"^opc ua: serving")
            assert "PLC scanning" in listener.statuses()[-1]
            plc = run.pid("plc")
            listener.wait_for("WATCHDOG=1", 5, after_s=ready)
            time.sleep(2.0)
            pings = listener.times("WATCHDOG=1", start_s=ready)
            gaps = [b - a for a, b in zip(pings, pings[1:])]
            assert len(pings) >= 4 and all(0.4 < g < 0.8 for g in gaps), gaps

            with stopped(plc):
                frozen = time.monotonic()
                n = len(run.lines)
                run.wait_for(rf"supervisor: plc \(pid {plc}\) hung", 10)
                hung = time.monotonic()
            new_plc = run.pid("plc", after=n)
            assert new_plc != plc
            # the last ping came no later than one interval after the PLC stopped ...
            last = max(listener.times("WATCHDOG=1", end_s=hung))
            assert last < frozen + 1.0
            silent = listener.times("WATCHDOG=1", start_s=frozen + 1.0, end_s=hung)
            assert silent == []
            # ... and the new PLC's scans bring them back
            back = listener.wait_for("WATCHDOG=1", 30, after_s=hung)
            print(f"pings: every {sum(gaps) / len(gaps):.2f} s; PLC stopped {frozen - ready:.1f} s "
                  f"after READY; last ping {last - frozen:+.2f} s; supervisor kill {hung - frozen:.1f} s; "
                  f"pings back {back - frozen:.1f} s after the stop")
            assert any("PLC scanning" in s and "1 restart(s)" in s for s in listener.statuses())
            assert "PLC silent" in " ".join(listener.statuses())
            stop_sent = time.monotonic()
            code = run.stop()
        assert code == 0, run.output
        listener.wait_for("STOPPING=1", 5, after_s=stop_sent)
        senders = {pid for _t, pid, _text in listener.messages}
        assert senders == {run.proc.pid}                 # the supervisor alone (NotifyAccess=main)
        assert "systemd: watchdog 1 s: WATCHDOG=1 every 0.5 s while the PLC scans" in run.output
    finally:
        listener.close()


def test_run_notifies_an_abstract_socket(tmp_path):
    """``NOTIFY_SOCKET=@name``; ``WATCHDOG_PID`` of another process: READY=1 and STOPPING=1,
    no WATCHDOG=1 (the watchdog is not the supervisor's)."""
    name = f"tempering-test-{os.getpid()}-{time.monotonic_ns()}"
    listener = Listener("\0" + name)
    env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    try:
        with TemperingRun(machine_dir(tmp_path), "--no-start", "--no-history", "--no-opcua",
                          env=env) as run:
            ready = listener.wait_for("READY=1", 60)
            time.sleep(1.0)
            stop_sent = time.monotonic()
            assert run.stop() == 0, run.output
        listener.wait_for("STOPPING=1", 5, after_s=stop_sent)
        assert listener.times("WATCHDOG=1") == []
        assert listener.times("READY=1") == [ready]
    finally:
        listener.close()


# -- the journal --------------------------------------------------------------------------------

def decode_fields(data: bytes) -> dict[str, bytes]:
    """The journal's native protocol read back (a second, independent reading of its rules)."""
    fields, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = nl + 1
        else:
            key = line
            (size,) = struct.unpack_from("<Q", data, nl + 1)
            value = data[nl + 9:nl + 9 + size]
            assert data[nl + 9 + size:nl + 10 + size] == b"\n"
            i = nl + 10 + size
        assert key.decode().isupper() or "_" in key.decode(), key
        fields[key.decode()] = value
    return fields


@pytest.fixture
def journal(tmp_path):
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    handler = JournalHandler("plc", "tempering-01", path)
    logger = logging.getLogger("tempering.test_systemd")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield sock, logger
    logger.removeHandler(handler)
    handler.close()
    sock.close()


def test_journal_record_fields(journal):
    sock, logger = journal
    logger.warning("zone %s: sensor lost", "tank")
    f = decode_fields(sock.recv(65536))
    assert f["MESSAGE"] == b"zone tank: sensor lost"
    assert f["PRIORITY"] == b"4"
    assert f["SYSLOG_IDENTIFIER"] == b"tempering"
    assert f["TEMPERING_PROCESS"] == b"plc" and f["TEMPERING_MACHINE"] == b"tempering-01"
    assert f["CODE_FILE"] == __file__.encode() and f["CODE_FUNC"] == b"test_journal_record_fields"
    assert int(f["CODE_LINE"]) > 0
    assert f["LOGGER"] == b"tempering.test_systemd"


def test_journal_multiline_message_is_binary_safe(journal):
    sock, logger = journal
    try:
        raise ValueError("bad\nreply")
    except ValueError:
        logger.exception("link io:\nno answer")
    data = sock.recv(65536)
    assert b"MESSAGE\n" in data and b"MESSAGE=" not in data
    f = decode_fields(data)
    assert f["MESSAGE"].startswith(b"link io:\nno answer\nTraceback")
    assert b"ValueError: bad\nreply" in f["MESSAGE"]
    assert f["PRIORITY"] == b"3"


def test_journal_big_record_goes_in_a_memfd(journal):
    sock, logger = journal
    text = "x" * 400_000                     # above a datagram's limit
    logger.error(text)
    msg, anc, _flags, _addr = sock.recvmsg(16, socket.CMSG_SPACE(4))
    fds = array.array("i")
    for level, kind, d in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(d[:4])
    assert msg == b"" and len(fds) == 1
    with os.fdopen(fds[0], "rb") as f:                # journald maps it from offset 0
        f.seek(0)
        assert decode_fields(f.read())["MESSAGE"] == text.encode()


@pytest.mark.parametrize("level, prio", [(logging.CRITICAL, 2), (logging.ERROR, 3),
                                         (logging.WARNING, 4), (logging.INFO, 6), (logging.DEBUG, 7)])
def test_syslog_priority(level, prio):
    assert syslog_priority(level) == prio


def test_encode_fields_table():
    assert encode_fields([("A", "1"), ("B", "x\ny")]) == b"A=1\nB\n" + struct.pack("<Q", 3) + b"x\ny\n"


def test_journal_only_when_stderr_is_the_journal(tmp_path):
    """JOURNAL_STREAM equal to the stream's device:inode: records go to the journal; another
    device:inode, or none: logging stays as it is."""
    stream = open(tmp_path / "stream", "w")
    st = os.fstat(stream.fileno())
    root = logging.getLogger()
    saved = list(root.handlers)
    try:
        assert under_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stream.fileno())
        assert not under_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, stream.fileno())
        assert not under_journal({}, stream.fileno())
        assert journal_logging("window", "m", {}, stream.fileno()) is None
        assert root.handlers == saved
        sock = str(tmp_path / "j.sock")
        handler = journal_logging("window", "m", {"TEMPERING_JOURNAL_SOCKET": sock}, stream.fileno())
        assert root.handlers == [handler] and handler.path == sock
        handler.close()
        for h in list(root.handlers):
            root.removeHandler(h)
        handler = journal_logging("window", "m", {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
                                  stream.fileno())
        assert root.handlers == [handler] and handler.path == "/run/systemd/journal/socket"
        handler.close()
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
        stream.close()


def test_children_do_not_inherit_the_notify_socket(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "@x")
    monkeypatch.setenv("WATCHDOG_USEC", "1")
    n = Notifier.from_environ()
    n.close()
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
