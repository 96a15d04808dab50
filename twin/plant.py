"""The tempering machine as a lumped thermal and electrical model, in virtual time.

Charter
-------
One job: given the output image the PLC writes (bools) and a time step, advance the plant
and report what its field devices would read. The model never reads a clock, never sleeps
and does no I/O; time enters only as ``dt_s``. Same seed and same calls give the same
readings, bit for bit. Faults are injected through methods, never by patching.

It is a stand-in for the real hardware: ``plc`` never imports it. Control quality is
measured on :meth:`Twin.pouring_temp_c` (the true temperature), never on the quantised
reading the PLC sees.

Node layout
-----------
::

                cool1/cool2 (jacket, 12 °C coolant, lag 10 s)
                  │ 50 %            │ 50 %
      ┌───────────▼──┐  mixing  ┌───▼──────────┐   ◄── return from the fountain curtain
      │ tank_bottom  │◄────────►│  tank_wall   │◄──────────────────────────┐
      │ 24 kg        │ UA 300/15│  22 kg       │                           │
      └──────┬───────┘   W/K    └──────────────┘                           │
             │ 0.15 kg/s while the pump runs                               │
      ┌──────▼───────┐   riser: FIFO, 8 s transit    ┌──────────────┐      │
      │ pump         │──────────────────────────────►│ fountain     │──────┘
      │ 1.5 kg + 4 kg│◄──────── conduction 1 W/K ───►│ 2.5 kg + 3 kg│──► pouring point
      │ steel        │                               │ steel        │
      └──────────────┘                               └──────────────┘
     every node: heater (lag 15 s), loss to ambient 22 °C, sensor (lag 4 s, noise, 0.1 °C)

Equations (node i, temperature T_i, all heat flows in W)
-----------------------------------------------------
``Q_i = P_i + UA_cool,i (T_coolant - T_i) + G_amb,i (T_amb - T_i) + Σ_j G_ij (T_j - T_i)
+ ṁ c_l (T_in,i - T_i)``

* ``P_i``: heater heat reaching the chocolate, a first-order lag (``heater_lag_s``) of the
  electrical power ``P_rated,i (V_phase / V_rated)²`` while the output is on, the e-stop chain
  healthy, the element intact and its phase present.
* ``UA_cool``: ``stage1 · cool1_tank + stage2 · cool2_tank``, first-order lag ``cooling.lag_s``,
  split ``bottom_share`` / rest between tank_bottom and tank_wall. Colder coolant cools harder.
* ``G_ij``: tank_bottom↔tank_wall mixing, ``running`` or ``idle`` UA scaled by the liquid fraction
  of the tank (floor ``min_liquid_scale``): solid chocolate does not stir. pump↔fountain: a small
  steel conduction.
* Advection while the pump runs and the pump node is fully liquid (and the tank bottom holds
  some liquid): ``ṁ`` kg/s from tank_bottom → pump → riser → fountain → tank_wall, and the same
  flow tank_wall → tank_bottom inside the tank, so every node keeps its mass. The riser is a
  FIFO of (mass, temperature) parcels of ``ṁ · transport_delay_s`` kg in total (1.2 kg): a pure
  transport delay that still books its enthalpy, so energy closes exactly. Its content starts
  at the initial temperature and is treated as liquid; it is a delay line, not part of the
  charge (:meth:`Twin.chocolate_mass_kg`, :meth:`Twin.liquid_fraction` and the physical
  minimum count the four nodes and the seed pool). The pump does not move solid chocolate;
  its motor still runs and draws current (stopping it is the PLC's interlock).
* Enthalpy update with melting: a node with unmelted chocolate has the capacity
  ``C_steel + m_liquid c_l + m_solid c_s``; heat that would lift it above the melt point melts
  chocolate at the melt point instead (latent heat ``L`` per kg) - the melt plateau - and the
  rest heats the liquid. Cooling never re-solidifies: tempered chocolate is a supercooled
  liquid carrying seed crystals, and the crystallisation heat (a few kJ/kg, released slowly) is
  neglected. ``c_s`` therefore only matters before the first melting.
* Seed callets (:meth:`Twin.add_seed`) wait in a pool at their own temperature (they are
  tempered crystals that do not melt at working temperature) and join the tank nodes,
  split by mass, at the rate ``pool / seed_dissolve_s``; each portion brings its sensible heat
  (``c_l``, no latent heat), so the tank settles at the mixing temperature and the charge grows.
* Explicit Euler over sub-steps of at most ``max_substep_s`` (0.1 s); the smallest node time
  constant (pump, ≈4400 J/K against ≈240 W/K) is ~18 s, so the step is stable by two orders.
  Lags use the exact discrete factor ``1 - exp(-h/τ)``, and the heater heat and jacket UA
  applied over a sub-step are the lag's exact mean over it, so the heat delivered does not
  depend on the step.

Electrical side
---------------
Phase L1 feeds heater_tank_bottom, L2 heater_tank_wall, L3 everything else (pump and fountain
heaters, vib_heater 200 W, mold_heater 300 W, all motors). Heater current ``P/V``; motor current
its running value (×5 inrush for 0.5 s after it gets power, ×2.5 when overloaded), motors stall
below ``min_run_voltage_v``. Phase currents add arithmetically (power factor 1 assumed);
``current_total`` is the highest phase. Cooling valves sit on the control supply: only the
e-stop removes them. The e-stop is the hard-wired chain: while pressed no output gets power.
Readings of grid voltage and frequency carry a small deterministic ripple; the physics uses
the set voltage.

Sensors
-------
Each zone sensor is a first-order lag (``sensors.lag_s``) of the node's true temperature, plus
gaussian noise (``noise_sigma_c``, drawn in blocks from ``numpy.random.default_rng(seed)``,
four draws per :meth:`Twin.step`), quantised to ``resolution_c``. Readings are sampled once per
step, so :meth:`Twin.read_inputs` is idempotent between steps. Faults overlay the reading:
open → ``open_reading_c`` (850), short → ``short_reading_c`` (-50), stuck → the last reading.

Assumed magnitudes (default machine; replace with a real machine's data)
------------------------------------------------------------------------
50 kg of dark chocolate, c_l 1.6 kJ/(kg·K), c_s 1.3 kJ/(kg·K), L 45 kJ/kg (cocoa butter
fraction ~35 %), melt point 33 °C; heaters 1.5 + 1.5 kW tank, 0.3 kW pump, 0.4 kW fountain;
cooling 60 + 80 W/K (≈2.7 kW at 31 °C against 12 °C coolant); losses 4/6/1.5/8 W/K (the
fountain's open curtain loses most); pump flow 0.15 kg/s (9 kg/min), riser transit 8 s; sensors
τ 4 s, σ 0.02 °C, 0.1 °C resolution. Heating 50 kg from 22 °C solid to 45 °C takes at least
~18 min of full power (:meth:`Twin.physical_min_heating_time_s`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping

import numpy as np

from plc.contract import OUTPUT_SPECS
from twin.config import TwinConfig

__all__ = ["Twin"]

_ZONES = ("tank_bottom", "tank_wall", "pump", "fountain")
_HEATERS = ("heater_tank_bottom", "heater_tank_wall", "heater_pump", "heater_fountain", "vib_heater", "mold_heater")
_MOTORS = ("mixer", "pump", "vibration")
_OUTPUTS = tuple(OUTPUT_SPECS)  # the PLC's output names: the machine's wiring, one list
_OUTPUT_SET = frozenset(_OUTPUTS)
# phase (0 = L1, 1 = L2, 2 = L3) of each heater in _HEATERS order
_HEATER_PHASE = (0, 1, 2, 2, 2, 2)
_SENSOR_FAULTS = ("open", "short", "stuck")
_NOISE_BLOCK = 4096
# periods of the deterministic ripple on the grid readings
_RIPPLE_V_PERIOD_S = 11.0
_RIPPLE_F_PERIOD_S = 17.0


def _lag_factor(h_s: float, tau_s: float) -> float:
    """Exact discrete first-order lag factor for a step h (τ = 0 means no lag)."""
    return 1.0 if tau_s <= 0.0 else -math.expm1(-h_s / tau_s)


def _lag_mean_factor(h_s: float, tau_s: float) -> float:
    """Weight of the initial offset in the mean of a first-order lag over a step h:
    mean = target + (start - target) · factor. Lets the heat delivered over a step be exact."""
    return 0.0 if tau_s <= 0.0 else tau_s * -math.expm1(-h_s / tau_s) / h_s


class Twin:
    """The simulated machine. See the module docstring for the model.

    Temperatures in °C, times in s, powers in W, currents in A, voltages in V.
    """

    ZONES = _ZONES
    OUTPUTS = _OUTPUTS
    INPUTS = (
        "temp_tank_bottom",
        "temp_tank_wall",
        "temp_pump",
        "temp_fountain",
        "current_mixer",
        "current_pump",
        "current_vibration",
        "current_total",
        "grid_v_l1",
        "grid_v_l2",
        "grid_v_l3",
        "grid_freq",
        "estop_ok",
        "pedal",
    )

    def __init__(
        self,
        config: TwinConfig | None = None,
        *,
        seed: int = 0,
        initial_temp_c: float | None = None,
        solid: bool | None = None,
    ) -> None:
        cfg = config if config is not None else TwinConfig()
        self.config = cfg
        choc = cfg.chocolate
        t0 = cfg.ambient_temp_c if initial_temp_c is None else float(initial_temp_c)
        if not math.isfinite(t0):
            raise ValueError(f"initial_temp_c: must be finite, got {initial_temp_c!r}")
        if solid is None:
            solid = t0 < choc.melt_point_c
        if solid and t0 > choc.melt_point_c:
            raise ValueError(
                f"initial_temp_c: solid chocolate cannot start above the melt point "
                f"{choc.melt_point_c} °C, got {t0}"
            )
        zones = [getattr(cfg.zones, z) for z in _ZONES]
        self._cl = choc.c_liquid_j_per_kg_k
        self._cs = choc.c_solid_j_per_kg_k
        self._latent = choc.latent_heat_j_per_kg
        self._tm = choc.melt_point_c

        # thermal state
        self.time_s = 0.0
        self._t = [t0] * 4
        self._m = [z.chocolate_mass_kg for z in zones]
        self._ms = list(self._m) if solid else [0.0] * 4
        self._any_solid = bool(solid)
        self._c_steel = [z.steel_mass_kg * cfg.steel_c_j_per_kg_k for z in zones]
        self._cap_liq = [0.0] * 4
        self._update_capacities()
        self._p_rated = [z.heater_power_w for z in zones] + [cfg.vib_heater_power_w, cfg.mold_heater_power_w]
        self._g_amb = [z.ambient_loss_w_per_k for z in zones]
        self._p_del = [0.0] * 4  # heater heat reaching each node (lagged)
        self._ua_cool = 0.0  # lagged jacket UA
        circ = cfg.circulation
        self._riser_kg = circ.flow_kg_per_s * circ.transport_delay_s
        self._riser: deque[list[float]] = deque()
        if self._riser_kg > 0.0:
            self._riser.append([self._riser_kg, t0])
        self._pool_kg = 0.0
        self._pool_t = t0
        self._ledger = {"heaters_j": 0.0, "cooling_j": 0.0, "ambient_j": 0.0}
        # initial state, for physical_min_heating_time_s
        self._init_t = t0
        self._init_solid = bool(solid)
        self._init_m = list(self._m)
        self._seed_kg = 0.0
        self._seed_kg_c = 0.0  # Σ m·T of all seed additions

        # field devices
        self._rng = np.random.default_rng(seed)
        self._noise: list[float] = []
        self._noise_i = 0
        self._sensor = [t0] * 4  # lagged sensor state (true, before noise)
        self._sensed = [0.0] * 4  # quantised noisy reading
        self._reported = [0.0] * 4
        self._sensor_fault: list[str | None] = [None] * 4
        self._outputs = dict.fromkeys(_OUTPUTS, False)  # last output image applied
        self._heater_failed = [False] * 6
        self._motor_overload = [False] * 3
        self._motor_on_s = [0.0] * 3
        self._grid_v = cfg.grid.voltage_v
        self._grid_hz = cfg.grid.frequency_hz
        self._lost_phase = 0
        self._estop = False
        self._pedal = False
        self._coef_cache: dict[float, tuple[float, float, float, float]] = {}
        self._sample_sensors()

    # ------------------------------------------------------------------ stepping

    def step(self, dt_s: float, outputs: Mapping[str, bool]) -> None:
        """Advance the plant by ``dt_s`` seconds (> 0) with the output image ``outputs``.

        Unknown output names raise KeyError; missing names are False. Long steps are split into
        sub-steps of at most ``config.max_substep_s``.
        """
        if not (dt_s >= 0.0 and math.isfinite(dt_s)):
            raise ValueError(f"dt_s: must be finite and >= 0, got {dt_s!r}")
        if not outputs.keys() <= _OUTPUT_SET:
            raise KeyError(f"unknown output(s): {sorted(set(outputs) - _OUTPUT_SET)}")
        out = self._outputs
        for name in _OUTPUTS:
            out[name] = bool(outputs.get(name, False))
        if dt_s == 0.0:
            return
        cfg = self.config
        n = max(1, math.ceil(dt_s / cfg.max_substep_s - 1e-9))
        h = dt_s / n
        coefs = self._coef_cache.get(h)
        if coefs is None:
            coefs = (
                _lag_factor(h, cfg.heater_lag_s),
                _lag_mean_factor(h, cfg.heater_lag_s),
                _lag_factor(h, cfg.cooling.lag_s),
                _lag_mean_factor(h, cfg.cooling.lag_s),
                _lag_factor(h, cfg.sensors.lag_s),
                _lag_factor(h, cfg.seed_dissolve_s),
            )
            self._coef_cache[h] = coefs
        a_heat, b_heat, a_cool, b_cool, a_sens, a_seed = coefs

        heater_w, motor_on, ua_cmd = self._power()
        cmd0, cmd1, cmd2, cmd3 = heater_w[0], heater_w[1], heater_w[2], heater_w[3]
        mixer_on, pump_on = motor_on[0], motor_on[1]

        cl = self._cl
        t = self._t
        ms = self._ms
        m = self._m
        cap = self._cap_liq
        pd = self._p_del
        sens = self._sensor
        ta = cfg.ambient_temp_c
        tc = cfg.cooling.coolant_temp_c
        share_b = cfg.cooling.bottom_share
        g0, g1, g2, g3 = self._g_amb
        k_pf = cfg.circulation.pump_fountain_conduction_w_per_k
        mix_ua = cfg.mixing.running_ua_w_per_k if mixer_on else cfg.mixing.idle_ua_w_per_k
        mix_floor = cfg.mixing.min_liquid_scale
        flow = cfg.circulation.flow_kg_per_s if pump_on else 0.0
        ua = self._ua_cool
        ledger = self._ledger
        heat_j = cool_j = amb_j = 0.0

        for _ in range(n):
            tb, tw, tp, tf = t
            if self._any_solid:
                tank_kg = m[0] + m[1]
                tank_lf = (tank_kg - ms[0] - ms[1]) / tank_kg
                mix = mix_ua * max(mix_floor, tank_lf)
                flowing = flow > 0.0 and ms[2] <= 0.0 and ms[0] < m[0]
            else:
                mix = mix_ua
                flowing = flow > 0.0
            if flowing:
                adv = flow * cl
                t_out = self._riser_pass(flow * h, tp)
            else:
                adv = 0.0
                t_out = tf
            # lagged heater heat and jacket UA: their exact means over the sub-step
            ua_mean = ua_cmd + (ua - ua_cmd) * b_cool
            cb = ua_mean * share_b
            cw = ua_mean - cb
            p0 = cmd0 + (pd[0] - cmd0) * b_heat
            p1 = cmd1 + (pd[1] - cmd1) * b_heat
            p2 = cmd2 + (pd[2] - cmd2) * b_heat
            p3 = cmd3 + (pd[3] - cmd3) * b_heat
            qc0 = cb * (tc - tb)
            qc1 = cw * (tc - tw)
            qa0 = g0 * (ta - tb)
            qa1 = g1 * (ta - tw)
            qa2 = g2 * (ta - tp)
            qa3 = g3 * (ta - tf)
            q0 = p0 + qc0 + qa0 + (mix + adv) * (tw - tb)
            q1 = p1 + qc1 + qa1 + mix * (tb - tw) + adv * (tf - tw)
            q2 = p2 + qa2 + k_pf * (tf - tp) + adv * (tb - tp)
            q3 = p3 + qa3 + k_pf * (tp - tf) + adv * (t_out - tf)
            heat_j += (p0 + p1 + p2 + p3) * h
            cool_j += (qc0 + qc1) * h
            amb_j += (qa0 + qa1 + qa2 + qa3) * h
            e0 = q0 * h
            e1 = q1 * h
            if self._pool_kg > 0.0:
                e0, e1 = self._dissolve_seed(a_seed, e0, e1)
            if self._any_solid:
                self._heat_node(0, e0)
                self._heat_node(1, e1)
                self._heat_node(2, q2 * h)
                self._heat_node(3, q3 * h)
                self._any_solid = ms[0] > 0.0 or ms[1] > 0.0 or ms[2] > 0.0 or ms[3] > 0.0
            else:
                t[0] = tb + e0 / cap[0]
                t[1] = tw + e1 / cap[1]
                t[2] = tp + q2 * h / cap[2]
                t[3] = tf + q3 * h / cap[3]
            # lags: heater elements, jacket, sensors
            pd[0] += (cmd0 - pd[0]) * a_heat
            pd[1] += (cmd1 - pd[1]) * a_heat
            pd[2] += (cmd2 - pd[2]) * a_heat
            pd[3] += (cmd3 - pd[3]) * a_heat
            ua += (ua_cmd - ua) * a_cool
            sens[0] += (t[0] - sens[0]) * a_sens
            sens[1] += (t[1] - sens[1]) * a_sens
            sens[2] += (t[2] - sens[2]) * a_sens
            sens[3] += (t[3] - sens[3]) * a_sens

        self._ua_cool = ua
        ledger["heaters_j"] += heat_j
        ledger["cooling_j"] += cool_j
        ledger["ambient_j"] += amb_j
        on_s = self._motor_on_s
        for i in range(3):
            on_s[i] = on_s[i] + dt_s if motor_on[i] else 0.0
        self.time_s += dt_s
        self._sample_sensors()

    def _power(self) -> tuple[list[float], list[bool], float]:
        """What the present output image, e-stop chain, grid and faults let through:
        electrical power of each heater (W, _HEATERS order), motors running, jacket UA (W/K)."""
        out = self._outputs
        if self._estop:
            return [0.0] * 6, [False] * 3, 0.0
        v = self._phase_voltages()
        rated = self.config.rated_voltage_v
        heater_w = [
            self._p_rated[i] * (v[_HEATER_PHASE[i]] / rated) ** 2
            if out[name] and not self._heater_failed[i]
            else 0.0
            for i, name in enumerate(_HEATERS)
        ]
        runs = v[2] >= self.config.motors.min_run_voltage_v
        motor_on = [runs and out[name] for name in _MOTORS]
        cool = self.config.cooling
        ua_cmd = cool.stage1_ua_w_per_k * out["cool1_tank"] + cool.stage2_ua_w_per_k * out["cool2_tank"]
        return heater_w, motor_on, ua_cmd

    def _phase_voltages(self) -> tuple[float, float, float]:
        v = self._grid_v
        lost = self._lost_phase
        return (0.0 if lost == 1 else v, 0.0 if lost == 2 else v, 0.0 if lost == 3 else v)

    def _update_capacities(self) -> None:
        cl = self._cl
        for i in range(4):
            self._cap_liq[i] = self._c_steel[i] + self._m[i] * cl

    def _heat_node(self, i: int, e_j: float) -> None:
        """Add ``e_j`` joules to node i, melting at the melt point while solid remains."""
        t = self._t
        m_s = self._ms[i]
        if m_s <= 0.0:
            t[i] += e_j / self._cap_liq[i]
            return
        temp = t[i]
        c = self._c_steel[i] + (self._m[i] - m_s) * self._cl + m_s * self._cs
        tm = self._tm
        if e_j <= 0.0:  # cooling: no re-solidification
            t[i] = temp + e_j / c
            return
        if temp < tm:
            to_melt_point = c * (tm - temp)
            if e_j <= to_melt_point:
                t[i] = temp + e_j / c
                return
            e_j -= to_melt_point
        latent = self._latent
        if latent > 0.0 and e_j < m_s * latent:  # on the plateau
            self._ms[i] = m_s - e_j / latent
            t[i] = tm
            return
        self._ms[i] = 0.0
        t[i] = tm + (e_j - m_s * latent) / self._cap_liq[i]

    def _riser_pass(self, mass_kg: float, temp_c: float) -> float:
        """Push a parcel into the riser and pull the same mass out; returns its mean temperature."""
        riser = self._riser
        riser.append([mass_kg, temp_c])
        need = mass_kg
        mt = 0.0
        while need > 0.0 and riser:
            head = riser[0]
            if head[0] <= need:
                riser.popleft()
                mt += head[0] * head[1]
                need -= head[0]
            else:
                head[0] -= need
                mt += need * head[1]
                need = 0.0
        if need > 0.0:  # float residue only
            mt += need * temp_c
        return mt / mass_kg

    def _dissolve_seed(self, a_seed: float, e0: float, e1: float) -> tuple[float, float]:
        """Move a portion of the seed pool into the tank nodes; returns the node energies
        (J) increased by the portion's sensible heat relative to each node."""
        dm = self._pool_kg * a_seed
        if self._pool_kg - dm < 1e-9:
            dm = self._pool_kg
        self._pool_kg -= dm
        m = self._m
        t = self._t
        dm0 = dm * m[0] / (m[0] + m[1])
        dm1 = dm - dm0
        m[0] += dm0
        m[1] += dm1
        self._update_capacities()
        cl = self._cl
        tp = self._pool_t
        return e0 + dm0 * cl * (tp - t[0]), e1 + dm1 * cl * (tp - t[1])

    def _sample_sensors(self) -> None:
        """Noise and quantisation of the lagged sensor states, then the fault overlay."""
        sc = self.config.sensors
        res = sc.resolution_c
        sigma = sc.noise_sigma_c
        if self._noise_i + 4 > len(self._noise):
            self._noise = self._rng.standard_normal(_NOISE_BLOCK).tolist()
            self._noise_i = 0
        k = self._noise_i
        noise = self._noise
        for i in range(4):
            x = self._sensor[i] + sigma * noise[k + i]
            self._sensed[i] = round(round(x / res) * res, 9)
        self._noise_i = k + 4
        for i in range(4):
            self._apply_sensor_fault(i)

    def _apply_sensor_fault(self, i: int) -> None:
        kind = self._sensor_fault[i]
        if kind is None:
            self._reported[i] = self._sensed[i]
        elif kind == "open":
            self._reported[i] = self.config.sensors.open_reading_c
        elif kind == "short":
            self._reported[i] = self.config.sensors.short_reading_c
        # "stuck": keep the last reported value

    # ------------------------------------------------------------------ field devices

    def read_inputs(self) -> dict[str, float | bool]:
        """What the field devices report now (°C, A, V, Hz, bools). Idempotent between steps."""
        rep = self._reported
        heater_w, motor_on, _ = self._power()
        v = self._phase_voltages()
        phase_a = [0.0, 0.0, 0.0]
        for i, w in enumerate(heater_w):
            if w > 0.0:
                phase_a[_HEATER_PHASE[i]] += w / v[_HEATER_PHASE[i]]
        mc = self.config.motors
        running = (mc.mixer_running_a, mc.pump_running_a, mc.vibration_running_a)
        motor_a = [0.0, 0.0, 0.0]
        for i in range(3):
            if motor_on[i]:
                if self._motor_on_s[i] < mc.inrush_s - 1e-9:
                    factor = mc.inrush_factor
                elif self._motor_overload[i]:
                    factor = mc.overload_factor
                else:
                    factor = 1.0
                motor_a[i] = running[i] * factor
        phase_a[2] += motor_a[0] + motor_a[1] + motor_a[2]
        g = self.config.grid
        w_v = 2.0 * math.pi * self.time_s / _RIPPLE_V_PERIOD_S
        volts = [
            0.0 if v[k] == 0.0 else round(max(0.0, v[k] + g.voltage_ripple_v * math.sin(w_v + 2.0 * math.pi * k / 3.0)), 1)
            for k in range(3)
        ]
        freq = self._grid_hz + g.frequency_ripple_hz * math.sin(2.0 * math.pi * self.time_s / _RIPPLE_F_PERIOD_S)
        return {
            "temp_tank_bottom": rep[0],
            "temp_tank_wall": rep[1],
            "temp_pump": rep[2],
            "temp_fountain": rep[3],
            "current_mixer": motor_a[0],
            "current_pump": motor_a[1],
            "current_vibration": motor_a[2],
            "current_total": max(phase_a),
            "grid_v_l1": volts[0],
            "grid_v_l2": volts[1],
            "grid_v_l3": volts[2],
            "grid_freq": round(freq, 3),
            "estop_ok": not self._estop,
            "pedal": self._pedal,
        }

    # ------------------------------------------------------------------ truth (for benches and tests)

    def true_temp_c(self, zone: str) -> float:
        """True chocolate temperature of a node (°C): no lag, no noise."""
        return self._t[self._zone_index(zone)]

    def pouring_temp_c(self) -> float:
        """True temperature at the pouring point, the fountain outlet (the fountain node, °C)."""
        return self._t[3]

    def liquid_fraction(self) -> float:
        """Melted share of all chocolate in the nodes and the seed pool (0..1; seed callets
        waiting in the pool are crystals, not liquid)."""
        total = sum(self._m) + self._pool_kg
        return (sum(self._m) - sum(self._ms)) / total

    def chocolate_mass_kg(self) -> float:
        """Charge of the machine: the four nodes plus the seed pool (the riser's transit mass
        is a delay line, not counted)."""
        return sum(self._m) + self._pool_kg

    def physical_min_heating_time_s(self, goal_c: float) -> float:
        """Shortest possible time (s) to bring all chocolate from its initial state to ``goal_c``.

        Energy the chocolate (nodes at start, plus every seed addition from its own
        temperature) must take up - solid sensible heat to the melt point, latent heat, liquid
        sensible heat to the goal - divided by the full power of the four zone heaters at the
        rated voltage. Steel, losses and heater lag are left out: it is a lower bound.
        """
        cl, cs, tm, t0 = self._cl, self._cs, self._tm, self._init_t
        per_kg = cs * (tm - t0) + self._latent + cl * (goal_c - tm) if self._init_solid else cl * (goal_c - t0)
        energy_j = sum(self._init_m) * per_kg + cl * (self._seed_kg * goal_c - self._seed_kg_c)
        power_w = sum(self._p_rated[:4])
        if power_w <= 0.0:
            return math.inf
        return max(0.0, energy_j) / power_w

    def enthalpy_j(self) -> float:
        """Total stored enthalpy (J; reference: liquid chocolate and steel at 0 °C) of the
        nodes, the riser and the seed pool. Changes only by :meth:`energy_ledger` flows."""
        cl, cs, tm, lat = self._cl, self._cs, self._tm, self._latent
        total = 0.0
        for i in range(4):
            temp = self._t[i]
            m_s = self._ms[i]
            h_solid = cl * tm - lat - cs * (tm - temp)
            total += self._c_steel[i] * temp + (self._m[i] - m_s) * cl * temp + m_s * h_solid
        total += cl * sum(p[0] * p[1] for p in self._riser)
        total += cl * self._pool_kg * self._pool_t
        return total

    def energy_ledger(self) -> dict[str, float]:
        """Heat that crossed the model's boundary since start (J, positive = into the chocolate):
        ``heaters_j``, ``cooling_j`` (≤ 0 normally), ``ambient_j``."""
        return dict(self._ledger)

    # ------------------------------------------------------------------ fault injection

    def set_sensor_fault(self, zone: str, kind: str | None) -> None:
        """``"open"`` reads open_reading_c, ``"short"`` short_reading_c, ``"stuck"`` holds the
        last reading; ``None`` heals. Takes effect at once."""
        i = self._zone_index(zone)
        if kind is not None and kind not in _SENSOR_FAULTS:
            raise ValueError(f"kind: must be one of {_SENSOR_FAULTS} or None, got {kind!r}")
        self._sensor_fault[i] = kind
        self._apply_sensor_fault(i)

    def set_temperature(self, zone: str, temp_c: float) -> None:
        """Bring a zone's chocolate (and its sensor) to ``temp_c`` at once, as a hot or cold
        charge poured in would: the way to drive a zone past its limits in a test."""
        if not math.isfinite(temp_c):
            raise ValueError(f"temp_c: must be finite, got {temp_c!r}")
        i = self._zone_index(zone)
        self._t[i] = self._sensor[i] = float(temp_c)
        self._sample_sensors()

    def set_heater_failed(self, output: str, failed: bool) -> None:
        """A failed heater gives no heat and draws no current."""
        if output not in _HEATERS:
            raise KeyError(f"not a heater output: {output!r} (one of {_HEATERS})")
        self._heater_failed[_HEATERS.index(output)] = bool(failed)

    def set_motor_overload(self, motor: str, overload: bool) -> None:
        """An overloaded motor keeps running but draws overload_factor × its running current."""
        if motor not in _MOTORS:
            raise KeyError(f"not a motor: {motor!r} (one of {_MOTORS})")
        self._motor_overload[_MOTORS.index(motor)] = bool(overload)

    def set_grid(
        self,
        *,
        voltage_v: float | None = None,
        frequency_hz: float | None = None,
        lost_phase: int | None = None,
    ) -> None:
        """Set the supply: phase voltage (V, all phases), frequency (Hz), a lost phase 1..3
        (reads 0 V, feeds nothing) or 0 to restore. ``None`` leaves a value unchanged."""
        if voltage_v is not None:
            if not (voltage_v >= 0.0 and math.isfinite(voltage_v)):
                raise ValueError(f"voltage_v: must be finite and >= 0, got {voltage_v!r}")
            self._grid_v = float(voltage_v)
        if frequency_hz is not None:
            if not (frequency_hz > 0.0 and math.isfinite(frequency_hz)):
                raise ValueError(f"frequency_hz: must be finite and > 0, got {frequency_hz!r}")
            self._grid_hz = float(frequency_hz)
        if lost_phase is not None:
            if lost_phase not in (0, 1, 2, 3):
                raise ValueError(f"lost_phase: must be 0 (none) or 1..3, got {lost_phase!r}")
            self._lost_phase = int(lost_phase)

    def set_estop(self, pressed: bool) -> None:
        """The hard-wired e-stop chain: while pressed no output gets power."""
        self._estop = bool(pressed)

    def set_pedal(self, pressed: bool) -> None:
        self._pedal = bool(pressed)

    def add_seed(self, fraction_of_mass: float, temp_c: float) -> None:
        """Drop ``fraction_of_mass`` × the present charge of seed callets at ``temp_c`` into the
        tank. They join the tank liquid with time constant ``seed_dissolve_s``."""
        if not (0.0 < fraction_of_mass <= 1.0):
            raise ValueError(f"fraction_of_mass: must be in (0, 1], got {fraction_of_mass!r}")
        if not (-30.0 <= temp_c <= 60.0):
            raise ValueError(f"temp_c: must be in [-30, 60] °C, got {temp_c!r}")
        dm = fraction_of_mass * self.chocolate_mass_kg()
        pool = self._pool_kg
        self._pool_t = (pool * self._pool_t + dm * temp_c) / (pool + dm)
        self._pool_kg = pool + dm
        self._seed_kg += dm
        self._seed_kg_c += dm * temp_c

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _zone_index(zone: str) -> int:
        try:
            return _ZONES.index(zone)
        except ValueError:
            raise KeyError(f"unknown zone: {zone!r} (one of {_ZONES})") from None
