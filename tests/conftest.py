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
from dataclasses import replace
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
from plc.contract import INPUT_SPECS, ZONES
from plc.program import Program
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
    """The machine's program with step phase goals: the rig's tests set the temperatures by
    hand and expect a phase's goal at once (the goal ramps are tested in test_sequencer and, on
    the twin, in test_cycle and the autotune tests)."""
    cfg, book = load_all(MACHINE_FILE)
    p = Program.from_config(cfg, book)
    return replace(p, sequence=replace(p.sequence, cooling_ramp_k_per_min=0.0,
                                       reheat_ramp_k_per_min=0.0))


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
#   ``servers.InfluxServer`` (tests/servers.py): ``.url``, ``.database``, ``.pid``, ``.stop()``,
#   ``.start()`` (same port, same data: an outage), ``.query(influxql)`` -> JSON,
#   ``.rows(influxql)`` -> list of dicts. Stopped by PID at the end, also on failure.
# - ``victoria_metrics``: a VictoriaMetrics (``-storageDataPath <tmp> -httpListenAddr
#   127.0.0.1:<port>``, fresh points queryable, replays deduplicated); a
#   ``VictoriaMetricsServer``: ``.url``, ``.pid``, ``.stop()``, ``.start()``, ``.export(match)``,
#   ``.wait_export(match, points)`` (polls: VM makes rows searchable about a second late).
# - ``make_influxdb1(**kw)``: more InfluxDB servers in one test (``username=``/``password=``:
#   authentication on; ``tls=True``: HTTPS with a self-signed certificate, ``.ca_file``).

def _servers(tmp_path: Path, kind: str):
    from servers import ServerError
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
    from servers import InfluxServer
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
    from servers import VictoriaMetricsServer
    make, started = _servers(tmp_path, VictoriaMetricsServer)
    try:
        yield make()
    finally:
        for server in started:
            server.stop()


# -- a real PostgreSQL on loopback (the records' plant database) -----------------------------
#
# - ``postgresql_server``: one PostgreSQL per test session (initdb + pg_ctl from the PATH or
#   /usr/lib/postgresql/<version>/bin, Debian's ``postgresql`` package) in a temporary
#   directory, on a free loopback port, password authentication (scram-sha-256); run as the
#   ``postgres`` user when the tests run as root (PostgreSQL refuses root). Stopped by PID
#   (SIGINT: fast shutdown; SIGKILL if it lingers) at the end of the session.
# - ``postgresql_url``: a fresh empty database on it for one test, as an SQLAlchemy URL
#   ``postgresql+psycopg://tempering:<password>@127.0.0.1:<port>/<db>``.

class PostgresServer:
    user = "tempering"

    def __init__(self, directory: Path, port: int):
        self.directory, self.port = directory, port
        self.password = os.urandom(12).hex()
        self.pid: int | None = None

    @staticmethod
    def bin_dir() -> Path:
        pg_ctl = shutil.which("pg_ctl")
        if pg_ctl:
            return Path(pg_ctl).resolve().parent
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                       key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
        if not found:
            pytest.fail("PostgreSQL is not installed (pg_ctl not found; make system-deps installs "
                        "Debian's postgresql package)")
        return found[-1].parent

    def _run_as(self) -> dict:
        if os.geteuid() != 0:
            return {}
        import pwd
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root and there is no postgres user to run PostgreSQL as")
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def start(self) -> "PostgresServer":
        bin_dir, as_user = self.bin_dir(), self._run_as()
        data = self.directory / "data"
        pwfile = self.directory / "pwfile"
        pwfile.write_text(self.password + "\n")
        if as_user:
            os.chown(self.directory, as_user["user"], as_user["group"])
            os.chown(pwfile, as_user["user"], as_user["group"])
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        run = dict(cwd=self.directory, env=env, capture_output=True, text=True, **as_user)
        done = subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", self.user,
                               "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8"], **run)
        if done.returncode != 0:
            pytest.fail(f"initdb failed: {done.stderr}")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' -c fsync=off"
        done = subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(self.directory / "log"),
                               "-o", options, "-w", "-t", "60", "start"], **run)
        pid_file = data / "postmaster.pid"
        if pid_file.exists():
            self.pid = int(pid_file.read_text().split()[0])
        if done.returncode != 0:
            log = (self.directory / "log").read_text() if (self.directory / "log").exists() else ""
            self.stop()
            pytest.fail(f"pg_ctl start failed: {done.stderr}{log}")
        return self

    def stop(self) -> None:
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        pid_file = self.directory / "data" / "postmaster.pid"
        try:
            os.kill(pid, 2)                    # SIGINT: PostgreSQL's fast shutdown
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_file.exists():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg
        name = f"t_{os.urandom(6).hex()}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[PostgresServer]:
    import tempfile
    directory = Path(tempfile.mkdtemp(prefix="tempering-pg-"))
    server = PostgresServer(directory, find_free_port())
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def postgresql_url(postgresql_server: PostgresServer) -> str:
    return postgresql_server.url(postgresql_server.create_database())


