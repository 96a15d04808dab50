"""The plant the PLC runs against, chosen with ``tempering run --plant``.

- ``modbus-twin`` (default when the config's ``fieldbus`` is one Modbus TCP link): the twin, a process of
  its own (``tempering twin``, started by the supervisor), served as a Modbus TCP slave on the
  TCP link's endpoint of the register map, and the PLC talking to it over real Modbus TCP on
  loopback (``plc.modbus``). Everything a real machine would exercise runs: the register map,
  coalesced polling, qualities, reconnects, and a killed PLC shows exactly what a real machine
  would see (its I/O modules' communication watchdog drops the outputs).
- ``modbus``: the PLC's links only, to a real machine or to a twin started on its own with
  ``tempering twin`` (TCP or RTU).
- ``inprocess`` (default otherwise: no fieldbus, or RTU lines): the twin inside the PLC's
  process with no Modbus in between.

``Plant.outputs()`` is what the machine holds (the twin's I/O module, or the image last sent).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

PLANTS = ("modbus-twin", "modbus", "inprocess")


class PlantError(Exception):
    """The plant asked for cannot be built from this configuration."""


@dataclass
class Plant:
    io: object                                   # plc.runtime.PlantIo
    description: str
    outputs: Callable[[], Mapping[str, bool]]
    _io_stop: asyncio.Event = field(default_factory=asyncio.Event)
    _twin_stop: asyncio.Event = field(default_factory=asyncio.Event)
    _io_tasks: list = field(default_factory=list)
    _twin_tasks: list = field(default_factory=list)
    _closers: list = field(default_factory=list)
    diagnostics: Callable[[], tuple] = lambda: ()

    async def close(self) -> None:
        """Stop the links (they write the last, safe, image first), then the twin."""
        self._io_stop.set()
        await asyncio.gather(*self._io_tasks, return_exceptions=True)
        self._twin_stop.set()
        await asyncio.gather(*self._twin_tasks, return_exceptions=True)
        for close in self._closers:
            await close()


def default_plant(cfg) -> str:
    """``modbus-twin`` when the fieldbus is one Modbus TCP link (the twin is served on its
    endpoint); otherwise (no fieldbus, or serial RTU lines: a migrated machine's) ``inprocess``.
    The real machine is always ``--plant modbus``."""
    links = cfg.fieldbus.links if cfg.fieldbus is not None else {}
    if len(links) == 1 and next(iter(links.values())).transport == "tcp":
        return "modbus-twin"
    return "inprocess"


async def start_plant(kind: str, cfg, *, seed: int = 0, initial_temp_c: float | None = None) -> Plant:
    """The PLC process's plant: ``modbus`` (its links; with ``modbus-twin`` the supervisor runs
    the twin as a process of its own on the link's endpoint) or ``inprocess``."""
    if kind == "inprocess":
        from twin import Twin
        from twin.inprocess import InProcessTwinIo

        io = InProcessTwinIo(Twin(cfg.twin, seed=seed, initial_temp_c=initial_temp_c), wall=time.time)
        plant = Plant(io, "twin in-process (no Modbus)", lambda: io.outputs)
        plant._twin_tasks.append(asyncio.create_task(io.run_realtime(plant._twin_stop)))
        return plant
    if kind not in ("modbus", "modbus-twin"):
        raise PlantError(f"unknown plant {kind!r} (one of {', '.join(PLANTS)})")
    if cfg.fieldbus is None:
        raise PlantError(f"--plant {kind} needs a fieldbus section in the machine file")
    from plc.modbus.io import ModbusPlantIo

    io = ModbusPlantIo(cfg.fieldbus)
    links = ", ".join(f"{n} ({link.endpoint})" for n, link in io.links.items())
    plant = Plant(io, f"Modbus links {links}", lambda: io.outputs, diagnostics=io.diagnostics)
    plant._io_tasks.append(asyncio.create_task(io.run(plant._io_stop)))
    return plant


def twin_endpoint(cfg) -> tuple[str, int]:
    """Where ``modbus-twin`` serves the twin: the one TCP link's endpoint. PlantError if the
    fieldbus is not one TCP link."""
    if cfg.fieldbus is None:
        raise PlantError("--plant modbus-twin needs a fieldbus section in the machine file")
    links = cfg.fieldbus.links
    if len(links) != 1 or next(iter(links.values())).transport != "tcp":
        raise PlantError("--plant modbus-twin serves the twin on one Modbus TCP link; for RTU "
                         "links run `tempering twin --rtu DEVICE` and `tempering run --plant modbus`")
    link = next(iter(links.values()))
    return link.host, link.port
