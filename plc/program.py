"""The program: the machine's configuration turned into frozen core types at start-up.

The scan never sees YAML or pydantic models: ``Program.from_config`` reads the validated
configuration once and keeps only what the logic needs, in plain frozen dataclasses. The PLC's
I/O contract (the names and types of the input and output points, the zones and motors, the safe
output image) is ``plc.contract``.

Interpretation of the legacy fields (documented again in the README, Configuration):
- ``set_temp1..4``: per-zone set-point offsets (K) added to the phase goal of the recipe.
- ``tank_max_heat`` / ``pump_max_heat``: ceilings of the tank zones' and pump zone's set-points.
- ``abs_max_heat`` / ``abs_min_heat``: absolute over/under-temperature trips of every zone.
- ``pump_min_heat`` + ``pre_heating_temp``: the pump zone must reach pump_min_heat +
  pre_heating_temp and stay above pump_min_heat for ``pump_delay`` s before the pump may run;
  it stops at once below pump_min_heat (the pump must never run on solid chocolate).
- ``mixer_delay``: the mixer runs this long before the heaters are enabled.
- ``heating_delay`` / ``cooling_delay`` / ``pouring_delay``: dwell times all zones must stay
  within ``phase_tolerance`` of the phase goal before the phase completes (pouring: before
  pouring is released).
- ``cooling_ramp_k_per_min`` / ``reheat_ramp_k_per_min`` (not in the legacy data): the goal of
  cooling moves from the heating goal down, and the goal of pouring from the cooling goal up, at
  this rate (0: a step), landing softly on the final goal (``sequencer.LANDING_S``); the dwell
  starts once the goal is final. The re-heat is gentle (1
  K/min by default) as tempering wants - it melts the unstable crystals without the overshoot a
  step would give - and it keeps every zone's loop out of saturation on any machine.
- Per zone ``kp`` (%/K), ``ki`` (%/(K·s)), ``kd`` (%·s/K); ``kl`` = set-point ramp limit (K/min);
  ``heat_control_range`` = control band (K); ``fc_threshold`` = split-range threshold (%).
- Current limits: ``i_motor1`` of tank_bottom / pump / fountain guard the mixer / pump /
  vibration motors (0 = not monitored); ``i_neutral`` awaits a neutral-current input.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

from .autotune import Settings as AutotuneSettings
from .contract import TANK_ZONES, ZONES
from .pid import PidTuning

if TYPE_CHECKING:  # the core only reads attributes of the validated config
    from .config import MachineConfig, RecipeBook

# which zone record's i_motor1 limits which motor (the legacy Configuration.csv layout)
MOTOR_LIMIT_ZONE = {"mixer": "tank_bottom", "pump": "pump", "vibration": "fountain"}


@dataclass(frozen=True, slots=True)
class ZoneProgram:
    name: str
    number: int
    tuning: PidTuning
    max_temp_c: float
    min_temp_c: float
    fc_threshold_pct: float
    setpoint_offset_k: float
    setpoint_max_c: float
    heating_outputs: tuple[str, ...]
    cool1_outputs: tuple[str, ...]
    cool2_outputs: tuple[str, ...]

    @property
    def out_min_pct(self) -> float:
        """The lowest output that acts: a zone without cooling outputs can only stop heating."""
        return self.tuning.out_min if self.tuning.act_min is None else self.tuning.act_min


@dataclass(frozen=True, slots=True)
class RecipeProgram:
    id: str
    name: str
    heating_goal_c: float
    cooling_goal_c: float
    pouring_goal_c: float
    working_max_c: float
    mixer: bool
    fountain: bool
    mold_heater: bool
    vibration: bool
    vib_heater: bool
    pedal_auto: bool
    pedal_on_s: float
    pedal_off_s: float


@dataclass(frozen=True, slots=True)
class Limits:
    abs_max_c: float
    abs_min_c: float
    sensor_high_c: float
    sensor_low_c: float
    stuck_s: float
    alarm_delay_s: float
    warning_k: float
    error_k: float
    voltage_low_v: float
    voltage_high_v: float
    frequency_hz: float
    frequency_tol_hz: float
    phase_count: int
    current_total_a: float
    motor_current_a: Mapping[str, float]
    no_progress_s: float = 1500.0   # a zone heated at full output this long ...
    no_progress_k: float = 1.5      # ... without rising this much: heater or element failure
    max_shelve_s: float = 8 * 3600.0


@dataclass(frozen=True, slots=True)
class Sequence:
    pump_min_c: float
    pump_start_c: float
    pump_delay_s: float
    mixer_delay_s: float
    heating_dwell_s: float
    cooling_dwell_s: float
    pouring_dwell_s: float
    tolerance_k: float
    cooling_ramp_k_per_min: float = 0.0     # the cooling goal approached from the heating goal
    reheat_ramp_k_per_min: float = 0.0      # the pouring goal approached from the cooling goal


@dataclass(frozen=True, slots=True)
class Program:
    machine_id: str
    period_s: float
    pwm_window_ticks: int
    zones: tuple[ZoneProgram, ...]
    limits: Limits
    sequence: Sequence
    recipes: Mapping[str, RecipeProgram]
    default_recipe: str
    autotune: AutotuneSettings = AutotuneSettings()

    def with_recipes(self, recipes: Mapping[str, Any]) -> "Program":
        """The same program with another recipe book (validated ``Recipe`` models by id): how
        recipes edited at run time (OPC UA) reach the scan, between two scans."""
        return replace(self, recipes=MappingProxyType({rid: _recipe(rid, r) for rid, r in _items(recipes)}))

    def zone(self, name: str) -> ZoneProgram:
        for z in self.zones:
            if z.name == name:
                return z
        raise KeyError(name)

    @classmethod
    def from_config(cls, cfg: "MachineConfig", book: "RecipeBook",
                    period_s: float | None = None) -> "Program":
        mc, es, sysc = cfg.machine_config, cfg.error_settings, cfg.system
        period = period_s if period_s is not None else cfg.period_s
        zones = []
        for name in ZONES:
            z = cfg.zones[name]
            # a zone without cooling outputs can only stop heating: its output acts from 0 %,
            # its integral stops there (below, it would wind up with no effect; plc.pid)
            cools = bool(z.first_cooling_outputs or z.second_cooling_outputs)
            offset = getattr(mc, f"set_temp{z.number}")
            ceiling = mc.pump_max_heat if name == "pump" else (
                mc.tank_max_heat if name in TANK_ZONES else mc.abs_max_heat)
            zones.append(ZoneProgram(
                name=name, number=z.number,
                tuning=PidTuning(kp=z.kp, ki=z.ki, kd=z.kd, ramp_k_per_min=z.kl,
                                 control_band_k=z.heat_control_range,
                                 act_min=None if cools else 0.0),
                max_temp_c=z.max_temp, min_temp_c=z.min_temp, fc_threshold_pct=z.fc_threshold,
                setpoint_offset_k=offset, setpoint_max_c=ceiling,
                heating_outputs=tuple(z.heating_outputs),
                cool1_outputs=tuple(z.first_cooling_outputs),
                cool2_outputs=tuple(z.second_cooling_outputs)))
        limits = Limits(
            abs_max_c=mc.abs_max_heat, abs_min_c=mc.abs_min_heat,
            sensor_high_c=es.temperature_high_limit, sensor_low_c=es.temperature_low_limit,
            stuck_s=es.stuck_sensor_s, alarm_delay_s=es.alarm_delay_s,
            warning_k=sysc.warning_limit, error_k=sysc.error_limit,
            voltage_low_v=es.voltage_low_limit, voltage_high_v=es.voltage_high_limit,
            frequency_hz=es.grid_frequency, frequency_tol_hz=es.frequency_tolerance,
            phase_count=es.phase_count, current_total_a=es.current_high_limit,
            motor_current_a=MappingProxyType(
                {m: cfg.zones[z].i_motor1 for m, z in MOTOR_LIMIT_ZONE.items()}),
            no_progress_s=es.no_progress_s, no_progress_k=es.no_progress_k,
            max_shelve_s=es.max_shelve_s)
        seq = Sequence(
            pump_min_c=mc.pump_min_heat, pump_start_c=mc.pump_min_heat + mc.pre_heating_temp,
            pump_delay_s=mc.pump_delay, mixer_delay_s=mc.mixer_delay,
            heating_dwell_s=mc.heating_delay, cooling_dwell_s=mc.cooling_delay,
            pouring_dwell_s=mc.pouring_delay, tolerance_k=mc.phase_tolerance,
            cooling_ramp_k_per_min=mc.cooling_ramp_k_per_min,
            reheat_ramp_k_per_min=mc.reheat_ramp_k_per_min)
        recipes = {rid: _recipe(rid, r) for rid, r in _items(book)}
        window = max(1, round(cfg.scan.pwm_period_s / period))
        return cls(machine_id=cfg.machine.id, period_s=period, pwm_window_ticks=window,
                   zones=tuple(zones), limits=limits, sequence=seq,
                   recipes=MappingProxyType(recipes), default_recipe=cfg.machine.default_recipe)


def _items(book: Any):
    recipes = getattr(book, "recipes", book)
    return recipes.items()


def _recipe(rid: str, r: Any) -> RecipeProgram:
    return RecipeProgram(
        id=rid, name=r.name, heating_goal_c=r.heating_goal, cooling_goal_c=r.cooling_goal,
        pouring_goal_c=r.pouring_goal, working_max_c=r.working_max, mixer=r.mixer_enabled,
        fountain=r.fountain_enabled, mold_heater=r.mold_heater_enabled,
        vibration=r.vibration_enabled, vib_heater=r.vib_heater_enabled,
        pedal_auto=r.pedal == "auto", pedal_on_s=r.pedal_on_time, pedal_off_s=r.pedal_off_time)
