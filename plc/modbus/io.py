"""The runtime's plant I/O over Modbus: latest-value slots between the scan and the links.

``ModbusPlantIo`` implements ``plc.runtime.PlantIo``. The scan never awaits the network:

- ``read_inputs()`` builds the input image from the slots the links fill. A point keeps the
  quality its last poll gave it (GOOD with the read time, or BAD with the reason); a GOOD value
  older than ``stale_after_ms`` reads UNCERTAIN ("stale: last good read N ms ago").
- ``write_outputs(image)`` / ``force_safe()`` put the image in the output slot; each link writes
  what changed at once (and everything every ``refresh_ms``). ``force_safe`` may be called from
  another thread, but it only reaches the machine once the links' event loop runs.
- ``sever(reason)``: the hang watchdog's path, for when that loop is blocked. From any thread,
  without the loop: puts the safe image in the slot and, per link (``Link.sever``), writes it
  to the devices itself, blocking, within ``timeout_s`` (0.2 s) per link (TCP: a new
  connection; RTU: the open port), then shuts the live TCP connection down so that the
  devices' communication watchdogs drop the outputs even if that write failed. Counted in each
  link's diagnostics (``severs``, ``last_sever``); logged once per call; never raises. When the
  loop runs again the links reconnect by themselves. Until the scan writes an image with every
  output off (the trip the first scan after a hang latches), ``write_outputs`` images are
  dropped and the slot stays safe: the image of the scan that hung must not switch the
  outputs back on through the reconnected links.
- ``run(stop)`` runs one task per link until ``stop`` is set, then writes the output slot one
  last time (after the runtime's final scan it holds the safe image) and closes the links.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable, Mapping

from plc.image import Point, ProcessImage, Quality
from plc.contract import INPUT_SPECS, SAFE_OUTPUTS

from .link import InputSlots, Link, LinkDiagnostics, OutputSlot

log = logging.getLogger(__name__)


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
        self.held_safe = ""     # the reason of the last sever while its hold lasts, else ""
        self._sever_lock = threading.Lock()     # one sever at a time (threads, not the loop)

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
        values = {n: bool(p.value) for n, p in outputs.items()}
        if self.held_safe:
            if any(values.values()):
                return          # an image from before the sever (the scan that hung)
            self.held_safe = ""
        self.output_slot.put(values)

    def force_safe(self) -> None:
        self.output_slot.put(SAFE_OUTPUTS)

    def sever(self, reason: str, *, timeout_s: float = 0.2) -> None:
        """Make the outputs safe on the machine without the event loop (module docstring).
        Any thread; returns within about ``timeout_s`` per link; never raises."""
        try:
            with self._sever_lock:
                self.held_safe = reason or "severed"
                self.output_slot.put(SAFE_OUTPUTS)
                done = [f"link {name}: {link.sever(reason, SAFE_OUTPUTS, timeout_s)}"
                        for name, link in self.links.items()]
            log.warning("field I/O severed: %s", "; ".join(done))
        except Exception:
            log.exception("severing the field I/O (%s) failed", reason)

    # -- the links ------------------------------------------------------------------------------

    @property
    def outputs(self) -> Mapping[str, bool]:
        """The output image the links are writing."""
        return dict(self.output_slot.values)

    def diagnostics(self) -> tuple[LinkDiagnostics, ...]:
        return tuple(link.diagnostics() for link in self.links.values())

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(link.run(stop) for link in self.links.values()))
