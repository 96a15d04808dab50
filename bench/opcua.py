"""OPC UA server: start-up, address-space build, notifications to clients, scan lateness under them.

    python -m bench.opcua [--seconds N] [--clients N] [--points N] [--json]

Everything on loopback, with the server's default security (SignAndEncrypt Basic256Sha256, a
trusted client certificate, user name and password); one run measures:

- ``startup_s``: from the start of the process ``tempering run --duration-s ... --no-history``
  (the default plant: the twin as a Modbus TCP slave and the PLC over Modbus, on free ports), in
  a fresh temporary directory whose data dir holds a user and the client's trusted certificate
  and nothing else (the server makes its own certificate on this first start), to the first read
  by an asyncua client that returns a Good value of the pump zone's Temperature: the machine is
  served and the PLC's values are in it. ``startup_session_s``: to the client's first session.
  ``restart_s``: the same on a second start in the same directory (certificate and records there).
- ``build_s_10k`` / ``naive_build_s_10k``: building the address space of a synthetic machine of
  about 10,000 points (``--points``; a point is a data variable, properties such as
  EngineeringUnits and EURange not counted): the default machine's plan plus as many extra
  TemperatureZoneType objects under Zones as it takes, built by ``opcua_server.model``'s template
  builder and by its node-by-node builder (``naive=True``), each in a fresh asyncua Server, same
  run. model.py has no helper for a synthetic machine, so this uses its internals (``_Plan``,
  ``_Instance``, ``_Builder``, ``_build_naive``) the way ``build_machine`` does.
- ``notifications_per_s``: data-change notifications delivered to ``--clients`` (10) asyncua
  clients, each in its own session and subscription (100 ms publishing) on every data variable of
  the machine, while the PLC scans at 100 ms on the in-process twin running the default recipe, in
  the server's process and event loop (over the bridge, ``plc.bridge``, on a Unix socket): the
  server's own cost, side by side with the idle scan. ``tempering run`` runs the PLC in a process
  of its own; ``bench.isolation`` measures that. The clients run in a child process
  (``--clients-worker``), as a SCADA would on another machine; they count for ``--seconds`` once
  subscribed and past the initial values.
- ``late_ms_p99_idle`` / ``late_ms_p99_loaded``: the scan's lateness p99 (wake-up minus its
  absolute deadline, from the controller's ``ScanStats``, every sample kept) while no client is
  connected and while the clients are subscribed, in the same run: idle (half of ``--seconds``),
  loaded, idle again (the other half), pooled as in ``bench.scan``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from asyncua import Client, Server, ua
from asyncua.crypto import security_policies

from opcua_server import model
from opcua_server.config import DEFAULT_CONFIG, load
from opcua_server.records import Records
from opcua_server.security import Pki
from opcua_server.server import TemperingServer
from plc.bridge import PlcClient, WindowPort
from plc.commands import StartRecipe
from plc.interlocks import condition_ids
from plc.program import Program
from plc.runtime import Controller, MonotonicClock, Runtime, ScanStats, WatchdogSettings
from twin import Twin
from twin.inprocess import InProcessTwinIo

from .common import emit, fmt

CLIENT_URI = "urn:open-tempering:bench-client"
USER = "bench"
PROBE = model.POINT_PATHS["temp_pump"]          # the value the start-up client waits for
STARTUP_LIMIT_S = 60.0
PERIOD_S = 0.1
PUBLISHING_MS = 100.0
SETTLE_S = 1.0                                    # after subscribing: the initial values go by


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs_s: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs_s) * 1e3, q)) if xs_s else float("nan")


# -- clients ----------------------------------------------------------------------------------


def client_certificate(directory: Path) -> tuple[Path, Path]:
    """A client application certificate and key for CLIENT_URI (the PKI's own-certificate
    maker, in a PKI of the client's own)."""
    return Pki(directory).ensure_own_certificate(CLIENT_URI, socket.gethostname())


async def secure_client(endpoint: str, cert: Path, key: Path, server_cert: Path, password: str,
                        timeout_s: float = 5.0) -> Client:
    """An asyncua client set up for SignAndEncrypt Basic256Sha256 as USER (not connected)."""
    client = Client(endpoint, timeout=timeout_s)
    client.application_uri = CLIENT_URI
    await client.set_security(security_policies.SecurityPolicyBasic256Sha256, str(cert), str(key),
                              server_certificate=str(server_cert),
                              mode=ua.MessageSecurityMode.SignAndEncrypt)
    client.set_user(USER)
    client.set_password(password)
    return client


# -- start-up of `tempering run` ----------------------------------------------------------------


def machine_files(directory: Path, opcua_port: int, modbus_port: int,
                  monitoring_port: int | None = None) -> Path:
    """The default machine's files copied to ``directory``, on the given loopback ports (the
    monitoring's on a free one unless given: two machines never share 9840)."""
    source = DEFAULT_CONFIG.parent
    directory.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data["opcua"]["endpoint"] = f"opc.tcp://127.0.0.1:{opcua_port}"
    data["monitoring"]["listen"] = f"127.0.0.1:{monitoring_port or _free_port()}"
    for link in data["fieldbus"]["links"].values():
        link["port"] = modbus_port
    for name in (data["machine"]["recipes_file"], data["fieldbus"].get("map_file")):
        if name:
            shutil.copy(source / name, directory / name)
    path = directory / DEFAULT_CONFIG.name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _tempering() -> list[str]:
    script = Path(sys.executable).parent / "tempering"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tempering.cli"]


async def _first_good_read(proc, t0: float, endpoint: str, cert: Path, key: Path, server_cert: Path,
                           password: str, machine_uri: str) -> tuple[float, float]:
    """(first session, first Good read of PROBE), seconds after t0."""
    deadline = t0 + STARTUP_LIMIT_S
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"tempering run exited with {proc.returncode} before serving")
        if not server_cert.exists():                 # made by the server on its first start
            await asyncio.sleep(0.01)
            continue
        client = await secure_client(endpoint, cert, key, server_cert, password, timeout_s=2.0)
        try:
            await client.connect()
        except (OSError, asyncio.TimeoutError, ua.UaError):
            await asyncio.sleep(0.01)
            continue
        session_s = time.monotonic() - t0
        try:
            ns = await client.get_namespace_index(machine_uri)
            node = client.get_node(ua.NodeId(f"{model.ROOT}.{PROBE}", ns))
            while time.monotonic() < deadline:
                try:
                    if (await node.read_data_value()).StatusCode.is_good():
                        return session_s, time.monotonic() - t0
                except ua.UaStatusCodeError:         # BadWaitingForInitialData: not published yet
                    pass
                await asyncio.sleep(0.005)
        finally:
            await client.disconnect()
    raise RuntimeError(f"no Good read of {PROBE} within {STARTUP_LIMIT_S:g} s")


