"""The runtime's plant I/O over Modbus: latest-value slots between the scan and the links.

``ModbusPlantIo`` implements ``plc.runtime.PlantIo``. The scan never awaits the network:

- ``read_inputs()`` builds the input image from the slots the links fill. A point keeps the
  quality its last poll gave it (GOOD with the read time, or BAD with the reason); a GOOD value
  older than ``stale_after_ms`` reads UNCERTAIN ("stale: last good read N ms ago").
- ``write_outputs(image)`` / ``force_safe()`` put the image in the output slot; each link writes
  what changed at once (and everything every ``refresh_ms``).
- ``run(stop)`` runs one task per link until ``stop`` is set, then writes the output slot one
  last time (after the runtime's final scan it holds the safe image) and closes the links.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Mapping

from plc.image import Point, ProcessImage, Quality
from plc.program import INPUT_SPECS, SAFE_OUTPUTS

from .link import InputSlots, Link, LinkDiagnostics, OutputSlot


class ModbusPlantIo:
    def __init__(self, settings, *, naive: bool = False,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        """``settings``: a validated ``FieldbusSettings`` with its points filled in."""
        self.settings = settings
        self.clock, self.wall = clock, wall
        self.stale_s = settings.stale_after_ms / 1000.0
        self.inputs = InputSlots(tuple(INPUT_SPECS), "communication error: no reply yet")
        self.output_slot = OutputSlot(SAFE_OUTPUTS)
        self.links: dict[str, Link] = {
            name: Link(name, link, settings.points, self.inputs, self.output_slot, naive=naive,
                       clock=clock, wall=wall)
            for name, link in settings.links.items()}

    # -- PlantIo ------------------------------------------------------------------------------

    def read_inputs(self) -> ProcessImage:
        now = self.clock()
        points: dict[str, Point] = {}
        for name, p in self.inputs.points.items():
            if p.quality is Quality.GOOD:
                age_s = now - self.inputs.read_at[name]
                if age_s > self.stale_s:
                    p = Point(p.value, Quality.UNCERTAIN, p.timestamp_s,
                              f"stale: last good read {age_s * 1000:.0f} ms ago")
            points[name] = p
        return ProcessImage.build(INPUT_SPECS, points)

    def write_outputs(self, outputs: ProcessImage) -> None:
        self.output_slot.put({n: bool(p.value) for n, p in outputs.items()})

    def force_safe(self) -> None:
        self.output_slot.put(SAFE_OUTPUTS)

    # -- the links ------------------------------------------------------------------------------

    @property
    def outputs(self) -> Mapping[str, bool]:
        """The output image the links are writing."""
        return dict(self.output_slot.values)

    def diagnostics(self) -> tuple[LinkDiagnostics, ...]:
        return tuple(link.diagnostics() for link in self.links.values())

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(link.run(stop) for link in self.links.values()))
