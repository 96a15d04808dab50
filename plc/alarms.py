"""Alarms on the ISA-18.2 lifecycle, kept in the core. Pure: time comes in as an argument.

One job: turn the conditions the interlocks evaluate each scan, and the operators' alarm
commands, into alarm records and the transitions between them. Times are wall-clock epoch
seconds (``now``), so they survive a restart and become the OPC UA event Time.

States (ANSI/ISA-18.2-2016 §11, the alarm state transition diagram; ``Alarm.state`` derives
them from the record's flags, the lower rows taking precedence)::

    annunciated (enabled, unshelved, not suppressed by design):
        NORMAL     --active--> UNACK_ACTIVE --ack--> ACK_ACTIVE --clear--> NORMAL
                               UNACK_ACTIVE --clear--> UNACK_RTN --ack--> NORMAL
                               UNACK_RTN --active--> UNACK_ACTIVE
    SUPPRESSED     <--suppressed / unsuppressed-->  the condition says it cannot be decided
                                                    (over_temp while its sensor is faulty)
    SHELVED        <--shelve (timed, one-shot) / unshelve-->  by an operator; by "system" at
                                                    ``unshelve_at`` or when a one-shot shelved
                                                    alarm clears
    OUT_OF_SERVICE <--disable / enable-->           by an operator

Rules
- ``Alarm.active`` always follows the process condition, whatever is annunciated: the
  interlocks, the trips and Reset never look at shelving, suppression or enable (a shelved or
  disabled over-temperature still trips). Only what is annunciated changes.
- An activation while the alarm is annunciable makes it unacknowledged; while it is shelved
  or suppressed, the activation and the clear are still reported (state SHELVED/SUPPRESSED,
  ``acked`` untouched: nothing to acknowledge) so the journal has them; when it becomes
  annunciable again while active it is annunciated then (unacknowledged).
- Disabled (out of service) alarms report nothing but ``enabled`` / ``disabled``; disabling
  drops any shelve and any pending acknowledgement or confirmation.
- Acknowledge sets ``confirmed`` False; Confirm sets it back. ``retain`` does not wait for
  Confirm.
- Every reported change is one :class:`AlarmTransition` and bumps the alarm's ``seq``; its
  ``event_id`` (``id#seq#changed_us``) is unique per change, so a command that names a stale
  event is refused (``BadEventIdUnknown``).
- ``message`` is set at each reported change and says what happened in both directions
  ("... over-temperature 61.2 degC > 60 degC", "... temperature within 60 degC (59.8 degC)");
  ``value`` follows the process while the alarm is active.

Mapping to OPC UA Part 9 (§5.8 AlarmConditionType and §5.5-5.7 Condition / Acknowledgeable):
``active`` -> ActiveState, ``acked`` -> AckedState, ``confirmed`` -> ConfirmedState,
``enabled`` -> EnabledState, ``shelving`` -> ShelvingState (§5.8.10: Unshelved, TimedShelved,
OneShotShelved; ``unshelve_at`` gives UnshelveTime), ``suppressed`` -> SuppressedState
(§5.8.3), ``retain`` -> Retain, ``priority`` -> Severity, ``event_id`` -> EventId,
``comment``/``user`` -> Comment / ClientUserId. Refusals carry the Part 4/Part 9 status code
*name* (``Refusal.code``), which the window maps to ``ua.StatusCodes``:

    BadEventIdUnknown                    unknown alarm id, or event_id given and stale
    BadConditionBranchAlreadyAcked       acknowledge an acknowledged alarm
    BadConditionBranchAlreadyConfirmed   confirm a confirmed alarm
    BadConditionDisabled                 ack / confirm / comment / shelve a disabled alarm
    BadConditionAlreadyDisabled, BadConditionAlreadyEnabled
    BadConditionAlreadyShelved           shelve a shelved alarm
    BadConditionNotShelved               unshelve an unshelved alarm
    BadShelvingTimeOutOfRange            timed shelve for <= 0 s or more than ``max_shelve_s``
    BadInvalidState                      anything else (a one-shot shelve of an inactive alarm)
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace
from typing import Iterable, Mapping


class AlarmState(enum.Enum):
    """ISA-18.2-2016 §11 states (derived, see ``Alarm.state``)."""
    NORMAL = "normal"
    UNACK_ACTIVE = "unacknowledged_active"
    ACK_ACTIVE = "acknowledged_active"
    UNACK_RTN = "unacknowledged_returned_to_normal"
    SHELVED = "shelved"
    SUPPRESSED = "suppressed_by_design"
    OUT_OF_SERVICE = "out_of_service"


class Shelving(enum.Enum):
    """OPC UA Part 9 §5.8.10 ShelvedStateMachineType states."""
    UNSHELVED = "unshelved"
    TIMED = "timed"
    ONE_SHOT = "one_shot"


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
    limit: float | None = None        # the limit the value is compared with (K, degC, A, V, Hz)
    suppressed: bool = False          # suppressed by design (over_temp while the sensor is faulty)


@dataclass(frozen=True, slots=True)
class Alarm:
    id: str
    active: bool = False              # the process condition itself, whatever is annunciated
    acked: bool = True
    confirmed: bool = True
    enabled: bool = True              # False = out of service (Disable)
    suppressed: bool = False
    shelving: Shelving = Shelving.UNSHELVED
    unshelve_at: float | None = None  # wall-clock epoch seconds a timed shelve ends
    message: str = ""                 # says what happened, in both directions
    priority: Priority = Priority.LOW
    trip: bool = False
    value: float | None = None
    limit: float | None = None
    active_since: float | None = None  # epoch s
    changed: float = 0.0              # epoch s of the last reported change (the event's Time)
    user: str = ""                    # who made the last operator change ("" = the process)
    comment: str = ""                 # last comment (ack, confirm, add-comment, shelve ...)
    seq: int = 0                      # +1 on every reported change of this alarm

    @property
    def state(self) -> AlarmState:
        if not self.enabled:
            return AlarmState.OUT_OF_SERVICE
        if self.shelving is not Shelving.UNSHELVED:
            return AlarmState.SHELVED
        if self.suppressed:
            return AlarmState.SUPPRESSED
        if self.active:
            return AlarmState.ACK_ACTIVE if self.acked else AlarmState.UNACK_ACTIVE
        return AlarmState.NORMAL if self.acked else AlarmState.UNACK_RTN

    @property
    def annunciable(self) -> bool:
        """Enabled, unshelved and not suppressed: an activation is shown to the operator."""
        return self.enabled and self.shelving is Shelving.UNSHELVED and not self.suppressed

    @property
    def retain(self) -> bool:
        """OPC UA Retain (Part 9 §5.5.2): still of interest to a client."""
        return self.enabled and (self.active or not self.acked)

    @property
    def event_id(self) -> bytes:
        """OPC UA EventId of this alarm's last reported change; unique per change."""
        return f"{self.id}#{self.seq}#{round(self.changed * 1e6)}".encode()


