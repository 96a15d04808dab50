"""The machine's alarms as OPC UA Part 9 conditions: their nodes, events, methods and refresh.

One job: show the PLC's ISA-18.2 alarms (``plc.alarms``; the lifecycle lives in the PLC) to
OPC UA clients as Part 9 Alarms & Conditions, and turn the clients' condition methods into PLC
commands. Nothing here decides an alarm's state: every state comes from the scan.

    address space   each alarm is a condition object ``Machine.Alarms.<id>`` of a subtype of a
                    Part 9 alarm type (``opcua_server.model.condition_type``), organized in the
                    Alarms folder and linked by HasCondition from its source (a zone, a motor,
                    the power meter, the safety inputs, the diagnostics). Notifier chain (Part 3
                    §7.16, Part 9 §5.12): Server -HasNotifier-> Machine -HasNotifier-> source
                    -HasCondition-> condition, so a subscription on the Server object, on the
                    machine or on one source gets exactly the events below it.
    events          every transition of an alarm (``plc.alarms.AlarmTransition``, carried by the
                    scan's ``alarm`` events) becomes one event of the condition's type with all
                    its condition fields (EventId = ``Alarm.event_id``, unique per event), sent to
                    each notifier of its chain; the condition's variables take the same values.
    refresh         ConditionRefresh / ConditionRefresh2 (Part 9 §5.5.7): RefreshStartEvent, the
                    last event of every retained condition below the monitored item's node,
                    RefreshEndEvent, to that subscription (or monitored item) only.
    methods         Acknowledge, Confirm, AddComment (operator); Enable, Disable, TimedShelve,
                    OneShotShelve, Unshelve (technician) — on the condition (or its ShelvingState)
                    whether called through the instance's method or the type's. Each becomes a
                    PLC command through ``Gate`` (role check, audit trail, audit event) and is
                    answered with the scan's verdict as a Part 9 StatusCode
                    (BadEventIdUnknown, BadConditionBranchAlreadyAcked, BadConditionDisabled, ...).

asyncua 2.1 delivers an event to the monitored items of its emitting node only, and evaluates
OfType as an exact type match; ``install`` makes OfType follow the type hierarchy (Part 4
§7.7.3), which Part 9 clients rely on (``OfType ConditionType``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Iterable

from asyncua import ua
from asyncua.common.events import Event
from asyncua.server import monitored_item_service

from plc.alarms import Alarm, Shelving
from plc.commands import Acknowledge, AddComment, Confirm, SetAlarmEnabled, Shelve, Unshelve

from .gate import Refused
from .model import ROOT, TYPE_IDS, MachineNodes, condition_source, condition_type
from .model import walk
from .notifiers import SERVER as _SERVER
from .notifiers import new_event, notify
from .security import current_session_id

log = logging.getLogger(__name__)

SC = ua.StatusCodes
O = ua.ObjectIds
_HAS_CONDITION = ua.NodeId(O.HasCondition)
_HAS_NOTIFIER = ua.NodeId(O.HasNotifier)

_SHELVING_STATES = {Shelving.UNSHELVED: ("Unshelved", O.ShelvedStateMachineType_Unshelved),
                    Shelving.TIMED: ("TimedShelved", O.ShelvedStateMachineType_TimedShelved),
                    Shelving.ONE_SHOT: ("OneShotShelved", O.ShelvedStateMachineType_OneShotShelved)}
_SHELVING_TRANSITIONS = {
    (Shelving.UNSHELVED, Shelving.TIMED): ("UnshelvedToTimedShelved", O.ShelvedStateMachineType_UnshelvedToTimedShelved),
    (Shelving.UNSHELVED, Shelving.ONE_SHOT): ("UnshelvedToOneShotShelved", O.ShelvedStateMachineType_UnshelvedToOneShotShelved),
    (Shelving.TIMED, Shelving.UNSHELVED): ("TimedShelvedToUnshelved", O.ShelvedStateMachineType_TimedShelvedToUnshelved),
    (Shelving.TIMED, Shelving.ONE_SHOT): ("TimedShelvedToOneShotShelved", O.ShelvedStateMachineType_TimedShelvedToOneShotShelved),
    (Shelving.ONE_SHOT, Shelving.UNSHELVED): ("OneShotShelvedToUnshelved", O.ShelvedStateMachineType_OneShotShelvedToUnshelved),
    (Shelving.ONE_SHOT, Shelving.TIMED): ("OneShotShelvedToTimedShelved", O.ShelvedStateMachineType_OneShotShelvedToTimedShelved)}

# condition classes (Part 9 §5.9): trips are safety, the controller's own alarms system
_SAFETY = (O.SafetyConditionClassType, "SafetyConditionClassType")
_PROCESS = (O.ProcessConditionClassType, "ProcessConditionClassType")
_SYSTEM = (O.SystemConditionClassType, "SystemConditionClassType")

# method -> (least role, what it does) ; the type's method node and the instances' copies
OPERATOR_METHODS = {"Acknowledge": O.AcknowledgeableConditionType_Acknowledge,
                    "Confirm": O.AcknowledgeableConditionType_Confirm,
                    "AddComment": O.ConditionType_AddComment}
TECHNICIAN_METHODS = {"Enable": O.ConditionType_Enable, "Disable": O.ConditionType_Disable,
                      "TimedShelve": O.ShelvedStateMachineType_TimedShelve,
                      "OneShotShelve": O.ShelvedStateMachineType_OneShotShelve,
                      "Unshelve": O.ShelvedStateMachineType_Unshelve}
_DECLARED_SHELVING = {"TimedShelve": O.AlarmConditionType_ShelvingState_TimedShelve,
                      "OneShotShelve": O.AlarmConditionType_ShelvingState_OneShotShelve,
                      "Unshelve": O.AlarmConditionType_ShelvingState_Unshelve}

_V = ua.VariantType


def _utc(epoch_s: float | None) -> datetime | None:
    return None if epoch_s is None else datetime.fromtimestamp(epoch_s, timezone.utc)


def _state(text: str) -> ua.LocalizedText:
    return ua.LocalizedText(text, "en")


@dataclass
class _Condition:
    cid: str
    node: ua.NodeId
    type_id: ua.NodeId
    source: ua.NodeId
    source_name: str
    notifiers: tuple[ua.NodeId, ...]             # source, machine, Server
    variables: dict[str, ua.NodeId]              # "ActiveState/Id" -> its variable
    condition_class: tuple[int, str]
    input_node: ua.NodeId
    setpoint_node: ua.NodeId | None
    alarm: Alarm | None = None
    event: Event | None = None                   # the last event (refresh sends it again)
    times: dict[str, datetime] = field(default_factory=dict)   # state -> last transition time
    last_severity: int = 0
    written: dict[ua.NodeId, Any] = field(default_factory=dict)


class ConditionServer:
    """``server`` an asyncua Server with the machine built (``nodes``); ``gate`` the window's
    Gate; ``program`` the plc Program (limits); ``max_shelve_s`` the longest shelve;
    ``performance`` an ``opcua_server.alarm_performance.AlarmPerformance`` fed with the
    transitions, its figures published in Alarms/Performance."""

    def __init__(self, server, nodes: MachineNodes, gate, program, *, max_shelve_s: float = 8 * 3600.0,
                 performance: Any = None, journal: Any = None, machine_id: str = ""):
        self.server = server
        self.nodes = nodes
        self.gate = gate
        self.program = program
        self.max_shelve_s = max_shelve_s
        self.conditions: dict[str, _Condition] = {}
        self._by_object: dict[ua.NodeId, _Condition] = {}     # condition or its ShelvingState
        self._summary: dict[ua.NodeId, Any] = {}
        self.performance = performance
        self.journal = journal              # opcua_server.records.Records (alarm_journal)
        self.machine_id = machine_id
        self.events_sent = 0

    # -- set-up ------------------------------------------------------------------------------

    async def install(self) -> None:
        aspace = self.server.iserver.aspace
        ns, tns = self.nodes.namespace_index, self.nodes.types_namespace_index
        machine = self.nodes.machine.nodeid
        subscribe = ua.EventNotifier.SubscribeToEvents.mask
        sources: dict[str, ua.NodeId] = {}
        for cid, node in self.nodes.conditions.items():
            path = condition_source(cid)
            source = ua.NodeId(f"{ROOT}.{path}", ns)
            sources[path] = source
            # its variables by browse path as an event field names them ("ActiveState/Id")
            variables = {"/".join(path): nid for nid, path in walk(aspace, node.nodeid, ())
                         if path and aspace[nid].attributes[ua.AttributeIds.NodeClass].value.Value.Value
                         is ua.NodeClass.Variable}
            zone_path = path if path.startswith("Zones.") else None
            kind = condition_type(cid)
            cls = _SYSTEM if cid.startswith(("plc.", "io.")) else _PROCESS    # trips: safety, see _apply
            c = _Condition(
                cid, node.nodeid, ua.NodeId(TYPE_IDS[kind], tns), source,
                aspace[source].attributes[ua.AttributeIds.BrowseName].value.Value.Value.Name,
                (source, machine, _SERVER), variables, cls,
                ua.NodeId(f"{ROOT}.{zone_path}.Temperature", ns) if zone_path else ua.NodeId(),
                ua.NodeId(f"{ROOT}.{zone_path}.Setpoint", ns) if zone_path and "Deviation" in kind else None)
            self.conditions[cid] = c
            self._by_object[node.nodeid] = c
            self._by_object[ua.NodeId(f"{node.nodeid.Identifier}.ShelvingState", ns)] = c
            self._reference(source, node.nodeid, _HAS_CONDITION)
        for source in sources.values():
            self._reference(machine, source, _HAS_NOTIFIER)
            await self._notifier(source, subscribe)
        self._reference(_SERVER, machine, _HAS_NOTIFIER)
        await self._notifier(machine, subscribe | ua.EventNotifier.HistoryRead.mask)
        await self._notifier(_SERVER, subscribe)
        self._link_methods()
        self.server.link_method(self.server.get_node(O.ConditionType_ConditionRefresh), self._refresh)
        self.server.link_method(self.server.get_node(O.ConditionType_ConditionRefresh2), self._refresh)
        monitored_item_service.WhereClauseEvaluator = HierarchyWhereClauseEvaluator

    def _reference(self, source: ua.NodeId, target: ua.NodeId, ref_type: ua.NodeId) -> None:
        """A forward reference and its inverse, straight into the address space."""
        aspace = self.server.iserver.aspace
        src, dst = aspace[source], aspace[target]
        if any(r.NodeId == target and r.ReferenceTypeId == ref_type and r.IsForward for r in src.references):
            return
        a = ua.AttributeIds
        for holder, other, forward in ((src, dst, True), (dst, src, False)):
            holder.references.append(ua.ReferenceDescription(
                ReferenceTypeId=ref_type, IsForward=forward, NodeId=other.nodeid,
                BrowseName=other.attributes[a.BrowseName].value.Value.Value,
                DisplayName=other.attributes[a.DisplayName].value.Value.Value,
                NodeClass=other.attributes[a.NodeClass].value.Value.Value,
                TypeDefinition=ua.NodeId()))

    async def _notifier(self, nid: ua.NodeId, bits: int) -> None:
        await self.server.write_attribute_value(nid, ua.DataValue(ua.Variant(bits, _V.Byte)),
                                                ua.AttributeIds.EventNotifier)

    def _link_methods(self) -> None:
        for name, type_method in (*OPERATOR_METHODS.items(), *TECHNICIAN_METHODS.items()):
            role = "operator" if name in OPERATOR_METHODS else "technician"
            callback = self.gate.method(lambda parent, name=name: self._target(parent, name), role,
                                        getattr(self, f"_{name.lower()}"), with_object=True)
            nodes = [type_method]
            if name in _DECLARED_SHELVING:
                nodes.append(_DECLARED_SHELVING[name])
            for c in self.conditions.values():
                path = f"ShelvingState.{name}" if name in _DECLARED_SHELVING else name
                nid = ua.NodeId(f"{c.node.Identifier}.{path}", c.node.NamespaceIndex)
                if nid in self.server.iserver.aspace:
                    nodes.append(nid)
            for nid in nodes:
                self.server.link_method(self.server.get_node(nid), callback)

    def _target(self, parent: ua.NodeId, method: str) -> str:
        c = self._by_object.get(parent)
        return f"{c.cid}.{method}" if c is not None else f"{parent.to_string()}.{method}"

    # -- methods (each: handler(user, parent, *arguments) -> the accepted Command) -------------

    def _condition(self, parent: ua.NodeId) -> _Condition:
        c = self._by_object.get(parent)
        if c is None:
            raise Refused(SC.BadNodeIdInvalid, f"{parent.to_string()} is not a condition of this machine")
        return c

    async def _send(self, user: str, cmd):
        return await self.gate.submit(replace(cmd, user=user, origin="opcua", id=self.gate.plc.new_id()))

    @staticmethod
    def _event_id(value: Any) -> bytes:
        if not isinstance(value, (bytes, bytearray)):
            raise Refused(SC.BadEventIdUnknown, f"EventId must be a ByteString, got {type(value).__name__}")
        return bytes(value)

    @staticmethod
    def _comment(value: Any) -> str:
        if isinstance(value, ua.LocalizedText):
            return value.Text or ""
        if isinstance(value, str) or value is None:
            return value or ""
        raise Refused(SC.BadTypeMismatch, f"Comment must be a LocalizedText, got {type(value).__name__}")

    async def _acknowledge(self, user: str, parent, event_id=None, comment=None, *extra):
        c = self._condition(parent)
        return await self._send(user, Acknowledge(c.cid, self._comment(comment), event_id=self._event_id(event_id)))

    async def _confirm(self, user: str, parent, event_id=None, comment=None, *extra):
        c = self._condition(parent)
        return await self._send(user, Confirm(c.cid, self._comment(comment), event_id=self._event_id(event_id)))

    async def _addcomment(self, user: str, parent, event_id=None, comment=None, *extra):
        c = self._condition(parent)
        return await self._send(user, AddComment(c.cid, self._comment(comment), event_id=self._event_id(event_id)))

    async def _enable(self, user: str, parent, *extra):
        return await self._send(user, SetAlarmEnabled(self._condition(parent).cid, True))

    async def _disable(self, user: str, parent, *extra):
        return await self._send(user, SetAlarmEnabled(self._condition(parent).cid, False))

    async def _timedshelve(self, user: str, parent, shelving_time_ms=None, *extra):
        c = self._condition(parent)
        if isinstance(shelving_time_ms, bool) or not isinstance(shelving_time_ms, (int, float)):
            raise Refused(SC.BadTypeMismatch, "ShelvingTime must be a Duration (Double, ms)")
        ms = float(shelving_time_ms)
        if not 0 < ms <= self.max_shelve_s * 1000.0:
            raise Refused(SC.BadShelvingTimeOutOfRange,
                          f"ShelvingTime must be within 0..{self.max_shelve_s * 1000.0:g} ms (got {ms:g})")
        return await self._send(user, Shelve(c.cid, ms / 1000.0))

    async def _oneshotshelve(self, user: str, parent, *extra):
        return await self._send(user, Shelve(self._condition(parent).cid, None))

    async def _unshelve(self, user: str, parent, *extra):
        return await self._send(user, Unshelve(self._condition(parent).cid))

    # -- from the scan -----------------------------------------------------------------------

    async def event(self, e) -> None:
        """One event of the scan: an ``alarm`` transition, or ``alarm_system`` (the PLC started
        with its alarms restored)."""
        if e.kind == "alarm_system":
            await self.system_event(e.message, 500)
        elif e.kind == "alarm" and await self.transition(e) and self.performance is not None:
            self.performance.add(e)

    async def sync(self, alarms: Iterable[Alarm]) -> None:
        """The alarms of a publication: conditions not yet known take their state silently
        (start-up, a window restarted; changed ones were told by their events), and the
        summary and performance figures of the Alarms folder."""
        alarms = tuple(alarms)
        for a in alarms:
            c = self.conditions.get(a.id)
            if c is not None and c.alarm != a and (c.alarm is None or a.seq != c.alarm.seq):
                await self._apply(c, a, "", send=False)
        summary = self.nodes.alarms_summary
        active = sorted(f"{a.priority.name} {a.id}: {a.message}" for a in alarms if a.active)
        for name, value, vt in (
                ("ActiveAlarms", active, _V.String), ("ActiveCount", len(active), _V.UInt32),
                ("UnacknowledgedCount", sum(1 for a in alarms if a.enabled and not a.acked), _V.UInt32),
                ("ShelvedAlarms", sorted(a.id for a in alarms if a.shelving is not Shelving.UNSHELVED), _V.String),
                ("OutOfServiceAlarms", sorted(a.id for a in alarms if not a.enabled), _V.String)):
            if name in summary:
                await self._set(summary[name].nodeid, value, vt)
        if self.performance is not None:
            await self._performance(time.time())

    async def _performance(self, now: float) -> None:
        f = self.performance.figures(now)
        perf = self.nodes.alarm_performance
        for name, value, vt in (
                ("AlarmsLast10Min", int(f.last_10min), _V.UInt32),
                ("AveragePer10Min", float(f.average_per_10min), _V.Double),
                ("InFlood", bool(f.in_flood), _V.Boolean), ("Floods", int(f.floods), _V.UInt32),
                ("ChatteringAlarms", list(f.chattering), _V.String),
                ("StaleAlarms", list(f.stale), _V.String),
                ("TopAlarms", [f"{i} ({n})" for i, n in f.top], _V.String)):
            if name in perf:
                await self._set(perf[name].nodeid, value, vt)

    async def _set(self, nid: ua.NodeId, value: Any, vt: ua.VariantType) -> None:
        if self._summary.get(nid, _MISSING) == value:
            return
        self._summary[nid] = value
        now = datetime.now(timezone.utc)
        await self.server.write_attribute_value(nid, ua.DataValue(ua.Variant(value, vt), SourceTimestamp=now,
                                                                  ServerTimestamp=now))

    async def transition(self, e) -> bool:
        """One ``alarm`` event of the scan: the condition's new state, sent to its notifiers.
        False when the event is not about a condition of this machine."""
        a = e.get("alarm")
        c = self.conditions.get(str(e.get("alarm_id", "")))
        if c is None or not isinstance(a, Alarm):
            return False
        if c.alarm is not None and a.seq <= c.alarm.seq:      # replayed after a reconnect
            return True
        await self._apply(c, a, str(e.get("transition", "")), send=True)
        return True

    async def _apply(self, c: _Condition, a: Alarm, kind: str, send: bool) -> None:
        old = c.alarm
        when = _utc(a.changed) or datetime.now(timezone.utc)
        for state, changed in (("ActiveState", old is None or old.active != a.active),
                               ("AckedState", old is None or old.acked != a.acked),
                               ("ConfirmedState", old is None or old.confirmed != a.confirmed),
                               ("EnabledState", old is None or old.enabled != a.enabled),
                               ("SuppressedState", old is None or old.suppressed != a.suppressed),
                               ("ShelvingState", old is None or old.shelving != a.shelving),
                               ("Comment", old is None or old.comment != a.comment)):
            if changed:
                c.times[state] = when
        if old is not None and old.priority != a.priority:
            c.last_severity = int(old.priority)
        elif old is None:
            c.last_severity = int(a.priority)
        c.alarm = a
        if a.trip:
            c.condition_class = _SAFETY
        ev = self._event(c, a, old)
        c.event = ev
        await self._write_variables(c, ev)
        if send and a.enabled or send and kind in ("disabled", "enabled"):
            await self._deliver(ev, c.notifiers)

    def _event(self, c: _Condition, a: Alarm, old: Alarm | None) -> Event:
        now = datetime.now(timezone.utc)
        when = _utc(a.changed) or now
        ev = Event(c.notifiers[0])
        put = ev.add_property
        put("EventId", a.event_id, _V.ByteString)
        put("EventType", c.type_id, _V.NodeId)
        put("SourceNode", c.source, _V.NodeId)
        put("SourceName", c.source_name, _V.String)
        put("Time", when, _V.DateTime)
        put("ReceiveTime", now, _V.DateTime)
        put("Message", ua.LocalizedText(a.message, "en"), _V.LocalizedText)
        put("Severity", int(a.priority), _V.UInt16)
        put("NodeId", c.node, _V.NodeId)                     # the ConditionId (Part 9 §5.5.2)
        put("ConditionClassId", ua.NodeId(c.condition_class[0]), _V.NodeId)
        put("ConditionClassName", ua.LocalizedText(c.condition_class[1], "en"), _V.LocalizedText)
        put("ConditionName", c.cid, _V.String)
        put("BranchId", ua.NodeId(), _V.NodeId)
        put("Retain", a.retain, _V.Boolean)
        put("Quality", ua.StatusCode(SC.Good), _V.StatusCode)
        put("Quality/SourceTimestamp", when, _V.DateTime)
        put("LastSeverity", c.last_severity, _V.UInt16)
        put("LastSeverity/SourceTimestamp", when, _V.DateTime)
        put("Comment", ua.LocalizedText(a.comment, "en"), _V.LocalizedText)
        put("Comment/SourceTimestamp", c.times.get("Comment", when), _V.DateTime)
        put("ClientUserId", a.user, _V.String)
        self._two_state(put, c, "EnabledState", a.enabled, "Enabled", "Disabled")
        self._two_state(put, c, "AckedState", a.acked, "Acknowledged", "Unacknowledged")
        self._two_state(put, c, "ConfirmedState", a.confirmed, "Confirmed", "Unconfirmed")
        self._two_state(put, c, "ActiveState", a.active, "Active", "Inactive")
        self._two_state(put, c, "SuppressedState", a.suppressed, "Suppressed", "Unsuppressed")
        self._two_state(put, c, "OutOfServiceState", not a.enabled, "Out of Service", "In Service")
        put("InputNode", c.input_node, _V.NodeId)
        put("SuppressedOrShelved", a.suppressed or a.shelving is not Shelving.UNSHELVED, _V.Boolean)
        put("MaxTimeShelved", self.max_shelve_s * 1000.0, _V.Double)
        name, sid = _SHELVING_STATES[a.shelving]
        put("ShelvingState", _state(name), _V.LocalizedText)
        put("ShelvingState/CurrentState", _state(name), _V.LocalizedText)
        put("ShelvingState/CurrentState/Id", ua.NodeId(sid), _V.NodeId)
        shelve_from = old.shelving if old is not None else Shelving.UNSHELVED
        tname, tid = _SHELVING_TRANSITIONS.get((shelve_from, a.shelving), ("", None))
        if tid is not None:
            put("ShelvingState/LastTransition", _state(tname), _V.LocalizedText)
            put("ShelvingState/LastTransition/Id", ua.NodeId(tid), _V.NodeId)
            put("ShelvingState/LastTransition/TransitionTime", c.times.get("ShelvingState", when), _V.DateTime)
        elif c.event is not None and hasattr(c.event, "ShelvingState/LastTransition"):
            for f in ("ShelvingState/LastTransition", "ShelvingState/LastTransition/Id",
                      "ShelvingState/LastTransition/TransitionTime"):
                put(f, getattr(c.event, f), c.event.data_types[f])
        remaining = (max(0.0, a.unshelve_at - time.time()) * 1000.0
                     if a.shelving is Shelving.TIMED and a.unshelve_at is not None else 0.0)
        put("ShelvingState/UnshelveTime", remaining, _V.Double)
        kind = condition_type(c.cid)
        if kind in ("TemperatureLevelAlarmType", "TemperatureDeviationAlarmType"):
            self._limits(put, c, a)
        if c.setpoint_node is not None:
            put("SetpointNode", c.setpoint_node, _V.NodeId)
        if kind == "MachineOffNormalAlarmType":
            put("NormalState", ua.NodeId(), _V.NodeId)
        return ev

    def _two_state(self, put, c: _Condition, name: str, value: bool, true: str, false: str) -> None:
        """A TwoStateVariableType field: its text, Id and TransitionTime (Part 9 §5.3)."""
        put(name, _state(true if value else false), _V.LocalizedText)
        put(f"{name}/Id", bool(value), _V.Boolean)
        when = c.times.get("EnabledState" if name == "OutOfServiceState" else name)
        if when is not None:
            put(f"{name}/TransitionTime", when, _V.DateTime)

    def _limits(self, put, c: _Condition, a: Alarm) -> None:
        """HighLimit / LowLimit and the exclusive limit state (Part 9 §5.8.11, §5.8.12)."""
        limit = a.limit
        over = c.cid.endswith("over_temp")
        deviation = "deviation" in c.cid
        if limit is not None:
            if deviation:
                put("HighLimit", float(limit), _V.Double)
                put("LowLimit", -float(limit), _V.Double)
            else:
                put("HighLimit" if over else "LowLimit", float(limit), _V.Double)
        if a.active:
            high = over or (deviation and (a.value or 0.0) >= 0)
            put("LimitState/CurrentState", _state("High" if high else "Low"), _V.LocalizedText)
            put("LimitState/CurrentState/Id", ua.NodeId(O.ExclusiveLimitStateMachineType_High if high
                                                        else O.ExclusiveLimitStateMachineType_Low), _V.NodeId)
        else:
            put("LimitState/CurrentState", ua.LocalizedText(), _V.LocalizedText)
            put("LimitState/CurrentState/Id", ua.NodeId(), _V.NodeId)

    async def _write_variables(self, c: _Condition, ev: Event) -> None:
        """The condition's variables take the event's values (only those that changed)."""
        stamp = ev.Time
        for path, nid in c.variables.items():
            if path not in ev.data_types:
                if nid not in c.written:       # no such fact yet (a last transition before any):
                    c.written[nid] = None      # null, Good — never left waiting for data
                    dv = ua.DataValue(SourceTimestamp=stamp, ServerTimestamp=stamp)
                    dv.Value = None            # no Variant: asyncua's type check lets it pass
                    await self.server.write_attribute_value(nid, dv)
                continue
            value = getattr(ev, path)
            if path != "EventId" and c.written.get(nid, _MISSING) == value:
                continue
            c.written[nid] = value
            await self.server.write_attribute_value(nid, ua.DataValue(
                ua.Variant(value, ev.data_types[path]), SourceTimestamp=stamp, ServerTimestamp=stamp))

    async def _deliver(self, ev: Event, notifiers: Iterable[ua.NodeId]) -> None:
        """Send one event to the monitored items of each notifier (the same EventId)."""
        await notify(self.server, ev, tuple(notifiers), stamp=False)
        self.events_sent += 1

    async def system_event(self, message: str, severity: int = 500) -> None:
        """An event about the alarm system itself (the PLC started or was lost), on the machine
        and the Server object (SystemEventType, Part 5 §6.4.28)."""
        machine = self.nodes.machine.nodeid
        ev = new_event(O.SystemEventType, machine, ROOT)
        ev.Message = ua.LocalizedText(message, "en")
        ev.Severity = int(severity)
        await notify(self.server, ev, (machine, _SERVER))

    # -- event history (Part 11 ReadEventDetails) ------------------------------------------------

    async def history(self, source: ua.NodeId, start: datetime | None, end: datetime | None,
                      nb_values: int, evfilter: Any) -> tuple[list[Event], datetime | None]:
        """The journal's rows from ``start`` to ``end`` (inclusive) as the events they were, of
        the conditions below ``source`` (the Server object or the machine: all, and the PLC's
        starts): oldest first, newest first when ``start`` is after ``end`` (Part 11 §6.4.2)."""
        if self.journal is None:
            return [], None
        unset = datetime(1601, 1, 2, tzinfo=timezone.utc)
        lo = start if start is not None and start.replace(tzinfo=start.tzinfo or timezone.utc) > unset else None
        hi = end if end is not None and end.replace(tzinfo=end.tzinfo or timezone.utc) > unset else None
        reverse = lo is not None and hi is not None and lo > hi
        if reverse:
            lo, hi = hi, lo
        until = None if hi is None else hi.replace(tzinfo=hi.tzinfo or timezone.utc).timestamp() + 1e-6
        rows = await asyncio.to_thread(self.journal.alarm_journal, since=lo, until=until)
        wanted = {c.cid for c in self.conditions.values() if source in c.notifiers}
        everything = source in (_SERVER, self.nodes.machine.nodeid)
        rows = [r for r in rows if (r.alarm_id in wanted or (everything and not r.alarm_id))
                and (not self.machine_id or r.machine in ("", self.machine_id))]
        if reverse:
            rows.reverse()
        where = HierarchyWhereClauseEvaluator(log, self.server.iserver.aspace, evfilter.WhereClause) \
            if evfilter is not None and evfilter.WhereClause is not None else None
        events = [ev for ev in (self._row_event(r) for r in rows) if where is None or where.eval(ev)]
        cont = None
        if nb_values and len(events) > nb_values:
            cont = events[nb_values].Time
            events = events[:nb_values]
        return events, cont

    def _row_event(self, r) -> Event:
        """A journal row as the event it was (the condition's fields at that change)."""
        c = self.conditions.get(r.alarm_id)
        ev = Event(self.nodes.machine.nodeid)
        put = ev.add_property
        put("EventId", bytes.fromhex(r.event_id) if r.event_id else f"restart@{r.time_s}".encode(), _V.ByteString)
        put("EventType", c.type_id if c is not None else ua.NodeId(O.SystemEventType), _V.NodeId)
        put("SourceNode", c.source if c is not None else self.nodes.machine.nodeid, _V.NodeId)
        put("SourceName", c.source_name if c is not None else ROOT, _V.String)
        put("Time", r.time, _V.DateTime)
        put("ReceiveTime", r.time, _V.DateTime)
        put("Message", ua.LocalizedText(r.message, "en"), _V.LocalizedText)
        put("Severity", int(r.severity or 0), _V.UInt16)
        if c is None:
            return ev
        put("NodeId", c.node, _V.NodeId)
        put("ConditionName", c.cid, _V.String)
        put("ConditionClassId", ua.NodeId(c.condition_class[0]), _V.NodeId)
        put("ConditionClassName", ua.LocalizedText(c.condition_class[1], "en"), _V.LocalizedText)
        put("BranchId", ua.NodeId(), _V.NodeId)
        put("Retain", bool(r.enabled and (r.active or not r.acked)), _V.Boolean)
        put("Comment", ua.LocalizedText(r.comment, "en"), _V.LocalizedText)
        put("ClientUserId", r.user, _V.String)
        for name, value, true, false in (("EnabledState", r.enabled, "Enabled", "Disabled"),
                                         ("ActiveState", r.active, "Active", "Inactive"),
                                         ("AckedState", r.acked, "Acknowledged", "Unacknowledged"),
                                         ("ConfirmedState", r.confirmed, "Confirmed", "Unconfirmed")):
            put(name, _state(true if value else false), _V.LocalizedText)
            put(f"{name}/Id", bool(value), _V.Boolean)
        shelving = Shelving(r.shelving) if r.shelving else Shelving.UNSHELVED
        name, sid = _SHELVING_STATES[shelving]
        put("ShelvingState/CurrentState", _state(name), _V.LocalizedText)
        put("ShelvingState/CurrentState/Id", ua.NodeId(sid), _V.NodeId)
        return ev

    # -- ConditionRefresh ----------------------------------------------------------------------

    async def _refresh(self, parent, subscription_id=None, monitored_item_id=None):
        sid = subscription_id.Value if isinstance(subscription_id, ua.Variant) else subscription_id
        mid = monitored_item_id.Value if isinstance(monitored_item_id, ua.Variant) else monitored_item_id
        sub = self.server.iserver.subscription_service.subscriptions.get(sid)
        caller = current_session_id()
        if sub is None or (caller is not None and sub.session_id != caller):
            return ua.StatusCode(SC.BadSubscriptionIdInvalid)      # not a subscription of the caller
        mis = sub.monitored_item_srv
        items = [(node, m) for node, mids in list(mis._monitored_events.items()) for m in mids]
        if mid is not None:
            items = [(node, m) for node, m in items if m == mid]
            if not items:
                return ua.StatusCode(SC.BadMonitoredItemIdInvalid)
        for node, m in items:
            await self._marker(mis, m, O.RefreshStartEventType, "ConditionRefresh: start")
            for c in self.conditions.values():
                if c.event is not None and c.alarm is not None and c.alarm.retain and node in c.notifiers:
                    c.event.emitting_node = node
                    await mis.trigger_event(c.event, m)
            await self._marker(mis, m, O.RefreshEndEventType, "ConditionRefresh: end")
        return []

    @staticmethod
    async def _marker(mis, mid: int, etype: int, message: str) -> None:
        """RefreshStartEvent / RefreshEndEvent to one monitored item, whatever its where clause
        (Part 9 §5.11.2)."""
        mdata = mis._monitored_items.get(mid)
        if mdata is None:
            return
        ev = Event(_SERVER)
        now = datetime.now(timezone.utc)
        for name, value, vt in (("EventId", uuid.uuid4().bytes, _V.ByteString),
                                ("EventType", ua.NodeId(etype), _V.NodeId),
                                ("SourceNode", _SERVER, _V.NodeId), ("SourceName", "Server", _V.String),
                                ("Time", now, _V.DateTime), ("ReceiveTime", now, _V.DateTime),
                                ("Message", ua.LocalizedText(message, "en"), _V.LocalizedText),
                                ("Severity", 100, _V.UInt16)):
            ev.add_property(name, value, vt)
        fields = ua.EventFieldList(ClientHandle=mdata.client_handle,
                                   EventFields=ev.to_event_fields(mdata.filter.SelectClauses))
        await mis.isub.enqueue_event(mid, fields, mdata.queue_size)


_MISSING = object()


class HierarchyWhereClauseEvaluator(monitored_item_service.WhereClauseEvaluator):
    """asyncua's where-clause evaluator with OfType true for the type and its subtypes (Part 4
    §7.7.3) and operands with a browse path of more than one element ("AckedState/Id")."""

    def _eval_el(self, index: int, event: Any) -> Any:
        el = self.elements[index]
        if el.FilterOperator == ua.FilterOperator.OfType:
            wanted = self._eval_op(el.FilterOperands[0], event)
            return _is_subtype(self._aspace, getattr(event, "EventType", None), wanted)
        return super()._eval_el(index, event)

    def _eval_op(self, op: Any, event: Any) -> Any:
        if isinstance(op, ua.SimpleAttributeOperand) and op.BrowsePath:
            return getattr(event, "/".join(q.Name for q in op.BrowsePath), None)
        return super()._eval_op(op, event)


def _is_subtype(aspace, type_id: ua.NodeId | None, wanted: Any) -> bool:
    if type_id is None or not isinstance(wanted, ua.NodeId):
        return False
    seen = 0
    while type_id is not None and seen < 32:
        if type_id == wanted:
            return True
        nd = aspace.get(type_id)
        if nd is None:
            return False
        type_id = next((r.NodeId for r in nd.references
                        if not r.IsForward and r.ReferenceTypeId == ua.NodeId(O.HasSubtype)), None)
        seen += 1
    return False