async def _one_start(workdir: Path, machine_file: Path, endpoint: str, cert: Path, key: Path,
                     server_cert: Path, password: str, machine_uri: str) -> tuple[float, float]:
    log = (workdir / "run.log").open("ab")
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *_tempering(), "run", "--config", str(machine_file), "--duration-s", str(STARTUP_LIMIT_S + 30),
        "--no-history", "--state-file", str(workdir / "plc-state.json"), cwd=workdir,
        stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        return await _first_good_read(proc, t0, endpoint, cert, key, server_cert, password, machine_uri)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)              # a clean stop, as Ctrl-C
            try:
                await asyncio.wait_for(proc.wait(), 20.0)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def startup(tmp: Path) -> dict:
    workdir = tmp / "run"
    opcua_port, modbus_port = _free_port(), _free_port()
    machine_file = machine_files(workdir / "config", opcua_port, modbus_port)
    cfg, _ = load(machine_file)
    data_dir = workdir / cfg.opcua.data_dir
    data_dir.mkdir(parents=True)
    password = secrets.token_urlsafe(12)
    records = Records(f"sqlite:///{(data_dir / 'tempering.db').resolve()}")
    records.add_user(USER, password, "viewer")
    records.close()
    cert, key = client_certificate(tmp / "client-pki")
    server_pki = Pki(data_dir / "pki")
    server_pki.trust(cert)
    args = (workdir, machine_file, cfg.opcua.endpoint, cert, key, server_pki.cert_path, password,
            model.MACHINE_URI_PREFIX + cfg.machine.id)
    session_s, first_s = await _one_start(*args)
    _, again_s = await _one_start(*args)
    return {"startup_s": first_s, "startup_session_s": session_s, "restart_s": again_s}


# -- building a synthetic machine --------------------------------------------------------------


def _data_variables(t) -> int:
    n, stack = 0, [t]
    while stack:
        x = stack.pop()
        n += x.nclass is ua.NodeClass.Variable and not x.is_property
        stack.extend(x.children)
    return n