KINDS = ("active", "cleared", "acknowledged", "confirmed", "comment", "shelved", "unshelved",
         "disabled", "enabled", "suppressed", "unsuppressed", "message")


@dataclass(frozen=True, slots=True)
class AlarmTransition:
    """One reported change of one alarm (``kind`` one of ``KINDS``); ``alarm`` is the record
    after the change, ``time`` its wall-clock epoch seconds."""
    id: str
    kind: str
    time: float
    old: AlarmState
    new: AlarmState
    alarm: Alarm
    user: str = ""
    comment: str = ""


@dataclass(frozen=True, slots=True)
class Refusal:
    """An alarm command refused: ``code`` is the OPC UA status code name, ``reason`` the text."""
    code: str
    reason: str


Change = tuple[dict[str, Alarm], list[AlarmTransition]]
SYSTEM = "system"                     # the user of a shelve that ends by itself


def _report(out: dict[str, Alarm], changes: list[AlarmTransition], before: Alarm, after: Alarm,
            kind: str, now: float, user: str = "", comment: str = "") -> Alarm:
    """Record one reported change: bump seq, stamp it, append its transition."""
    after = replace(after, seq=before.seq + 1, changed=now)
    out[after.id] = after
    changes.append(AlarmTransition(after.id, kind, now, before.state, after.state, after,
                                   user, comment))
    return after


def _annunciated(before: Alarm, after: Alarm) -> Alarm:
    """An active alarm that becomes annunciable is annunciated now (unacknowledged)."""
    if after.active and after.annunciable and not before.annunciable:
        return replace(after, acked=False)
    return after


def _unshelved(a: Alarm) -> Alarm:
    return replace(a, shelving=Shelving.UNSHELVED, unshelve_at=None)


