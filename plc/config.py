"""Typed, validated configuration of the machine and its recipes.

One job: turn ``config/tempering-machine.yaml``, ``config/recipes.yaml`` and the register
map (``config/register-map.yaml``) into frozen, validated models, or refuse with messages that name the file, the field and the value.
Config is validated once, at start-up; the scan core receives these models (or core types
built from them) and never sees YAML.

Rules
- Every model is ``frozen=True, extra="forbid"``: an unknown or misspelt field is an error.
- Numbers are numbers: a string such as ``"1.5"`` or ``yes`` is a type error, never coerced.
  Integers are accepted where a float is expected (``pump_delay: 60``); booleans are not.
- Booleans are YAML ``true``/``false`` or the legacy ``1``/``0`` (seed 001).
- YAML is read with the YAML 1.2 core schema for scalars: only ``true``/``false`` are
  booleans (``yes``, ``no``, ``on``, ``off`` stay strings and are then rejected), ``010`` is
  ten, ``1e3`` is a float. Duplicate keys are an error.
- Units are in field comments of the YAML file: degC and K for temperatures, s for delays,
  ms for ``sending_interval``/``period_ms``, A, V, Hz for the electrical limits.

Errors
    ConfigError(Exception)   -- the only exception the loaders raise for bad input.
        .path      the file at fault (for cross-file checks: the machine file)
        .messages  one line per problem, all problems of the file at once:
                   ``<file>: <dotted.path>: <message> (got <value>)``
                   ``<file>:<line>:<col>: <problem>`` for YAML syntax errors;
                   an entry of a list is named: ``points[3] (temp_pump).bits``.
    Cross-field checks that span sections (zone limits against ``machine_config``) run once
    every section on its own is valid; checks inside one section always run with the rest.

Loaders
    load_machine_config(path, model=MachineConfig) -> MachineConfig
    load_recipes(path) -> RecipeBook
    load_all(path, model=MachineConfig) -> (MachineConfig, RecipeBook)
    The machinery they share (strict types, YAML 1.2 reading, messages) is in
    ``plc.configbase``; the ``fieldbus`` models are in ``plc.modbus.regmap``; the zones and
    outputs named here come from the I/O contract, ``plc.contract``.

Field I/O: the optional ``fieldbus:`` section (``plc.modbus.regmap.FieldbusSettings``) names
the Modbus links and the register map, either inline (``points``) or as ``map_file``, a file
relative to the machine file. ``load_machine_config`` validates the section alone;
``load_all`` also loads the map file and checks the whole map against the links and the PLC's
I/O contract (``plc.contract.INPUT_SPECS`` / ``OUTPUT_SPECS``: every point mapped exactly
once, with a matching direction and type); it returns the config with ``fieldbus.points``
filled in, so the application reads the points in one place whichever way they were given.
Problems of the map file are reported against that file (``<map>: points[i] (name).field``).

Optional sections: a top-level ``twin:`` section belongs to the simulated machine, whose
configuration model lives outside ``plc`` (``plc`` never imports ``twin``). The application
passes a subclass of MachineConfig that declares a ``twin`` field; with a model that has no
``twin`` field the loader drops the section before validation, so the PLC alone accepts a
machine file that carries one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import BeforeValidator, Field, field_validator, model_validator

# The shared machinery lives in plc.configbase (plc.modbus.regmap uses it too); it is
# re-exported here, where the file format is documented.
from .configbase import (  # noqa: F401
    _NOTHING,
    SLUG_PATTERN,
    ConfigError,
    Flag,
    Int,
    Number,
    Slug,
    Text,
    _exact_int,
    _flag,
    _Frozen,
    _line,
    _messages,
    _path,
    _Problems,
    _problems,
    _raise_if,
    _Raw,
    _read_mapping,
    _relation,
    _show,
    _validate,
)
from .contract import ZONE_NUMBERS, ZONE_OUTPUTS, ZONES
from .modbus.regmap import FieldbusSettings, load_register_map

__all__ = [
    "AcceptanceCriteria",
    "ConfigError",
    "ErrorSettings",
    "MachineConfig",
    "MachineParams",
    "MachineSection",
    "OPTIONAL_SECTIONS",
    "OutputName",
    "Recipe",
    "RecipeBook",
    "ScanSettings",
    "SLUG_PATTERN",
    "SystemSettings",
    "ZONE_NAMES",
    "ZONE_NUMBERS",
    "ZONE_OUTPUTS",
    "ZoneConfig",
    "ZoneName",
    "load_all",
    "load_machine_config",
    "load_recipes",
]

# --------------------------------------------------------------------------- domain constants

# ZONE_NUMBERS (zone name -> number, seed 001) and ZONE_OUTPUTS (the outputs a zone may drive)
# are the I/O contract's (plc.contract), exported here with the file format they validate.
#: Zone names in zone-number order.
ZONE_NAMES: tuple[str, ...] = ZONES
#: Top-level sections owned by components outside ``plc``; dropped unless the model declares them.
OPTIONAL_SECTIONS: tuple[str, ...] = ("twin", "historian", "opcua", "monitoring")
# The literals are built from the contract, so a zone or output added there is accepted here.
ZoneName = Literal[ZONES]  # type: ignore[valid-type]
OutputName = Literal[ZONE_OUTPUTS]  # type: ignore[valid-type]

Outputs = tuple[OutputName, ...]


# --------------------------------------------------------------------------- machine file


class MachineSection(_Frozen):
    """``machine``: identity and the files that go with this machine."""

    id: Text
    name: Text
    state_file: Text                  # relative to the working directory (or work_dir)
    recipes_file: Text                # relative to the machine file
    default_recipe: Slug              # must exist in the recipes file (checked by load_all)
    #: The directory the machine's run-time paths are relative to (state_file, and in the
    #: application's sections opcua.data_dir, historian.spool_dir, historian.sink.path),
    #: itself relative to the machine file; None: the working directory. ``"."`` keeps a
    #: machine's data next to its file (a migrated or restored machine directory).
    work_dir: Text | None = None


class MachineParams(_Frozen):
    """``machine_config`` (Machine.csv record 1). Temperatures in degC, margins in K, delays in s."""

    tank_max_heat: Number             # highest set-point any tank zone may get
    pump_max_heat: Number             # highest set-point of the pump zone
    pump_min_heat: Number             # the pump never runs below this (solid chocolate)
    abs_max_heat: Number              # absolute over-temperature trip, any zone
    abs_min_heat: Number              # absolute under-temperature trip, any zone
    pre_heating_temp: Annotated[Number, Field(ge=0)]   # K above pump_min_heat to start the pump
    pump_delay: Annotated[Number, Field(ge=0)]
    mixer_delay: Annotated[Number, Field(ge=0)]
    heating_delay: Annotated[Number, Field(ge=0)]
    cooling_delay: Annotated[Number, Field(ge=0)]
    pouring_delay: Annotated[Number, Field(ge=0)]
    set_temp1: Number                 # set-point offsets per zone, K
    set_temp2: Number
    set_temp3: Number
    set_temp4: Number
    phase_tolerance: Annotated[Number, Field(gt=0)]     # K band of "at goal"
    # the phase goals' own ramps (K/min, 0 = a step): how fast cooling brings the goal down
    # from the heating goal, and how gently pouring re-heats from the cooling goal
    cooling_ramp_k_per_min: Annotated[Number, Field(ge=0)] = 0.0
    reheat_ramp_k_per_min: Annotated[Number, Field(ge=0)] = 1.0

    @model_validator(mode="after")
    def _limits(self) -> MachineParams:
        _raise_if(_relation([
            ("abs_min_heat", "<", "abs_max_heat", self.abs_min_heat, self.abs_max_heat),
            ("pump_min_heat", "<", "pump_max_heat", self.pump_min_heat, self.pump_max_heat),
            ("tank_max_heat", "<=", "abs_max_heat", self.tank_max_heat, self.abs_max_heat),
            ("pump_max_heat", "<=", "abs_max_heat", self.pump_max_heat, self.abs_max_heat),
        ]))
        return self


class SystemSettings(_Frozen):
    """``system`` (Screen.csv record 1): serial link, scan interval, deviation limits (K)."""

    serial_port: Text
    baud_rate: Annotated[Int, Field(gt=0)]
    parity: Literal["none", "odd", "even"]
    stop_bits: Annotated[Literal[1, 2], BeforeValidator(_exact_int)]
    sending_interval: Annotated[Int, Field(ge=1, le=10000)]    # ms
    warning_limit: Annotated[Number, Field(gt=0)]              # K
    error_limit: Annotated[Number, Field(gt=0)]                # K

    @model_validator(mode="after")
    def _limits(self) -> SystemSettings:
        _raise_if(_relation([
            ("warning_limit", "<", "error_limit", self.warning_limit, self.error_limit),
        ]))
        return self


class ErrorSettings(_Frozen):
    """``error_settings`` (ErrorSettings.csv record 1): grid, current and sensor limits."""

    grid_frequency: Annotated[Number, Field(gt=0)]             # Hz
    frequency_tolerance: Annotated[Number, Field(gt=0)]        # Hz
    phase_count: Annotated[Literal[1, 3], BeforeValidator(_exact_int)]
    voltage_high_limit: Annotated[Number, Field(gt=0)]         # V per phase
    voltage_low_limit: Annotated[Number, Field(gt=0)]          # V per phase
    current_high_limit: Annotated[Number, Field(gt=0)]         # A total
    temperature_high_limit: Number                             # degC, sensor plausibility
    temperature_low_limit: Number                              # degC, sensor plausibility
    stuck_sensor_s: Annotated[Number, Field(gt=0)]
    alarm_delay_s: Annotated[Number, Field(ge=0)]
    # heater or element failure: a zone heated at full output for no_progress_s without its
    # temperature rising by no_progress_k (longer than the melt plateau of a solid charge)
    no_progress_s: Annotated[Number, Field(gt=0)] = 1500.0
    no_progress_k: Annotated[Number, Field(gt=0)] = 1.5
    max_shelve_s: Annotated[Number, Field(gt=0, le=7 * 24 * 3600)] = 8 * 3600.0   # longest timed shelve

    @model_validator(mode="after")
    def _limits(self) -> ErrorSettings:
        _raise_if(_relation([
            ("voltage_low_limit", "<", "voltage_high_limit",
             self.voltage_low_limit, self.voltage_high_limit),
            ("temperature_low_limit", "<", "temperature_high_limit",
             self.temperature_low_limit, self.temperature_high_limit),
            ("frequency_tolerance", "<", "grid_frequency",
             self.frequency_tolerance, self.grid_frequency),
        ]))
        return self


class ScanSettings(_Frozen):
    """``scan``: scan period and watchdog."""

    period_ms: Annotated[Int, Field(ge=1, le=10000)] | None = None   # None: system.sending_interval
    watchdog_max_consecutive_overruns: Annotated[Int, Field(ge=1)]
    watchdog_max_cycle_factor: Annotated[Number, Field(gt=1)]
    pwm_period_s: Annotated[Number, Field(gt=0)]


class ZoneConfig(_Frozen):
    """One entry of ``zones`` (Configuration.csv): limits (degC), PID gains, currents (A), outputs."""

    number: Annotated[Int, Field(ge=1, le=4)]
    max_temp: Number
    min_temp: Number
    kp: Annotated[Number, Field(ge=0)]                 # %/K
    ki: Annotated[Number, Field(ge=0)]                 # %/(K*s)
    kd: Annotated[Number, Field(ge=0)]                 # %*s/K
    kl: Annotated[Number, Field(ge=0)]                 # set-point ramp limit, K/min (0 = none)
    fc_threshold: Annotated[Number, Field(ge=0, le=100)]   # %
    heat_control_range: Annotated[Number, Field(gt=0)]     # K
    i_neutral: Annotated[Number, Field(ge=0)]
    i_motor1: Annotated[Number, Field(ge=0)]
    i_motor2: Annotated[Number, Field(ge=0)]
    heating_outputs: Outputs
    first_cooling_outputs: Outputs
    second_cooling_outputs: Outputs

    @model_validator(mode="after")
    def _limits(self) -> ZoneConfig:
        problems = _relation([("min_temp", "<", "max_temp", self.min_temp, self.max_temp)])
        if not self.heating_outputs:
            problems.append((("heating_outputs",), "must name at least one output", _NOTHING))
        _raise_if(problems)
        return self

    @property
    def outputs(self) -> tuple[tuple[str, str], ...]:
        """All ``(list name, output name)`` pairs of this zone, in declaration order."""
        return tuple(
            (kind, output)
            for kind in ("heating_outputs", "first_cooling_outputs", "second_cooling_outputs")
            for output in getattr(self, kind)
        )


class MachineConfig(_Frozen):
    """The whole machine file. Subclass it to add a section (e.g. ``twin``) and pass the
    subclass as ``model`` to the loaders; the frozen/forbid settings and checks are inherited."""

    machine: MachineSection
    machine_config: MachineParams
    system: SystemSettings
    error_settings: ErrorSettings
    scan: ScanSettings
    zones: dict[ZoneName, ZoneConfig]
    fieldbus: FieldbusSettings | None = None   # Modbus field I/O; None: no field I/O configured

    @field_validator("zones")
    @classmethod
    def _four_zones(cls, zones: dict[str, ZoneConfig]) -> dict[str, ZoneConfig]:
        problems: list = []
        missing = [name for name in ZONE_NAMES if name not in zones]
        if missing:
            problems.append(((), f"missing zone(s) {', '.join(missing)}", _NOTHING))
        owner: dict[str, str] = {}
        for name, zone in zones.items():
            if zone.number != ZONE_NUMBERS[name]:
                problems.append(((name, "number"), f"must be {ZONE_NUMBERS[name]} for zone {name}",
                                 zone.number))
            for kind, output in zone.outputs:
                where = f"{name}.{kind}"
                if output in owner:
                    problems.append(((name, kind), f"output {output} is already used by "
                                     f"zones.{owner[output]}", _NOTHING))
                else:
                    owner[output] = where
        _raise_if(problems)
        # Zone-number order, whatever the file's order.
        return {name: zones[name] for name in ZONE_NAMES}

    @model_validator(mode="after")
    def _zones_within_machine_limits(self) -> MachineConfig:
        params = self.machine_config
        problems = []
        for name, zone in self.zones.items():
            for item in _relation([
                ("max_temp", "<=", "machine_config.abs_max_heat", zone.max_temp, params.abs_max_heat),
            ]):
                problems.append((("zones", name), *item[1:]))
        _raise_if(problems)
        return self

    @property
    def period_ms(self) -> int:
        """Scan period in ms: ``scan.period_ms``, else ``system.sending_interval``."""
        if self.scan.period_ms is not None:
            return self.scan.period_ms
        return self.system.sending_interval

    @property
    def period_s(self) -> float:
        """Scan period in seconds (see ``period_ms``)."""
        return self.period_ms / 1000.0


# --------------------------------------------------------------------------- recipes file


class AcceptanceCriteria(_Frozen):
    """``acceptance`` of a recipe (optional): what a batch must show to PASS (judged by
    ``opcua_server.batches.judge``). Temperatures in K, times in s, the share 0..1.

    - heating: every zone at least ``tolerance_k`` near the heating goal, held
      ``heating_dwell_s`` without a break (the crystals are all melted);
    - cooling: the tank zones reach the cooling goal and never fall more than
      ``cooling_undershoot_k`` below it;
    - pouring (once released): the pouring path (pump and fountain zones) within
      ``pouring_band_k`` of the pouring goal for at least ``pouring_min_share`` of the time;
      and no zone above the recipe's working_max once tempered (the temper is lost);
    - ``tolerance_k``: the band around each zone's set-point outside which a zone's time
      counts as "outside" in the per-zone figures.
    The defaults pass a normal batch of the default machine with margin (see the README)."""

    heating_dwell_s: Annotated[Number, Field(ge=0)] = 45.0
    cooling_undershoot_k: Annotated[Number, Field(ge=0)] = 1.0
    pouring_band_k: Annotated[Number, Field(gt=0)] = 0.5
    pouring_min_share: Annotated[Number, Field(ge=0, le=1)] = 0.9
    tolerance_k: Annotated[Number, Field(gt=0)] = 0.5


class Recipe(_Frozen):
    """One recipe (Recipe.csv). Temperatures in degC, pedal times in s; ``acceptance``
    (optional) the criteria its batches are judged by."""

    name: Text
    heating_goal: Annotated[Number, Field(ge=40, le=60)]    # melt everything
    cooling_goal: Annotated[Number, Field(ge=20, le=40)]    # crystallise
    pouring_goal: Annotated[Number, Field(ge=20, le=60)]   # working temperature, held while pouring
    working_max: Number                                     # never exceeded once tempered
    mixer_enabled: Flag
    fountain_enabled: Flag
    mold_heater_enabled: Flag
    vibration_enabled: Flag
    vib_heater_enabled: Flag
    pedal: Literal["manual", "auto"]
    pedal_on_time: Annotated[Number, Field(gt=0)]
    pedal_off_time: Annotated[Number, Field(gt=0)]
    acceptance: AcceptanceCriteria = AcceptanceCriteria()

    @model_validator(mode="after")
    def _curve(self) -> Recipe:
        _raise_if(_relation([
            ("cooling_goal", "<", "heating_goal", self.cooling_goal, self.heating_goal),
            ("cooling_goal", "<=", "pouring_goal", self.cooling_goal, self.pouring_goal),
            ("pouring_goal", "<=", "heating_goal", self.pouring_goal, self.heating_goal),
            ("pouring_goal", "<", "working_max", self.pouring_goal, self.working_max),
            ("working_max", "<=", "heating_goal", self.working_max, self.heating_goal),
        ]))
        return self


class RecipeBook(_Frozen):
    """The recipes file: ``recipes:`` mapping recipe id (a slug) to Recipe, at least one."""

    recipes: Annotated[dict[Slug, Recipe], Field(min_length=1)]

    def __getitem__(self, recipe_id: str) -> Recipe:
        return self.recipes[recipe_id]

    def __contains__(self, recipe_id: object) -> bool:
        return recipe_id in self.recipes

    def __len__(self) -> int:
        return len(self.recipes)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self.recipes)


# --------------------------------------------------------------------------- loaders

C = TypeVar("C", bound=MachineConfig)


def load_machine_config(path: str | Path, model: type[C] = MachineConfig) -> C:
    """Read and validate a machine file. ``model`` may be a subclass of MachineConfig that
    declares extra sections; sections in OPTIONAL_SECTIONS that ``model`` does not declare
    are dropped before validation. Raises ConfigError listing every problem."""
    data = _read_mapping(path)
    for section in OPTIONAL_SECTIONS:
        if section not in model.model_fields:
            data.pop(section, None)
    return _validate(path, data, model)


def load_recipes(path: str | Path) -> RecipeBook:
    """Read and validate a recipes file. Raises ConfigError listing every problem."""
    return _validate(path, _read_mapping(path), RecipeBook)


def recipe_misfits(params: MachineParams, recipe: Recipe, where: str = "") -> list[tuple[str, str]]:
    """(field, message) for each way a valid recipe does not fit the machine: heating_goal above
    ``tank_max_heat``, or pouring_goal not above ``pump_min_heat`` (the pump could not run while
    pouring). Checked when the files load and when a recipe is edited at run time (OPC UA)."""
    out = []
    if recipe.heating_goal > params.tank_max_heat:
        out.append(("heating_goal", f"must be <= machine_config.tank_max_heat{where} "
                                    f"({_show(params.tank_max_heat)})"))
    if recipe.pouring_goal <= params.pump_min_heat:
        out.append(("pouring_goal", f"must be > machine_config.pump_min_heat{where} "
                                    f"({_show(params.pump_min_heat)})"))
    return out


def load_all(path: str | Path, model: type[C] = MachineConfig) -> tuple[C, RecipeBook]:
    """Load the machine file and the recipes file it names (``machine.recipes_file``,
    relative to the machine file), then check the two against each other:
    ``machine.default_recipe`` exists, and every recipe fits the machine (heating_goal within
    ``machine_config.tank_max_heat``; pouring_goal above ``machine_config.pump_min_heat``, or
    the pump could not run while pouring). With ``fieldbus.map_file`` set, the register map
    is loaded (relative to the machine file) and validated as a whole against
    ``fieldbus.links`` and the PLC's I/O contract; the config comes back with
    ``fieldbus.points`` filled in. Raises ConfigError."""
    machine = load_machine_config(path, model)
    recipes_path = Path(path).parent / machine.machine.recipes_file
    recipes = load_recipes(recipes_path)

    file, recipes_file = str(path), str(recipes_path)
    params = machine.machine_config
    messages = []
    default = machine.machine.default_recipe
    if default not in recipes:
        messages.append(f"{file}: machine.default_recipe: no such recipe in {recipes_file} "
                        f"(got {default!r}; have {', '.join(recipes.ids)})")
    for recipe_id, recipe in recipes.recipes.items():
        for field, message in recipe_misfits(params, recipe, f" of {file}"):
            messages.append(f"{recipes_file}: recipes.{recipe_id}.{field}: {message}"
                            f" (got {_show(getattr(recipe, field))})")
    if messages:
        raise ConfigError(path, messages)
    return _with_register_map(machine, Path(path)), recipes


def _with_register_map(machine: C, path: Path) -> C:
    """``machine`` with ``fieldbus.points`` read from ``fieldbus.map_file`` (if it has one)."""
    fieldbus = machine.fieldbus
    if fieldbus is None or fieldbus.map_file is None:
        return machine
    points = load_register_map(path.parent / fieldbus.map_file, fieldbus.links)
    return machine.model_copy(update={"fieldbus": fieldbus.model_copy(update={"points": points})})
