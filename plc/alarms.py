"""Alarms with ISA-18.2 states, kept in the core. Pure: time comes in as ``now_s``.

States (ANSI/ISA-18.2-2016 §11, the alarm state transition diagram, without shelving):

    NORMAL --active--> UNACK_ACTIVE --ack--> ACK_ACTIVE --clear--> NORMAL
                       UNACK_ACTIVE --clear--> UNACK_RTN --ack--> NORMAL
                       UNACK_RTN --active--> UNACK_ACTIVE

A *trip* alarm is also latched by the interlocks (see ``interlocks.py``): its alarm can return
to normal only once the condition is clear, and the trip itself needs an explicit reset.
Each transition is reported as an :class:`AlarmTransition` so that observers (OPC UA events,
the historian, the alarm journal) see every change, with its timestamp.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Iterable, Mapping


class AlarmState(enum.Enum):
    NORMAL = "normal"
    UNACK_ACTIVE = "unacknowledged_active"
    ACK_ACTIVE = "acknowledged_active"
    UNACK_RTN = "unacknowledged_returned_to_normal"


class Priority(enum.IntEnum):
    """ISA-18.2 priorities; the value is an OPC UA severity (Part 9 §5.8.2, 1..1000)."""
    LOW = 250
    MEDIUM = 500
    HIGH = 700
    CRITICAL = 900


@dataclass(frozen=True, slots=True)
class Condition:
    """What the interlocks evaluated this scan for one alarm id."""
    id: str
    active: bool
    message: str
    priority: Priority
    trip: bool = False
    value: float | None = None


@dataclass(frozen=True, slots=True)
class Alarm:
    id: str
    state: AlarmState = AlarmState.NORMAL
    message: str = ""
    priority: Priority = Priority.LOW
    trip: bool = False
    active_since_s: float | None = None
    changed_s: float = 0.0
    acked_by: str = ""

    @property
    def active(self) -> bool:
        return self.state in (AlarmState.UNACK_ACTIVE, AlarmState.ACK_ACTIVE)

    @property
    def unacknowledged(self) -> bool:
        return self.state in (AlarmState.UNACK_ACTIVE, AlarmState.UNACK_RTN)


@dataclass(frozen=True, slots=True)
class AlarmTransition:
    id: str
    old: AlarmState
    new: AlarmState
    time_s: float
    message: str
    priority: Priority
    user: str = ""


def update(alarms: Mapping[str, Alarm], conditions: Iterable[Condition],
           now_s: float) -> tuple[dict[str, Alarm], list[AlarmTransition]]:
    """Advance every alarm by this scan's conditions. Alarms not mentioned keep their state."""
    out = dict(alarms)
    changes: list[AlarmTransition] = []
    for c in conditions:
        a = out.get(c.id) or Alarm(c.id, message=c.message, priority=c.priority, trip=c.trip)
        new = a.state
        if c.active and a.state in (AlarmState.NORMAL, AlarmState.UNACK_RTN):
            new = AlarmState.UNACK_ACTIVE
        elif not c.active and a.state is AlarmState.UNACK_ACTIVE:
            new = AlarmState.UNACK_RTN
        elif not c.active and a.state is AlarmState.ACK_ACTIVE:
            new = AlarmState.NORMAL
        if new is not a.state:
            since = now_s if new is AlarmState.UNACK_ACTIVE else (
                None if new is AlarmState.NORMAL else a.active_since_s)
            a = replace(a, state=new, message=c.message, priority=c.priority,
                        active_since_s=since, changed_s=now_s, acked_by="")
            changes.append(AlarmTransition(c.id, alarms[c.id].state if c.id in alarms
                                           else AlarmState.NORMAL, new, now_s, c.message, c.priority))
        elif c.active and c.message != a.message:
            a = replace(a, message=c.message)
        out[c.id] = a
    return out, changes


def acknowledge(alarms: Mapping[str, Alarm], alarm_id: str | None, user: str,
                now_s: float) -> tuple[dict[str, Alarm], list[AlarmTransition]]:
    """Acknowledge one alarm (or all with ``alarm_id`` None). Unknown ids raise KeyError."""
    if alarm_id is not None and alarm_id not in alarms:
        raise KeyError(alarm_id)
    out = dict(alarms)
    changes: list[AlarmTransition] = []
    for aid in ([alarm_id] if alarm_id is not None else list(alarms)):
        a = out[aid]
        new = {AlarmState.UNACK_ACTIVE: AlarmState.ACK_ACTIVE,
               AlarmState.UNACK_RTN: AlarmState.NORMAL}.get(a.state)
        if new is None:
            continue
        out[aid] = replace(a, state=new, changed_s=now_s, acked_by=user,
                           active_since_s=a.active_since_s if new is AlarmState.ACK_ACTIVE else None)
        changes.append(AlarmTransition(aid, a.state, new, now_s, a.message, a.priority, user))
    return out, changes
