"""Typed parameters of the simulated tempering machine (the twin).

One job: say what the plant is made of, with units in every field name, validated once.
The defaults *are* the default machine (a plausible mid-size 50 kg, 4-zone tempering unit,
see the README); a heavier or weaker machine is a config change, never a code change.

Every model is ``frozen=True, extra="forbid"``: an unknown or misspelt field is an error.
The YAML home of these values is the ``twin:`` section of ``config/tempering-machine.yaml``;
the application's loader (``plc.config.load_machine_config`` with a model that declares a
``twin`` field) validates it into :class:`TwinConfig`. This module reads no files.

Magnitudes are assumptions to be replaced by a real machine's data; ``twin.plant`` explains
where each one enters the equations.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChocolateConfig",
    "CirculationConfig",
    "CoolingConfig",
    "GridConfig",
    "MixingConfig",
    "MotorsConfig",
    "SensorsConfig",
    "TwinConfig",
    "ZoneConfig",
    "ZonesConfig",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ZoneConfig(_Frozen):
    """One lumped thermal node: the chocolate in a zone plus the steel it touches."""

    chocolate_mass_kg: float = Field(gt=0, description="chocolate held by the node")
    steel_mass_kg: float = Field(0.0, ge=0, description="steel lumped with the node (pump body, fountain head)")
    heater_power_w: float = Field(ge=0, description="heater power at the rated voltage")
    ambient_loss_w_per_k: float = Field(ge=0, description="conductance to the ambient air")


class ZonesConfig(_Frozen):
    """The four zones, in the legacy order 1..4."""

    tank_bottom: ZoneConfig = Field(
        default_factory=lambda: ZoneConfig(
            chocolate_mass_kg=24.0, heater_power_w=1500.0, ambient_loss_w_per_k=4.0
        )
    )
    tank_wall: ZoneConfig = Field(
        default_factory=lambda: ZoneConfig(
            chocolate_mass_kg=22.0, heater_power_w=1500.0, ambient_loss_w_per_k=6.0
        )
    )
    pump: ZoneConfig = Field(
        default_factory=lambda: ZoneConfig(
            chocolate_mass_kg=1.5, steel_mass_kg=4.0, heater_power_w=300.0, ambient_loss_w_per_k=1.5
        )
    )
    fountain: ZoneConfig = Field(
        default_factory=lambda: ZoneConfig(
            chocolate_mass_kg=2.5, steel_mass_kg=3.0, heater_power_w=400.0, ambient_loss_w_per_k=8.0
        )
    )


class ChocolateConfig(_Frozen):
    """Thermal properties of the chocolate (dark, cocoa butter fraction ~35 %)."""

    c_liquid_j_per_kg_k: float = Field(1600.0, gt=0)
    c_solid_j_per_kg_k: float = Field(1300.0, gt=0, description="used only before the first melting")
    latent_heat_j_per_kg: float = Field(45000.0, ge=0, description="per kg of chocolate, not of cocoa butter")
    melt_point_c: float = Field(33.0, ge=0, le=60)


class CoolingConfig(_Frozen):
    """Tank jacket cooling: two stages against a coolant of fixed temperature."""

    stage1_ua_w_per_k: float = Field(60.0, ge=0, description="output cool1_tank")
    stage2_ua_w_per_k: float = Field(80.0, ge=0, description="output cool2_tank")
    coolant_temp_c: float = Field(12.0, ge=-30, le=40)
    lag_s: float = Field(10.0, ge=0, description="valve opening / jacket filling time constant")
    bottom_share: float = Field(0.5, ge=0, le=1, description="part of the jacket on tank_bottom; the rest on tank_wall")


class MixingConfig(_Frozen):
    """Heat exchange between tank_bottom and tank_wall."""

    running_ua_w_per_k: float = Field(300.0, ge=0, description="mixer running")
    idle_ua_w_per_k: float = Field(15.0, ge=0, description="mixer stopped (natural convection)")
    min_liquid_scale: float = Field(0.1, ge=0, le=1, description="floor of the liquid-fraction scaling")


class CirculationConfig(_Frozen):
    """Pump loop: tank_bottom -> pump -> riser (delay) -> fountain -> tank_wall."""

    flow_kg_per_s: float = Field(0.15, ge=0)
    transport_delay_s: float = Field(8.0, ge=0, description="riser transit time, pump to fountain")
    pump_fountain_conduction_w_per_k: float = Field(1.0, ge=0)


class SensorsConfig(_Frozen):
    """Zone temperature sensors (PT100 in a thermowell) and their transmitters."""

    lag_s: float = Field(4.0, ge=0)
    noise_sigma_c: float = Field(0.02, ge=0)
    resolution_c: float = Field(0.1, gt=0)
    open_reading_c: float = Field(850.0, description="what an open (broken) sensor reads")
    short_reading_c: float = Field(-50.0, description="what a shorted sensor reads")


class MotorsConfig(_Frozen):
    """Motor currents (one phase, L3); a motor runs only with its phase present."""

    mixer_running_a: float = Field(1.5, ge=0)
    pump_running_a: float = Field(2.0, ge=0)
    vibration_running_a: float = Field(1.0, ge=0)
    inrush_factor: float = Field(5.0, ge=1)
    inrush_s: float = Field(0.5, ge=0)
    overload_factor: float = Field(2.5, ge=1)
    min_run_voltage_v: float = Field(115.0, ge=0, description="below this phase voltage motors stall")


class GridConfig(_Frozen):
    """Supply as seen by the power meter: three phases, nominal values and a small ripple."""

    voltage_v: float = Field(230.0, ge=0, description="phase-to-neutral, all phases")
    frequency_hz: float = Field(50.0, gt=0)
    voltage_ripple_v: float = Field(0.4, ge=0, le=5, description="deterministic ripple amplitude in the readings")
    frequency_ripple_hz: float = Field(0.02, ge=0, le=1)


class TwinConfig(_Frozen):
    """The whole twin; defaults are the default machine."""

    zones: ZonesConfig = Field(default_factory=ZonesConfig)
    chocolate: ChocolateConfig = Field(default_factory=ChocolateConfig)
    steel_c_j_per_kg_k: float = Field(500.0, gt=0)
    ambient_temp_c: float = Field(22.0, ge=-10, le=50)
    rated_voltage_v: float = Field(230.0, gt=0, description="voltage at which heater powers are rated")
    heater_lag_s: float = Field(15.0, ge=0, description="element to chocolate time constant")
    vib_heater_power_w: float = Field(200.0, ge=0, description="vibration table heater (no chocolate node)")
    mold_heater_power_w: float = Field(300.0, ge=0, description="mold heater (no chocolate node)")
    cooling: CoolingConfig = Field(default_factory=CoolingConfig)
    mixing: MixingConfig = Field(default_factory=MixingConfig)
    circulation: CirculationConfig = Field(default_factory=CirculationConfig)
    sensors: SensorsConfig = Field(default_factory=SensorsConfig)
    seed_dissolve_s: float = Field(90.0, ge=0, description="time constant of seed callets joining the tank")
    motors: MotorsConfig = Field(default_factory=MotorsConfig)
    grid: GridConfig = Field(default_factory=GridConfig)
    max_substep_s: float = Field(0.1, gt=0, le=1, description="integration step; longer steps are split")
