"""Typed, validated configuration of the machine and its recipes.

One job: turn ``config/tempering-machine.yaml`` and ``config/recipes.yaml`` into frozen,
validated models, or refuse with messages that name the file, the field and the value.
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
                   ``<file>:<line>:<col>: <problem>`` for YAML syntax errors.
    Cross-field checks that span sections (zone limits against ``machine_config``) run once
    every section on its own is valid; checks inside one section always run with the rest.

Loaders
    load_machine_config(path, model=MachineConfig) -> MachineConfig
    load_recipes(path) -> RecipeBook
    load_all(path, model=MachineConfig) -> (MachineConfig, RecipeBook)

Optional sections: a top-level ``twin:`` section belongs to the simulated machine, whose
configuration model lives outside ``plc`` (``plc`` never imports ``twin``). The application
passes a subclass of MachineConfig that declares a ``twin`` field; with a model that has no
``twin`` field the loader drops the section before validation, so the PLC alone accepts a
machine file that carries one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .program import OUTPUT_SPECS

__all__ = [
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

#: Zone name -> zone number (seed 001): 1 tank bottom, 2 tank wall, 3 pump, 4 fountain.
ZONE_NUMBERS: dict[str, int] = {"tank_bottom": 1, "tank_wall": 2, "pump": 3, "fountain": 4}
#: Zone names in zone-number order.
ZONE_NAMES: tuple[str, ...] = tuple(ZONE_NUMBERS)
#: The outputs a zone may drive (heaters and the two tank cooling stages).
ZONE_OUTPUTS: tuple[str, ...] = tuple(n for n in OUTPUT_SPECS if n.startswith(("heater_", "cool")))
#: Top-level sections owned by components outside ``plc``; dropped unless the model declares them.
OPTIONAL_SECTIONS: tuple[str, ...] = ("twin",)
#: Recipe ids and the default recipe: lower-case letters, digits and '-'.
SLUG_PATTERN = r"^[a-z0-9-]+$"

ZoneName = Literal["tank_bottom", "tank_wall", "pump", "fountain"]
OutputName = Literal[
    "heater_tank_bottom", "heater_tank_wall", "heater_pump", "heater_fountain",
    "cool1_tank", "cool2_tank",
]

# --------------------------------------------------------------------------- strict field types


def _exact_int(value: Any) -> Any:
    """Let only real integers through to a Literal of ints (pydantic would take 1.0 or true)."""
    if type(value) is not int:
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


def _flag(value: Any) -> bool:
    """YAML true/false, or the legacy 0/1 of the CSV files; nothing else."""
    if type(value) is bool:
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    raise PydanticCustomError("flag_type", "Input should be true or false")


Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]   # int or float, never str/bool
Int = Annotated[int, Strict()]                                     # int, never float/str/bool
Text = Annotated[str, Strict(), Field(min_length=1)]
Slug = Annotated[str, Strict(), Field(pattern=SLUG_PATTERN)]
Flag = Annotated[bool, BeforeValidator(_flag)]
Outputs = tuple[OutputName, ...]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- cross-field problems

_NOTHING = object()


class _Raw(str):
    """A ``got`` value that is already formatted (shown as is, without quotes)."""


class _Problems(ValueError):
    """Several cross-field problems of one model, raised together from one validator.

    Each item is ``(sub_path, message, got)``; ``sub_path`` is appended to the location of
    the model that raised it. Pydantic wraps this ValueError into a ``value_error`` whose
    ``ctx["error"]`` is this object; ``_messages`` expands it into one line per item.
    """

    def __init__(self, items: list[tuple[tuple[str | int, ...], str, Any]]):
        super().__init__("; ".join(message for _, message, _ in items))
        self.items = items


def _raise_if(items: list[tuple[tuple[str | int, ...], str, Any]]) -> None:
    if items:
        raise _Problems(items)


def _relation(checks: Iterable[tuple[str, str, str, float, float]]) -> list:
    """Check ``a <op> b`` relations; each failing one becomes a problem at the model's path."""
    ops: dict[str, Callable[[float, float], bool]] = {
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
    }
    return [
        ((), f"{left} must be {op} {right}", _Raw(f"{left}={_show(a)}, {right}={_show(b)}"))
        for left, op, right, a, b in checks
        if not ops[op](a, b)
    ]


# --------------------------------------------------------------------------- machine file


class MachineSection(_Frozen):
    """``machine``: identity and the files that go with this machine."""

    id: Text
    name: Text
    state_file: Text                  # relative to the working directory
    recipes_file: Text                # relative to the machine file
    default_recipe: Slug              # must exist in the recipes file (checked by load_all)


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


class Recipe(_Frozen):
    """One recipe (Recipe.csv). Temperatures in degC, pedal times in s."""

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


# --------------------------------------------------------------------------- errors


class ConfigError(Exception):
    """Bad configuration: ``.path`` the file, ``.messages`` one line per problem."""

    def __init__(self, path: str | Path, messages: list[str]):
        self.path = path
        self.messages = list(messages)
        super().__init__("\n".join(self.messages))

    def __str__(self) -> str:
        return "\n".join(self.messages)