async def _synthetic(cfg, book, points: int):
    """A fresh server with the types loaded, and the plan of the default machine grown with extra
    zones to at least ``points`` data variables: (server, types ns, machine ns, plan, points)."""
    server = Server()
    await server.init()
    types_ns = await model.load_types(server)
    ns = await server.register_namespace(model.MACHINE_URI_PREFIX + cfg.machine.id)
    program = Program.from_config(cfg, book)
    links = tuple(cfg.fieldbus.links) if cfg.fieldbus is not None else ()
    plan = model._machine_plan(cfg, program, book, condition_ids(program), links, ns)
    counter = model._Builder(server, types_ns)
    base = sum(_data_variables(counter.template(i.type_name)) for i in plan.instances)
    per_zone = _data_variables(counter.template("TemperatureZoneType"))
    extra = math.ceil(max(0, points - base) / per_zone)
    zones = ua.NodeId(f"{model.ROOT}.Zones", ns)
    for i in range(extra):
        name = f"Extra{i:05d}"
        ident = f"{model.ROOT}.Zones.{name}"
        plan.instances.append(model._Instance(ident, zones, model._HAS_COMPONENT, name, f"Extra zone {i}",
                                              "TemperatureZoneType"))
        plan.prefixes[ident] = f"Extra zone {i}"
        plan.descriptions[ident] = f"Extra zone {i}: a synthetic zone of the benchmark."
        for gain in ("Kp", "Ki", "Kd"):
            plan.values[f"{ident}.{gain}"] = ua.Variant(1.0, ua.VariantType.Double)
    return server, types_ns, ns, plan, base + extra * per_zone


def _namespace_nodes(server: Server, ns: int) -> int:
    return sum(1 for nid in server.iserver.aspace.keys() if nid.NamespaceIndex == ns)


async def build(cfg, book, points: int) -> dict:
    """Each builder on the same plan, each in a fresh server; only the build itself is timed,
    the way build_machine runs it (the template builder with the cyclic collector paused)."""
    server, types_ns, ns, plan, n = await _synthetic(cfg, book, points)
    t = time.perf_counter()
    with model._collector_paused():
        model._Builder(server, types_ns).build(plan, ns)
    fast_s = time.perf_counter() - t
    nodes = _namespace_nodes(server, ns)
    del server
    server, types_ns, ns, plan, _ = await _synthetic(cfg, book, points)
    t = time.perf_counter()
    await model._build_naive(server, plan, ns, types_ns)
    naive_s = time.perf_counter() - t
    naive_nodes = _namespace_nodes(server, ns)
    return {"build_s_10k": fast_s, "naive_build_s_10k": naive_s, "build_speedup": naive_s / fast_s,
            "build_points": n, "build_nodes": nodes, "naive_build_nodes": naive_nodes}


# -- notifications and scan lateness ----------------------------------------------------------


async def clients_worker(spec: dict) -> dict:
    """The child process: ``spec["clients"]`` sessions, each subscribed to every node of
    ``spec["nodes"]``; prints "ready" once subscribed and settled, counts for
    ``spec["seconds"]``; returns the counts."""
    cert, key, server_cert = Path(spec["cert"]), Path(spec["key"]), Path(spec["server_cert"])
    clients = [await secure_client(spec["endpoint"], cert, key, server_cert, spec["password"], timeout_s=30.0)
               for _ in range(spec["clients"])]
    counts = [0] * len(clients)
    consumers = []

    async def consume(i: int, sub) -> None:
        async for event in sub:
            counts[i] += hasattr(event, "value")         # a DataChangeEvent (not a status change)

    async def open_one(i: int, client: Client) -> None:
        await client.connect()
        sub = await client.create_subscription(PUBLISHING_MS, None, queue_maxsize=100_000)
        aiter(sub)                                       # the queue exists before the first publish
        consumers.append(asyncio.create_task(consume(i, sub)))
        nodes = [client.get_node(ua.NodeId.from_string(s)) for s in spec["nodes"]]
        await sub.subscribe_data_change(nodes, sampling_interval=PUBLISHING_MS)

    await asyncio.gather(*(open_one(i, c) for i, c in enumerate(clients)))
    await asyncio.sleep(SETTLE_S)
    print("ready", flush=True)
    start = list(counts)
    t0 = time.monotonic()
    await asyncio.sleep(spec["seconds"])
    seconds = time.monotonic() - t0
    got = [c - s for c, s in zip(counts, start)]
    print(json.dumps({"notifications": sum(got), "per_client": got, "seconds": seconds,
                      "items_per_client": len(spec["nodes"])}), flush=True)
    for task in consumers:
        task.cancel()
    await asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True)
    return {}


