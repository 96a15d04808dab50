"""The live terminal view of ``tempering run``: what the machine does, at a glance.

``render(snapshot)`` is pure (snapshot in, text out) so it is tested without a terminal. The
``Console`` task (in the plant-window process) redraws it twice a second from the latest
snapshot (it only reads the snapshot channel), and turns single keys into operator commands when
stdin is a terminal; each goes through ``command`` (the gate's command path: the scan's
verdict, audited with origin ``console``) and its verdict is shown. When stdout is not a
terminal (a log, CI) it prints events as lines instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import Awaitable, Callable, TextIO

from plc.channel import Snapshot, SnapshotChannel
from plc.commands import Abort, Acknowledge, Command, Hold, Reset, Resume, StartRecipe, Stop

KEYS = "s start  h hold  r resume  p stop pouring  a abort  x reset  k ack all  q quit"
MOTORS = ("mixer", "pump", "vibration", "vib_heater", "mold_heater")


def _f(v: float | None, fmt: str = "{:6.2f}") -> str:
    return "   ---" if v is None else fmt.format(v)


def render(s: Snapshot, machine: str = "", now_wall: float | None = None) -> str:
    state = s.phase.upper() + (" (HELD)" if s.held else "") + (
        " (INTERRUPTED: resume or abort)" if s.interrupted else "")
    lines = [
        f"{machine}  phase {state}  for {int(s.phase_time_s) // 60:d}:{int(s.phase_time_s) % 60:02d}"
        f"  recipe {s.recipe_id or '-'}  batch {s.batch_id or '-'}"
        + ("  TEMPERED" if s.tempered else "") + ("  POURING RELEASED" if s.pouring_released else ""),
        "",
        "zone          PV degC   SP degC   out %   quality",
    ]
    for z in s.zones:
        q = z.quality.name.lower() + (" manual" if z.manual else "")
        lines.append(f"{z.name:<12} {_f(z.pv_c)}    {_f(z.sp_c)}   {z.output_pct:6.1f}   {q}")
    out = s.outputs
    on = lambda n: "ON " if n in out and out[n].value else "off"  # noqa: E731
    lines += ["", "outputs  " + "  ".join(f"{n} {on(n)}" for n in
                                          ("heater_tank_bottom", "heater_tank_wall", "heater_pump",
                                           "heater_fountain", "cool1_tank", "cool2_tank")),
              "motors   " + "  ".join(f"{n} {on(n)}" for n in MOTORS)]
    cur = [f"{n.removeprefix('current_')} {s.inputs[n].value:.1f} A" for n in
           ("current_mixer", "current_pump", "current_vibration", "current_total") if n in s.inputs]
    if cur:
        lines.append("currents " + "  ".join(cur))
    # the interesting ones, worst first: active, unacknowledged, shelved or out of service
    shown = sorted((a for a in s.alarms if a.active or a.state.value in (
        "unacknowledged_returned_to_normal", "shelved", "out_of_service")),
        key=lambda a: (-int(a.priority), a.id))
    lines += ["", f"alarms ({len(shown)})" + (f"   TRIPPED, first-out: {s.first_out}" if s.trips else "")]
    for a in shown[:8]:
        lines.append(f"  {a.priority.name:<8} {a.state.value:<34} {a.message}")
    st = s.stats
    if st:
        lines += ["", "scan  logic p50 {:.2f} ms  p99 {:.2f} ms   late p50 {:.2f} ms  p99 {:.2f} ms  max {:.2f} ms"
                  "   overruns {:.0f}   scans {:.0f}".format(
                      st.get("logic_ms_p50", 0), st.get("logic_ms_p99", 0), st.get("late_ms_p50", 0),
                      st.get("late_ms_p99", 0), st.get("late_ms_max", 0), st.get("overruns", 0),
                      st.get("scans", 0))]
    return "\n".join(lines)


def render_links(links) -> str:
    """One line per Modbus link and one per device: state, requests, errors, round trip."""
    lines = []
    for d in links:
        errs = " ".join(f"{k} {v}" for k, v in d.errors.items() if v) or "no errors"
        lines.append(f"link {d.name} {d.transport} {d.endpoint}: {d.state}, {d.requests} requests "
                     f"({d.requests_per_poll}/poll), rtt p50 {d.rtt_ms_p50:.1f} ms p99 "
                     f"{d.rtt_ms_p99:.1f} ms, {errs}")
        for dev in d.devices:
            if dev.state != "connected" or dev.last_error:
                lines.append(f"  unit {dev.unit}: {dev.state}" +
                             (f", last error: {dev.last_error}" if dev.last_error else ""))
    return "\n".join(lines)


def render_history(d) -> str:
    """One line about the historian: where the history goes, backlog, rate, spool, last error."""
    if d is None:
        return ""
    text = (f"history -> {d.sink}: {d.state}, backlog {d.backlog_lines} lines, "
            f"{d.rate_lines_per_s:.1f} lines/s, spool {d.spool_fill * 100:.1f} % full")
    if d.spool_alarm:
        text += "  SPOOL ALARM (>= 80 % full)"
    if d.dropped_total:
        text += f", {d.dropped_total} lines dropped (spool full)"
    if d.state == "retrying" and d.last_error:
        text += f"\n  last error: {d.last_error}"
    return text


def key_command(key: str, default_recipe: str, user: str) -> Command | None:
    o = "console"
    return {
        "s": lambda: StartRecipe(default_recipe, user=user, origin=o),
        "h": lambda: Hold(user=user, origin=o), "r": lambda: Resume(user=user, origin=o),
        "p": lambda: Stop(user=user, origin=o), "a": lambda: Abort(user=user, origin=o),
        "x": lambda: Reset(user=user, origin=o), "k": lambda: Acknowledge(None, user=user, origin=o),
    }.get(key.lower(), lambda: None)()


class Console:
    def __init__(self, channel: SnapshotChannel, machine: str,
                 submit: Callable[[Command], Awaitable[tuple[bool, str]]],
                 default_recipe: str, stop: asyncio.Event, out: TextIO = sys.stdout,
                 user: str = "console", links: Callable[[], tuple] = lambda: (),
                 history: Callable[[], object] = lambda: None):
        self.links = links
        self.history = history
        self.sub = channel.subscribe(maxlen=256)
        self.machine = machine
        self.submit = submit
        self.recipe = default_recipe
        self.stop = stop
        self.out = out
        self.user = user
        self.interactive = out.isatty()
        self.messages: list[str] = []
        self._pending: set[asyncio.Task] = set()

    async def _send(self, cmd: Command) -> None:
        ok, text = await self.submit(cmd)
        line = f"{time.strftime('%H:%M:%S')} {cmd.name}: {'accepted' if ok else 'refused: ' + text}"
        self.messages = (self.messages + [line])[-6:]

    async def run(self, refresh_s: float = 0.5) -> None:
        with self._keys():
            while not self.stop.is_set():
                snaps = self.sub.drain()
                for snap in snaps:
                    for e in snap.events:
                        line = f"{time.strftime('%H:%M:%S', time.localtime(e.time_s))} {e.kind}: {e.message}"
                        if self.interactive:
                            self.messages = (self.messages + [line])[-6:]
                        else:
                            print(line, file=self.out, flush=True)
                if snaps and self.interactive:
                    text = render(snaps[-1], self.machine)
                    extra = "\n".join(t for t in (render_links(self.links()),
                                                    render_history(self.history())) if t)
                    if extra:
                        text += "\n\n" + extra
                    self.out.write("\x1b[H\x1b[2J" + text + "\n\nlast events\n  " +
                                   "\n  ".join(self.messages) + f"\n\nkeys: {KEYS}\n")
                    self.out.flush()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), refresh_s)

    @contextlib.contextmanager
    def _keys(self):
        stdin = sys.stdin
        if not (self.interactive and stdin.isatty()):
            yield
            return
        import termios
        import tty
        fd = stdin.fileno()
        old = termios.tcgetattr(fd)
        loop = asyncio.get_running_loop()

        def on_key() -> None:
            ch = stdin.read(1)
            if ch.lower() == "q":
                self.stop.set()
                return
            cmd = key_command(ch, self.recipe, self.user)
            if cmd is not None:
                task = asyncio.create_task(self._send(cmd))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)

        tty.setcbreak(fd)
        loop.add_reader(fd, on_key)
        try:
            yield
        finally:
            loop.remove_reader(fd)
            termios.tcsetattr(fd, termios.TCSADRAIN, old)
