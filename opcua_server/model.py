"""The machine's OPC UA address space: the information model's types, and the instances built
from the configuration.

    nodesets/Tempering.Types.NodeSet2.xml   the types (urn:open-tempering:types): load_types
    build_machine                           one TemperingMachineType instance (each zone with its
                                            ZoneAutotuneType Autotune) with a RecipeType
                                            per recipe, an AlarmType per interlock condition and
                                            a LinkDiagnosticsType per Modbus link, in the namespace
                                            urn:open-tempering:machine:<machine id>
    MachineNodes                            the nodes the rest of the server needs, by name
    export_nodeset                          the instances as a NodeSet2 file (Part 6 Annex F)

Rules:
- Every instance node comes from a type: its components, their EngineeringUnits and EURange,
  descriptions and access levels are those of the InstanceDeclarations (Part 3 §6.4); the
  configuration adds descriptions that depend on it ("Zone 3 pump: chocolate temperature
  (input temp_pump); trips above 60 °C ...") and the values it knows (machine id and name, PID
  gains, recipes).
- NodeIds are strings of the browse path below the machine object (``Machine.Zones.Pump.
  Temperature``), the naming asyncua's instantiation uses, so they stay the same from one start
  to the next and a SCADA may store them.
- A process value has no value and the status BadWaitingForInitialData until the publisher
  writes it (Part 4 §7.34); a client never reads a made-up 0.
- Two builders make the same address space. ``naive=True`` instantiates node by node through
  asyncua's session API (``instantiate_util.instantiate`` and one write per setting). The
  default reads each type once into a template and copies templates straight into the server's
  address space (asyncua's internal ``AddressSpace``: ``NodeData`` and ``ReferenceDescription``
  values), which is what keeps a machine of tens of thousands of nodes quick to build.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import xml.etree.ElementTree as Et
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

from asyncua import Node, Server, ua
from asyncua.common import xmlexporter
from asyncua.common.instantiate_util import instantiate
from asyncua.server.address_space import AttributeValue, NodeData

from plc.contract import MOTORS, OUTPUT_SPECS, ZONES
from plc.program import MOTOR_LIMIT_ZONE, Program
from plc.state import Phase

TYPES_URI = "urn:open-tempering:types"
MACHINE_URI_PREFIX = "urn:open-tempering:machine:"
TYPES_NODESET = Path(__file__).resolve().parent.parent / "nodesets" / "Tempering.Types.NodeSet2.xml"
ROOT = "Machine"                       # string NodeId of the machine object

# numeric NodeIds in the types namespace (nodesets/README.md)
TYPE_IDS: Mapping[str, int] = MappingProxyType({
    "TemperatureZoneType": 1001, "MotorType": 1002, "PowerMeterType": 1003, "SequencerType": 1004,
    "RecipeType": 1005, "RecipeBookType": 1006, "ScanDiagnosticsType": 1008,
    "LinkDiagnosticsType": 1009, "HistorianDiagnosticsType": 1010, "TemperingMachineType": 1011,
    # the alarm condition types (subtypes of the OPC UA Part 9 alarm types); 1007 and 1012 retired
    "TemperatureLevelAlarmType": 1013, "TemperatureDeviationAlarmType": 1014,
    "MachineOffNormalAlarmType": 1015, "MachineDiscreteAlarmType": 1016,
    "BatchRecordType": 1017, "BatchCompletedEventType": 1019, "ZoneAutotuneType": 1020})
DATA_TYPE_IDS: Mapping[str, int] = MappingProxyType({"PhaseEnum": 3001})   # 3003 retired

# the Int32 values of PhaseEnum: the members' order, which the type keeps
PHASE_VALUES: Mapping[Phase, int] = MappingProxyType({p: i for i, p in enumerate(Phase)})


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


ZONE_NODES: Mapping[str, str] = MappingProxyType({z: _camel(z) for z in ZONES})
MOTOR_NODES: Mapping[str, str] = MappingProxyType({m: _camel(m) for m in MOTORS})
OUTPUT_NODES: Mapping[str, str] = MappingProxyType({o: _camel(o) for o in OUTPUT_SPECS})
# process-image point -> browse path below the machine object
POINT_PATHS: Mapping[str, str] = MappingProxyType({
    **{f"temp_{z}": f"Zones.{ZONE_NODES[z]}.Temperature" for z in ZONES},
    **{f"current_{m}": f"Motors.{MOTOR_NODES[m]}.Current" for m in MOTORS},
    "current_total": "PowerMeter.CurrentTotal",
    **{f"grid_v_l{i}": f"PowerMeter.VoltageL{i}" for i in (1, 2, 3)},
    "grid_freq": "PowerMeter.Frequency",
    "estop_ok": "Safety.EstopOk",
    "pedal": "Safety.Pedal",
    **{o: f"Outputs.{n}" for o, n in OUTPUT_NODES.items()},
})
# RecipeType browse name -> field of plc.config.Recipe
RECIPE_FIELDS: Mapping[str, str] = MappingProxyType({
    "Name": "name", "HeatingGoal": "heating_goal", "CoolingGoal": "cooling_goal",
    "PouringGoal": "pouring_goal", "WorkingMax": "working_max", "MixerEnabled": "mixer_enabled",
    "FountainEnabled": "fountain_enabled", "MoldHeaterEnabled": "mold_heater_enabled",
    "VibrationEnabled": "vibration_enabled", "VibHeaterEnabled": "vib_heater_enabled",
    "Pedal": "pedal", "PedalOnTime": "pedal_on_time", "PedalOffTime": "pedal_off_time",
    # the acceptance criteria its batches are judged by (plc.config.AcceptanceCriteria)
    "AcceptanceHeatingDwell": "acceptance.heating_dwell_s",
    "AcceptanceCoolingUndershoot": "acceptance.cooling_undershoot_k",
    "AcceptancePouringBand": "acceptance.pouring_band_k",
    "AcceptancePouringMinShare": "acceptance.pouring_min_share",
    "AcceptanceTolerance": "acceptance.tolerance_k"})
# shown in % over OPC UA, kept as a share 0..1 in the recipe
RECIPE_PERCENT_FIELDS = frozenset({"acceptance.pouring_min_share"})


def recipe_value(data: Mapping[str, Any], field: str) -> Any:
    """A recipe field's value from ``Recipe.model_dump()`` ("acceptance.pouring_band_k": nested),
    as OPC UA shows it (a share in %)."""
    value: Any = data
    for part in field.split("."):
        value = value[part]
    return value * 100.0 if field in RECIPE_PERCENT_FIELDS else value


def with_recipe_value(data: Mapping[str, Any], field: str, value: Any) -> dict:
    """``data`` (``Recipe.model_dump()``) with one field set from its OPC UA value."""
    if field in RECIPE_PERCENT_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = value / 100.0
    head, _, rest = field.partition(".")
    if not rest:
        return {**data, head: value}
    return {**data, head: with_recipe_value(dict(data.get(head) or {}), rest, value)}
# least role that may write the writable variables of a type (opcua_server.security.ROLES)
WRITE_ROLES: Mapping[str, str] = MappingProxyType({"zone": "technician", "recipe": "admin"})

_WAITING = ua.StatusCode(ua.StatusCodes.BadWaitingForInitialData)
_A = ua.AttributeIds
_HAS_COMPONENT = ua.NodeId(ua.ObjectIds.HasComponent)
_HAS_PROPERTY = ua.NodeId(ua.ObjectIds.HasProperty)
_ORGANIZES = ua.NodeId(ua.ObjectIds.Organizes)
_HAS_TYPE_DEFINITION = ua.NodeId(ua.ObjectIds.HasTypeDefinition)
_HAS_MODELLING_RULE = ua.NodeId(ua.ObjectIds.HasModellingRule)
_CHILD_REFS = (_HAS_COMPONENT, _HAS_PROPERTY, _ORGANIZES, ua.NodeId(ua.ObjectIds.HasOrderedComponent))
_NOT_INSTANTIATED = (ua.NodeId(ua.ObjectIds.ModellingRule_Optional),
                     ua.NodeId(ua.ObjectIds.ModellingRule_OptionalPlaceholder))
_PROPERTY_TYPE = ua.NodeId(ua.ObjectIds.PropertyType)
# the attributes asyncua's instantiation copies from a declaration (instantiate_util)
_COPIED = {
    ua.NodeClass.Object: (_A.DisplayName, _A.Description, _A.WriteMask, _A.UserWriteMask),
    ua.NodeClass.Variable: (_A.AccessLevel, _A.ArrayDimensions, _A.DataType, _A.Description,
                            _A.DisplayName, _A.Historizing, _A.MinimumSamplingInterval,
                            _A.UserAccessLevel, _A.UserWriteMask, _A.ValueRank, _A.WriteMask),
    ua.NodeClass.Method: (_A.Description, _A.DisplayName, _A.Executable, _A.UserExecutable,
                          _A.UserWriteMask, _A.WriteMask),
}


@dataclass(frozen=True, slots=True)
class Writable:
    """What a writable variable stands for: ``kind`` "zone" (``key`` the plc zone name) or
    "recipe" (``key`` the recipe id), ``field`` its browse name, ``role`` the least role that
    may write it."""
    kind: str
    key: str
    field: str
    role: str


@dataclass
class MachineNodes:
    """The nodes of one machine, by name. Paths are browse names below the machine object."""
    machine: Node
    namespace_index: int
    types_namespace_index: int
    points: dict[str, Node]                # process-image point -> variable (POINT_PATHS)
    zones: dict[str, dict[str, Node]]      # plc zone name -> Temperature, Setpoint, ..., Heater
    autotune: dict[str, dict[str, Node]]   # plc zone name -> its Autotune's Stage, ..., Start, Accept, ...
    motors: dict[str, dict[str, Node]]     # plc motor name -> Running, Current
    sequencer: dict[str, Node]             # Phase, PhaseTime, ..., and its methods by name
    recipes_folder: Node
    recipes: dict[str, dict[str, Node]]    # recipe id -> RecipeType browse name -> variable
    alarms_folder: Node
    conditions: dict[str, Node]            # condition id -> its Part 9 condition object (Alarms.<id>)
    alarms_summary: dict[str, Node]        # ActiveAlarms, ActiveCount, UnacknowledgedCount, ...
    alarm_performance: dict[str, Node]     # Alarms.Performance: AlarmsLast10Min, InFlood, ...
    batches: dict[str, Node]               # "Current.BatchId", ..., "Last.Verdict", ... (Batches)
    diagnostics: dict[str, Node]           # "Scan.LateP99", "Links.io.State", "Historian.Backlog", "Sessions"
    methods: dict[str, Node]               # StartRecipe, ..., AcknowledgeAll, AddRecipe, ...
    objects: dict[str, Node]               # every object by path: "Zones.Pump", "Alarms.estop", "Recipes.dark-70"
    writable: dict[ua.NodeId, Writable]    # every writable variable
    variant_types: dict[ua.NodeId, ua.VariantType]   # how to encode a value of each variable
    _builder: "_Builder | None" = field(default=None, repr=False)


# --------------------------------------------------------------------------- types


async def load_types(server: Server) -> int:
    """Import the types NodeSet2 (once per server); return the types namespace index."""
    if TYPES_URI in await server.get_namespace_array():
        idx = await server.get_namespace_index(TYPES_URI)
        if ua.NodeId(TYPE_IDS["TemperingMachineType"], idx) in server.iserver.aspace:
            return idx
    await server.import_xml(TYPES_NODESET)
    return await server.get_namespace_index(TYPES_URI)


# --------------------------------------------------------------------------- the plan


@dataclass
class _Instance:
    ident: str                   # string NodeId of the new object
    parent: ua.NodeId
    ref_type: ua.NodeId          # reference from the parent
    browse_name: str             # in the machine's namespace
    display_name: str
    type_name: str
    optionals: frozenset[str] = frozenset()   # Optional declarations to instantiate too (conditions)


@dataclass
class _Plan:
    """What to build, whichever builder builds it."""
    instances: list[_Instance] = field(default_factory=list)
    descriptions: dict[str, str] = field(default_factory=dict)   # ident -> description
    prefixes: dict[str, str] = field(default_factory=dict)       # object ident -> prefix of its components' descriptions
    values: dict[str, ua.Variant] = field(default_factory=dict)  # ident -> value known from config


def _zone_label(name: str, number: int) -> str:
    return f"Zone {number} {name.replace('_', ' ')}"


def _list(names: Iterable[str]) -> str:
    return ", ".join(names) or "none"


def _machine_plan(cfg: Any, program: Program, book: Any, conditions: Sequence[str],
                  links: Sequence[str], ns: int) -> _Plan:
    m, lim = cfg.machine, program.limits
    plan = _Plan()
    plan.instances.append(_Instance(ROOT, ua.NodeId(ua.ObjectIds.ObjectsFolder), _ORGANIZES,
                                    m.id, m.name, "TemperingMachineType"))
    plan.descriptions[ROOT] = (f"{m.name} (machine id {m.id}): a chocolate tempering machine "
                               "controlled by the tempering soft-PLC. An event notifier: its alarms "
                               "(Part 9 conditions), audit events and the PLC's comings and goings "
                               "are reported here and on the Server object; HistoryRead of its events "
                               "gives the alarm journal.")
    plan.values[f"{ROOT}.MachineId"] = ua.Variant(m.id, ua.VariantType.String)
    plan.values[f"{ROOT}.Name"] = ua.Variant(m.name, ua.VariantType.String)
    drivers: dict[str, list[str]] = {o: [] for o in OUTPUT_SPECS}
    for z in program.zones:
        label = _zone_label(z.name, z.number)
        zid = f"{ROOT}.Zones.{ZONE_NODES[z.name]}"
        hi, lo = min(z.max_temp_c, lim.abs_max_c), max(z.min_temp_c, lim.abs_min_c)
        heat = _list(z.heating_outputs)
        cool = (f"first stage {_list(z.cool1_outputs)}, second stage {_list(z.cool2_outputs)} beyond "
                f"{z.fc_threshold_pct:g} % cooling demand" if z.cool1_outputs or z.cool2_outputs
                else "no cooling outputs")
        ramp = (f"ramped at most {z.tuning.ramp_k_per_min:g} K/min" if z.tuning.ramp_k_per_min
                else "not ramp-limited")
        plan.prefixes[zid] = label
        plan.prefixes[f"{zid}.Autotune"] = f"{label} autotune"
        plan.descriptions |= {
            zid: f"{label}: heating outputs {heat}; cooling: {cool}.",
            f"{zid}.Temperature": f"{label}: chocolate temperature (input temp_{z.name}); trips above "
                                  f"{hi:g} °C (over-temperature) and below {lo:g} °C (under-temperature).",
            f"{zid}.Setpoint": f"{label}: set-point of the PID loop: the recipe's goal for the phase "
                               f"{z.setpoint_offset_k:+g} K (set_temp{z.number}) plus the trim, {ramp}, "
                               f"at most {z.setpoint_max_c:g} °C.",
            f"{zid}.Output": f"{label}: controller output, +100 % full heating ({heat}), -100 % full "
                             f"cooling ({cool}).",
            f"{zid}.Heater": f"{label}: True while a heating output of the zone ({heat}) is on."}
        plan.values |= {f"{zid}.Kp": ua.Variant(float(z.tuning.kp), ua.VariantType.Double),
                        f"{zid}.Ki": ua.Variant(float(z.tuning.ki), ua.VariantType.Double),
                        f"{zid}.Kd": ua.Variant(float(z.tuning.kd), ua.VariantType.Double)}
        for kind, outs in (("heating", z.heating_outputs), ("cooling, first stage", z.cool1_outputs),
                           ("cooling, second stage", z.cool2_outputs)):
            for o in outs:
                drivers[o].append(f"{label.lower()} ({kind})")
    for mo in MOTORS:
        mid = f"{ROOT}.Motors.{MOTOR_NODES[mo]}"
        limit, zone = lim.motor_current_a[mo], MOTOR_LIMIT_ZONE[mo]
        guard = (f"over-current trip above {limit:g} A (i_motor1 of zone {zone})" if limit > 0
                 else f"current not monitored (i_motor1 of zone {zone} is 0)")
        plan.prefixes[mid] = f"{_camel(mo)} motor"
        plan.descriptions |= {
            mid: f"{_camel(mo)} motor (output {mo}); {guard}.",
            f"{mid}.Current": f"{_camel(mo)} motor: measured current (input current_{mo}); {guard}.",
            f"{mid}.Running": f"{_camel(mo)} motor: True while the PLC commands it to run (output {mo})."}
        drivers[mo].append("the sequence (recipe's equipment flags)")
    pm = f"{ROOT}.PowerMeter"
    phases = 3 if lim.phase_count >= 3 else 1
    for i in (1, 2, 3):
        plan.descriptions[f"{pm}.VoltageL{i}"] = (
            f"Grid voltage, phase L{i} (input grid_v_l{i}); trips outside {lim.voltage_low_v:g}.."
            f"{lim.voltage_high_v:g} V, phase loss below {lim.voltage_low_v / 2:g} V." if i <= phases
            else f"Grid voltage, phase L{i} (input grid_v_l{i}); not monitored (phase_count {lim.phase_count}).")
    plan.descriptions |= {
        f"{pm}.Frequency": f"Grid frequency (input grid_freq); trips outside {lim.frequency_hz:g} ± "
                           f"{lim.frequency_tol_hz:g} Hz.",
        f"{pm}.CurrentTotal": f"Highest phase current of the machine (input current_total); trips above "
                              f"{lim.current_total_a:g} A.",
        f"{ROOT}.Safety.EstopOk": "E-stop chain healthy (input estop_ok): True while the hard-wired chain "
                                  "is closed; False trips the machine.",
        f"{ROOT}.Safety.Pedal": "Pouring pedal pressed (input pedal)."}
    for o, spec in OUTPUT_SPECS.items():
        plan.descriptions[f"{ROOT}.Outputs.{OUTPUT_NODES[o]}"] = (
            f"Output point {o}: {spec.description}; driven by {_list(drivers[o])}. True = on.")
    plan.descriptions[f"{ROOT}.Diagnostics.Scan"] = (
        f"Scan cycle timing of the PLC (scan period {program.period_s * 1000:g} ms).")
    for rid, recipe in getattr(book, "recipes", book).items():
        _recipe_plan(plan, rid, recipe, ns)
    for cid in conditions:
        ident = f"{ROOT}.Alarms.{cid}"
        plan.instances.append(_Instance(ident, ua.NodeId(f"{ROOT}.Alarms", ns), _ORGANIZES, cid, cid,
                                        condition_type(cid), condition_optionals(cid)))
        plan.descriptions[ident] = _alarm_description(cid, program)
        plan.prefixes[ident] = f"Alarm {cid}"
        for limit, value in _condition_limits(cid, program).items():
            plan.values[f"{ident}.{limit}"] = ua.Variant(float(value), ua.VariantType.Double)
    fieldbus = getattr(cfg, "fieldbus", None)
    for name in links:
        ident = f"{ROOT}.Diagnostics.Links.{name}"
        link = fieldbus.links.get(name) if fieldbus is not None else None
        where = ("" if link is None else f" ({link.host}:{link.port} over TCP)" if link.transport == "tcp"
                 else f" ({link.device} over RTU, {link.baud_rate} baud)")
        plan.instances.append(_Instance(ident, ua.NodeId(f"{ROOT}.Diagnostics.Links", ns), _ORGANIZES,
                                        name, name, "LinkDiagnosticsType"))
        plan.descriptions[ident] = f"Modbus link {name}{where}: state, counters and round-trip times."
        plan.prefixes[ident] = f"Link {name}"
    return plan


def _recipe_plan(plan: _Plan, rid: str, recipe: Any, ns: int) -> None:
    ident = f"{ROOT}.Recipes.{rid}"
    plan.instances.append(_Instance(ident, ua.NodeId(f"{ROOT}.Recipes", ns), _HAS_COMPONENT, rid, rid, "RecipeType"))
    plan.descriptions[ident] = f"Recipe {rid} of the recipe book (its display name is in Name)."
    plan.prefixes[ident] = f"Recipe {rid}"
    data = recipe.model_dump()
    for browse, attr in RECIPE_FIELDS.items():
        v = recipe_value(data, attr)
        variant = (ua.Variant(v, ua.VariantType.Boolean) if isinstance(v, bool) else
                   ua.Variant(v, ua.VariantType.String) if isinstance(v, str) else
                   ua.Variant(float(v), ua.VariantType.Double))
        plan.values[f"{ident}.{browse}"] = variant


# ---------------------------------------------------------------- alarms as Part 9 conditions

# the Optional InstanceDeclarations of the Part 9 alarm types that every condition carries
# (OPC UA Part 9 §5.7.3, §5.8.2, §5.8.10): confirmation, shelving, suppression, out of service
CONDITION_OPTIONALS = frozenset({"ConfirmedState", "Confirm", "TransitionTime", "ShelvingState",
                                 "LastTransition", "SuppressedState", "OutOfServiceState",
                                 "MaxTimeShelved"})


# descriptions of the components of a condition (OPC UA Part 9 §5.5 - §5.8, in short), by
# path below the condition; the standard model gives its declarations none
CONDITION_DESCRIPTIONS: Mapping[str, str] = MappingProxyType({
    "EventId": "Identifier of the condition's last event (Acknowledge, Confirm and AddComment take it).",
    "EventType": "Type of the condition's events (its own type).",
    "SourceNode": "The object the alarm is about (zone, motor, power meter, safety inputs, diagnostics).",
    "SourceName": "Browse name of the SourceNode.",
    "Time": "When the last change happened (the scan's time).",
    "ReceiveTime": "When the plant window received the last change from the PLC.",
    "Message": "What happened, in words: the value and the limit, in both directions.",
    "Severity": "ISA-18.2 priority as an OPC UA severity: 250 low, 500 medium, 700 high, 900 critical.",
    "ConditionClassId": "SafetyConditionClassType for a trip, ProcessConditionClassType for a process "
                        "alarm, SystemConditionClassType for the controller's own alarms.",
    "ConditionClassName": "Name of the ConditionClassId.",
    "ConditionName": "The interlock condition id (e.g. zone.pump.over_temp).",
    "BranchId": "Null: the machine keeps no branches of a condition.",
    "Retain": "True while the condition is interesting to a client: active or unacknowledged (and "
              "enabled). ConditionRefresh sends the retained conditions.",
    "EnabledState.Id": "False while the alarm is out of service (Disable); its interlock still acts.",
    "Quality.SourceTimestamp": "When the quality was last evaluated.",
    "LastSeverity.SourceTimestamp": "When the severity last changed.",
    "Comment.SourceTimestamp": "When the last comment was made.",
    "ClientUserId": "User of the last operator action on the alarm (acknowledge, comment, shelve, ...).",
    "AckedState.Id": "False while the alarm waits for an operator's acknowledgement.",
    "AckedState.TransitionTime": "When AckedState last changed.",
    "ConfirmedState.Id": "False after an acknowledgement until the operator confirms the alarm was dealt with.",
    "ConfirmedState.TransitionTime": "When ConfirmedState last changed.",
    "ActiveState.Id": "True while the process condition is present (whatever is annunciated).",
    "ActiveState.TransitionTime": "When ActiveState last changed.",
    "InputNode": "The variable the alarm watches (a zone's Temperature), null when there is none.",
    "SuppressedState.Id": "True while suppressed by design (e.g. a zone's limits while its sensor is faulty).",
    "SuppressedState.TransitionTime": "When SuppressedState last changed.",
    "OutOfServiceState.Id": "True while the alarm is disabled (out of service).",
    "OutOfServiceState.TransitionTime": "When OutOfServiceState last changed.",
    "SuppressedOrShelved": "True while suppressed or shelved: not annunciated, the interlock still acts.",
    "MaxTimeShelved": "Longest TimedShelve in ms (alarms.max_shelve_s of the configuration).",
    "ShelvingState.CurrentState": "Unshelved, TimedShelved or OneShotShelved.",
    "ShelvingState.CurrentState.Id": "NodeId of the current state of the ShelvedStateMachineType.",
    "ShelvingState.LastTransition": "The last shelving transition.",
    "ShelvingState.LastTransition.Id": "NodeId of the last shelving transition.",
    "ShelvingState.LastTransition.TransitionTime": "When the shelving state last changed.",
    "ShelvingState.UnshelveTime": "Time left (ms) until a timed shelve ends; 0 otherwise.",
    "ShelvingState.TimedShelve": "Shelve the alarm for ShelvingTime ms (technician).",
    "ShelvingState.TimedShelve.InputArguments": "ShelvingTime: Duration in ms, at most MaxTimeShelved.",
    "ShelvingState.OneShotShelve": "Shelve the alarm until it next returns to normal (technician).",
    "ShelvingState.Unshelve": "End the shelving (technician).",
    "Acknowledge.InputArguments": "EventId of the event acknowledged, and a comment.",
    "Confirm.InputArguments": "EventId of the event confirmed, and a comment.",
    "AddComment.InputArguments": "EventId of the event commented, and the comment.",
    "HighLimit": "The high limit the value is compared with (degC, or K for a deviation).",
    "LowLimit": "The low limit the value is compared with (degC, or K for a deviation).",
    "LimitState.CurrentState": "High or Low while active beyond that limit; null while inactive.",
    "LimitState.CurrentState.Id": "NodeId of the limit state.",
    "LimitState.LastTransition": "The last limit-state transition.",
    "LimitState.LastTransition.Id": "NodeId of the last limit-state transition.",
    "LimitState.LastTransition.TransitionTime": "When the limit state last changed.",
    "SetpointNode": "The zone's Setpoint, from which the deviation is measured.",
    "NormalState": "Null: the normal state of this off-normal alarm is implied by its input.",
})


def condition_type(cid: str) -> str:
    """The condition type of an interlock condition id: level alarms for a zone's over- and
    under-temperature, deviation alarms for its deviation, discrete alarms for the working
    maximum and missing heating progress, off-normal alarms for the rest."""
    parts = cid.split(".")
    if parts[0] == "zone" and len(parts) == 3:
        if parts[2] in ("over_temp", "under_temp"):
            return "TemperatureLevelAlarmType"
        if parts[2].startswith("deviation"):
            return "TemperatureDeviationAlarmType"
        if parts[2] in ("above_working_max", "no_progress"):
            return "MachineDiscreteAlarmType"
    return "MachineOffNormalAlarmType"


def condition_optionals(cid: str) -> frozenset[str]:
    """CONDITION_OPTIONALS and the limits the condition has (LimitAlarmType's HighLimit/LowLimit)."""
    extra = {"TemperatureLevelAlarmType": {"HighLimit"} if cid.endswith("over_temp") else {"LowLimit"},
             "TemperatureDeviationAlarmType": {"HighLimit", "LowLimit"}}.get(condition_type(cid), set())
    return CONDITION_OPTIONALS | extra


def _condition_limits(cid: str, p: Program) -> dict[str, float]:
    """HighLimit / LowLimit of a limit alarm, from the configuration (°C, or K for a deviation)."""
    parts, lim = cid.split("."), p.limits
    if parts[0] != "zone" or len(parts) != 3 or parts[1] not in ZONES:
        return {}
    z = p.zone(parts[1])
    if parts[2] == "over_temp":
        return {"HighLimit": min(z.max_temp_c, lim.abs_max_c)}
    if parts[2] == "under_temp":
        return {"LowLimit": max(z.min_temp_c, lim.abs_min_c)}
    k = {"deviation_warning": lim.warning_k, "deviation_error": lim.error_k}.get(parts[2])
    return {} if k is None else {"HighLimit": k, "LowLimit": -k}


def condition_source(cid: str) -> str:
    """Browse path below the machine of the object a condition is about (its SourceNode)."""
    parts = cid.split(".")
    if parts[0] == "zone" and len(parts) > 1 and parts[1] in ZONE_NODES:
        return f"Zones.{ZONE_NODES[parts[1]]}"
    if parts[0] == "motor" and len(parts) > 1 and parts[1] in MOTOR_NODES:
        return f"Motors.{MOTOR_NODES[parts[1]]}"
    if parts[0] == "grid":
        return "PowerMeter"
    if cid == "estop":
        return "Safety"
    if cid == "plc.watchdog":
        return "Diagnostics.Scan"
    return "Diagnostics"


def _alarm_description(cid: str, p: Program) -> str:
    lim = p.limits
    parts = cid.split(".")
    delay = f"for {lim.alarm_delay_s:g} s"
    if cid == "estop":
        return "Alarm estop: the hard-wired e-stop chain is open, or its input is not good. Trip."
    if cid == "plc.watchdog":
        return "Alarm plc.watchdog: the scan watchdog fired (too many overruns in a row, or one overlong cycle). Trip."
    if cid == "io.uncertain":
        return "Alarm io.uncertain: an input has uncertain quality (its value is stale)."
    if len(parts) == 3 and parts[0] == "zone" and parts[1] in ZONES:
        z = p.zone(parts[1])
        label = _zone_label(z.name, z.number)
        text = {
            "sensor": f"sensor fault: input bad, reading above {lim.sensor_high_c:g} °C (open) or below "
                      f"{lim.sensor_low_c:g} °C (shorted), or unchanged for {lim.stuck_s:g} s while driven "
                      "hard (stuck). Trip",
            "over_temp": f"over-temperature, above {min(z.max_temp_c, lim.abs_max_c):g} °C. Trip",
            "under_temp": f"under-temperature, below {max(z.min_temp_c, lim.abs_min_c):g} °C. Trip",
            "deviation_warning": f"deviation from the goal above {lim.warning_k:g} K {delay} once the zone "
                                 "has reached it",
            "deviation_error": f"deviation from the goal above {lim.error_k:g} K {delay} once the zone has "
                               "reached it; pouring is withheld while active",
            "above_working_max": "above the recipe's working maximum once tempered; the zone's heater is "
                                 "forced off",
            "no_progress": f"heating at full output for {getattr(lim, 'no_progress_s', 0):g} s without the "
                           f"temperature rising by {getattr(lim, 'no_progress_k', 0):g} K (heater or element "
                           "failure)",
        }.get(parts[2])
        if text:
            return f"Alarm {cid}: {label}: {text}."
    if len(parts) == 3 and parts[0] == "motor" and parts[2] == "over_current" and parts[1] in MOTORS:
        return (f"Alarm {cid}: {parts[1]} motor current above {lim.motor_current_a[parts[1]]:g} A {delay}, "
                "or its input bad. Trip.")
    grid = {
        "grid.current": f"highest phase current above {lim.current_total_a:g} A {delay}. Trip",
        "grid.phase_loss": f"a monitored phase below {lim.voltage_low_v / 2:g} V (half the low limit). Trip",
        "grid.voltage": f"a phase outside {lim.voltage_low_v:g}..{lim.voltage_high_v:g} V {delay}, or the "
                        "grid inputs bad. Trip",
        "grid.frequency": f"frequency outside {lim.frequency_hz:g} ± {lim.frequency_tol_hz:g} Hz {delay}. Trip",
    }.get(cid)
    return f"Alarm {cid}: grid: {grid}." if grid else f"Alarm {cid}."


# --------------------------------------------------------------------------- the fast builder


@contextmanager
def _collector_paused():
    """A bulk build allocates some 15 objects per attribute and node, none of them cyclic
    garbage; left on, the cyclic collector walks the whole (large) address space again and
    again while it grows, which triples the build time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Template:
    """One InstanceDeclaration (or the type itself, at the root), read once."""
    __slots__ = ("browse_name", "bname_dv", "nclass", "nclass_dv", "ref_type", "type_def",
                 "type_ref", "static", "description", "display", "description_dv", "display_dv",
                 "value", "is_property", "children")

    def __init__(self) -> None:
        self.children: list[_Template] = []


class _Builder:
    """Copies templates of the types into the server's address space, without per-node service
    calls: each node is a NodeData with its attributes and both directions of its references,
    as asyncua's NodeManagementService would make them."""

    def __init__(self, server: Server, types_ns: int):
        self.aspace = server.iserver.aspace
        self.types_ns = types_ns
        self._templates: dict[tuple[str, frozenset[str]], _Template] = {}

    def template(self, type_name: str, optionals: frozenset[str] = frozenset()) -> _Template:
        tpl = self._templates.get((type_name, optionals))
        if tpl is None:
            type_id = ua.NodeId(TYPE_IDS[type_name], self.types_ns)
            tpl = self._read(type_id, ua.NodeClass.Object, None, optionals)
            self._templates[(type_name, optionals)] = tpl
        return tpl

    def _attr(self, nd: NodeData, attr: ua.AttributeIds) -> Any:
        av = nd.attributes.get(attr)
        return None if av is None or av.value is None or av.value.Value is None else av.value.Value.Value

    def _read(self, nodeid: ua.NodeId, nclass: ua.NodeClass, ref_type: ua.NodeId | None,
              optionals: frozenset[str] = frozenset()) -> _Template:
        nd = self.aspace[nodeid]
        t = _Template()
        t.browse_name = self._attr(nd, _A.BrowseName)
        t.bname_dv = ua.DataValue(ua.Variant(t.browse_name, ua.VariantType.QualifiedName))
        t.nclass = nclass
        t.nclass_dv = ua.DataValue(ua.Variant(nclass, ua.VariantType.Int32))
        t.ref_type = ref_type
        t.static = [(a, nd.attributes[a].value) for a in _COPIED[nclass]
                    if a in nd.attributes and a not in (_A.Description, _A.DisplayName)]
        if nclass is ua.NodeClass.Object:
            t.static.append((_A.EventNotifier, ua.DataValue(ua.Variant(0, ua.VariantType.Byte))))
        t.description = self._attr(nd, _A.Description) or ua.LocalizedText()
        t.display = self._attr(nd, _A.DisplayName) or ua.LocalizedText(t.browse_name.Name)
        t.description_dv = ua.DataValue(ua.Variant(t.description, ua.VariantType.LocalizedText))
        t.display_dv = ua.DataValue(ua.Variant(t.display, ua.VariantType.LocalizedText))
        t.type_def, t.type_ref = None, None
        if nclass is not ua.NodeClass.Object or ref_type is not None:   # a declaration
            for r in nd.references:
                if r.IsForward and r.ReferenceTypeId == _HAS_TYPE_DEFINITION:
                    t.type_def = r.NodeId
        else:                                                          # the type itself
            t.type_def = nodeid
        if t.type_def is not None:
            td = self.aspace[t.type_def]
            t.type_ref = (self._attr(td, _A.BrowseName), self._attr(td, _A.DisplayName),
                          self._attr(td, _A.NodeClass))
        t.is_property = ref_type == _HAS_PROPERTY
        t.value = nd.attributes[_A.Value].value.Value if nclass is ua.NodeClass.Variable else None
        # the components: of the node itself, and (for a type) those its supertypes add
        seen: set[str] = set()
        for source in self._with_supertypes(nodeid, nclass, ref_type):
            for r in self.aspace[source].references:
                if not r.IsForward or r.ReferenceTypeId not in _CHILD_REFS:
                    continue
                child = self.aspace.get(r.NodeId)
                if child is None or r.BrowseName.Name in seen or not self._instantiated(
                        child, r.BrowseName.Name in optionals):
                    continue
                seen.add(r.BrowseName.Name)
                t.children.append(self._read(r.NodeId, r.NodeClass, r.ReferenceTypeId, optionals))
        return t

    def _with_supertypes(self, nodeid: ua.NodeId, nclass: ua.NodeClass, ref_type) -> list[ua.NodeId]:
        if ref_type is not None:
            return [nodeid]
        chain = [nodeid]
        while True:   # up the HasSubtype chain; BaseObjectType itself adds nothing (asyncua skips it)
            parent = next((r.NodeId for r in self.aspace[chain[-1]].references
                           if not r.IsForward and r.ReferenceTypeId == ua.NodeId(ua.ObjectIds.HasSubtype)), None)
            if parent is None or parent == ua.NodeId(ua.ObjectIds.BaseObjectType):
                return chain
            chain.append(parent)

    @staticmethod
    def _instantiated(nd: NodeData, optional_wanted: bool = False) -> bool:
        rules = [r.NodeId for r in nd.references if r.IsForward and r.ReferenceTypeId == _HAS_MODELLING_RULE]
        return bool(rules) and (rules[0] not in _NOT_INSTANTIATED or (
            optional_wanted and rules[0] == _NOT_INSTANTIATED[0]))

    def build(self, plan: _Plan, ns: int) -> None:
        now = datetime.now(timezone.utc)
        waiting = ua.DataValue(ua.Variant(None, ua.VariantType.Null), _WAITING, now, now)
        shared: dict[int, ua.DataValue] = {}   # one value DataValue per property template
        for inst in plan.instances:
            nid = ua.NodeId(inst.ident, ns)
            if nid in self.aspace:
                raise ValueError(f"{inst.ident}: already in the address space (namespace {ns})")
            tpl = self.template(inst.type_name, inst.optionals)
            parent = self.aspace[inst.parent]
            self._node(tpl, inst.ident, ns, parent, inst.ref_type, ua.QualifiedName(inst.browse_name, ns),
                       ua.LocalizedText(inst.display_name), plan, None, now, waiting, shared)

    def _node(self, t: _Template, ident: str, ns: int, parent: NodeData, ref_type: ua.NodeId,
              bname: ua.QualifiedName | None, display: ua.LocalizedText | None, plan: _Plan,
              prefix: str | None, now: datetime, waiting: ua.DataValue, shared: dict) -> NodeData:
        nid = ua.NodeId(ident, ns)
        nd = NodeData(nid)
        attrs = nd.attributes
        attrs[_A.NodeId] = AttributeValue(ua.DataValue(ua.Variant(nid, ua.VariantType.NodeId)))
        if bname is None:
            bname, bname_dv = t.browse_name, t.bname_dv
        else:
            bname_dv = ua.DataValue(ua.Variant(bname, ua.VariantType.QualifiedName))
        attrs[_A.BrowseName] = AttributeValue(bname_dv)
        attrs[_A.NodeClass] = AttributeValue(t.nclass_dv)
        for a, dv in t.static:
            attrs[a] = AttributeValue(dv)
        if display is None:
            display = t.display
            attrs[_A.DisplayName] = AttributeValue(t.display_dv)
        else:
            attrs[_A.DisplayName] = AttributeValue(ua.DataValue(ua.Variant(display, ua.VariantType.LocalizedText)))
        text = plan.descriptions.get(ident)
        if text is None and prefix is not None and not t.is_property:
            text = f"{prefix}: {t.description.Text}"
        attrs[_A.Description] = AttributeValue(t.description_dv if text is None else ua.DataValue(
            ua.Variant(ua.LocalizedText(text), ua.VariantType.LocalizedText)))
        if t.nclass is ua.NodeClass.Variable:
            value = plan.values.get(ident)
            if value is not None:
                dv = ua.DataValue(value, SourceTimestamp=now, ServerTimestamp=now)
            elif t.is_property:
                dv = shared.get(id(t))
                if dv is None:
                    dv = shared[id(t)] = ua.DataValue(t.value, SourceTimestamp=now, ServerTimestamp=now)
            else:
                dv = waiting
            attrs[_A.Value] = AttributeValue(dv)
        self.aspace[nid] = nd
        type_def = t.type_def if t.type_def is not None else ua.ExpandedNodeId()
        parent.references.append(ua.ReferenceDescription(
            ReferenceTypeId=ref_type, IsForward=True, NodeId=nid, BrowseName=bname, DisplayName=display,
            NodeClass=t.nclass, TypeDefinition=type_def))
        pclass = parent.attributes[_A.NodeClass].value.Value.Value
        nd.references.append(ua.ReferenceDescription(
            ReferenceTypeId=ref_type, IsForward=False, NodeId=parent.nodeid,
            BrowseName=parent.attributes[_A.BrowseName].value.Value.Value,
            DisplayName=parent.attributes[_A.DisplayName].value.Value.Value, NodeClass=pclass,
            TypeDefinition=self._type_of(parent) if pclass in (ua.NodeClass.Object, ua.NodeClass.Variable)
            else ua.ExpandedNodeId()))
        if t.type_def is not None:
            tb, tdn, tcl = t.type_ref
            nd.references.append(ua.ReferenceDescription(
                ReferenceTypeId=_HAS_TYPE_DEFINITION, IsForward=True, NodeId=t.type_def, BrowseName=tb,
                DisplayName=tdn, NodeClass=tcl))
        child_prefix = plan.prefixes.get(ident)
        for c in t.children:
            self._node(c, f"{ident}.{c.browse_name.Name}", ns, nd, c.ref_type, None, None, plan,
                       child_prefix, now, waiting, shared)
        return nd

    @staticmethod
    def _type_of(nd: NodeData) -> ua.NodeId | ua.ExpandedNodeId:
        for r in nd.references:
            if r.IsForward and r.ReferenceTypeId == _HAS_TYPE_DEFINITION:
                return r.NodeId
        return ua.ExpandedNodeId()


def _paths(t: _Template, prefix: str = "") -> Iterable[str]:
    """Browse paths ("ActiveState.Id") of every node below a template."""
    for c in t.children:
        path = f"{prefix}{c.browse_name.Name}"
        yield path
        yield from _paths(c, path + ".")


# --------------------------------------------------------------------------- the naive builder


async def _build_naive(server: Server, plan: _Plan, ns: int, types_ns: int) -> None:
    """The same address space through asyncua's session API, node by node (the reference)."""
    now = datetime.now(timezone.utc)
    for inst in (i for i in plan.instances if not i.optionals):
        await instantiate(server.get_node(inst.parent), server.get_node(ua.NodeId(TYPE_IDS[inst.type_name], types_ns)),
                          nodeid=ua.NodeId(inst.ident, ns), bname=ua.QualifiedName(inst.browse_name, ns),
                          dname=ua.LocalizedText(inst.display_name), instantiate_optional=False)
    # asyncua's instantiation takes every Optional declaration or none: the conditions, which
    # carry a chosen few (CONDITION_OPTIONALS), are copied from the templates in both builders
    conditions = [i for i in plan.instances if i.optionals]
    _Builder(server, types_ns).build(_Plan(conditions, plan.descriptions, plan.prefixes, plan.values), ns)
    copied = {i.ident for i in conditions}
    for ident, prefix in plan.prefixes.items():
        if ident in copied:
            continue
        for child in await server.get_node(ua.NodeId(ident, ns)).get_children():
            if (child.nodeid.Identifier not in plan.descriptions
                    and await child.read_type_definition() != _PROPERTY_TYPE):
                text = (await child.read_description()).Text
                await child.write_attribute(_A.Description, ua.DataValue(ua.Variant(
                    ua.LocalizedText(f"{prefix}: {text}"), ua.VariantType.LocalizedText)))
    for ident, text in plan.descriptions.items():
        await server.get_node(ua.NodeId(ident, ns)).write_attribute(_A.Description, ua.DataValue(
            ua.Variant(ua.LocalizedText(text), ua.VariantType.LocalizedText)))
    for ident, variant in plan.values.items():
        await server.write_attribute_value(ua.NodeId(ident, ns), ua.DataValue(
            variant, SourceTimestamp=now, ServerTimestamp=now))
    for nid in [n for n in server.iserver.aspace.keys() if n.NamespaceIndex == ns]:
        node = server.get_node(nid)
        if (await node.read_node_class() is ua.NodeClass.Variable and nid.Identifier not in plan.values
                and await node.read_type_definition() != _PROPERTY_TYPE):
            await server.write_attribute_value(nid, ua.DataValue(
                ua.Variant(None, ua.VariantType.Null), _WAITING, now, now))


# --------------------------------------------------------------------------- the machine


async def build_machine(server: Server, cfg: Any, book: Any, condition_ids: Sequence[str],
                        link_names: Sequence[str], *, naive: bool = False) -> MachineNodes:
    """Build the machine's address space in ``server`` (initialised; started or not) from the
    machine configuration, its recipe book (plc.config.RecipeBook or a mapping id -> Recipe),
    the interlock condition ids (``plc.interlocks.condition_ids``) and the Modbus link names.
    ``naive`` builds node by node through the session API instead of copying templates."""
    types_ns = await load_types(server)
    ns = await server.register_namespace(MACHINE_URI_PREFIX + cfg.machine.id)
    if ua.NodeId(ROOT, ns) in server.iserver.aspace:
        raise ValueError(f"machine {cfg.machine.id} is already in the address space")
    plan = _machine_plan(cfg, Program.from_config(cfg, book), book, condition_ids, link_names, ns)
    builder = _Builder(server, types_ns)
    for inst in (i for i in plan.instances if i.optionals):     # the conditions' components
        for rest in _paths(builder.template(inst.type_name, inst.optionals)):
            text = CONDITION_DESCRIPTIONS.get(rest)
            if text is not None:
                plan.descriptions.setdefault(f"{inst.ident}.{rest}", f"Alarm {inst.browse_name}: {text}")
    if naive:
        await _build_naive(server, plan, ns, types_ns)
    with _collector_paused():
        if not naive:
            builder.build(plan, ns)
        await server.write_attribute_value(ua.NodeId(ROOT, ns), ua.DataValue(
            ua.Variant(ua.EventNotifier.SubscribeToEvents.mask, ua.VariantType.Byte)), _A.EventNotifier)
        node = server.get_node
        nodes = MachineNodes(
            machine=node(ua.NodeId(ROOT, ns)), namespace_index=ns, types_namespace_index=types_ns,
            points={}, zones={}, autotune={}, motors={}, sequencer={},
            recipes_folder=node(ua.NodeId(f"{ROOT}.Recipes", ns)), recipes={},
            alarms_folder=node(ua.NodeId(f"{ROOT}.Alarms", ns)), conditions={}, alarms_summary={},
            alarm_performance={}, batches={}, diagnostics={}, methods={}, objects={}, writable={}, variant_types={}, _builder=builder)
        _index(server, nodes, ua.NodeId(ROOT, ns), ())
    return nodes


async def add_recipe_nodes(server: Server, nodes: MachineNodes, recipe_id: str, recipe: Any) -> dict[str, Node]:
    """Add a RecipeType object for a new recipe (plc.config.Recipe); return its variables."""
    if recipe_id in nodes.recipes:
        raise ValueError(f"recipe {recipe_id!r} already has nodes")
    plan = _Plan()
    _recipe_plan(plan, recipe_id, recipe, nodes.namespace_index)
    if nodes._builder is None:
        nodes._builder = _Builder(server, nodes.types_namespace_index)
    nodes._builder.build(plan, nodes.namespace_index)
    _index(server, nodes, ua.NodeId(plan.instances[0].ident, nodes.namespace_index), ("Recipes", recipe_id))
    return nodes.recipes[recipe_id]


async def remove_recipe_nodes(server: Server, nodes: MachineNodes, recipe_id: str) -> None:
    """Remove a recipe's object and everything below it."""
    if recipe_id not in nodes.recipes:
        raise KeyError(recipe_id)
    aspace = server.iserver.aspace
    root = ua.NodeId(f"{ROOT}.Recipes.{recipe_id}", nodes.namespace_index)
    doomed = [nid for nid, _ in walk(aspace, root, ())]
    # the only reference from outside the subtree is the recipe book's; the rest goes with the nodes
    book = aspace[nodes.recipes_folder.nodeid]
    book.references[:] = [r for r in book.references if r.NodeId != root]
    server.iserver.node_mgt_service.delete_nodes(ua.DeleteNodesParameters(NodesToDelete=[
        ua.DeleteNodesItem(NodeId=nid, DeleteTargetReferences=False) for nid in reversed(doomed)]))
    del nodes.recipes[recipe_id]
    prefix = f"Recipes.{recipe_id}"
    for key in [k for k in nodes.objects if k == prefix or k.startswith(prefix + ".")]:
        del nodes.objects[key]
    for nid in doomed:
        nodes.writable.pop(nid, None)
        nodes.variant_types.pop(nid, None)


def walk(aspace: Any, nid: ua.NodeId, path: tuple[str, ...]):
    """(nodeid, path) of a node and every node below it in its namespace, parents first."""
    stack = [(nid, path)]
    while stack:
        nid, path = stack.pop()
        yield nid, path
        for r in reversed(aspace[nid].references):
            if r.IsForward and r.ReferenceTypeId in _CHILD_REFS and r.NodeId.NamespaceIndex == nid.NamespaceIndex:
                stack.append((r.NodeId, path + (r.BrowseName.Name,)))


_BUILTIN_VARIANT_TYPES = {vt.value: vt for vt in ua.VariantType if 0 < vt.value <= 25}


def _variant_type(dtype: ua.NodeId) -> ua.VariantType | None:
    """How a value of this DataType is encoded: the built-in type, Int32 for our enumerations
    (PhaseEnum), ExtensionObject for a structure; None for BaseDataType."""
    if dtype.NamespaceIndex != 0:
        return ua.VariantType.Int32
    if dtype.Identifier == ua.ObjectIds.BaseDataType:
        return None
    return _BUILTIN_VARIANT_TYPES.get(dtype.Identifier, ua.VariantType.ExtensionObject)


def _index(server: Server, nodes: MachineNodes, start: ua.NodeId, start_path: tuple[str, ...]) -> None:
    """Fill ``nodes`` with the subtree at ``start`` (the machine, or one new recipe)."""
    aspace = server.iserver.aspace
    by_path: dict[tuple[str, ...], Node] = {}
    children: dict[tuple[str, ...], list[tuple[str, Node, ua.NodeClass]]] = {}
    for nid, path in walk(aspace, start, start_path):
        nd = aspace[nid]
        nclass = nd.attributes[_A.NodeClass].value.Value.Value
        node = by_path[path] = server.get_node(nid)
        children.setdefault(path[:-1], []).append((path[-1] if path else "", node, nclass))
        if nclass is ua.NodeClass.Object and path:
            nodes.objects[".".join(path)] = node
        if nclass is not ua.NodeClass.Variable:
            continue
        vt = _variant_type(nd.attributes[_A.DataType].value.Value.Value)
        if vt is not None:
            nodes.variant_types[nid] = vt
        if nd.attributes[_A.AccessLevel].value.Value.Value & ua.AccessLevel.CurrentWrite.mask:
            kind = {"Zones": "zone", "Recipes": "recipe"}.get(path[0], "other")
            key = next((z for z, n in ZONE_NODES.items() if n == path[1]), path[1])
            nodes.writable[nid] = Writable(kind, key, path[-1], WRITE_ROLES.get(kind, "admin"))

    def below(*path: str, nclass: ua.NodeClass | None = None) -> dict[str, Node]:
        return {name: n for name, n, c in children.get(path, ()) if nclass is None or c is nclass}

    if start_path:                                           # one recipe
        nodes.recipes[start_path[1]] = below(*start_path)
        return
    nodes.points.update({p: by_path[tuple(path.split("."))] for p, path in POINT_PATHS.items()})
    nodes.zones.update({z: below("Zones", n, nclass=ua.NodeClass.Variable) for z, n in ZONE_NODES.items()})
    nodes.autotune.update({z: below("Zones", n, "Autotune") for z, n in ZONE_NODES.items()})
    nodes.motors.update({m: below("Motors", n) for m, n in MOTOR_NODES.items()})
    nodes.sequencer.update(below("Sequencer"))
    nodes.recipes.update({rid: below("Recipes", rid) for rid in below("Recipes", nclass=ua.NodeClass.Object)})
    nodes.conditions.update({cid: n for cid, n in below("Alarms", nclass=ua.NodeClass.Object).items()
                             if cid != "Performance"})
    nodes.alarms_summary.update(below("Alarms", nclass=ua.NodeClass.Variable))
    nodes.alarm_performance.update(below("Alarms", "Performance"))
    for group in ("Scan", "Historian"):
        nodes.diagnostics.update({f"{group}.{k}": v for k, v in below("Diagnostics", group).items()})
    for link in below("Diagnostics", "Links"):
        nodes.diagnostics.update({f"Links.{link}.{k}": v for k, v in below("Diagnostics", "Links", link).items()})
    nodes.diagnostics.update(below("Diagnostics", nclass=ua.NodeClass.Variable))
    for part in ("Current", "Last"):
        nodes.batches.update({f"{part}.{k}": v for k, v in below("Batches", part).items()})
    for owner in ("Sequencer", "Recipes", "Batches"):
        nodes.methods.update(below(owner, nclass=ua.NodeClass.Method))


# --------------------------------------------------------------------------- export


async def export_nodeset(server: Server, path: str | Path) -> None:
    """Write every node of the machine namespaces (urn:open-tempering:machine:*) as a NodeSet2
    file, with values, and a Models entry that requires the types model; the file replaces
    ``path`` atomically. A server that has loaded the types (load_types) imports it back."""
    uris = await server.get_namespace_array()
    machine_ns = {i for i, uri in enumerate(uris) if uri.startswith(MACHINE_URI_PREFIX)}
    nodes = [server.get_node(nid) for nid in list(server.iserver.aspace.keys())
             if nid.NamespaceIndex in machine_ns]
    log = logging.getLogger(xmlexporter.__name__)
    level = log.level
    log.setLevel(logging.ERROR)   # it warns that exporting values is "limited": ours are plain
    try:
        exporter = xmlexporter.XmlExporter(server, export_values=True)
    finally:
        log.setLevel(level)
    await exporter.build_etree(nodes)
    root = exporter.etree.getroot()
    await _fix_extension_object_type_ids(server, root)
    root.insert(1, _models_element([uris[i] for i in sorted(machine_ns)]))
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        await exporter.write_xml(tmp)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def _models_element(machine_uris: list[str]) -> Et.Element:
    ns = {"n": "http://opcfoundation.org/UA/2011/03/UANodeSet.xsd"}
    types_model = Et.parse(TYPES_NODESET).getroot().find("n:Models/n:Model", ns)
    assert types_model is not None
    models = Et.Element("Models")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for uri in machine_uris:
        model = Et.SubElement(models, "Model", ModelUri=uri, Version=types_model.get("Version", ""),
                              PublicationDate=date)
        for required in types_model.findall("n:RequiredModel", ns):
            Et.SubElement(model, "RequiredModel", dict(required.attrib))
        Et.SubElement(model, "RequiredModel", ModelUri=TYPES_URI, Version=types_model.get("Version", ""),
                      PublicationDate=types_model.get("PublicationDate", ""))
    return models


async def _fix_extension_object_type_ids(server: Server, root: Et.Element) -> None:
    """asyncua's exporter names an ExtensionObject by its DataType; Part 6 §5.3.1.16 wants the
    DataType's "Default XML" encoding NodeId, which the importers of other stacks look up."""
    uax = "{http://opcfoundation.org/UA/2008/02/Types.xsd}"
    encodings: dict[str, str] = {}
    for type_id in root.iter(f"{uax}TypeId"):
        ident = type_id.find(f"{uax}Identifier")
        if ident is None or not ident.text:
            continue
        text = ident.text
        if text not in encodings:
            encodings[text] = text
            dtype = ua.NodeId.from_string(text)
            nd = server.iserver.aspace.get(dtype) if dtype.NamespaceIndex == 0 else None
            for r in nd.references if nd is not None else ():
                if (r.IsForward and r.ReferenceTypeId == ua.NodeId(ua.ObjectIds.HasEncoding)
                        and r.BrowseName.Name == "Default XML"):
                    encodings[text] = r.NodeId.to_string()
        ident.text = encodings[text]
