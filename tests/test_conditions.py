"""The machine's alarms as OPC UA Part 9 conditions, through a real asyncua client over
SignAndEncrypt: events on the Server object, ConditionRefresh, Acknowledge with a comment,
return to normal, shelving, Enable/Disable, refusals by role and by state, and the address
space (types, HasCondition, notifiers)."""

from __future__ import annotations


from asyncua import ua

from machines import InProcessMachine, until

O = ua.ObjectIds
SERVER = ua.NodeId(O.Server)




def select(*paths: str, attribute=ua.AttributeIds.Value) -> list[ua.SimpleAttributeOperand]:
    ops = []
    for p in paths:
        op = ua.SimpleAttributeOperand()
        op.TypeDefinitionId = ua.NodeId(O.ConditionType if p != "EventType" else O.BaseEventType)
        op.BrowsePath = [ua.QualifiedName(x, 0) for x in p.split("/")] if p else []
        op.AttributeId = attribute if p else ua.AttributeIds.NodeId
        ops.append(op)
    return ops


FIELDS = ("EventId", "EventType", "SourceNode", "SourceName", "Time", "Message", "Severity",
          "ConditionName", "Retain", "EnabledState/Id", "ActiveState/Id", "AckedState/Id",
          "ConfirmedState/Id", "ShelvingState/CurrentState", "Comment", "ClientUserId", "")


def condition_filter(of_type: int = O.ConditionType) -> ua.EventFilter:
    """What a Part 9 client asks for: the condition fields, the ConditionId (empty browse path,
    NodeId attribute), and OfType ConditionType or a subtype."""
    f = ua.EventFilter()
    f.SelectClauses = select(*FIELDS)
    el = ua.ContentFilterElement()
    el.FilterOperator = ua.FilterOperator.OfType
    el.FilterOperands = [ua.LiteralOperand(Value=ua.Variant(ua.NodeId(of_type)))]
    f.WhereClause = ua.ContentFilter(Elements=[el])
    return f


class Collector:
    """Raw event field lists -> dicts by field name (the ConditionId under "NodeId")."""

    def __init__(self):
        self.events: list[dict] = []

    def status_change_notification(self, status):
        pass

    def datachange_notification(self, node, val, data):
        pass

    def event_notification(self, event):
        fields = event.get_event_props_as_fields_dict()
        self.events.append({k: v.Value for k, v in fields.items()})

    def of(self, name: str) -> list[dict]:
        return [e for e in self.events if e.get("ConditionName") == name]


async def subscribe(client, node_id, handler, flt=None):
    sub = await client.create_subscription(50, handler)
    await sub.subscribe_events(client.get_node(node_id), evfilter=flt or condition_filter())
    return sub


async def refresh(client, sub) -> None:
    await client.get_node(ua.NodeId(O.ConditionType)).call_method(
        ua.NodeId(O.ConditionType_ConditionRefresh), ua.Variant(sub.subscription_id, ua.VariantType.UInt32))


async def call_status(obj, method, *args) -> str:
    try:
        await obj.call_method(method, *args)
    except ua.UaStatusCodeError as e:
        return type(e).__name__
    return "Good"


def condition_node(m, cid: str) -> ua.NodeId:
    return m.nodes.conditions[cid].nodeid


async def test_conditions_in_the_address_space(opcua_pki):
    async with InProcessMachine(opcua_pki) as m:
        async with await opcua_pki.client("viewer") as viewer:
            cond = viewer.get_node(condition_node(m, "zone.pump.over_temp"))
            tdef = await cond.read_type_definition()
            level = viewer.get_node(tdef)
            assert (await level.read_browse_name()).Name == "TemperatureLevelAlarmType"
            supertype = (await level.get_references(ua.ObjectIds.HasSubtype, ua.BrowseDirection.Inverse))[0]
            assert supertype.NodeId == ua.NodeId(O.ExclusiveLevelAlarmType)
            high = await viewer.get_node(ua.NodeId(f"{cond.nodeid.Identifier}.HighLimit",
                                                   cond.nodeid.NamespaceIndex)).read_value()
            assert high == 60.0
            zone = viewer.get_node(m.nodes.objects["Zones.Pump"].nodeid)
            has_condition = await zone.get_referenced_nodes(ua.ObjectIds.HasCondition)
            assert cond.nodeid in [n.nodeid for n in has_condition]
            notified = await viewer.get_node(SERVER).get_referenced_nodes(ua.ObjectIds.HasNotifier)
            assert m.nodes.machine.nodeid in [n.nodeid for n in notified]
            estop = viewer.get_node(condition_node(m, "estop"))
            assert (await viewer.get_node(await estop.read_type_definition()).read_browse_name()).Name \
                == "MachineOffNormalAlarmType"
            # a condition's variables carry values from the first publication
            await until(lambda: viewer.get_node(ua.NodeId(f"{estop.nodeid.Identifier}.EnabledState.Id",
                                                           estop.nodeid.NamespaceIndex)).read_value())