def _show(value: Any) -> str:
    """A value as the user wrote it, short."""
    if isinstance(value, _Raw):
        return str(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping" if value else "{}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _path(loc: Iterable[str | int]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + part
    return text or "(top level)"


def _expected(ctx: dict[str, Any]) -> str:
    # pydantic renders choices as "'none', 'odd' or 'even'"; we want "none, odd, even".
    return ctx["expected"].replace("'", "").replace(" or ", ", ")


_SIMPLE = {
    "missing": "missing field",
    "extra_forbidden": "unknown field",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "bool_type": "must be true or false (or 1/0)",
    "flag_type": "must be true or false (or 1/0)",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}

_NO_VALUE = {"missing", "extra_forbidden"}


def _message(kind: str, ctx: dict[str, Any], fallback: str) -> str:
    if kind in _SIMPLE:
        return _SIMPLE[kind]
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
              "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
    if kind in bounds:
        op, key = bounds[kind]
        bound = ctx[key]
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)         # Field(ge=0) on a float field reports 0.0
        return f"must be {op} {bound}"
    if kind == "literal_error":
        return f"must be one of {_expected(ctx)}"
    if kind == "string_pattern_mismatch":
        if ctx.get("pattern") == SLUG_PATTERN:
            return "must be lower-case letters, digits and '-' only"
        return f"must match {ctx.get('pattern')}"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} entry"
    if kind == "value_error":
        return str(ctx["error"])
    return fallback


def _messages(file: str, error: ValidationError) -> list[str]:
    """One ``<file>: <path>: <message> (got <value>)`` line per pydantic error."""
    lines = []
    for err in error.errors(include_url=False):
        loc = list(err["loc"])
        kind = err["type"]
        ctx = err.get("ctx") or {}
        is_key = bool(loc) and loc[-1] == "[key]"
        if is_key:                     # a bad mapping key: report it at the key's path
            loc.pop()
        problems = ctx.get("error")
        if kind == "value_error" and isinstance(problems, _Problems):
            items = [(loc + list(sub), message, got) for sub, message, got in problems.items]
        else:
            got = _NOTHING if kind in _NO_VALUE else err.get("input", _NOTHING)
            if is_key:
                got = loc[-1]
            message = _message(kind, ctx, err["msg"])
            items = [(loc, ("key " if is_key else "") + message, got)]
        for where, message, got in items:
            suffix = "" if got is _NOTHING else f" (got {_show(got)})"
            lines.append(f"{file}: {_path(where)}: {message}{suffix}")
    return lines


# --------------------------------------------------------------------------- YAML reading

_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars and duplicate keys rejected."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue               # unhashable key: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0x"):
        return int(text[2:], 16)
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 10)               # "010" is ten, not eight


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    if text.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    if text == ".nan":
        return math.nan
    return float(text)


_Loader.add_constructor(_INT, _construct_int)
_Loader.add_constructor(_FLOAT, _construct_float)


def _read_mapping(path: str | Path) -> dict:
    """Read a YAML file whose top level must be a mapping; ConfigError otherwise."""
    file = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(path, [f"{file}: no such file"]) from None
    except IsADirectoryError:
        raise ConfigError(path, [f"{file}: is a directory, not a file"]) from None
    except OSError as exc:
        raise ConfigError(path, [f"{file}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [f"{file}: not UTF-8 text (byte {exc.start})"]) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            started = exc.context_mark
            at = f" started at line {started.line + 1}" if started and started is not mark else ""
            problem = f"{exc.problem} ({exc.context}{at})"
        raise ConfigError(path, [f"{where}: {problem}"]) from None
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(path, [f"{file}: invalid YAML: {exc}"]) from None
    if data is None:
        raise ConfigError(path, [f"{file}: file is empty"])
    if not isinstance(data, dict):
        raise ConfigError(path, [f"{file}: top level must be a mapping of sections "
                                 f"(got a {type(data).__name__})"])
    return data


M = TypeVar("M", bound=BaseModel)


def _validate(path: str | Path, data: dict, model: type[M]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, _messages(str(path), exc)) from None


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


def load_all(path: str | Path, model: type[C] = MachineConfig) -> tuple[C, RecipeBook]:
    """Load the machine file and the recipes file it names (``machine.recipes_file``,
    relative to the machine file), then check the two against each other:
    ``machine.default_recipe`` exists, and every recipe fits the machine (heating_goal within
    ``machine_config.tank_max_heat``; pouring_goal above ``machine_config.pump_min_heat``, or
    the pump could not run while pouring). Raises ConfigError."""
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
        if recipe.heating_goal > params.tank_max_heat:
            messages.append(f"{recipes_file}: recipes.{recipe_id}.heating_goal: must be <= "
                            f"machine_config.tank_max_heat of {file} ({_show(params.tank_max_heat)})"
                            f" (got {_show(recipe.heating_goal)})")
        if recipe.pouring_goal <= params.pump_min_heat:
            messages.append(f"{recipes_file}: recipes.{recipe_id}.pouring_goal: must be > "
                            f"machine_config.pump_min_heat of {file} ({_show(params.pump_min_heat)})"
                            f" (got {_show(recipe.pouring_goal)})")
    if messages:
        raise ConfigError(path, messages)
    return machine, recipes
