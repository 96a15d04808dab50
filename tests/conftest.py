"""Shared fixtures for the tests of the pure PLC core (virtual time: no sleeps, no sockets).

- ``program``: the default machine (config/tempering-machine.yaml + its recipes) as a Program.
- ``make_inputs``: builds an input ProcessImage of a healthy machine, with overrides.
- ``rig``: a plant-free loop around ``plc.scan.scan``: the test sets the temperatures directly.

And for the loopback tests of the Modbus face (real processes, real sockets, a real pty pair):
- ``free_port``: a function, ``free_port()`` is a TCP port on 127.0.0.1 free a moment ago.
- ``pty_pair``: ``(master_path, slave_path)``, two linked ptys made by socat (a null-modem
  cable): whatever is written to one path is read from the other; socat is killed afterwards.
- ``twin_slave``: a ``TwinSlave`` on the default register map with a default ``Twin``, serving
  TCP on a free loopback port (``.tcp_port``), started in the test's event loop, closed after.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping

import pytest

from plc.commands import Command, Event
from plc.config import load_all
from plc.image import Point, ProcessImage
from plc.program import INPUT_SPECS, ZONES, Program
from plc.scan import ScanContext, ScanResult, scan
from plc.state import PlcState

ROOT = Path(__file__).resolve().parent.parent
MACHINE_FILE = ROOT / "config" / "tempering-machine.yaml"

# A healthy machine at rest: every input good and inside its limits.
HEALTHY: Mapping[str, object] = {
    **{f"temp_{z}": 20.0 for z in ZONES},
    "current_mixer": 1.5, "current_pump": 2.0, "current_vibration": 1.0, "current_total": 8.0,
    "grid_v_l1": 230.0, "grid_v_l2": 230.0, "grid_v_l3": 230.0, "grid_freq": 50.0,
    "estop_ok": True, "pedal": False,
}


def inputs_image(temps: Mapping[str, float] | None = None, timestamp_s: float = 0.0,
                 **values: object) -> ProcessImage:
    """Healthy inputs; ``temps`` maps zone -> degC; ``values`` overrides points by name (a plain
    value becomes a good point, a Point is used as is, ``None`` removes the point)."""
    merged: dict[str, object] = dict(HEALTHY)
    for z, v in (temps or {}).items():
        merged[f"temp_{z}"] = v
    merged.update(values)
    points = {}
    for name, v in merged.items():
        if v is None:
            continue
        points[name] = v if isinstance(v, Point) else Point(v, timestamp_s=timestamp_s)
    return ProcessImage.build(INPUT_SPECS, points)


@pytest.fixture(scope="session")
def program() -> Program:
    cfg, book = load_all(MACHINE_FILE)
    return Program.from_config(cfg, book)


@pytest.fixture(scope="session")
def make_inputs() -> Callable[..., ProcessImage]:
    return inputs_image


class Rig:
    """Drives ``scan`` in virtual time. ``temps`` are what the sensors read (set them directly);
    ``overrides`` are extra input points. Odd ticks add 0.01 degC so a reading never looks
    stuck; set ``dither=False`` to turn that off."""

    def __init__(self, program: Program, state: PlcState | None = None, now_s: float = 0.0,
                 tick: int = 0, temps: Mapping[str, float] | None = None, dither: bool = True):
        self.p = program
        self.state = state or PlcState()
        self.now_s = now_s
        self.tick = tick
        self.temps: dict[str, float] = {z: 20.0 for z in ZONES}
        self.temps.update(temps or {})
        self.overrides: dict[str, object] = {}
        self.dither = dither
        self.events: list[Event] = []
        self.last: ScanResult | None = None

    @property
    def dt(self) -> float:
        return self.p.period_s

    def set(self, **temps: float) -> "Rig":
        self.temps.update(temps)
        return self

    def set_all(self, temp_c: float) -> "Rig":
        return self.set(**{z: temp_c for z in ZONES})

    def image(self) -> ProcessImage:
        d = 0.01 if (self.dither and self.tick % 2) else 0.0
        temps = {z: v + d if isinstance(v, float) else v for z, v in self.temps.items()}
        return inputs_image(temps, self.now_s, **self.overrides)

    def scan(self, *cmds: Command, watchdog: str = "") -> ScanResult:
        r = scan(self.p, self.state, self.image(), list(cmds),
                 ScanContext(self.tick, self.dt, self.now_s, watchdog))
        self.state = r.state
        self.events += r.events
        self.last = r
        self.tick += 1
        self.now_s = round(self.now_s + self.dt, 9)
        return r

    def run(self, seconds: float, until: Callable[[ScanResult], bool] | None = None
            ) -> list[ScanResult]:
        """Scan for ``seconds`` (or until ``until(result)`` is true); returns every result."""
        out = []
        for _ in range(round(seconds / self.dt)):
            r = self.scan()
            out.append(r)
            if until is not None and until(r):
                break
        return out

    def kinds(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]


@pytest.fixture(scope="session")
def rig(program: Program) -> Callable[..., Rig]:
    """A factory (stateless, so session-scoped): ``rig(p=None, state=None, temps=..., ...)``."""
    def make(p: Program | None = None, **kw) -> Rig:
        return Rig(p or program, **kw)
    return make


# -- loopback Modbus ------------------------------------------------------------------------

def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """``free_port()``: a TCP port on 127.0.0.1 that was free a moment ago."""
    return find_free_port


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two linked ptys (socat): ``(master, slave)`` paths; serve one end, talk on the other."""
    socat = shutil.which("socat")
    if socat is None:
        pytest.fail("socat is not installed (make system-deps)")
    master, slave = tmp_path / "master", tmp_path / "slave"
    proc = subprocess.Popen([socat, "-d", "-d", f"pty,raw,echo=0,link={master}",
                             f"pty,raw,echo=0,link={slave}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10.0
        while not (os.path.exists(master) and os.path.exists(slave)):
            if proc.poll() is not None:
                pytest.fail(f"socat exited: {proc.stderr.read().decode(errors='replace')}")
            if time.monotonic() > deadline:
                pytest.fail("socat did not create the pty pair within 10 s")
            time.sleep(0.01)
        yield str(master), str(slave)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 15)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, 9)
                proc.wait()
        proc.stderr.close()


