"""The supervisor of ``tempering run``: starts the processes, restarts the one that dies or
hangs, and stops them in order.

    tempering run ─┬─ twin     (``tempering twin``; only with --plant modbus-twin: the machine)
                   ├─ plc      (``tempering plc``: scan, links, state, hang watchdog)
                   └─ window   (``tempering window``: OPC UA, records, historian, live view)

- Each of plc and window writes a byte to its own heartbeat pipe: the PLC after every scan,
  the window from its event loop every 0.25 s. A child that exits is restarted at once (after
  ``RESTART_BACKOFF_S`` if it had run for less than that); one whose heartbeat stops for
  ``hang_after_s`` is killed with SIGKILL and restarted. A restarted PLC comes back
  interrupted with its outputs safe, as after a power loss (its state file); a restarted
  window reconnects to the PLC and OPC UA clients reconnect to it.
- The PLC and the twin run in sessions of their own (a Ctrl-C on the terminal reaches only the
  supervisor and the live view); the window stays in the terminal's process group so that its
  live view reads the keys.
- Stop (SIGINT, SIGTERM, ``--duration-s``, or ``q`` in the live view, which the window reports
  by exiting with ``QUIT``): the PLC first (its last scan ends the batch and the links write the
  safe image), then the window, then the twin; whatever does not end in time is killed. The
  children die with the supervisor too (PR_SET_PDEATHSIG), so a kill -9 of it leaves no orphan.
- Exit status: the PLC's last one (0: stopped with outputs safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .plc_process import stop_event
from .window_process import QUIT

RESTART_BACKOFF_S = 1.0
STOP_TIMEOUT_S = 15.0


@dataclass
class Child:
    name: str
    argv: list[str]
    hang_after_s: float | None = None     # None: no heartbeat
    first_beat_s: float = 60.0            # time a fresh start may take before its first beat
    own_session: bool = True
    proc: asyncio.subprocess.Process | None = None
    started_s: float = 0.0
    last_beat_s: float | None = None
    restarts: int = 0
    _beat_fd: int | None = None


def _describe(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    def __init__(self, children: list[Child], *, say=None):
        self.children = {c.name: c for c in children}
        self.say = say or (lambda line: print(f"supervisor: {line}", flush=True))
        self.stopping = False
        self.quit = asyncio.Event()
        self.tick = lambda now_s: None        # called from the loop of ``watch`` (systemd)

    async def start(self, child: Child, extra: tuple[str, ...] = ()) -> None:
        loop = asyncio.get_running_loop()
        argv = [*child.argv, *extra]
        pass_fds: tuple[int, ...] = ()
        w = None
        if child.hang_after_s is not None:
            r, w = os.pipe()
            os.set_blocking(r, False)
            argv += ["--heartbeat-fd", str(w)]
            pass_fds = (w,)
            child._beat_fd = r
            child.last_beat_s = None
            loop.add_reader(r, self._beat, child, r)
        child.proc = await asyncio.create_subprocess_exec(*argv, pass_fds=pass_fds,
                                                          start_new_session=child.own_session)
        if w is not None:
            os.close(w)
        child.started_s = time.monotonic()
        self.say(f"{child.name} started (pid {child.proc.pid})")

    def _beat(self, child: Child, fd: int) -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        if data:
            child.last_beat_s = time.monotonic()
        else:                       # the child closed its end: it is gone
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
            if child._beat_fd == fd:
                child._beat_fd = None

    def _hung(self, child: Child, now: float) -> str:
        if child.hang_after_s is None:
            return ""
        if child.last_beat_s is None:
            waited = now - child.started_s
            return f"no heartbeat {waited:.0f} s after its start" if waited > child.first_beat_s else ""
        silent = now - child.last_beat_s
        return f"no heartbeat for {silent:.1f} s" if silent > child.hang_after_s else ""

    async def watch(self, stop: asyncio.Event, order: list[str]) -> None:
        """Restart what dies, kill what hangs, until ``stop`` is set."""
        while not stop.is_set():
            now = time.monotonic()
            for name in order:
                child = self.children[name]
                proc = child.proc
                if proc is None:
                    continue
                if proc.returncode is not None:
                    if name == "window" and proc.returncode == QUIT:
                        self.say("quit asked from the live view")
                        stop.set()
                        return
                    ran = now - child.started_s
                    self.say(f"{name} (pid {proc.pid}) ended: {_describe(proc.returncode)}; restarting")
                    child.proc = None
                    if ran < RESTART_BACKOFF_S:
                        await asyncio.sleep(RESTART_BACKOFF_S - ran)
                    if stop.is_set():
                        return
                    child.restarts += 1
                    await self.start(child)
                    continue
                why = self._hung(child, now)
                if why:
                    self.say(f"{name} (pid {proc.pid}) hung: {why}; killing it")
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
            self.tick(time.monotonic())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)

    async def stop_all(self, order: list[str]) -> dict[str, int | None]:
        """SIGTERM each child in ``order``, waiting for it (SIGKILL after STOP_TIMEOUT_S)."""
        codes: dict[str, int | None] = {}
        for name in order:
            child = self.children.get(name)
            proc = child.proc if child else None
            if proc is None:
                continue
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
                except asyncio.TimeoutError:
                    self.say(f"{name} (pid {proc.pid}) did not stop in {STOP_TIMEOUT_S:.0f} s; killing it")
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
            codes[name] = proc.returncode
            if child._beat_fd is not None:
                with contextlib.suppress(ValueError, OSError):
                    asyncio.get_running_loop().remove_reader(child._beat_fd)
                    os.close(child._beat_fd)
                child._beat_fd = None
        return codes


def _terminal_state():
    """A function that puts the terminal back as it is now (a live view killed with -9 leaves
    it without echo)."""
    if not sys.stdin.isatty():
        return lambda: None
    import termios
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)

    def restore() -> None:
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    return restore


def _service_status(sup: Supervisor) -> dict:
    """What ``systemd.ServiceState.update`` is told: the PLC's and the window's last beats and
    a STATUS line that changes only when a process changes state."""
    words = {"plc": ("PLC", "scanning"), "window": ("window", "serving")}
    parts = []
    for name, (label, doing) in words.items():
        c = sup.children[name]
        if c.proc is None or c.proc.returncode is not None:
            parts.append(f"{label} restarting")
        elif c.last_beat_s is None:
            parts.append(f"{label} starting (pid {c.proc.pid})")
        elif time.monotonic() - c.last_beat_s > (c.hang_after_s or 0) / 2:
            parts.append(f"{label} silent (pid {c.proc.pid})")
        else:
            parts.append(f"{label} {doing} (pid {c.proc.pid})")
    restarts = sum(c.restarts for c in sup.children.values())
    status = ", ".join(parts) + (f"; {restarts} restart(s)" if restarts else "")
    return {"plc_beat_s": sup.children["plc"].last_beat_s,
            "window_beat_s": sup.children["window"].last_beat_s, "status": status}


def _wait_for_port(host: str, port: int, timeout_s: float, proc) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return True
        time.sleep(0.05)
    return False


async def run(args, cfg) -> int:
    """``tempering run``: the processes of the configuration, until asked to stop."""
    from .plant import PlantError, default_plant, twin_endpoint
    from .systemd import Notifier, ServiceState, journal_logging

    journal_logging("supervisor", cfg.machine.id)
    service = ServiceState(Notifier.from_environ())     # the children inherit none of it
    if service.ping_every_s is not None:
        print(f"systemd: watchdog {service.notifier.watchdog_s:g} s: WATCHDOG=1 every "
              f"{service.ping_every_s:g} s while the PLC scans"
              + (f" (shorter than --plc-hang-s {args.plc_hang_s:g} s plus a PLC's restart: "
                 f"systemd restarts the service before the supervisor restarts the PLC)"
                 if service.notifier.watchdog_s < args.plc_hang_s + 5 else ""), flush=True)
    kind = args.plant or default_plant(cfg)
    if args.plant is None and kind == "inprocess" and cfg.fieldbus is not None:
        print("plant: the twin in-process: the fieldbus is not one Modbus TCP link "
              "(--plant modbus drives the real line)", flush=True)
    me = [sys.executable, "-m", "tempering.cli"]
    config = ["--config", str(args.config)] if args.config else []
    common = list(config)
    if args.period_ms:
        common += ["--period-ms", str(args.period_ms)]
    workdir = Path(tempfile.mkdtemp(prefix="tempering-"))      # mode 0700: the PLC's socket
    sock = workdir / "plc.sock"
    parent = ["--parent-pid", str(os.getpid())]
    children: list[Child] = []
    order_start: list[str] = []
    if kind == "modbus-twin":
        try:
            host, port = twin_endpoint(cfg)
        except PlantError as e:
            print(str(e), file=sys.stderr)
            return 2
        twin = [*me, "twin", "--tcp", f"{host}:{port}", "--seed", str(args.seed), *config]
        if args.initial_temp_c is not None:
            twin += ["--initial-temp-c", str(args.initial_temp_c)]
        children.append(Child("twin", twin))
        order_start.append("twin")
    plc = [*me, "plc", "--socket", str(sock), *parent, *common, "--plant",
           "modbus" if kind == "modbus-twin" else kind, "--seed", str(args.seed),
           "--priority", args.priority, "--window-lost-s", str(args.window_lost_s)]
    if args.state_file:
        plc += ["--state-file", str(args.state_file)]
    if args.initial_temp_c is not None and kind == "inprocess":
        plc += ["--initial-temp-c", str(args.initial_temp_c)]
    if args.scan_log:
        plc += ["--scan-log", str(args.scan_log)]
    children.append(Child("plc", plc, hang_after_s=args.plc_hang_s, first_beat_s=30.0))
    window = [*me, "window", "--socket", str(sock), *parent, *common, "--nice", str(args.window_nice)]
    for flag in ("no_history", "no_opcua"):
        if getattr(args, flag):
            window.append("--" + flag.replace("_", "-"))
    if args.recipe:
        window += ["--recipe", args.recipe]
    children.append(Child("window", window, hang_after_s=args.window_hang_s, first_beat_s=60.0,
                          own_session=False))
    order_start += ["plc", "window"]
    sup = Supervisor(children)
    sup.tick = lambda now_s: service.update(now_s, **_service_status(sup))
    stop = stop_event(args.duration_s)
    codes: dict[str, int | None] = {}
    terminal = _terminal_state()
    try:
        for name in order_start:
            child = sup.children[name]
            extra: tuple[str, ...] = ()
            if name == "window" and not args.no_start:
                extra = ("--start", args.recipe or cfg.machine.default_recipe)
            await sup.start(child, extra)
            if name == "twin":
                if not await asyncio.to_thread(_wait_for_port, host, port, 15.0, child.proc):
                    print(f"twin: not serving {host}:{port} (see above)", file=sys.stderr)
                    stop.set()
                    break
        await sup.watch(stop, order_start)
    finally:
        service.stop()
        codes = await sup.stop_all(["plc", "window", "twin"])
        shutil.rmtree(workdir, ignore_errors=True)
        terminal()
    plc_code = codes.get("plc")
    return 1 if plc_code is None else plc_code
