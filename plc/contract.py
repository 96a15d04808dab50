"""The PLC's I/O contract: every input and output point by name, its type, unit and meaning.

One job: say once what the PLC reads and writes. Everyone else takes the names from here: the
scan and the interlocks (``plc.program``, ``plc.scan``), the configuration (which outputs a
zone may drive), the register map (``plc.modbus.regmap``: every contract point mapped exactly
once, with a matching direction and type), the drivers (``plc.modbus.io``, ``twin``) and the
OPC UA model. Pure data: this module imports only ``plc.image`` (the point types), never the
configuration, the program or the register map, so any of them may import it.

Points (units in ``PointSpec.unit``):
- inputs: ``temp_<zone>`` chocolate temperature of each zone (degC); ``current_<motor>`` the
  motor currents and ``current_total`` the highest phase current of the machine (A);
  ``grid_v_l1..3`` phase voltages (V), ``grid_freq`` (Hz); ``estop_ok`` the hard-wired
  e-stop chain is closed; ``pedal`` the pouring pedal is pressed.
- outputs (all bool, on = energised): ``heater_<zone>``; ``cool1_tank`` / ``cool2_tank`` the
  two tank cooling stages; the motors ``mixer``, ``pump`` (pump / fountain), ``vibration``;
  ``vib_heater`` and ``mold_heater``.
- ``SAFE_OUTPUTS``: the safe output image, every output off; written on a trip, at stop and
  whenever the drivers lose the scan.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from .image import PointSpec, PointType

#: Zone name -> zone number (legacy Configuration.csv): 1 tank bottom, 2 tank wall, 3 pump,
#: 4 fountain.
ZONE_NUMBERS: Mapping[str, int] = MappingProxyType(
    {"tank_bottom": 1, "tank_wall": 2, "pump": 3, "fountain": 4})
#: Zone names in zone-number order.
ZONES: tuple[str, ...] = tuple(ZONE_NUMBERS)
TANK_ZONES: tuple[str, ...] = ("tank_bottom", "tank_wall")
MOTORS: tuple[str, ...] = ("mixer", "pump", "vibration")

_F, _B = PointType.FLOAT, PointType.BOOL
INPUT_SPECS: Mapping[str, PointSpec] = MappingProxyType({s.name: s for s in (
    *(PointSpec(f"temp_{z}", _F, "degC", f"Chocolate temperature, zone {z}") for z in ZONES),
    *(PointSpec(f"current_{m}", _F, "A", f"Current of the {m} motor") for m in MOTORS),
    PointSpec("current_total", _F, "A", "Highest phase current of the machine"),
    PointSpec("grid_v_l1", _F, "V", "Grid voltage, phase L1"),
    PointSpec("grid_v_l2", _F, "V", "Grid voltage, phase L2"),
    PointSpec("grid_v_l3", _F, "V", "Grid voltage, phase L3"),
    PointSpec("grid_freq", _F, "Hz", "Grid frequency"),
    PointSpec("estop_ok", _B, "", "E-stop chain healthy (hard-wired chain closed)"),
    PointSpec("pedal", _B, "", "Pouring pedal pressed"),
)})
OUTPUT_SPECS: Mapping[str, PointSpec] = MappingProxyType({s.name: s for s in (
    *(PointSpec(f"heater_{z}", _B, "", f"Heater, zone {z}") for z in ZONES),
    PointSpec("cool1_tank", _B, "", "Tank cooling, first stage"),
    PointSpec("cool2_tank", _B, "", "Tank cooling, second stage"),
    PointSpec("mixer", _B, "", "Mixer motor"),
    PointSpec("pump", _B, "", "Pump / fountain motor"),
    PointSpec("vibration", _B, "", "Vibration table motor"),
    PointSpec("vib_heater", _B, "", "Vibration table heater"),
    PointSpec("mold_heater", _B, "", "Mold heater"),
)})
#: The safe output image: every output off.
SAFE_OUTPUTS: Mapping[str, bool] = MappingProxyType({n: False for n in OUTPUT_SPECS})
#: The outputs a zone may drive (its heaters and the two tank cooling stages), in contract order.
ZONE_OUTPUTS: tuple[str, ...] = tuple(n for n in OUTPUT_SPECS if n.startswith(("heater_", "cool")))

__all__ = ["INPUT_SPECS", "MOTORS", "OUTPUT_SPECS", "SAFE_OUTPUTS", "TANK_ZONES", "ZONES",
           "ZONE_NUMBERS", "ZONE_OUTPUTS"]
