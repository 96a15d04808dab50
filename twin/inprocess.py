"""The twin as the PLC's plant inside the same process (no Modbus in between).

``InProcessTwinIo`` implements the runtime's ``PlantIo``: ``read_inputs`` turns the twin's
current readings into good points stamped with the given clock, ``write_outputs`` stores the
output image (applied by the twin from its next step on), ``force_safe`` drops every output,
and so does ``sever(reason)`` (the hang watchdog's path, from another thread: there is no field
connection to close in process, the reason is kept in ``last_sever``).
In virtual time the caller advances the twin with ``advance(dt_s)`` after each scan; in real
time ``run_realtime`` steps it by the elapsed wall time in its own task.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from plc.image import Point, ProcessImage, Quality
from plc.contract import INPUT_SPECS, SAFE_OUTPUTS

from .plant import Twin


class InProcessTwinIo:
    def __init__(self, twin: Twin, wall: Callable[[], float] | None = None):
        self.twin = twin
        self._wall = wall or (lambda: twin.time_s)
        self._outputs: dict[str, bool] = dict(SAFE_OUTPUTS)
        self.last_sever = ""

    def read_inputs(self) -> ProcessImage:
        ts = self._wall()
        raw = self.twin.read_inputs()
        return ProcessImage.build(INPUT_SPECS, {n: Point(raw[n], Quality.GOOD, ts) for n in INPUT_SPECS})

    def write_outputs(self, outputs: ProcessImage) -> None:
        self._outputs = {n: bool(p.value) for n, p in outputs.items()}

    def force_safe(self) -> None:
        self._outputs = dict(SAFE_OUTPUTS)

    def sever(self, reason: str) -> None:
        """Any thread: every output off now (one assignment, nothing to wait for)."""
        self._outputs = dict(SAFE_OUTPUTS)
        self.last_sever = reason

    @property
    def outputs(self) -> dict[str, bool]:
        return dict(self._outputs)

    def advance(self, dt_s: float) -> None:
        self.twin.step(dt_s, self._outputs)

    async def run_realtime(self, stop: asyncio.Event, step_s: float = 0.05) -> None:
        """Step the twin by the elapsed monotonic time until ``stop`` is set."""
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(step_s)
            now = time.monotonic()
            self.advance(now - last)
            last = now
