"""Modbus field I/O: coalesced requests vs one request per point, TCP round trip, RTU line time.

Runs the PLC's Modbus links against the twin served as a Modbus TCP slave on loopback, in one
process and one run:

- ``requests_per_scan``: requests in one full poll of the default register map (every input
  read, every output written because every output changed), with the link's coalescing;
  ``naive_requests_per_scan``: the same poll with one request per point (what a per-tag poller
  does), on the same map, the same slave and the same run.
- ``tcp_rtt_ms_p50`` / ``tcp_rtt_ms_p99``: request-to-reply time of the coalesced polls
  (loopback, Python slave: this is mostly the two event loops, not the wire).
- ``rtu_poll_ms_19200`` / ``rtu_poll_ms_115200``: line time of one full poll (reads and writes)
  on an RTU line, computed from the request plan: every frame's characters (11 bits each with
  even parity) plus the 3.5-character gaps; a device's own reply delay comes on top. Also the
  steady-state poll (reads only: outputs unchanged) and the one-request-per-point plan.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from opcua_server.config import load
from plc.modbus import pdu
from plc.modbus.io import ModbusPlantIo
from plc.modbus.regmap import plan_reads, plan_writes, poll_line_time_s
from twin import Twin
from twin.modbus_slave import TwinSlave

from .common import emit, fmt


async def _poll_run(fieldbus, slave_port: int, polls: int, naive: bool) -> dict:
    link_name = next(iter(fieldbus.links))
    settings = fieldbus.links[link_name].model_copy(update={"host": "127.0.0.1", "port": slave_port})
    fb = fieldbus.model_copy(update={"links": {link_name: settings}})
    io = ModbusPlantIo(fb, naive=naive)
    link = io.links[link_name]
    await link.transport.connect(1.0)
    counts = []
    try:
        for i in range(polls):
            io.output_slot.put({n: (i % 2 == 0) for n in io.output_slot.values})
            await link.poll()
            counts.append(link.requests_per_poll)
    finally:
        await link.transport.close()
    d = link.diagnostics()
    bad = [n for n, p in io.read_inputs().items() if not p.good]
    return {"requests_per_poll": sum(counts[1:]) / max(1, len(counts) - 1), "rtt_ms_p50": d.rtt_ms_p50,
            "rtt_ms_p99": d.rtt_ms_p99, "requests": d.requests, "errors": sum(d.errors.values()),
            "bad_points": bad}


async def measure(cfg, polls: int) -> dict:
    fieldbus = cfg.fieldbus
    twin = Twin(cfg.twin, seed=0)
    slave = TwinSlave(twin, fieldbus.points)
    await slave.start_tcp("127.0.0.1", 0)
    slave.update_inputs()
    try:
        naive = await _poll_run(fieldbus, slave.tcp_port, max(20, polls // 5), naive=True)
        coalesced = await _poll_run(fieldbus, slave.tcp_port, polls, naive=False)
    finally:
        await slave.close()
    link = next(iter(fieldbus.links.values()))
    reads = plan_reads(fieldbus.points, link)
    blocks = reads + plan_writes(fieldbus.points)
    naive_blocks = plan_reads(fieldbus.points, link, naive=True) + tuple(
        b for p in fieldbus.points for b in plan_writes([p]))
    return {
        "requests_per_scan": coalesced["requests_per_poll"],
        "naive_requests_per_scan": naive["requests_per_poll"],
        "coalescing_ratio": naive["requests_per_poll"] / coalesced["requests_per_poll"],
        "tcp_rtt_ms_p50": coalesced["rtt_ms_p50"],
        "tcp_rtt_ms_p99": coalesced["rtt_ms_p99"],
        "naive_tcp_rtt_ms_p50": naive["rtt_ms_p50"],
        "tcp_requests": coalesced["requests"],
        "tcp_errors": coalesced["errors"] + naive["errors"],
        "bad_points": sorted(set(coalesced["bad_points"]) | set(naive["bad_points"])),
        "rtu_poll_ms_19200": 1000 * poll_line_time_s(blocks, 19200, "even", 1),
        "rtu_poll_ms_115200": 1000 * poll_line_time_s(blocks, 115200, "even", 1),
        "rtu_read_poll_ms_19200": 1000 * poll_line_time_s(reads, 19200, "even", 1),
        "rtu_read_poll_ms_115200": 1000 * poll_line_time_s(reads, 115200, "even", 1),
        "naive_rtu_poll_ms_19200": 1000 * poll_line_time_s(naive_blocks, 19200, "even", 1),
        "naive_rtu_poll_ms_115200": 1000 * poll_line_time_s(naive_blocks, 115200, "even", 1),
        "read_blocks": len(plan_reads(fieldbus.points, link)),
        "write_blocks": len(plan_writes(fieldbus.points)),
        "points": len(fieldbus.points),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="machine configuration file (default: the embedded machine)")
    ap.add_argument("--polls", type=int, default=1000, help="coalesced polls to time (default 1000)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    cfg, _ = load(args.config)
    if cfg.fieldbus is None:
        print("the configuration has no fieldbus section", file=sys.stderr)
        return 2
    r = asyncio.run(measure(cfg, args.polls))
    print(f"Modbus field I/O on the default register map ({r['points']} points; "
          f"{r['read_blocks']} read and {r['write_blocks']} write blocks planned)")
    emit([("requests per scan (all outputs changed)", fmt(r["requests_per_scan"], 1),
           fmt(r["naive_requests_per_scan"], 1)),
          ("TCP round trip p50, ms", fmt(r["tcp_rtt_ms_p50"]), fmt(r["naive_tcp_rtt_ms_p50"])),
          ("TCP round trip p99, ms", fmt(r["tcp_rtt_ms_p99"]), "-"),
          ("RTU line time of that poll at 19200 baud, ms", fmt(r["rtu_poll_ms_19200"], 1),
           fmt(r["naive_rtu_poll_ms_19200"], 1)),
          ("RTU line time of that poll at 115200 baud, ms", fmt(r["rtu_poll_ms_115200"], 1),
           fmt(r["naive_rtu_poll_ms_115200"], 1)),
          ("RTU line time, reads only, 19200 baud, ms", fmt(r["rtu_read_poll_ms_19200"], 1), "-"),
          ("RTU line time, reads only, 115200 baud, ms", fmt(r["rtu_read_poll_ms_115200"], 1), "-")],
         ("measure", "coalesced", "one request per point"), r, as_json=False)
    print(f"{r['tcp_requests']} coalesced requests, {r['tcp_errors']} errors, "
          f"bad points at the end: {', '.join(r['bad_points']) or 'none'}")
    if args.json:
        sys.stdout.flush()
        print(json.dumps(r, sort_keys=True))
    return 0 if not r["tcp_errors"] and not r["bad_points"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
