"""``tempering run`` as the tests and benchmarks start it: a machine directory with free ports,
the supervisor as a child process whose output is read by a thread, the PIDs it announces,
and the twin's outputs read back over Modbus by an independent client (pymodbus).

One way to run the whole product in a test: ``with TemperingRun(machine_dir(tmp)) as run``;
it always ends the processes it started (SIGTERM to the supervisor, then SIGKILL to its
process group), by PID."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
from conftest import find_free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def machine_dir(base: Path, **opcua) -> Path:
    """A copy of the default machine in ``base/config`` with its own free ports (Modbus, OPC
    UA) and every file it writes under ``base``. Returns the machine file."""
    from bench.opcua import machine_files

    path = machine_files(base / "config", find_free_port(), find_free_port())
    data = yaml.safe_load(path.read_text())
    data["machine"]["state_file"] = str(base / "plc-state.json")
    data["opcua"]["data_dir"] = str(base / "opcua")
    data["opcua"].update(opcua)
    data["historian"]["spool_dir"] = str(base / "spool")
    data["historian"]["sink"]["path"] = str(base / "history.sqlite")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class TemperingRun:
    """``tempering run --config FILE ARGS...`` with its stdout collected line by line."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None):
        self.config = config
        self.env = env                   # added to this environment (None: inherited as it is)
        data = yaml.safe_load(config.read_text())
        self.modbus = (data["fieldbus"]["links"]["io"]["host"], data["fieldbus"]["links"]["io"]["port"])
        self.endpoint = data["opcua"]["endpoint"]
        self.argv = [str(BIN / "tempering"), "run", "--config", str(config), *args]
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "TemperingRun":
        self.proc = subprocess.Popen(self.argv, cwd=self.config.parent.parent, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                     start_new_session=True,
                                     env=None if self.env is None else {**os.environ, **self.env})
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout_s: float = 60.0, after: int = 0) -> re.Match:
        """The first line (from index ``after``) matching ``pattern``; AssertionError after the
        timeout, with the output so far."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for line in self.lines[after:]:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._cond.wait(0.2)):
                    raise AssertionError(f"no line matching {pattern!r} within {timeout_s:g} s:\n"
                                         + "\n".join(self.lines[-60:]))
                self._cond.wait(min(left, 0.2))

    def pid(self, child: str, after: int = 0) -> int:
        return int(self.wait_for(rf"supervisor: {child} started \(pid (\d+)\)", after=after).group(1))

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        return self._end()

    def _end(self) -> int:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        return self.proc.returncode

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


@contextlib.contextmanager
def stopped(pid: int):
    """The process ``pid`` stopped (SIGSTOP: hung, as far as anyone can tell) for the block."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def twin_outputs(host: str, port: int, register_map: Path | None = None) -> dict[str, bool]:
    """What the twin's I/O module holds, read back with pymodbus (coils with FC1, registers
    with FC3): every output point of the register map."""
    from pymodbus.client import ModbusTcpClient

    points = yaml.safe_load((register_map or ROOT / "config" / "register-map.yaml").read_text())["points"]
    out = {}
    client = ModbusTcpClient(host, port=port, timeout=1)
    try:
        if not client.connect():
            raise ConnectionError(f"twin not reachable at {host}:{port}")
        for p in points:
            if p["function"] in (5, 15):
                rr = client.read_coils(p["address"], count=1, device_id=p["unit"])
                out[p["name"]] = bool(rr.bits[0])
            elif p["function"] in (6, 16):
                rr = client.read_holding_registers(p["address"], count=1, device_id=p["unit"])
                value = rr.registers[0]
                bits = p.get("bits")
                out[p["name"]] = all(value >> b & 1 for b in bits) if bits else value != 0
    finally:
        client.close()
    return out
