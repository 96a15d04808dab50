"""One event to each of its notifiers: the same event (same EventId) on every object a client
may watch for it.

OPC UA lets a client subscribe to the events of an object that is an event notifier (Part 3
§5.5.2 EventNotifier, §7.16 HasNotifier): the Server object (ns=0;i=2253, the default of most
clients) stands for every event of the server, the machine object for those of the machine.
asyncua 2.1 delivers an event only to the monitored items of the node that emitted it
(``MonitoredItemService.trigger_event`` compares ``event.emitting_node``), so an event meant
for both must be handed to each. ``notify`` does that: it stamps the event once, as asyncua's
``EventGenerator.trigger`` does (EventId, Time, ReceiveTime, LocalTime), then gives it to the
subscriptions of each notifier in turn; a client watching two of them sees one EventId twice,
which is how it tells a duplicate.

    new_event(etype, source, source_name)   a fresh event of a standard (ns=0) event type whose
                                            fields all encode (asyncua keeps some field types
                                            as DataType NodeIds: UtcTime, NumericRange, ...)
    notify(server, event, notifiers, audience=None)
                                            the event to every subscription watching one of
                                            ``notifiers``; with ``audience``, only to sessions
                                            whose user it accepts (audit events: see
                                            ``opcua_server.security.sees_audit``)

Without ``audience`` the event goes through asyncua's own path
(``SubscriptionService.trigger_event``), which also keeps a retained condition for
ConditionRefresh; that refresh replays it from the last notifier it was triggered on only
(asyncua keeps one entry per condition), so give a condition's own object last. With
``audience`` the subscriptions are filtered here by their session's user: a subscription of
the server's own internal session (history, in-process clients) always gets the event.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from asyncua import ua
from asyncua.common import event_objects
from asyncua.common.events import Event

SERVER = ua.NodeId(ua.ObjectIds.Server)

# asyncua's standard event classes name some field types by their DataType NodeId, which a
# Variant cannot encode: the built-in type each of those is (Part 3 §8, Part 5 §12)
_ENCODED_AS = {
    ua.ObjectIds.UtcTime: ua.VariantType.DateTime,
    ua.ObjectIds.Duration: ua.VariantType.Double,
    ua.ObjectIds.NumericRange: ua.VariantType.String,
    ua.ObjectIds.LocaleId: ua.VariantType.String,
    ua.ObjectIds.IntegerId: ua.VariantType.UInt32,
    ua.ObjectIds.Counter: ua.VariantType.UInt32,
    ua.ObjectIds.VersionTime: ua.VariantType.UInt32,
    ua.ObjectIds.MessageSecurityMode: ua.VariantType.Int32,       # enumerations
    ua.ObjectIds.SecurityTokenRequestType: ua.VariantType.Int32,
    ua.ObjectIds.ServerState: ua.VariantType.Int32,
    ua.ObjectIds.PerformUpdateType: ua.VariantType.Int32,
}


def new_event(etype: int | ua.NodeId, source: ua.NodeId, source_name: str) -> Event:
    """A new event of the standard event type ``etype`` (an ns=0 ObjectIds value or NodeId,
    e.g. ``ua.ObjectIds.AuditActivateSessionEventType``) about ``source``; every field typed so
    that it encodes (structures as ExtensionObject). KeyError for a type asyncua does not
    implement. Fill its fields, then ``notify``."""
    ident = etype.Identifier if isinstance(etype, ua.NodeId) else int(etype)
    event = event_objects.IMPLEMENTED_EVENTS[ident]()
    for name, dtype in list(event.data_types.items()):
        if isinstance(dtype, ua.NodeId):
            event.data_types[name] = _ENCODED_AS.get(dtype.Identifier, ua.VariantType.ExtensionObject)
    event.SourceNode = source
    event.SourceName = source_name
    return event


def _stamp(event: Any, when: datetime | None) -> None:
    """What EventGenerator.trigger sets: a new EventId, the times, the local time offset."""
    now = datetime.now(timezone.utc)
    event.EventId = uuid.uuid4().hex.encode("ascii")
    event.Time = when or now
    event.ReceiveTime = now
    local = time.localtime(event.Time.timestamp())
    event.LocalTime = ua.uaprotocol_auto.TimeZoneDataType(
        Offset=local.tm_gmtoff // 60, DaylightSavingInOffset=bool(local.tm_isdst > 0))


async def notify(server: Any, event: Any, notifiers: Sequence[ua.NodeId], *,
                 audience: Callable[[Any], bool] | None = None, when: datetime | None = None,
                 stamp: bool = True) -> bytes:
    """Trigger ``event`` (an asyncua Event, or an EventGenerator: its ``event``) on each of
    ``notifiers`` in order, with one EventId; return that EventId.

    ``server``: the asyncua Server or its InternalServer. ``when``: the event's Time (default
    now). ``audience(user)``: whether the session of that user (asyncua User; ours are
    ``security.TemperingUser``) may receive it; None: every subscription. Each notifier must
    be an Object with EventNotifier SubscribeToEvents (the Server object is; the machine
    object is made one by ``model.build_machine``). The event's ``emitting_node`` is left at
    the last notifier. ``stamp`` False: the event keeps the EventId and times it has (a
    condition's event, whose EventId its methods refer to)."""
    event = getattr(event, "event", event)
    iserver = getattr(server, "iserver", server)
    subscriptions = iserver.subscription_service
    if stamp:
        _stamp(event, when)
    if audience is None:
        for nodeid in notifiers:
            event.emitting_node = nodeid
            await subscriptions.trigger_event(event)
        return event.EventId
    users = {s.session_id: s.user for s in list(getattr(iserver, "_external_sessions", {}).values())}
    chosen = []
    for sub in list(subscriptions.subscriptions.values()):
        user = users.get(sub.session_id, _INTERNAL)
        if user is _INTERNAL or audience(user):
            chosen.append(sub)
    for nodeid in notifiers:
        event.emitting_node = nodeid
        for sub in chosen:
            await sub.monitored_item_srv.trigger_event(event)
    return event.EventId


_INTERNAL = object()      # a subscription of no client session: the server's own