async def test_an_over_temperature_from_a_part9_client(opcua_pki):
    """Subscribe on the Server object, refresh, see the alarm come, acknowledge it with a
    comment, see it return to normal and leave Retain; a viewer may not acknowledge; a stale
    EventId is refused; the journal-worthy facts are on the events."""
    async with InProcessMachine(opcua_pki) as m:
        async with await opcua_pki.client("operator") as op, await opcua_pki.client("viewer") as viewer:
            seen = Collector()
            sub = await subscribe(op, SERVER, seen)
            await refresh(op, sub)
            await until(lambda: any(e.get("EventType") == ua.NodeId(O.RefreshEndEventType)
                                    for e in seen.events))
            m.twin.set_temperature("pump", 63.0)
            active = await until(lambda: [e for e in seen.of("zone.pump.over_temp") if e["ActiveState/Id"]])
            e = active[0]
            assert e["Retain"] and not e["AckedState/Id"] and e["Severity"] == 900
            assert e["SourceName"] == "Pump" and "over-temperature" in e["Message"].Text
            cond = op.get_node(condition_node(m, "zone.pump.over_temp"))
            # a viewer may not acknowledge; a wrong EventId is unknown
            v_cond = viewer.get_node(cond.nodeid)
            assert await call_status(v_cond, ua.NodeId(O.AcknowledgeableConditionType_Acknowledge),
                                     ua.Variant(e["EventId"], ua.VariantType.ByteString),
                                     ua.LocalizedText("viewer")) == "BadUserAccessDenied"
            assert await call_status(cond, ua.NodeId(O.AcknowledgeableConditionType_Acknowledge),
                                     ua.Variant(b"nonsense", ua.VariantType.ByteString),
                                     ua.LocalizedText("x")) == "BadEventIdUnknown"
            latest = seen.of("zone.pump.over_temp")[-1]
            assert await call_status(cond, ua.NodeId(O.AcknowledgeableConditionType_Acknowledge),
                                     ua.Variant(latest["EventId"], ua.VariantType.ByteString),
                                     ua.LocalizedText("hot charge, cooling")) == "Good"
            acked = await until(lambda: [x for x in seen.of("zone.pump.over_temp") if x["AckedState/Id"]])
            assert acked[0]["Comment"].Text == "hot charge, cooling" and acked[0]["ClientUserId"] == "operator"
            # acknowledging the same branch again
            assert await call_status(cond, ua.NodeId(O.AcknowledgeableConditionType_Acknowledge),
                                     ua.Variant(acked[0]["EventId"], ua.VariantType.ByteString),
                                     ua.LocalizedText("again")) == "BadConditionBranchAlreadyAcked"
            # a shelved over-temperature still trips: shelving changes the annunciation only
            assert m.controller.state.trips
            m.twin.set_temperature("pump", 40.0)
            normal = await until(lambda: [x for x in seen.of("zone.pump.over_temp")
                                          if not x["ActiveState/Id"] and x["AckedState/Id"]])
            assert normal[-1]["Retain"] is False
            # refresh again: the alarm is no longer retained
            seen.events.clear()
            await refresh(op, sub)
            await until(lambda: any(e.get("EventType") == ua.NodeId(O.RefreshEndEventType) for e in seen.events))
            assert not seen.of("zone.pump.over_temp")


async def test_shelve_unshelve_disable_enable_by_role(opcua_pki):
    async with InProcessMachine(opcua_pki) as m:
        async with await opcua_pki.client("technician") as tech, await opcua_pki.client("operator") as op:
            seen = Collector()
            await subscribe(tech, m.nodes.machine.nodeid, seen)
            cond = tech.get_node(condition_node(m, "zone.fountain.over_temp"))
            shelving = tech.get_node(ua.NodeId(f"{cond.nodeid.Identifier}.ShelvingState", cond.nodeid.NamespaceIndex))
            # an operator may not shelve
            assert await call_status(op.get_node(shelving.nodeid), ua.NodeId(O.ShelvedStateMachineType_OneShotShelve)) \
                == "BadUserAccessDenied"
            assert await call_status(shelving, ua.NodeId(O.ShelvedStateMachineType_TimedShelve),
                                     ua.Variant(-5.0, ua.VariantType.Double)) == "BadShelvingTimeOutOfRange"
            assert await call_status(shelving, ua.NodeId(O.ShelvedStateMachineType_TimedShelve),
                                     ua.Variant(60_000.0, ua.VariantType.Double)) == "Good"
            shelved = await until(lambda: [e for e in seen.of("zone.fountain.over_temp")
                                           if e["ShelvingState/CurrentState"].Text == "TimedShelved"])
            assert shelved
            assert await call_status(shelving, ua.NodeId(O.ShelvedStateMachineType_Unshelve)) == "Good"
            await until(lambda: seen.of("zone.fountain.over_temp")[-1]["ShelvingState/CurrentState"].Text == "Unshelved")
            assert await call_status(shelving, ua.NodeId(O.ShelvedStateMachineType_Unshelve)) == "BadConditionNotShelved"
            # disable: the alarm is out of service, methods refused, its interlock still acts
            assert await call_status(cond, ua.NodeId(O.ConditionType_Disable)) == "Good"
            await until(lambda: seen.of("zone.fountain.over_temp")[-1]["EnabledState/Id"] is False)
            assert await call_status(cond, ua.NodeId(O.ConditionType_Disable)) == "BadConditionAlreadyDisabled"
            m.twin.set_temperature("fountain", 64.0)
            await until(lambda: "zone.fountain.over_temp" in m.controller.state.trips)
            assert seen.of("zone.fountain.over_temp")[-1]["EnabledState/Id"] is False
            assert await call_status(cond, ua.NodeId(O.ConditionType_Enable)) == "Good"
            back = await until(lambda: [e for e in seen.of("zone.fountain.over_temp")
                                        if e["EnabledState/Id"] and e["ActiveState/Id"]])
            assert back[-1]["AckedState/Id"] is False


