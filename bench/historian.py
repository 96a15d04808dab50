"""Historian delivery to a real InfluxDB 1.x: throughput next to raw POSTs, and an outage.

Starts its own ``influxd`` on free loopback ports in a temporary directory
(``tests.servers.InfluxServer``, the tests' server) and measures, in one run:

- ``points_per_s``: sustained points per second through the historian path: a producer appends
  chunks of lines to a ``Spool`` while a ``Forwarder`` (its own thread, batches of <= 5000 lines,
  gzip) delivers them to an ``Influx1Sink``; timed from the first append until every point is
  acknowledged. ``append_points_per_s``: the producer's side alone (appends to the spool file).
- ``sink_points_per_s``: the same points written straight through ``Influx1Sink`` in batches of
  5000 (gzip, no spool): what the spool costs.
- ``raw_points_per_s``: the same points as plain line-protocol POSTs of 5000 lines on one
  kept-alive connection (no gzip, no spool): what the server takes at best from one client.
- the outage run: a producer appends at ``--outage-rate`` points/s for ``--outage-s`` seconds;
  the server is stopped (SIGTERM) after a third of it and started again (same port and data)
  ``--down-s`` seconds later; the forwarder retries (backoff capped at 1 s) and drains the spool.
  ``outage_catch_up_s``: from the restart until the backlog is back to what one 50 ms tick
  produces. ``produced``, ``delivered`` (points in the server), ``lost`` (sequence numbers missing from
  the server) and ``duplicated`` (points beyond one per sequence number) are counted by
  querying the server, as are the points of the throughput runs.
- ``historyread_influx_ms`` / ``historyread_local_ms``: one OPC UA HistoryRead (ReadRaw, one
  request, no NumValuesPerNode) of one hour of one zone at 1 s (3600 samples, written through
  the real sinks) from a loopback asyncua server whose history is ``LocalHistory`` over the
  InfluxDB (``InfluxHistory``, InfluxQL over ``/query``) and over the local SQLite store, in
  the same run; the median of ``--reads`` reads each (the first of each not counted).

Exits 1 if any run lost or duplicated a point.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from historian.forwarder import Forwarder
from historian.sinks import Influx1Sink
from historian.spool import Spool
from tests.servers import InfluxServer  # the tests' server; run from the repository root

from .common import emit, fmt

ZONES = ("tank", "pump", "pipe", "tap")
BATCH_LINES = 5000


def make_lines(n: int, t0_ns: int, first_seq: int = 0) -> list[str]:
    """``n`` zone points, sequence numbers ``first_seq..``, 1 µs apart, round-robin over zones
    (every point its own series + time, so a replay overwrites and never adds)."""
    return [f"zone,machine=bench,zone={ZONES[s % 4]},batch=b1,recipe=dark-70 "
            f"temp_c={30 + (s % 1000) / 100:.2f},setpoint_c=31.5,output_pct=42.0,seq={s}i,"
            f'quality="good" {t0_ns + s * 1000}' for s in range(first_seq, first_seq + n)]


def create_database(server: InfluxServer, name: str) -> None:
    server.query(f'CREATE DATABASE "{name}"', database=None, method="POST")


def count_on_server(server: InfluxServer, database: str, produced: int) -> dict:
    """Points of ``zone`` in ``database`` and how they compare to sequence numbers 0..produced-1."""
    doc = server.query("SELECT count(seq) AS n FROM zone", database=database)
    distinct = server.query("SELECT count(distinct(seq)) AS n FROM zone", database=database)
    span = server.query("SELECT min(seq) AS lo, max(seq) AS hi FROM zone", database=database)

    def first(d: dict, col: str) -> int:
        series = d["results"][0].get("series")
        if not series:
            return 0
        return series[0]["values"][0][series[0]["columns"].index(col)]
    points, unique = first(doc, "n"), first(distinct, "n")
    lo, hi = first(span, "lo"), first(span, "hi")
    in_range = unique if (points == 0 or (lo >= 0 and hi < produced)) else -1
    return {"produced": produced, "delivered": points,
            "lost": produced - in_range if in_range >= 0 else produced,
            "duplicated": points - unique}


def wait_drained(spool: Spool, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while spool.stats().backlog_lines > 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def raw_run(server: InfluxServer, database: str, lines: list[str]) -> float:
    """Seconds to POST every line, 5000 a request, one kept-alive connection, no gzip."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    path = f"/write?db={database}&precision=ns"
    started = time.perf_counter()
    for i in range(0, len(lines), BATCH_LINES):
        conn.request("POST", path, body="\n".join(lines[i:i + BATCH_LINES]).encode(),
                     headers={"Content-Type": "text/plain; charset=utf-8"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 204:
            raise RuntimeError(f"raw write: HTTP {resp.status}: {body[:200]!r}")
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed


def sink_run(server: InfluxServer, database: str, lines: list[str]) -> float:
    sink = Influx1Sink(server.url, database)
    started = time.perf_counter()
    for i in range(0, len(lines), BATCH_LINES):
        sink.write(lines[i:i + BATCH_LINES])
    elapsed = time.perf_counter() - started
    sink.close()
    return elapsed


def historian_run(server: InfluxServer, database: str, lines: list[str], spool_dir: Path,
                  chunk: int) -> dict:
    """Append ``lines`` in chunks while the forwarder delivers; time until all acknowledged."""
    spool = Spool(spool_dir)
    sink = Influx1Sink(server.url, database)
    forwarder = Forwarder(spool, sink, batch_max_lines=BATCH_LINES)
    forwarder.start()
    started = time.perf_counter()
    for i in range(0, len(lines), chunk):
        spool.append(lines[i:i + chunk])
    appended = time.perf_counter()
    drained = wait_drained(spool, timeout_s=300)
    done = time.perf_counter()
    stats = forwarder.stats()
    forwarder.stop()
    spool.close()
    sink.close()
    return {"elapsed_s": done - started, "append_s": appended - started, "drained": drained,
            "batches": stats.batches_total, "retries": stats.retries_total}


def outage_run(server: InfluxServer, database: str, spool_dir: Path, rate: float,
               duration_s: float, down_s: float) -> dict:
    """Produce at ``rate`` points/s for ``duration_s``; the server is down from a third of it
    for ``down_s``; then drain and count on the server."""
    spool = Spool(spool_dir)
    sink = Influx1Sink(server.url, database, timeout_s=2.0)
    forwarder = Forwarder(spool, sink, batch_max_lines=BATCH_LINES, retry_min_s=0.1,
                          retry_max_s=1.0)
    forwarder.start()
    t0_ns = time.time_ns()
    tick_s = 0.05
    per_tick = max(1, round(rate * tick_s))
    ticks = round(duration_s / tick_s)
    events: dict[str, float] = {}
    max_backlog = 0

    def outage() -> None:
        time.sleep(duration_s / 3)
        server.stop()
        events["down"] = time.perf_counter()
        time.sleep(down_s)
        server.start()
        events["up"] = time.perf_counter()

    chaos = threading.Thread(target=outage, name="outage", daemon=True)
    started = time.perf_counter()
    chaos.start()
    seq = 0
    for k in range(ticks):
        spool.append(make_lines(per_tick, t0_ns, seq))
        seq += per_tick
        backlog = spool.stats().backlog_lines
        max_backlog = max(max_backlog, backlog)
        if "up" in events and "caught_up" not in events and backlog <= 2 * per_tick:
            events["caught_up"] = time.perf_counter()
        time.sleep(max(0.0, started + (k + 1) * tick_s - time.perf_counter()))
    chaos.join()
    drained = wait_drained(spool, timeout_s=120)
    caught_up = events.get("caught_up", time.perf_counter())
    stats = forwarder.stats()
    forwarder.stop()
    spool.close()
    sink.close()
    counted = count_on_server(server, database, seq)
    return {**counted, "drained": drained, "down_s": events["up"] - events["down"],
            "catch_up_s": caught_up - events["up"], "max_backlog_lines": max_backlog,
            "retries": stats.retries_total}


HISTORY_SAMPLES = 3600        # one hour of one zone at 1 s


async def _historyread_ms(stores: dict, t0_s: float, reads: int) -> dict[str, float]:
    """Median ms of one HistoryRead of HISTORY_SAMPLES values, per store, over OPC UA."""
    from datetime import datetime, timezone

    from asyncua import Client, Server, ua

    from opcua_server.history import LocalHistory, answer_per_node
    from tests.servers import find_free_port

    server = Server()
    await server.init()
    endpoint = f"opc.tcp://127.0.0.1:{find_free_port()}/bench"
    server.set_endpoint(endpoint)
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await server.register_namespace("urn:bench:history")
    node = await server.nodes.objects.add_variable(ns, "Temperature", 0.0)
    await node.set_attr_bit(ua.AttributeIds.AccessLevel, ua.AccessLevel.HistoryRead)
    await node.set_attr_bit(ua.AttributeIds.UserAccessLevel, ua.AccessLevel.HistoryRead)
    answer_per_node(server)
    out = {}
    async with server:
        async with Client(endpoint, timeout=30) as client:
            remote = client.get_node(node.nodeid)
            start = datetime.fromtimestamp(t0_s, timezone.utc)
            end = datetime.fromtimestamp(t0_s + HISTORY_SAMPLES - 1, timezone.utc)
            for name, store in stores.items():
                server.iserver.history_manager.set_storage(
                    LocalHistory(store, {node.nodeid: "pump"}, "bench"))
                took = []
                for _ in range(reads + 1):
                    started = time.perf_counter()
                    values = await remote.read_raw_history(start, end)
                    took.append((time.perf_counter() - started) * 1000)
                    if len(values) != HISTORY_SAMPLES:
                        raise RuntimeError(f"HistoryRead from {name}: {len(values)} values, "
                                           f"expected {HISTORY_SAMPLES}")
                out[name] = statistics.median(took[1:])
    return out


def historyread_run(server: InfluxServer, database: str, store_path: Path, reads: int) -> dict:
    """One hour of one zone at 1 s into InfluxDB and the local store, read back over OPC UA."""
    from historian.local import LocalStore
    from historian.schema import line
    from historian.sinks import LocalSink
    from opcua_server.history_influx import InfluxHistory

    t0_s = float(int(time.time()) - 2 * HISTORY_SAMPLES)
    lines = [line("zone", {"machine": "bench", "zone": zone, "phase": "pouring", "batch": "b1",
                           "recipe": "dark-70"},
                  {"temp_c": 31.0 + (i % 100) / 100, "setpoint_c": 31.5, "output_pct": 40.0,
                   "quality": "good"}, int((t0_s + i) * 1e9))
             for i in range(HISTORY_SAMPLES) for zone in ZONES]        # 4 zones, one is read
    sink = Influx1Sink(server.url, database)
    sink.write(lines)
    sink.close()
    store = LocalStore(store_path)
    LocalSink(store).write(lines)
    try:
        return asyncio.run(_historyread_ms(
            {"influx": InfluxHistory(server.url, database, timeout_s=10.0), "local": store},
            t0_s, reads))
    finally:
        store.close()


def measure(points: int, chunk: int, outage_rate: float, outage_s: float, down_s: float,
            reads: int = 7) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-historian-") as tmp:
        tmp_path = Path(tmp)
        server = InfluxServer(tmp_path / "influxdb")
        server.start()
        try:
            t0_ns = time.time_ns() - 3600 * 10**9
            lines = make_lines(points, t0_ns)
            plain_bytes = sum(len(x) + 1 for x in lines[:BATCH_LINES])
            gzip_bytes = len(gzip.compress("\n".join(lines[:BATCH_LINES]).encode(), 1))
            runs = {}
            for name in ("raw", "sink", "historian"):
                create_database(server, f"bench_{name}")
            raw_s = raw_run(server, "bench_raw", lines)
            runs["raw"] = count_on_server(server, "bench_raw", points)
            sink_s = sink_run(server, "bench_sink", lines)
            runs["sink"] = count_on_server(server, "bench_sink", points)
            hist = historian_run(server, "bench_historian", lines, tmp_path / "spool-throughput",
                                 chunk)
            runs["historian"] = count_on_server(server, "bench_historian", points)
            create_database(server, "bench_outage")
            outage = outage_run(server, "bench_outage", tmp_path / "spool-outage", outage_rate,
                                outage_s, down_s)
            create_database(server, "bench_history")
            history = historyread_run(server, "bench_history", tmp_path / "history.sqlite", reads)
        finally:
            server.stop()
    bad_runs = {k: v for k, v in runs.items() if v["lost"] or v["duplicated"]}
    return {
        "points": points,
        "points_per_s": points / hist["elapsed_s"],
        "append_points_per_s": points / hist["append_s"],
        "sink_points_per_s": points / sink_s,
        "raw_points_per_s": points / raw_s,
        "historian_batches": hist["batches"],
        "batch_bytes_plain": plain_bytes,
        "batch_bytes_gzip": gzip_bytes,
        "throughput_lost": sum(v["lost"] for v in runs.values()),
        "throughput_duplicated": sum(v["duplicated"] for v in runs.values()),
        "throughput_runs_bad": sorted(bad_runs),
        "produced": outage["produced"],
        "delivered": outage["delivered"],
        "lost": outage["lost"],
        "duplicated": outage["duplicated"],
        "outage_down_s": outage["down_s"],
        "outage_catch_up_s": outage["catch_up_s"],
        "outage_max_backlog_lines": outage["max_backlog_lines"],
        "outage_retries": outage["retries"],
        "outage_drained": outage["drained"],
        "historyread_samples": HISTORY_SAMPLES,
        "historyread_reads": reads,
        "historyread_influx_ms": history["influx"],
        "historyread_local_ms": history["local"],
        "influxdb": "1.x (influxd on loopback)",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=200_000,
                    help="points of the throughput runs (default 200000)")
    ap.add_argument("--chunk", type=int, default=1000,
                    help="lines per spool append in the throughput run (default 1000)")
    ap.add_argument("--outage-rate", type=float, default=2000.0,
                    help="points per second produced in the outage run (default 2000)")
    ap.add_argument("--outage-s", type=float, default=9.0,
                    help="seconds of production in the outage run (default 9)")
    ap.add_argument("--down-s", type=float, default=3.0,
                    help="seconds the server is down in the outage run (default 3)")
    ap.add_argument("--reads", type=int, default=7,
                    help="HistoryReads of one hour per store, median taken (default 7)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    r = measure(args.points, args.chunk, args.outage_rate, args.outage_s, args.down_s,
                args.reads)
    print(f"Historian to InfluxDB 1.x on loopback: {r['points']} points, batches of {BATCH_LINES} "
          f"({r['batch_bytes_plain']} bytes, {r['batch_bytes_gzip']} gzipped)")
    emit([("historian: spool append + forwarder + Influx1Sink, until all acknowledged",
           fmt(r["points_per_s"], 0)),
          ("  of which the producer's appends to the spool alone", fmt(r["append_points_per_s"], 0)),
          ("Influx1Sink alone, batches of 5000, gzip", fmt(r["sink_points_per_s"], 0)),
          ("raw line-protocol POSTs of 5000 lines, no gzip", fmt(r["raw_points_per_s"], 0))],
         ("path", "points/s"), r, as_json=False)
    print(f"points lost / duplicated in the throughput runs: {r['throughput_lost']} / "
          f"{r['throughput_duplicated']}")
    print()
    print(f"Outage: {args.outage_rate:g} points/s for {args.outage_s:g} s, server down "
          f"{r['outage_down_s']:.1f} s mid-stream (counted on the server)")
    emit([("produced", r["produced"]), ("delivered", r["delivered"]), ("lost", r["lost"]),
          ("duplicated", r["duplicated"]),
          ("largest backlog in the spool, lines", r["outage_max_backlog_lines"]),
          ("send retries", r["outage_retries"]),
          ("catch-up after the restart, s", fmt(r["outage_catch_up_s"], 2))],
         ("outage run", "value"), r, as_json=False)
    print()
    print(f"OPC UA HistoryRead of one hour of one zone at 1 s ({r['historyread_samples']} values, "
          f"one request), median of {r['historyread_reads']}")
    emit([("from InfluxDB 1.x (InfluxQL over /query)", fmt(r["historyread_influx_ms"], 1)),
          ("from the local store (SQLite)", fmt(r["historyread_local_ms"], 1))],
         ("history backend", "ms"), r, as_json=False)
    if args.json:
        sys.stdout.flush()
        print(json.dumps(r, sort_keys=True))
    ok = (not r["lost"] and not r["duplicated"] and not r["throughput_lost"]
          and not r["throughput_duplicated"] and r["outage_drained"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
