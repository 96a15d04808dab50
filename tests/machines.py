"""A machine for the OPC UA tests: the PLC (real time, 100 ms scan) on the in-process twin and
the plant window's OPC UA server and alarm journal, in the test's event loop, talking over the real bridge
(``plc.bridge``: a Unix socket, snapshots out, commands in, verdicts back) — the same protocol
as the two processes of ``tempering run``, without their start-up time."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from opcua_server.config import load
from opcua_server.server import TemperingServer
from plc.bridge import PlcClient, WindowPort
from plc.program import Program
from plc.runtime import Controller, MonotonicClock, Runtime, WatchdogSettings
from tempering.window_process import journal_task
from twin import Twin
from twin.inprocess import InProcessTwinIo


class InProcessMachine:
    def __init__(self, opcua_pki, *, seed: int = 2, initial_temp_c: float = 40.0, **server_kw):
        cfg, book = load()
        self.cfg = cfg.model_copy(update={"opcua": opcua_pki.settings})
        self.book = book
        self.pki = opcua_pki
        self.records = opcua_pki.records
        self.records.seed_recipes(book)
        self.program = Program.from_config(self.cfg, book, period_s=0.1)
        self.controller = Controller(self.program)
        self._dir = Path(tempfile.mkdtemp(prefix="tempering-test-"))
        self.port = WindowPort(self._dir / "plc.sock", self.controller.submit,
                               on_recipes=self.controller.set_recipes,
                               on_batch_floor=self.controller.set_batch_floor)
        self.controller.channel = self.port
        self.plc = PlcClient(self._dir / "plc.sock")
        self.channel = self.plc.channel
        self.twin = Twin(self.cfg.twin, seed=seed, initial_temp_c=initial_temp_c)
        self.io = InProcessTwinIo(self.twin, wall=time.time)
        self.server = TemperingServer(self.cfg, self.plc, self.records, program=self.program,
                                      pki=opcua_pki.pki, app_uri=getattr(opcua_pki, "app_uri", None),
                                      **server_kw)
        self.stop = asyncio.Event()
        self.plc_stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    async def __aenter__(self):
        await self.port.start()
        self.tasks = [asyncio.create_task(journal_task(self.plc.channel, self.plc.channel.subscribe(maxlen=4096),
                                                  self.records, self.cfg.machine.id, self.stop)),
                      asyncio.create_task(self.plc.run(self.stop)),
                      asyncio.create_task(self.io.run_realtime(self.stop))]
        await self.server.start()
        runtime = Runtime(self.controller, self.io, MonotonicClock(), WatchdogSettings(5, 10.0),
                          window=self.port.status)
        self.tasks.append(asyncio.create_task(runtime.run(self.plc_stop)))
        await asyncio.wait_for(self.plc.connected_event.wait(), 10.0)
        await asyncio.sleep(0.3)
        return self

    async def __aexit__(self, *exc):
        self.plc_stop.set()
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.stop()
        await self.port.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def nodes(self):
        return self.server.nodes

    @property
    def endpoint(self) -> str:
        return self.cfg.opcua.endpoint

    @property
    def server_certificate(self) -> str:
        """The server's own certificate (made or remade at start) for the client to trust."""
        return str(self.pki.pki.cert_path)


async def until(predicate, timeout_s: float = 8.0):
    """Poll ``predicate`` (a function, its result awaited if it is a coroutine) every 50 ms
    until it is truthy; return that value. AssertionError after ``timeout_s``."""
    t0 = time.monotonic()
    while True:
        v = predicate()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"not within {timeout_s:g} s")
        await asyncio.sleep(0.05)