def update(alarms: Mapping[str, Alarm], conditions: Iterable[Condition],
           now: float) -> Change:
    """Advance every alarm by this scan's conditions at wall time ``now`` (epoch s).

    Per alarm, in this order: a timed shelve due at ``now`` ends; suppression follows the
    condition; activation or clear (a one-shot shelve ends with the clear). Alarms not
    mentioned keep their record. Returns the new alarms and the transitions, in order."""
    out = dict(alarms)
    changes: list[AlarmTransition] = []
    for c in conditions:
        a = out.get(c.id)
        if a is None:
            a = Alarm(c.id, message=c.message, priority=c.priority, trip=c.trip,
                      value=c.value, limit=c.limit, suppressed=c.suppressed, changed=now)
        if not a.enabled:      # out of service: follow the process silently
            if (a.active, a.suppressed) != (c.active, c.suppressed):
                a = replace(a, active=c.active, suppressed=c.suppressed, value=c.value,
                            limit=c.limit, message=c.message, priority=c.priority,
                            active_since=(a.active_since or now) if c.active else None)
            out[c.id] = a
            continue
        if c.active and (a.value != c.value or a.limit != c.limit):
            a = replace(a, value=c.value, limit=c.limit)   # follows the process, not reported
        if (a.shelving is Shelving.TIMED and a.unshelve_at is not None
                and now >= a.unshelve_at):
            a = _report(out, changes, a, _annunciated(a, _unshelved(a)), "unshelved", now,
                        SYSTEM, "shelving time expired")
        if c.suppressed != a.suppressed:
            b = _annunciated(a, replace(a, suppressed=c.suppressed, message=c.message))
            a = _report(out, changes, a, b, "suppressed" if c.suppressed else "unsuppressed",
                        now)
        if c.active and not a.active:
            b = replace(a, active=True, active_since=now, message=c.message,
                        priority=c.priority, value=c.value, limit=c.limit, user="",
                        acked=a.acked and not a.annunciable)
            a = _report(out, changes, a, b, "active", now)
        elif a.active and not c.active:
            b = replace(a, active=False, active_since=None, message=c.message,
                        priority=c.priority, value=c.value, limit=c.limit, user="")
            a = _report(out, changes, a, b, "cleared", now)
            if a.shelving is Shelving.ONE_SHOT:
                a = _report(out, changes, a, _unshelved(a), "unshelved", now, SYSTEM,
                            "one-shot shelve ended: the alarm cleared")
        elif c.active and c.priority != a.priority:
            a = _report(out, changes, a, replace(a, message=c.message, priority=c.priority),
                        "message", now)
        if a.trip != c.trip:
            a = replace(a, trip=c.trip)
        out[c.id] = a
    return out, changes


# --------------------------------------------------------------------------- operator actions


def _find(alarms: Mapping[str, Alarm], alarm_id: str | None,
          event_id: bytes | None = None) -> Alarm | Refusal:
    a = alarms.get(alarm_id) if alarm_id is not None else None
    if a is None:
        return Refusal("BadEventIdUnknown", f"unknown alarm {alarm_id!r}")
    if event_id is not None and bytes(event_id) != a.event_id:
        return Refusal("BadEventIdUnknown",
                       f"{alarm_id}: event {bytes(event_id)!r} is not its last event "
                       f"({a.event_id!r})")
    return a


def _operable(alarms: Mapping[str, Alarm], alarm_id: str | None, what: str,
              event_id: bytes | None = None) -> Alarm | Refusal:
    """The alarm an operator acts on: known, its last event when one is named, in service."""
    a = _find(alarms, alarm_id, event_id)
    if isinstance(a, Alarm) and not a.enabled:
        return Refusal("BadConditionDisabled", f"{a.id} is disabled (out of service); cannot {what} it")
    return a


def _one(alarms: Mapping[str, Alarm], before: Alarm, after: Alarm, kind: str, now: float,
         user: str, comment: str) -> Change:
    """The alarms with one alarm changed by an operator, and that transition."""
    out = dict(alarms)
    changes: list[AlarmTransition] = []
    _report(out, changes, before, after, kind, now, user, comment)
    return out, changes


def acknowledge(alarms: Mapping[str, Alarm], alarm_id: str | None, user: str, now: float,
                comment: str = "", event_id: bytes | None = None) -> Change | Refusal:
    """Acknowledge one alarm, or (``alarm_id`` None) every enabled unacknowledged one (nothing
    to acknowledge is not refused then; ``event_id`` is ignored). Sets confirmed False."""
    if alarm_id is None:
        todo = [a for _, a in sorted(alarms.items()) if a.enabled and not a.acked]
    else:
        a = _operable(alarms, alarm_id, "acknowledge", event_id)
        if isinstance(a, Refusal):
            return a
        if a.acked:
            return Refusal("BadConditionBranchAlreadyAcked", f"{alarm_id} is already acknowledged")
        todo = [a]
    out = dict(alarms)
    changes: list[AlarmTransition] = []
    for a in todo:
        _report(out, changes, a, replace(a, acked=True, confirmed=False, user=user,
                                         comment=comment), "acknowledged", now, user, comment)
    return out, changes