async def test_the_alarm_journal_as_event_history_of_the_machine(opcua_pki):
    """HistoryRead (ReadEventDetails) on the machine object: the journal's rows as the events
    they were — active, acknowledged with its comment and user, cleared — and the PLC's start."""
    from datetime import datetime, timedelta, timezone

    async with InProcessMachine(opcua_pki) as m:
        async with await opcua_pki.client("operator") as op:
            t0 = datetime.now(timezone.utc) - timedelta(seconds=5)
            m.twin.set_temperature("tank_wall", 63.0)
            await until(lambda: m.controller.state.alarms["zone.tank_wall.over_temp"].active)
            a = m.controller.state.alarms["zone.tank_wall.over_temp"]
            cond = op.get_node(condition_node(m, "zone.tank_wall.over_temp"))
            await cond.call_method(ua.NodeId(O.AcknowledgeableConditionType_Acknowledge),
                                   ua.Variant(a.event_id, ua.VariantType.ByteString),
                                   ua.LocalizedText("seen at the machine"))
            m.twin.set_temperature("tank_wall", 40.0)
            await until(lambda: not m.controller.state.alarms["zone.tank_wall.over_temp"].active)

            async def history():
                machine = op.get_node(m.nodes.machine.nodeid)
                return await machine.read_event_history(t0, datetime.now(timezone.utc) + timedelta(seconds=1),
                                                        evtypes=[ua.NodeId(O.AlarmConditionType)])
            events = await until(lambda: _three(history()), 8.0)
            steps = [(e.ActiveState.Text, e.AckedState.Text, e.Comment.Text, e.ClientUserId)
                     for e in events if e.ConditionName == "zone.tank_wall.over_temp"]
            assert steps[:2] == [("Active", "Unacknowledged", "", ""),
                                 ("Active", "Acknowledged", "seen at the machine", "operator")]
            assert steps[2][:2] == ("Inactive", "Acknowledged")
            assert all(e.Time >= t0 for e in events)
            rows = m.records.alarm_journal(alarm_id="zone.tank_wall.over_temp")
            assert [r.kind for r in rows][:3] == ["active", "acknowledged", "cleared"]


async def _three(history):
    events = await history
    return events if sum(1 for e in events if e.ConditionName == "zone.tank_wall.over_temp") >= 3 else None


async def test_condition_refresh_only_for_the_callers_own_subscription(opcua_pki):
    async with InProcessMachine(opcua_pki):
        async with await opcua_pki.client("operator") as op, await opcua_pki.client("viewer") as viewer:
            mine = Collector()
            sub = await subscribe(op, SERVER, mine)
            try:
                await refresh(viewer, sub)                    # someone else's subscription
            except ua.UaStatusCodeError as e:
                refused = type(e).__name__
            else:
                refused = "Good"
            assert refused == "BadSubscriptionIdInvalid"
            await refresh(op, sub)
            await until(lambda: any(e.get("EventType") == ua.NodeId(O.RefreshEndEventType) for e in mine.events))


async def test_an_acknowledge_is_audited_as_a_part9_audit_event_with_its_comment(opcua_pki):
    async with InProcessMachine(opcua_pki) as m:
        async with await opcua_pki.client("admin") as admin, await opcua_pki.client("operator") as op:
            audits = []

            class Handler:
                def event_notification(self, event):
                    audits.append(event)

            sub = await admin.create_subscription(50, Handler())
            await sub.subscribe_events(admin.nodes.server, O.AuditConditionAcknowledgeEventType)
            m.twin.set_temperature("fountain", 63.0)
            await until(lambda: m.controller.state.alarms["zone.fountain.over_temp"].active)
            a = m.controller.state.alarms["zone.fountain.over_temp"]
            await op.get_node(condition_node(m, "zone.fountain.over_temp")).call_method(
                ua.NodeId(O.AcknowledgeableConditionType_Acknowledge),
                ua.Variant(a.event_id, ua.VariantType.ByteString), ua.LocalizedText("checked the charge"))
            e = (await until(lambda: audits))[0]
            assert e.EventType == ua.NodeId(O.AuditConditionAcknowledgeEventType)
            assert e.SourceNode == condition_node(m, "zone.fountain.over_temp")
            assert e.Comment.Text == "checked the charge" and e.ConditionEventId == a.event_id
            assert e.ClientUserId == "operator" and e.Status is True
