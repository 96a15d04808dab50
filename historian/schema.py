"""What the historian writes: PLC snapshots in, InfluxDB line-protocol lines out (pure).

Schema (nanosecond timestamps; the README's "Historian" section is the reference for users):

    zone,machine=<id>,zone=<zone>,phase=<phase>,batch=<batch|none>,recipe=<recipe|none>
         temp_c=<float>,setpoint_c=<float>,output_pct=<float>,quality="good|uncertain|bad" <ns>
    event,machine=<id>,kind=<phase|batch_start|batch_end|trip|alarm|alarm_system|
         pouring_released|command_accepted|command_refused>,batch=..,recipe=..
         message="...",phase="..." <ns>
    alarm,machine=<id>,alarm=<condition id>,priority=<250|500|700|900>,batch=..,recipe=..
         state="<new state>",from="<old state>",transition="<active|cleared|acknowledged|
         ...>",message="...",user="...",comment="...",value=<float, when it has one> <ns>

    batch,machine=<id>,batch=<batch id>,recipe=<recipe>,verdict=<PASS|FAIL|INCOMPLETE>,
         outcome=<completed|stopped|aborted|tripped|shutdown>
         duration_s=<float>,energy_kwh=<float>,energy_kwh_per_kg=<float, when known>,
         alarms=<int>,interruptions=<int>,heating_s=..,cooling_s=..,pouring_s=<float, each
         phase the batch ran>,pouring_in_band_share=<0..1, when the batch poured> <ended_at ns>

Alarm lines take the scalar keys of the scan's ``alarm`` events (``plc.sequencer.alarm_event``);
the event's ``alarm`` record itself is never written.

``temp_c`` is left out while the sensor is faulty (quality bad) and ``setpoint_c`` while the zone
has none (idle). Timestamps are fixed here, at sampling time, from the scan's own time, so a
replay after an outage or a crash writes the very same points (InfluxDB keeps one point per
series and timestamp): several lines of one series in one scan get timestamps 1 ns apart.

Zone samples are taken every ``interval_s`` of scan time. With a deadband, a zone's sample is
written only when its temperature moved by more than the deadband since the zone's last written
sample, when its quality or set-point changed, or after ``max_silence_s``. Events and alarm
transitions are always written, whatever the interval.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping

from plc.channel import Snapshot

if TYPE_CHECKING:
    from opcua_server.batches import BatchRecord

_TAG_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": " ", "\0": ""})
_MEASUREMENT_ESCAPES = str.maketrans({",": r"\,", " ": r"\ ", "\n": " "})


def escape_tag(value: object) -> str:
    text = str(value).translate(_TAG_ESCAPES)
    return text if text else "none"


def field_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ").replace("\0", "")
    return f'"{text}"'


def line(measurement: str, tags: Mapping[str, object], fields: Mapping[str, object], ts_ns: int) -> str:
    """One line of line protocol; tags sorted (InfluxDB's canonical order), None fields left out."""
    tag_text = "".join(f",{escape_tag(k)}={escape_tag(v)}" for k, v in sorted(tags.items()))
    field_text = ",".join(f"{escape_tag(k)}={field_value(v)}" for k, v in fields.items()
                          if v is not None and not (isinstance(v, float) and not math.isfinite(v)))
    if not field_text:
        raise ValueError(f"{measurement}: a line needs at least one field")
    return f"{measurement.translate(_MEASUREMENT_ESCAPES)}{tag_text} {field_text} {ts_ns}"


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def ns(time_s: float) -> int:
    return int(round(time_s * 1e9))


def batch_fields(record: "BatchRecord") -> dict[str, object]:
    """The figures of a finished batch record (``opcua_server.batches.BatchRecord``), as the
    ``batch`` line's fields (and the columns of ``tempering batches export``): duration_s (end -
    start, s), energy_kwh, energy_kwh_per_kg (None unless the charge's mass is known), alarms
    and interruptions (counts), ``<phase>_s`` per phase the batch ran (its running time,
    interruptions left out; a phase entered twice counts twice), pouring_in_band_share (0..1,
    from the record's figures; None when the batch did not pour)."""
    fields: dict[str, object] = {
        "duration_s": float(record.ended_at - record.started_at),
        "energy_kwh": _number(record.energy_kwh),
        "energy_kwh_per_kg": _number(record.energy_kwh_per_kg),
        "alarms": len(record.alarms),
        "interruptions": len(record.interruptions),
    }
    for span in record.phases:
        key = f"{span.phase}_s"
        fields[key] = float(fields.get(key) or 0.0) + float(span.duration_s)
    fields["pouring_in_band_share"] = _number((getattr(record, "figures", None) or {})
                                              .get("pouring_in_band_share"))
    return fields


def batch_line(record: "BatchRecord") -> str:
    """The ``batch`` line of a finished batch record: one point per batch at its end
    (``ended_at``), so writing a record again writes the same point. Tags: machine, batch,
    recipe, verdict, outcome; fields: ``batch_fields`` (the unknown ones left out)."""
    return line("batch", {"machine": record.machine_id, "batch": record.batch_id,
                          "recipe": record.recipe_id, "verdict": record.verdict,
                          "outcome": record.outcome}, batch_fields(record), ns(record.ended_at))


class Sampler:
    """Turns the stream of snapshots into lines. Stateful (interval, deadband), but pure: the
    time is the snapshots' own."""

    def __init__(self, machine_id: str, interval_s: float = 1.0, deadband_c: float = 0.0,
                 max_silence_s: float = 60.0):
        self.machine_id = machine_id
        self.interval_s = interval_s
        self.deadband_c = deadband_c
        self.max_silence_s = max_silence_s
        self._next_due: float | None = None
        self._last: dict[str, tuple[float | None, str, float | None, float]] = {}
        self._last_ns: dict[tuple, int] = {}

    def _ts(self, series: tuple, time_s: float) -> int:
        t = ns(time_s)
        last = self._last_ns.get(series)
        if last is not None and t <= last:
            t = last + 1
        if len(self._last_ns) > 10_000:      # old batches' series: nothing can collide with them
            self._last_ns.clear()
        self._last_ns[series] = t
        return t

    def lines(self, snap: Snapshot) -> list[str]:
        tags = {"machine": self.machine_id, "batch": snap.batch_id or "none",
                "recipe": snap.recipe_id or "none"}
        out: list[str] = []
        for e in snap.events:
            series = ("event", e.kind, tags["batch"], tags["recipe"])
            out.append(line("event", {**tags, "kind": e.kind},
                            {"message": e.message, "phase": snap.phase}, self._ts(series, e.time_s)))
            if e.kind == "alarm":
                alarm_id = str(e.get("alarm_id", ""))
                prio = e.get("priority", 0)
                series = ("alarm", alarm_id, prio, tags["batch"], tags["recipe"])
                out.append(line("alarm", {**tags, "alarm": alarm_id, "priority": prio},
                                {"state": str(e.get("to", "")), "from": str(e.get("from", "")),
                                 "transition": str(e.get("transition") or "") or None,
                                 "message": e.message, "user": str(e.get("user") or ""),
                                 "comment": str(e.get("comment") or "") or None,
                                 "value": _number(e.get("value"))},
                                self._ts(series, e.time_s)))
        if self._next_due is None or snap.time_s >= self._next_due - 1e-9:
            base = math.floor(snap.time_s / self.interval_s + 1e-9) * self.interval_s
            self._next_due = base + self.interval_s
            out += self._zone_lines(snap, tags)
        return out

    def _zone_lines(self, snap: Snapshot, tags: Mapping[str, str]) -> list[str]:
        out = []
        for z in snap.zones:
            quality = z.quality.name.lower()
            last = self._last.get(z.name)
            if self.deadband_c > 0 and last is not None:
                pv, q, sp, t = last
                moved = (z.pv_c is None) != (pv is None) or (
                    z.pv_c is not None and pv is not None and abs(z.pv_c - pv) > self.deadband_c)
                if not (moved or q != quality or sp != z.sp_c or snap.time_s - t >= self.max_silence_s):
                    continue
            self._last[z.name] = (z.pv_c, quality, z.sp_c, snap.time_s)
            series = ("zone", z.name, snap.phase, tags["batch"], tags["recipe"])
            out.append(line("zone", {**tags, "zone": z.name, "phase": snap.phase},
                            {"temp_c": z.pv_c, "setpoint_c": z.sp_c, "output_pct": float(z.output_pct),
                             "quality": quality}, self._ts(series, snap.time_s)))
        return out
