"""Snapshots into the address space: values, qualities, alarms, events and diagnostics.

One job: make the address space say what the last scan saw, without ever touching the scan.
The publisher drains its own bounded subscription of the snapshot channel every
``interval_s``; it writes a variable only when its value or status changed (so a subscribed
client gets a data change exactly when something changed), with the scan's time as
SourceTimestamp. Every alarm event of every drained snapshot goes to the conditions
(``opcua_server.conditions``: a Part 9 condition event each), so none is lost between two
publications; the PLC's loss and return are SystemEventType events.

Quality -> StatusCode (OPC UA Part 4 §7.34, Part 8 §6.3):

    GOOD                                    Good
    UNCERTAIN (stale)                       UncertainLastUsableValue
    BAD "communication error ..."           BadCommunicationError
    BAD "device rejected ..."               BadDeviceFailure
    BAD, any other reason                   BadSensorFailure (for a zone temperature:
                                            open / shorted / stuck sensor found by the scan)
    PLC lost (``plc_status()`` not '')      BadNoCommunication on every process value
                                            (last value kept), and a "PLC lost" system event

No holes: from the first publication on, every variable of the machine (those below ``Alarms``
through ``opcua_server.conditions``) has a value or a status that says why it has none (a generic client never finds one still
BadWaitingForInitialData). Where the scan has no number to give, the status says so:

    Zones.*.Setpoint        no recipe in a running phase: null, BadOutOfService (the loop is
                            not running, so it has no set-point)
    Zones.*.ManualOutput    in auto: the controller's Output, Good (what manual mode would
                            start from: the transfer is bumpless); in manual: the set value
    Zones.*.Heater          a zone without heating outputs: False
    Diagnostics.Scan.*P50/P99   before the first measured scans: null, BadNoData (a percentile
                            of an empty window)
    Diagnostics.Historian.* no historian (``--no-history``): State "disabled", Sink "none", the
                            counters 0, LastError ""
    Zones.*.Autotune.*      no autotune since the PLC started: Stage "idle", Message "", the
                            figures 0, ModelIntegrating False (Good); an outcome without a model,
                            gains or prediction (failed, aborted): those 0; a prediction that
                            never settles: PredictedSettlingTime null, BadNoData

One writer per node: each variable is written at most once per publication, from one fact of
the snapshot. A zone's Temperature is the scan's verdict on the zone (``snap.zones``: the
reading it controls with, Bad when the scan refused the reading: open, shorted, stuck or a bad
input) with the input point's timestamp; the writable settings (Trim, gains, ManualOutput) come
from the same snapshot (``snap.settings``).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any, Callable, Mapping

from asyncua import ua

from plc.alarms import Priority
from plc.autotune import View as AutotuneView
from plc.channel import SnapshotChannel
from plc.image import Point, Quality
from plc.state import Phase

from .model import PHASE_VALUES

log = logging.getLogger(__name__)



_INTS = (ua.VariantType.Int16, ua.VariantType.UInt16, ua.VariantType.Int32, ua.VariantType.UInt32,
         ua.VariantType.Int64, ua.VariantType.UInt64, ua.VariantType.Byte, ua.VariantType.SByte)


def status_of(quality: Quality, reason: str = "") -> ua.StatusCode:
    if quality is Quality.GOOD:
        return ua.StatusCode(ua.StatusCodes.Good)
    if quality is Quality.UNCERTAIN:
        return ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue)
    if reason.startswith("communication error"):
        return ua.StatusCode(ua.StatusCodes.BadCommunicationError)
    if reason.startswith("device rejected"):
        return ua.StatusCode(ua.StatusCodes.BadDeviceFailure)
    return ua.StatusCode(ua.StatusCodes.BadSensorFailure)


# what the Historian diagnostics say when the machine runs without one (--no-history)
_NO_HISTORIAN = SimpleNamespace(sink="none", state="disabled", last_error="", backlog_lines=0,
                                delivered_total=0, dropped_total=0, spool_fill=0.0,
                                spool_alarm=False, rate_lines_per_s=0.0)
_OUT_OF_SERVICE = ua.StatusCode(ua.StatusCodes.BadOutOfService)
_NO_DATA = ua.StatusCode(ua.StatusCodes.BadNoData)


def _time(t_s: float | None) -> datetime | None:
    return None if t_s is None else datetime.fromtimestamp(t_s, timezone.utc)


class Publisher:
    def __init__(self, server, nodes, channel: SnapshotChannel, *, interval_s: float = 0.1,
                 links: Callable[[], tuple] = lambda: (), history: Callable[[], Any] = lambda: None,
                 sessions: Callable[[], tuple[int, int]] = lambda: (0, 0),
                 conditions: Any = None,
                 plc_status: Callable[[], str] = lambda: "",
                 plc_info: Callable[[], tuple[str, int]] = lambda: ("", 0),
                 heating_outputs: Mapping[str, tuple[str, ...]] = {}):
        self.heating_outputs = heating_outputs      # zone -> its heating outputs (Heater)
        self.plc_status = plc_status
        self.plc_info = plc_info
        self.plc_lost = ""
        self.server = server
        self.nodes = nodes
        self.sub = channel.subscribe(maxlen=1024)
        self.channel = channel
        self.interval_s = interval_s
        self.links = links
        self.history = history
        self.sessions = sessions
        self.conditions = conditions    # opcua_server.conditions.ConditionServer
        self._last: dict[Any, tuple] = {}     # nodeid -> (value, status code value)
        self.writes = 0
        self.publications = 0
        self.events = 0

    # -- one variable ---------------------------------------------------------------------------

    async def _set(self, node, value, vtype: ua.VariantType, status: ua.StatusCode | None = None,
                   source_s: float | None = None) -> None:
        status = status or ua.StatusCode(ua.StatusCodes.Good)
        key = node.nodeid
        if self._last.get(key) == (value, status.value):
            return
        self._last[key] = (value, status.value)
        if value is None:       # no value: the status says why (Part 4 §7.7.1)
            vtype = ua.VariantType.Null
        else:
            vtype, value = self._declared(node, vtype, value)
        dv = ua.DataValue(ua.Variant(value, vtype), StatusCode=status,
                          SourceTimestamp=_time(source_s), ServerTimestamp=datetime.now(timezone.utc))
        await self.server.write_attribute_value(key, dv)
        self.writes += 1

    def _declared(self, node, vtype: ua.VariantType, value):
        """The variable's declared type (the model's ``variant_types``) and the value in it."""
        declared = self.nodes.variant_types.get(node.nodeid, vtype)
        if declared is vtype or value is None or isinstance(value, (list, datetime, str)):
            return vtype, value
        if declared in _INTS:
            return declared, int(value)
        if declared in (ua.VariantType.Double, ua.VariantType.Float):
            return declared, float(value)
        return vtype, value

    async def _point(self, node, p: Point, is_bool: bool) -> None:
        status = status_of(p.quality, p.reason)
        value = bool(p.value) if is_bool else float(p.value)
        await self._set(node, value, ua.VariantType.Boolean if is_bool else ua.VariantType.Double,
                        status, p.timestamp_s or None)

    # -- one snapshot ---------------------------------------------------------------------------

    async def publish(self, snap) -> None:
        n = self.nodes
        t = snap.time_s
        temperatures = {f"temp_{z}" for z in n.zones}      # written from the scan's verdict below
        for name, node in n.points.items():
            image = snap.inputs if name in snap.inputs else snap.outputs
            if name not in image or name in temperatures:
                continue
            p = image[name]
            await self._point(node, p if image is snap.inputs else Point(p.value, p.quality, t),
                              isinstance(p.value, bool))
        settings = snap.settings or {}
        for z in snap.zones:
            if z.name in n.zones:
                await self._zone(n.zones[z.name], z, snap, settings.get(z.name, {}))
        autotune = snap.autotune or {}
        for zone, nodes in n.autotune.items():
            await self._autotune(nodes, autotune.get(zone) or AutotuneView(zone, "idle", 0.0, "", None), t)
        for motor, nodes in n.motors.items():
            if motor in snap.outputs and "Running" in nodes:
                await self._set(nodes["Running"], bool(snap.outputs[motor].value),
                                ua.VariantType.Boolean, None, t)
        seq = n.sequencer
        for key, value, vtype in (
                ("Phase", PHASE_VALUES[Phase(snap.phase)], ua.VariantType.Int32),
                ("PhaseTime", float(snap.phase_time_s), ua.VariantType.Double),
                ("Held", snap.held, ua.VariantType.Boolean),
                ("Interrupted", snap.interrupted, ua.VariantType.Boolean),
                ("Tempered", snap.tempered, ua.VariantType.Boolean),
                ("PouringReleased", snap.pouring_released, ua.VariantType.Boolean),
                ("RecipeId", snap.recipe_id or "", ua.VariantType.String),
                ("BatchId", snap.batch_id or "", ua.VariantType.String)):
            if key in seq:
                await self._set(seq[key], value, vtype, None, t)
        await self._alarms(snap)
        await self._diagnostics(snap)
        self.publications += 1

    async def _zone(self, nodes, z, snap, settings: Mapping[str, float]) -> None:
        """One zone, each variable once: the scan's verdict (ZoneView) and its settings."""
        t = snap.time_s
        raw = snap.inputs.get_point(f"temp_{z.name}") if f"temp_{z.name}" in snap.inputs else None
        stamp = (raw.timestamp_s if raw is not None else None) or t
        if z.pv_c is not None and z.quality is not Quality.BAD:
            await self._set(nodes["Temperature"], float(z.pv_c), ua.VariantType.Double,
                            status_of(z.quality), stamp)
        else:       # refused by the scan: the input's own reason if it is bad, else the sensor
            reason = raw.reason if raw is not None and raw.quality is Quality.BAD else "sensor"
            value = z.pv_c if z.pv_c is not None else (
                float(raw.value) if raw is not None and isinstance(raw.value, float) else None)
            await self._set(nodes["Temperature"], value, ua.VariantType.Double,
                            status_of(Quality.BAD, reason), stamp)
        if z.sp_c is not None:
            await self._set(nodes["Setpoint"], float(z.sp_c), ua.VariantType.Double, None, t)
        else:
            await self._set(nodes["Setpoint"], None, ua.VariantType.Double, _OUT_OF_SERVICE, t)
        await self._set(nodes["Output"], float(z.output_pct), ua.VariantType.Double, None, t)
        await self._set(nodes["Mode"], "manual" if z.manual else "auto", ua.VariantType.String, None, t)
        if "Heater" in nodes:
            heaters = [snap.outputs[o] for o in self.heating_outputs.get(z.name, ()) if o in snap.outputs]
            await self._set(nodes["Heater"], any(bool(p.value) for p in heaters),
                            ua.VariantType.Boolean, None, t)
        if "ManualOutput" in nodes:
            manual = settings.get("ManualOutput") if z.manual else None
            await self._set(nodes["ManualOutput"], float(z.output_pct if manual is None else manual),
                            ua.VariantType.Double, None, t)
        for browse in ("Trim", "Kp", "Ki", "Kd"):
            if browse in settings and browse in nodes:
                await self._set(nodes[browse], float(settings[browse]), ua.VariantType.Double, None, t)

    async def _autotune(self, nodes, v: AutotuneView, t: float) -> None:
        """A zone's autotune (``snap.autotune``): its stage and, once it ended, its outcome."""
        o = v.outcome
        model, gains, pred = (o.model, o.gains, o.prediction) if o is not None else (None, None, None)
        previous = o.previous if o is not None else {}
        settling = None if pred is None else pred.settling_s
        D = ua.VariantType.Double
        for key, value, vtype in (
                ("Stage", v.stage, ua.VariantType.String),
                ("Progress", float(v.progress_pct), D),
                ("Message", v.message, ua.VariantType.String),
                ("ModelGain", model.gain_k_per_pct if model else 0.0, D),
                ("ModelTimeConstant", model.tau_s if model else 0.0, D),
                ("ModelDeadTime", model.dead_s if model else 0.0, D),
                ("ModelIntegrating", bool(model.integrating) if model else False, ua.VariantType.Boolean),
                ("ProposedKp", gains.kp if gains else 0.0, D),
                ("ProposedKi", gains.ki if gains else 0.0, D),
                ("ProposedKd", gains.kd if gains else 0.0, D),
                ("PreviousKp", previous.get("kp", 0.0), D),
                ("PreviousKi", previous.get("ki", 0.0), D),
                ("PreviousKd", previous.get("kd", 0.0), D),
                ("PredictedOvershoot", pred.overshoot_k if pred else 0.0, D),
                ("PredictedMaxSensitivity", pred.ms if pred else 0.0, D),
                ("PredictedGainMargin", pred.gain_margin if pred else 0.0, D),
                ("PredictedPhaseMargin", pred.phase_margin_deg if pred else 0.0, D)):
            if key in nodes:
                await self._set(nodes[key], float(value) if vtype is D else value, vtype, None, t)
        if "PredictedSettlingTime" in nodes:
            if pred is not None and settling is None:     # it does not settle in the simulated time
                await self._set(nodes["PredictedSettlingTime"], None, D, _NO_DATA, t)
            else:
                await self._set(nodes["PredictedSettlingTime"], float(settling or 0.0), D, None, t)

    async def _alarms(self, snap) -> None:
        if self.conditions is not None:
            await self.conditions.sync(snap.alarms)

    async def _diagnostics(self, snap) -> None:
        d = self.nodes.diagnostics
        st = snap.stats or {}
        for key, stat, vtype in (("Scan.Scans", "scans", ua.VariantType.UInt64),
                                 ("Scan.Overruns", "overruns", ua.VariantType.UInt64),
                                 ("Scan.LogicP50", "logic_ms_p50", ua.VariantType.Double),
                                 ("Scan.LogicP99", "logic_ms_p99", ua.VariantType.Double),
                                 ("Scan.LateP50", "late_ms_p50", ua.VariantType.Double),
                                 ("Scan.LateP99", "late_ms_p99", ua.VariantType.Double),
                                 ("Scan.LateMax", "late_ms_max", ua.VariantType.Double)):
            if key not in d:
                continue
            if stat in st:
                v = st[stat]
                await self._set(d[key], int(v) if vtype is ua.VariantType.UInt64 else float(v), vtype)
            else:       # a percentile before the first measured scans: of an empty window
                await self._set(d[key], None, vtype, _NO_DATA)
        scheduling, dropped = self.plc_info()
        if "Scan.Scheduling" in d:
            await self._set(d["Scan.Scheduling"], scheduling, ua.VariantType.String)
        if "Scan.SnapshotsDropped" in d:
            await self._set(d["Scan.SnapshotsDropped"], int(dropped), ua.VariantType.UInt64)
        for link in self.links():
            p = f"Links.{link.name}."
            for key, value, vtype in (
                    ("State", link.state, ua.VariantType.String),
                    ("Requests", link.requests, ua.VariantType.UInt64),
                    ("Timeouts", link.errors.get("timeout", 0), ua.VariantType.UInt64),
                    ("Exceptions", link.errors.get("exception", 0), ua.VariantType.UInt64),
                    ("Garbage", link.errors.get("garbage", 0), ua.VariantType.UInt64),
                    ("Disconnects", link.errors.get("disconnect", 0), ua.VariantType.UInt64),
                    ("LastError", link.last_error or "", ua.VariantType.String),
                    ("RttP50", float(link.rtt_ms_p50), ua.VariantType.Double),
                    ("RttP99", float(link.rtt_ms_p99), ua.VariantType.Double),
                    ("RequestsPerPoll", float(link.requests_per_poll), ua.VariantType.Double)):
                if p + key in d:
                    await self._set(d[p + key], value, vtype)
        h = self.history() or _NO_HISTORIAN
        for key, value, vtype in (
                ("Historian.Sink", h.sink, ua.VariantType.String),
                ("Historian.State", h.state, ua.VariantType.String),
                ("Historian.LastError", h.last_error or "", ua.VariantType.String),
                ("Historian.Backlog", h.backlog_lines, ua.VariantType.UInt64),
                ("Historian.Delivered", h.delivered_total, ua.VariantType.UInt64),
                ("Historian.Dropped", h.dropped_total, ua.VariantType.UInt64),
                ("Historian.SpoolFill", float(h.spool_fill * 100.0), ua.VariantType.Double),
                ("Historian.SpoolAlarm", bool(h.spool_alarm), ua.VariantType.Boolean),
                ("Historian.Rate", float(h.rate_lines_per_s), ua.VariantType.Double)):
            if key in d:
                await self._set(d[key], value, vtype)
        sessions, subscriptions = self.sessions()
        if "Sessions" in d:
            await self._set(d["Sessions"], int(sessions), ua.VariantType.UInt32)
        if "Subscriptions" in d:
            await self._set(d["Subscriptions"], int(subscriptions), ua.VariantType.UInt32)

    # -- the task --------------------------------------------------------------------------------

    def _process_nodes(self):
        n = self.nodes
        yield from n.points.values()
        for nodes in n.zones.values():
            for key in ("Temperature", "Setpoint", "Output", "Mode", "Heater", "ManualOutput"):
                if key in nodes:
                    yield nodes[key]
        for nodes in n.autotune.values():
            yield from nodes.values()
        for nodes in n.motors.values():
            yield from nodes.values()
        yield from n.sequencer.values()

    async def _lost(self, reason: str) -> None:
        """The PLC is gone: every process value Bad (its last value kept), an alarm event."""
        bad = ua.StatusCode(ua.StatusCodes.BadNoCommunication)
        for node in self._process_nodes():
            last = self._last.get(node.nodeid)
            vtype = self.nodes.variant_types.get(node.nodeid)
            if last is not None and vtype is not None:
                await self._set(node, last[0], vtype, bad)
        await self._plc_event(f"PLC lost: {reason}", int(Priority.CRITICAL))

    async def _plc_event(self, message: str, severity: int) -> None:
        if self.conditions is None:
            return
        try:
            await self.conditions.system_event(message, severity)
            self.events += 1
        except Exception:
            log.exception("PLC event %s", message)

    async def step(self) -> None:
        snaps = self.sub.drain()
        if self.conditions is not None:
            for snap in snaps:
                for e in snap.events:
                    if e.kind in ("alarm", "alarm_system"):
                        try:
                            await self.conditions.event(e)
                            self.events += 1
                        except Exception:       # an event must not stop the values
                            log.exception("alarm event %s", e.message)
        reason = self.plc_status()
        if reason:          # what arrived before the PLC was lost must not turn values Good again
            if not self.plc_lost and self.publications:   # (before the first: values waiting)
                self.plc_lost = reason
                log.warning("PLC lost (%s): process values Bad", reason)
                await self._lost(reason)
            return
        if not snaps:
            return
        if self.plc_lost:
            await self._plc_event(f"PLC back (was: {self.plc_lost})", int(Priority.LOW))
            self.plc_lost = ""
        await self.publish(snaps[-1])

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.step()
            except Exception:
                log.exception("publishing a snapshot")
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass
        self.channel.unsubscribe(self.sub)