@pytest.fixture(params=["sqlite", "postgresql"])
def records(request, tmp_path):
    """The same tests against SQLite in tmp_path and a real PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'records' / 'tempering.db'}"
    else:
        url = request.getfixturevalue("postgresql_url")
    from opcua_server.records import Records

    r = Records(url)
    try:
        yield r
    finally:
        r.close()


# -- a secured OPC UA server on loopback -------------------------------------------------------
#
# - ``opcua_pki``: everything a secured server and its clients need, in tmp_path: ``.settings``
#   (OpcUaSettings: the default security, a free loopback port, data_dir in tmp_path),
#   ``.records`` (SQLite in data_dir, one user per role: name = the role, password
#   ``.password(role)``), ``.pki`` (the server's Pki; the client certificate already trusted),
#   ``.app_uri`` (the server's), ``.client_uri``, ``.client_cert`` / ``.client_key`` (trusted)
#   and ``.untrusted_cert`` / ``.untrusted_key``; ``await opcua_pki.client(user, password,
#   trusted=True, policy="Basic256Sha256", mode="SignAndEncrypt")`` is an asyncua Client set
#   up for the server, not yet connected (``async with client:`` connects).
# - ``secured_server``: an asyncua Server on ``opcua_pki`` (empty address space), secured by
#   ``opcua_server.security.configure_security``, started in the test's loop, stopped after.
#   Build a server of your own the same way: ``Server()``, ``await server.init()``, your
#   address space, ``await configure_security(server, pki.settings, pki.records, pki.pki,
#   app_uri=pki.app_uri)``, ``await server.start()``.

def make_client_certificate(directory: Path, name: str, app_uri: str) -> tuple[Path, Path]:
    """A self-signed OPC UA client application certificate (``<name>.der``) and its key
    (``<name>.pem``) with ``app_uri`` and this host in subjectAltName."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID
    from asyncua.crypto import cert_gen

    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, name, {}, [x509.UniformResourceIdentifier(app_uri), x509.DNSName(socket.gethostname())],
        [ExtendedKeyUsageOID.CLIENT_AUTH], days=30)
    cert_path, key_path = directory / f"{name}.der", directory / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return cert_path, key_path


@pytest.fixture(scope="session")
def opcua_client_certificates(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("opcua-clients")
    return {name: make_client_certificate(directory, name, OpcUaTestPki.client_uri)
            for name in ("trusted-client", "untrusted-client")}


class OpcUaTestPki:
    app_uri = "urn:open-tempering:server:test"
    client_uri = "urn:open-tempering:test-client"
    ROLES = ("viewer", "operator", "technician", "admin")

    def __init__(self, directory: Path, port: int, certificates: dict[str, tuple[Path, Path]]):
        from opcua_server.config import OpcUaSettings
        from opcua_server.records import Records
        from opcua_server.security import Pki

        self.settings = OpcUaSettings(endpoint=f"opc.tcp://127.0.0.1:{port}", data_dir=str(directory))
        self.records = Records(self.settings.records_url)
        for role in self.ROLES:
            self.records.add_user(role, self.password(role), role)
        self.pki = Pki(self.settings.pki_dir)
        self.client_cert, self.client_key = certificates["trusted-client"]
        self.untrusted_cert, self.untrusted_key = certificates["untrusted-client"]
        self.pki.trust(self.client_cert)

    @staticmethod
    def password(role: str) -> str:
        return f"{role}-secret-1"

    async def client(self, user: str | None = None, password: str | None = None, *, trusted: bool = True,
                     policy: str = "Basic256Sha256", mode: str = "SignAndEncrypt", timeout: float = 5):
        from asyncua import Client, ua
        from asyncua.crypto import security_policies

        client = Client(self.settings.endpoint, timeout=timeout)
        client.application_uri = self.client_uri
        cert, key = (self.client_cert, self.client_key) if trusted else (self.untrusted_cert, self.untrusted_key)
        policy_class = getattr(security_policies, "SecurityPolicy" + policy.replace("_", ""))
        await client.set_security(policy_class, str(cert), str(key), server_certificate=str(self.pki.cert_path),
                                  mode=getattr(ua.MessageSecurityMode, mode))
        if user is not None:
            client.set_user(user)
            client.set_password(password if password is not None else self.password(user))
        return client


@pytest.fixture
def opcua_pki(tmp_path: Path, opcua_client_certificates) -> Iterator[OpcUaTestPki]:
    # the server's own certificate first, so that clients can be set up before the server starts
    setup = OpcUaTestPki(tmp_path / "opcua", find_free_port(), opcua_client_certificates)
    setup.pki.ensure_own_certificate(OpcUaTestPki.app_uri, socket.gethostname(), ("127.0.0.1",))
    try:
        yield setup
    finally:
        setup.records.close()


@pytest.fixture
async def secured_server(opcua_pki: OpcUaTestPki):
    from asyncua import Server
    from opcua_server.security import configure_security

    server = Server()
    await server.init()
    await configure_security(server, opcua_pki.settings, opcua_pki.records, opcua_pki.pki,
                             app_uri=opcua_pki.app_uri)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