def confirm(alarms: Mapping[str, Alarm], alarm_id: str, user: str, now: float,
            comment: str = "", event_id: bytes | None = None) -> Change | Refusal:
    """Confirm an acknowledged alarm (Part 9 §5.7.4): confirmed True."""
    a = _operable(alarms, alarm_id, "confirm", event_id)
    if isinstance(a, Refusal):
        return a
    if a.confirmed:
        return Refusal("BadConditionBranchAlreadyConfirmed", f"{alarm_id} is already confirmed")
    return _one(alarms, a, replace(a, confirmed=True, user=user, comment=comment), "confirmed",
                now, user, comment)


def add_comment(alarms: Mapping[str, Alarm], alarm_id: str, user: str, now: float,
                comment: str, event_id: bytes | None = None) -> Change | Refusal:
    """Attach a comment to an alarm (Part 9 §5.5.6 AddComment)."""
    a = _operable(alarms, alarm_id, "comment", event_id)
    if isinstance(a, Refusal):
        return a
    return _one(alarms, a, replace(a, user=user, comment=comment), "comment", now, user, comment)


def shelve(alarms: Mapping[str, Alarm], alarm_id: str, duration_s: float | None, user: str,
           now: float, max_shelve_s: float, comment: str = "") -> Change | Refusal:
    """Shelve an alarm: timed for ``duration_s`` (0 < duration <= ``max_shelve_s``, ends at
    ``now + duration_s``), or one-shot (``duration_s`` None: an active alarm, shelved until
    it clears). Part 9 §5.8.10 TimedShelve / OneShotShelve; ISA-18.2 §11.3."""
    a = _operable(alarms, alarm_id, "shelve")
    if isinstance(a, Refusal):
        return a
    if a.shelving is not Shelving.UNSHELVED:
        return Refusal("BadConditionAlreadyShelved", f"{alarm_id} is already shelved "
                                                     f"({a.shelving.value})")
    if duration_s is None:
        if not a.active:
            return Refusal("BadInvalidState", f"{alarm_id} is not active; a one-shot shelve "
                                              "ends when the alarm clears")
        b = replace(a, shelving=Shelving.ONE_SHOT, unshelve_at=None)
    else:
        d = float(duration_s)
        if not (math.isfinite(d) and 0.0 < d <= max_shelve_s):
            return Refusal("BadShelvingTimeOutOfRange",
                           f"shelving time must be within 0..{max_shelve_s:g} s (got {duration_s})")
        b = replace(a, shelving=Shelving.TIMED, unshelve_at=now + d)
    return _one(alarms, a, replace(b, user=user, comment=comment), "shelved", now, user, comment)


def unshelve(alarms: Mapping[str, Alarm], alarm_id: str, user: str, now: float,
             comment: str = "") -> Change | Refusal:
    """End a shelve (Part 9 §5.8.10 Unshelve); an active alarm is annunciated again."""
    a = _find(alarms, alarm_id)
    if isinstance(a, Refusal):
        return a
    if a.shelving is Shelving.UNSHELVED:
        return Refusal("BadConditionNotShelved", f"{alarm_id} is not shelved")
    b = _annunciated(a, replace(_unshelved(a), user=user, comment=comment))
    return _one(alarms, a, b, "unshelved", now, user, comment)


def set_enabled(alarms: Mapping[str, Alarm], alarm_id: str, enabled: bool, user: str,
                now: float, comment: str = "") -> Change | Refusal:
    """Put an alarm out of service (``enabled`` False) or back (Part 9 §5.5.4 Disable/Enable;
    ISA-18.2 §11 out of service). Disabling drops the shelve and any pending acknowledgement;
    enabling an active alarm annunciates it."""
    a = _find(alarms, alarm_id)
    if isinstance(a, Refusal):
        return a
    if enabled and a.enabled:
        return Refusal("BadConditionAlreadyEnabled", f"{alarm_id} is already enabled")
    if not enabled and not a.enabled:
        return Refusal("BadConditionAlreadyDisabled", f"{alarm_id} is already disabled")
    if enabled:
        b = _annunciated(a, replace(a, enabled=True, user=user, comment=comment))
    else:
        b = replace(_unshelved(a), enabled=False, acked=True, confirmed=True, user=user,
                    comment=comment)
    return _one(alarms, a, b, "enabled" if enabled else "disabled", now, user, comment)