def _data_variable_ids(server: Server, ns: int) -> list[str]:
    """Every data variable of the machine (what a SCADA subscribes to): no properties."""
    aspace = server.iserver.aspace
    out = []
    for nid in list(aspace.keys()):
        if nid.NamespaceIndex != ns:
            continue
        nd = aspace[nid]
        if nd.attributes[ua.AttributeIds.NodeClass].value.Value.Value is not ua.NodeClass.Variable:
            continue
        if any(r.IsForward and r.ReferenceTypeId == model._HAS_TYPE_DEFINITION
               and r.NodeId == model._PROPERTY_TYPE for r in nd.references):
            continue
        out.append(nid.to_string())
    return sorted(out)


def secure_machine(cfg, book, tmp: Path):
    """The machine's config on a free loopback endpoint with its data in ``tmp``, records with
    the recipes and a viewer ``USER`` with a random password, and a client certificate the
    server trusts: (cfg, password, records, pki, client cert, client key)."""
    settings = cfg.opcua.model_copy(update={"endpoint": f"opc.tcp://127.0.0.1:{_free_port()}",
                                            "data_dir": str(tmp / "opcua")})
    cfg = cfg.model_copy(update={"opcua": settings})
    password = secrets.token_urlsafe(12)
    Path(settings.data_dir).mkdir(parents=True)
    records = Records(settings.records_url)
    records.seed_recipes(book)
    records.add_user(USER, password, "viewer")
    pki = Pki(settings.pki_dir)
    cert, key = client_certificate(tmp / "client-pki")
    pki.trust(cert)
    return cfg, password, records, pki, cert, key


async def load_run(cfg, book, tmp: Path, clients: int, seconds: float) -> dict:
    cfg, password, records, pki, cert, key = secure_machine(cfg, book, tmp)
    settings = cfg.opcua

    program = Program.from_config(cfg, book, period_s=PERIOD_S)
    controller = Controller(program)
    expected = int((2 * seconds + 120) / PERIOD_S)
    controller.stats = ScanStats(window=10 * expected)     # every sample of the run is kept
    io = InProcessTwinIo(Twin(cfg.twin, seed=7, initial_temp_c=45.0), wall=time.time)
    port = WindowPort(tmp / "plc.sock", controller.submit, on_recipes=controller.set_recipes)
    controller.channel = port
    await port.start()
    plc = PlcClient(tmp / "plc.sock")
    server = TemperingServer(cfg, plc, records, program=program, pki=pki)
    await server.start()
    stop = asyncio.Event()
    runtime = Runtime(controller, io, MonotonicClock(), WatchdogSettings(
        cfg.scan.watchdog_max_consecutive_overruns, cfg.scan.watchdog_max_cycle_factor),
        window=port.status)
    tasks = [asyncio.create_task(runtime.run(stop)), asyncio.create_task(io.run_realtime(stop)),
             asyncio.create_task(plc.run(stop))]
    controller.submit(StartRecipe(cfg.machine.default_recipe, user="bench"))
    stats = controller.stats
    windows: dict[str, list[tuple[int, int]]] = {"idle": [], "connecting": [], "loaded": []}
    writes: list[tuple[int, float]] = []
    worker_result: dict = {}
    try:
        await asyncio.sleep(2.0)                               # the server's first publications

        async def idle(span_s: float) -> None:
            a = stats.scans
            await asyncio.sleep(span_s)
            windows["idle"].append((a, stats.scans))

        await idle(seconds / 2)
        spec = {"endpoint": settings.endpoint, "cert": str(cert), "key": str(key),
                "server_cert": str(pki.cert_path), "password": password, "clients": clients,
                "seconds": seconds, "nodes": _data_variable_ids(server.server, server.nodes.namespace_index)}
        spec_file = tmp / "clients.json"
        spec_file.write_text(json.dumps(spec))
        connecting, overruns_before = stats.scans, stats.overruns
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.opcua", "--clients-worker", str(spec_file),
            cwd=Path(__file__).resolve().parent.parent,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 120.0)
            if line.strip() != b"ready":
                err = await proc.stderr.read()
                raise RuntimeError(f"clients worker: {line!r} {err.decode()[-2000:]}")
            a, w0, t0 = stats.scans, server.publisher.writes, time.monotonic()
            windows["connecting"].append((connecting, a))
            overruns_connecting = stats.overruns - overruns_before
            subscriptions = server.sessions()[1]
            line = await asyncio.wait_for(proc.stdout.readline(), seconds + 60.0)
            windows["loaded"].append((a, stats.scans))
            writes.append((server.publisher.writes - w0, time.monotonic() - t0))
            worker_result = json.loads(line)
            await asyncio.wait_for(proc.wait(), 60.0)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await asyncio.sleep(1.0)                               # sessions closed
        await idle(seconds / 2)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.stop()
        await port.close()
        records.close()

    late = list(stats.late_s)

    def samples(kind: str) -> list[float]:
        return [x for a, b in windows[kind] for x in late[a:b]]

    idle_s, loaded_s, connecting_s = samples("idle"), samples("loaded"), samples("connecting")
    return {
        "notifications_per_s": worker_result["notifications"] / worker_result["seconds"],
        "notifications_per_client_per_s": [n / worker_result["seconds"] for n in worker_result["per_client"]],
        "items_per_client": worker_result["items_per_client"], "clients": clients,
        "server_value_writes_per_s": writes[0][0] / writes[0][1],
        "subscriptions_seen": subscriptions,
        "late_ms_p99_idle": _pct(idle_s, 99), "late_ms_p99_loaded": _pct(loaded_s, 99),
        "late_ms_p50_idle": _pct(idle_s, 50), "late_ms_p50_loaded": _pct(loaded_s, 50),
        "late_ms_max_idle": max(idle_s) * 1e3, "late_ms_max_loaded": max(loaded_s) * 1e3,
        "logic_ms_p99": _pct(list(stats.logic_s), 99),
        "late_ms_max_connecting": max(connecting_s) * 1e3, "overruns_connecting": overruns_connecting,
        "scans_idle": len(idle_s), "scans_loaded": len(loaded_s), "overruns": stats.overruns,
        "phase_at_end": controller.state.phase.value, "trips": sorted(controller.state.trips),
    }