@pytest.fixture
async def twin_slave():
    """A TwinSlave on the default register map, TCP on a free loopback port, in this loop."""
    from opcua_server.config import load
    from twin import Twin
    from twin.modbus_slave import TwinSlave

    cfg, _ = load()
    slave = TwinSlave(Twin(cfg.twin, seed=0), cfg.fieldbus.points)
    await slave.start_tcp("127.0.0.1", 0)
    try:
        yield slave
    finally:
        await slave.close()


# -- real time-series servers on loopback (the historian's sinks) ---------------------------
#
# - ``influxdb1``: an InfluxDB 1.x (``influxd -config <tmp>/influxdb.conf``) on free loopback
#   ports with its meta, data and wal in tmp_path, database ``tempering`` created; a
#   ``historian.testservers.InfluxServer``: ``.url``, ``.database``, ``.pid``, ``.stop()``,
#   ``.start()`` (same port, same data: an outage), ``.query(influxql)`` -> JSON,
#   ``.rows(influxql)`` -> list of dicts. Stopped by PID at the end, also on failure.
# - ``victoria_metrics``: a VictoriaMetrics (``-storageDataPath <tmp> -httpListenAddr
#   127.0.0.1:<port>``, fresh points queryable, replays deduplicated); a
#   ``VictoriaMetricsServer``: ``.url``, ``.pid``, ``.stop()``, ``.start()``, ``.export(match)``,
#   ``.wait_export(match, points)`` (polls: VM makes rows searchable about a second late).
# - ``make_influxdb1(**kw)``: more InfluxDB servers in one test (``username=``/``password=``:
#   authentication on; ``tls=True``: HTTPS with a self-signed certificate, ``.ca_file``).

def _servers(tmp_path: Path, kind: str):
    from historian.testservers import ServerError
    started = []

    def make(**kw):
        server = kind(tmp_path / f"{kind.binary}-{len(started)}", find_free_port(), **kw)
        started.append(server)
        try:
            return server.start()
        except ServerError as e:
            pytest.fail(str(e))
    return make, started


@pytest.fixture
def make_influxdb1(tmp_path: Path):
    from historian.testservers import InfluxServer
    make, started = _servers(tmp_path, InfluxServer)
    try:
        yield make
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def influxdb1(make_influxdb1):
    return make_influxdb1()


@pytest.fixture
def victoria_metrics(tmp_path: Path):
    from historian.testservers import VictoriaMetricsServer
    make, started = _servers(tmp_path, VictoriaMetricsServer)
    try:
        yield make()
    finally:
        for server in started:
            server.stop()
