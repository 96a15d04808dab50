"""The twin as a stand-alone Modbus slave in real time (``tempering twin``).

One job: build the twin and its ``TwinSlave`` from the application config (its ``twin`` and
``fieldbus`` sections), listen on TCP and/or a serial line, step the twin in real time until
SIGINT/SIGTERM, and close every connection. Where it listens:

- ``tcp``: ``(host, port)``; by default the config's TCP link (``io`` if there are several).
- ``rtu``: a serial device (a pty in tests) with baud rate, parity and stop bits, by default
  those of the config's RTU link (else 19200, even, 1).
With ``rtu`` given and no ``tcp``, only the serial line is served.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass
from typing import Callable

from .modbus_slave import TwinSlave
from .plant import Twin


@dataclass(frozen=True)
class Endpoints:
    tcp: tuple[str, int] | None = None
    rtu: str | None = None
    baud: int | None = None
    parity: str | None = None
    stop_bits: int | None = None


def _link(fieldbus, transport: str):
    links = [(n, l) for n, l in fieldbus.links.items() if l.transport == transport]
    links.sort(key=lambda nl: nl[0] != "io")
    return links[0][1] if links else None


def resolve(fieldbus, want: Endpoints) -> Endpoints:
    """The endpoints to serve: what was asked, completed from the config's links."""
    rtu_link = _link(fieldbus, "rtu")
    tcp = want.tcp
    if tcp is None and want.rtu is None:
        link = _link(fieldbus, "tcp")
        if link is None:
            raise ValueError("the fieldbus has no TCP link: give --tcp HOST:PORT or --rtu DEVICE")
        tcp = (link.host, link.port)
    return Endpoints(
        tcp=tcp, rtu=want.rtu,
        baud=want.baud or (rtu_link.baud_rate if rtu_link else 19200),
        parity=want.parity or (rtu_link.parity if rtu_link else "even"),
        stop_bits=want.stop_bits or (rtu_link.stop_bits if rtu_link else 1))


async def serve(cfg, endpoints: Endpoints, *, seed: int = 0, initial_temp_c: float | None = None,
                stop: asyncio.Event | None = None, announce: Callable[[str], None] | None = None) -> None:
    """Run the twin as a Modbus slave until ``stop`` is set (or SIGINT/SIGTERM)."""
    if cfg.fieldbus is None or not cfg.fieldbus.points:
        raise ValueError("the config has no fieldbus register map")
    ep = resolve(cfg.fieldbus, endpoints)
    twin = Twin(cfg.twin, seed=seed, initial_temp_c=initial_temp_c)
    slave = TwinSlave(twin, cfg.fieldbus.points)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    where = []
    try:
        if ep.tcp is not None:
            await slave.start_tcp(*ep.tcp)
            where.append(f"Modbus TCP {ep.tcp[0]}:{slave.tcp_port}")
        if ep.rtu is not None:
            await slave.start_rtu(ep.rtu, ep.baud, ep.parity, ep.stop_bits)
            where.append(f"Modbus RTU {ep.rtu} {ep.baud} baud parity {ep.parity} "
                         f"{ep.stop_bits} stop bit{'s' if ep.stop_bits > 1 else ''}")
        units = ", ".join(str(u) for u in slave.units)
        (announce or (lambda line: print(line, flush=True)))(f"twin listening on {' and '.join(where)} (units {units}); Ctrl-C stops")
        await slave.run(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await slave.close()