# -- main ----------------------------------------------------------------------------------------


async def measure(cfg, book, seconds: float, clients: int, points: int) -> dict:
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-opcua-") as tmp:
        result.update(await startup(Path(tmp)))
    with tempfile.TemporaryDirectory(prefix="bench-opcua-") as tmp:
        result.update(await load_run(cfg, book, Path(tmp), clients, seconds))
    result.update(await build(cfg, book, points))
    result["seconds"] = seconds
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0,
                    help="loaded window, and the idle windows together (default 20 s)")
    ap.add_argument("--clients", type=int, default=10, help="subscribed clients (default 10)")
    ap.add_argument("--points", type=int, default=10_000, help="points of the synthetic machine (default 10000)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--clients-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.clients_worker:
        asyncio.run(clients_worker(json.loads(Path(args.clients_worker).read_text())))
        return 0
    cfg, book = load()
    r = asyncio.run(measure(cfg, book, args.seconds, args.clients, args.points))
    print(f"OPC UA server on loopback (SignAndEncrypt Basic256Sha256, user and password); "
          f"{os.cpu_count()} cores")
    emit([("tempering run: start to first Good read, s", fmt(r["startup_s"], 2),
           f"first session {fmt(r['startup_session_s'], 2)}; restart {fmt(r['restart_s'], 2)}"),
          (f"build {r['build_points']} points ({r['build_nodes']} nodes), s", fmt(r["build_s_10k"], 2),
           f"node by node {fmt(r['naive_build_s_10k'], 2)} ({fmt(r['build_speedup'], 1)}x)"),
          (f"notifications/s to {r['clients']} clients", fmt(r["notifications_per_s"], 0),
           f"{r['items_per_client']} items each; server wrote {fmt(r['server_value_writes_per_s'], 0)} values/s"),
          ("scan lateness p99, ms (100 ms scan)", fmt(r["late_ms_p99_loaded"]),
           f"idle {fmt(r['late_ms_p99_idle'])}"),
          ("scan lateness p50, ms", fmt(r["late_ms_p50_loaded"]), f"idle {fmt(r['late_ms_p50_idle'])}"),
          ("scan lateness max, ms", fmt(r["late_ms_max_loaded"]), f"idle {fmt(r['late_ms_max_idle'])}; "
           f"while the clients log in {fmt(r['late_ms_max_connecting'])}")],
         ("measure", "value", "for comparison"), r, as_json=False)
    print(f"scans: {r['scans_idle']} idle, {r['scans_loaded']} loaded, {r['overruns']} overruns "
          f"({r['overruns_connecting']} while the clients logged in); phase "
          f"at end {r['phase_at_end']}, trips {', '.join(r['trips']) or 'none'}; subscriptions on the "
          f"server while loaded: {r['subscriptions_seen']}")
    if args.json:
        sys.stdout.flush()
        print(json.dumps(r, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
