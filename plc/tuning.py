"""Process identification and PID tuning of one zone from an experiment's record. Pure.

    model = identify(samples)                   # samples: ((t_s, u_pct, y_c), ...) of the zone
    gains = simc(model)                         # SIMC gains for our positional PID block
    figures = predict(model, gains)             # what the loop will do, on the model

**Model** (first order plus dead time, FOPDT): the zone's temperature answers its output
``u`` (% of the -100..100 range) as

    y(t) = y_ref + K * x(t),     tau * dx/dt = -x + (u(t - theta) - u_ref)

with the static gain ``K`` (K per %), the time constant ``tau`` (s) and the dead time ``theta``
(s). A zone whose ``tau`` is long against its dead time and the experiment (a large tank) is
*integrating*: its slope per % is ``K / tau`` and that is all the data can tell;
``Model.integrating`` says so, and the tuning rule treats it as such (below).

**Identification**: an output-error fit. The record is resampled to a fixed step (at most
``MAX_SAMPLES`` points, the output averaged over each step), ``theta`` and ``tau`` run over a
grid (theta in whole steps, tau on a logarithmic scale up to ``TAU_MAX_S``), and for each pair
the model's response to the recorded input is linear in ``K``, ``y_ref`` and the decay of the
initial state, which least squares give in closed form; the best pair is refined once on a finer
grid. Fitting the simulated response (not the one-step prediction of an ARX model) keeps the
estimate unbiased by the sensor's noise and its 0.1 degC quantisation (Ljung, *System
Identification*, 2nd ed., §7.3 and §16.4). The grid is evaluated a chunk at a time
(``fit_step``: a few milliseconds each), so the scan spreads the fit over some fifteen scans and
none of them misses its deadline; ``identify`` runs the same steps at once.

**Two readings of the dead time.** A zone loop has no transport: what the fit calls dead time
is mostly the heater element's and the thermowell's lags. With the sensor's noise a record
cannot always tell a dead time from a lag of similar length, so the fit also tries the *lag
reading* - ``K' / ((tau' s + 1)(lag s + 1)) e^(-dead' s)``, the lag 0.5..1.5 theta, the dead
time at most theta / 2 - and takes it when its residual is within ``LAG_READING_TOLERANCE``
of the first-order fit's (ties go to the physics). A process with a real dead time fits the lag
reading clearly worse and keeps the first reading.

**Tuning rule**: SIMC (Skogestad, "Simple analytic rules for model reduction and PID controller
tuning", J. Process Control 13 (2003) 291-309), the closed-loop time constant ``tau_c`` set by the dead time:

- dead-time reading, PI with ``tau_c = theta`` ("tight control, good robustness"):
  ``Kc = tau / (K (tau_c + theta))``, ``tau_I = min(tau, 4 (tau_c +
  theta))``; the ``min`` makes it the integrating-process rule for lag-dominant zones;
- lag reading, PID: SIMC's second-order rule (series form, ``tau_D`` = the second lag) with
  the whole apparent dead time taken as that lag (its upper estimate: the fitted lag is the
  lower one) and none left: ``Kc = tau / (K tau_c)``, ``tau_I = min(tau, 4 tau_c)``, ``tau_D =
  theta``, with ``tau_c = 1.5 theta`` (no dead time is left to set it by, and 1.5 theta keeps
  the derivative's noise in bounds); turned into our parallel block as ``kp = Kc (1 + tau_D /
  tau_I)``, ``ki = Kc / tau_I``, ``kd = Kc tau_D``, the derivative filtered over ``tau_D / 2``
  (at least 2 s) against the quantisation. The derivative brakes a zone that approaches its
  goal fast (the momentum of its heater's lag): without it a light machine with strong heaters
  overshoots its goals by up to 0.9 K, with it 0.5 K (``bench.control --family``).

Units of our block: ``kp`` %/K, ``ki`` %/(K*s), ``kd`` %*s/K, each within ``max_gain``.

**Predicted figures**: the chosen reading and the gains simulated in closed loop (set-point step
of 1 K; a load step of 10 % of the output range) and its frequency response: overshoot, settling
time within 0.1 K, the load's peak deviation and recovery, maximum sensitivity Ms (robustness:
<= 2 is good), gain and phase margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

MAX_SAMPLES = 600           # the fit's resampled record: at most this many points
TAU_MAX_S = 20000.0         # longest time constant the grid tries (beyond: integrating)
THETA_MAX_S = 120.0         # longest dead time the grid tries
INTEGRATING_RATIO = 10.0    # tau beyond this many times (theta + the record's length / 10): integrating
LAG_TAU_C_FACTOR = 1.5         # tau_c of a lag-dominated zone, in apparent dead times
LAG_READING_TOLERANCE = 1.025   # the lag reading is taken when its residual is this close
TAU_C_MIN_S = 4.0           # the closed loop's time constant is never asked shorter (noise)


class IdentificationError(ValueError):
    """The record does not determine a model (too short, no excitation, no fit)."""


@dataclass(frozen=True, slots=True)
class Model:
    gain_k_per_pct: float       # K: temperature change per % of output, at steady state
    tau_s: float
    dead_s: float
    rms_k: float                # residual of the fit, K
    samples: int
    step_s: float
    # the lag reading, when it fits as well (lag_s > 0): gain / ((tau s + 1)(lag s + 1)) e^(-dead s)
    lag_s: float = 0.0
    lag_dead_s: float = 0.0
    lag_tau_s: float = 0.0
    lag_gain_k_per_pct: float = 0.0

    @property
    def integrating(self) -> bool:
        return self.tau_s >= INTEGRATING_RATIO * (self.dead_s + self.samples * self.step_s / 10.0)

    @property
    def slope_k_per_pct_s(self) -> float:
        """The initial slope per % of output (K/(%*s)): an integrating zone's only parameter."""
        return self.gain_k_per_pct / self.tau_s

    def as_dict(self) -> dict[str, float]:
        d = {"gain_k_per_pct": self.gain_k_per_pct, "tau_s": self.tau_s, "dead_s": self.dead_s,
             "rms_k": self.rms_k}
        if self.lag_s > 0:
            d["lag_reading"] = {"gain_k_per_pct": self.lag_gain_k_per_pct, "tau_s": self.lag_tau_s,
                                "lag_s": self.lag_s, "dead_s": self.lag_dead_s}
        return d


@dataclass(frozen=True, slots=True)
class Gains:
    kp: float                   # %/K
    ki: float                   # %/(K*s)
    kd: float = 0.0             # %*s/K
    tau_c_s: float = 0.0
    d_filter_s: float = 2.0     # the derivative's filter time constant


@dataclass(frozen=True, slots=True)
class Prediction:
    overshoot_k: float          # beyond a 1 K set-point step
    settling_s: float | None    # until it stays within 0.1 K of the new set-point
    load_peak_k: float          # a load of 10 % of the output range
    load_recovery_s: float | None
    ms: float                   # maximum sensitivity (robustness: <= 2 is good)
    gain_margin: float
    phase_margin_deg: float

    def as_dict(self) -> dict[str, float | None]:
        return {f: getattr(self, f) for f in self.__slots__}


def _resample(samples: Sequence[tuple[float, float, float]]) -> tuple[np.ndarray, np.ndarray, float]:
    a = np.asarray(samples, dtype=float)
    if a.ndim != 2 or a.shape[0] < 20 or a.shape[1] != 3:
        raise IdentificationError(f"too short a record ({len(samples)} samples; at least 20)")
    t, u, y = a[:, 0] - a[0, 0], a[:, 1], a[:, 2]
    span = float(t[-1])
    if span <= 0 or not np.all(np.diff(t) > 0):
        raise IdentificationError("sample times must increase")
    n = min(MAX_SAMPLES, max(20, int(span)))
    step = span / (n - 1)
    grid = np.arange(n) * step
    # the output over each step is its time average (it is held between samples); the
    # measurement is interpolated at the step's end
    cum = np.concatenate(([0.0], np.cumsum(u[:-1] * np.diff(t))))
    area = np.interp(grid, t, cum)
    uavg = np.empty(n)
    uavg[0] = u[0]
    uavg[1:] = np.diff(area) / step
    return uavg, np.interp(grid, t, y), step


def _fit(u: np.ndarray, y: np.ndarray, step: float, thetas: np.ndarray, taus: np.ndarray,
         lag_s: float = 0.0):
    """Residual and parameters of every (theta, tau) pair: arrays shaped (len(thetas), len(taus)).
    ``lag_s`` > 0: a second first-order lag of that time constant in series."""
    n = len(y)
    du = u - u[0]
    shift = np.rint(thetas / step).astype(int)
    a = np.exp(-step / taus)                       # per tau
    b = math.exp(-step / lag_s) if lag_s > 0 else 0.0
    nt, nk = len(thetas), len(taus)
    x1 = np.zeros((nt, nk))
    x = np.zeros((nt, nk))
    # normal equations of y = c + K x + d e, e = a^k (decay of an unknown initial state)
    sx = np.zeros((nt, nk)); sxx = np.zeros((nt, nk)); sxy = np.zeros((nt, nk))
    sxe = np.zeros((nt, nk)); se = np.zeros(nk); see = np.zeros(nk); sey = np.zeros(nk)
    e = np.ones(nk)
    sy, syy = float(y.sum()), float((y * y).sum())
    for k in range(n):
        src = k - shift                        # du[k]: the output's mean over step k
        inp = np.where(src >= 0, du[np.clip(src, 0, n - 1)], 0.0)[:, None]
        if k > 0:
            x1 = a * x1 + (1.0 - a) * inp
            x = b * x + (1.0 - b) * x1
            e = e * a
        yk = y[k]
        sx += x; sxx += x * x; sxy += x * yk; sxe += x * e
        se += e; see += e * e; sey += e * yk
    # solve the 3x3 systems [[n, sx, se], [sx, sxx, sxe], [se, sxe, see]] p = [sy, sxy, sey]
    m = np.empty((nt, nk, 3, 3))
    m[..., 0, 0] = n; m[..., 0, 1] = m[..., 1, 0] = sx; m[..., 0, 2] = m[..., 2, 0] = se
    m[..., 1, 1] = sxx; m[..., 1, 2] = m[..., 2, 1] = sxe; m[..., 2, 2] = see
    m += np.eye(3) * 1e-9 * (1.0 + np.abs(m).max())
    rhs = np.empty((nt, nk, 3))
    rhs[..., 0] = sy; rhs[..., 1] = sxy; rhs[..., 2] = sey
    p = np.linalg.solve(m, rhs[..., None])[..., 0]
    # residual sum of squares = y'y - p' rhs
    rss = syy - np.einsum("...i,...i->...", p, rhs)
    return np.maximum(rss, 0.0) / n, p


COARSE_CHUNK = 5            # theta values of the coarse grid per fitting step
LAG_STEPS = 7               # lags the lag reading tries, one per fitting step


@dataclass(frozen=True, slots=True)
class Fitting:
    """Where an identification spread over several calls of ``fit_step`` has got to (a plain
    value: the scan keeps it in its state and does one step per scan)."""
    step: int = 0
    coarse: tuple[float, float, float] = (math.inf, 0.0, 0.0)   # mse, theta, tau
    model: Model | None = None
    lag: tuple[float, float, float, float, float] = (math.inf, 0.0, 0.0, 0.0, 0.0)


def _grid(step: float, n: int) -> tuple[np.ndarray, np.ndarray, float]:
    span = step * (n - 1)
    theta_max = min(THETA_MAX_S, span / 3)
    coarse = max(step, theta_max / 24)
    return (np.arange(0.0, theta_max + coarse / 2, coarse),
            np.geomspace(max(step, 1.0), TAU_MAX_S, 32), coarse)


def fit_step(samples: Sequence[tuple[float, float, float]], f: Fitting) -> Fitting | Model:
    """One step of the fit (a few ms): a chunk of the coarse grid, the refinement, or one lag of
    the lag reading. Returns the next ``Fitting``, or the ``Model`` once done; raises
    IdentificationError for a record that determines none."""
    u, y, step = _resample(samples)
    if float(np.ptp(u)) < 1.0:
        raise IdentificationError("the output hardly moved (< 1 %): nothing to identify")
    thetas, taus, coarse = _grid(step, len(y))
    chunks = math.ceil(len(thetas) / COARSE_CHUNK)
    if f.step < chunks:
        part = thetas[f.step * COARSE_CHUNK:(f.step + 1) * COARSE_CHUNK]
        mse, _ = _fit(u, y, step, part, taus)
        i, j = np.unravel_index(int(np.argmin(mse)), mse.shape)
        best = (float(mse[i, j]), float(part[i]), float(taus[j]))
        return replace(f, step=f.step + 1, coarse=min(f.coarse, best))
    if f.step == chunks:
        # refine both around the best: theta at the step's resolution, tau on a fine scale
        _, theta0, tau0 = f.coarse
        j = int(np.argmin(np.abs(np.log(taus / tau0))))
        near = np.arange(max(0.0, theta0 - coarse), theta0 + coarse + step / 2, step)
        fine = np.geomspace(taus[max(0, j - 1)], taus[min(len(taus) - 1, j + 1)], 16)
        mse2, p2 = _fit(u, y, step, near, fine)
        i2, j2 = np.unravel_index(int(np.argmin(mse2)), mse2.shape)
        gain = float(p2[i2, j2, 1])
        if not (math.isfinite(gain) and gain > 0):
            raise IdentificationError(f"no positive gain fits the record (got {gain:.4g} K/%)")
        model = Model(gain, float(fine[j2]), float(near[i2]), math.sqrt(float(mse2[i2, j2])),
                      len(y), step)
        if model.dead_s < 2 * step:
            return model
        return replace(f, step=f.step + 1, model=model)
    # the lag reading: most of that dead time a first-order lag (heater element, thermowell)
    # in series, a short dead time left (the scan, the PWM window); one lag per step
    m = f.model
    k = f.step - chunks - 1
    if k < LAG_STEPS:
        lag = float(np.linspace(0.5 * m.dead_s, 1.5 * m.dead_s, LAG_STEPS)[k])
        dead = np.arange(0.0, m.dead_s / 2 + step / 2, step)
        around = np.geomspace(m.tau_s * 0.5, m.tau_s * 1.5, 12)
        mse3, p3 = _fit(u, y, step, dead, around, lag)
        i3, j3 = np.unravel_index(int(np.argmin(mse3)), mse3.shape)
        cand = (float(mse3[i3, j3]), lag, float(dead[i3]), float(around[j3]), float(p3[i3, j3, 1]))
        return replace(f, step=f.step + 1, lag=min(f.lag, cand))
    err, lag, lag_dead, lag_tau, lag_gain = f.lag
    if err <= LAG_READING_TOLERANCE * m.rms_k ** 2 and lag_gain > 0:
        return replace(m, lag_s=lag, lag_dead_s=lag_dead, lag_tau_s=lag_tau,
                       lag_gain_k_per_pct=lag_gain)
    return m


def identify(samples: Sequence[tuple[float, float, float]]) -> Model:
    """Fit the model to ``samples`` = ((t_s, u_pct, y_c), ...), in time order, at once (the
    scan spreads the same steps over several scans, ``fit_step``)."""
    f: Fitting | Model = Fitting()
    while isinstance(f, Fitting):
        f = fit_step(samples, f)
    return f


def simc(model: Model, tau_c_s: float | None = None, max_gain: float = 1000.0) -> Gains:
    """SIMC gains for our block (kp %/K, ki %/(K*s), kd %*s/K; see the module doc): PI on the
    dead-time reading, PID on the lag reading."""
    theta = max(model.dead_s, 0.5)
    if model.lag_s <= 0:
        tc = max(theta if tau_c_s is None else tau_c_s, TAU_C_MIN_S)
        kc = model.tau_s / (model.gain_k_per_pct * (tc + theta))
        ti = min(model.tau_s, 4.0 * (tc + theta))
        return Gains(kp=min(kc, max_gain), ki=min(kc / ti, max_gain), kd=0.0, tau_c_s=tc)
    # a lag-dominated zone: the second-order rule with the whole apparent dead time as the
    # second lag (its upper estimate), no dead time left, tau_c = 1.5 theta
    tc = max(LAG_TAU_C_FACTOR * theta if tau_c_s is None else tau_c_s, TAU_C_MIN_S)
    kc = model.tau_s / (model.gain_k_per_pct * tc)
    ti = min(model.tau_s, 4.0 * tc)
    td = theta
    return Gains(kp=min(kc * (1 + td / ti), max_gain), ki=min(kc / ti, max_gain),
                 kd=min(kc * td, max_gain), tau_c_s=tc, d_filter_s=max(2.0, td / 2))


def _reading(m: Model) -> tuple[float, float, float, float]:
    """(gain, tau, lag, dead time) of the reading the tuning uses."""
    if m.lag_s > 0:
        return m.lag_gain_k_per_pct, m.lag_tau_s, m.lag_s, m.lag_dead_s
    return m.gain_k_per_pct, m.tau_s, 0.0, m.dead_s


def _loop(model: Model, g: Gains, ws: np.ndarray) -> np.ndarray:
    """The loop's frequency response: the PID (its derivative filtered) times the model."""
    s = 1j * ws
    k, tau, lag, dead = _reading(model)
    plant = k * np.exp(-dead * s) / ((tau * s + 1.0) * (lag * s + 1.0))
    return plant * (g.kp + g.ki / s + g.kd * s / (g.d_filter_s * s + 1.0))


def predict(model: Model, g: Gains, dt_s: float = 0.5, horizon_s: float | None = None) -> Prediction:
    """Closed-loop figures of the PI on the model (see the module doc)."""
    horizon = horizon_s or max(600.0, 40.0 * (model.dead_s + min(model.tau_s, 2000.0) / 4))
    n = int(horizon / dt_s)
    k, tau, lag, dead = _reading(model)
    delay = max(0, int(round(dead / dt_s)))
    a = math.exp(-dt_s / tau)
    b = math.exp(-dt_s / lag) if lag > 0 else 0.0

    fd = math.exp(-dt_s / g.d_filter_s) if g.d_filter_s > 0 else 0.0

    def response(sp: float, load: float) -> list[float]:
        x, x2, integ, d_f, y_prev, buf, out = 0.0, 0.0, 0.0, 0.0, 0.0, [0.0] * (delay + 1), []
        for _ in range(n):
            y = k * x2
            e = sp - y
            d_f = fd * d_f + (1 - fd) * -(y - y_prev) / dt_s      # on the measurement, as the block
            y_prev = y
            integ += g.ki * e * dt_s
            u = max(-100.0, min(100.0, g.kp * e + integ + g.kd * d_f))
            buf.append(u + load)
            x = a * x + (1 - a) * buf.pop(0)
            x2 = b * x2 + (1 - b) * x
            out.append(y)
        return out

    def settle(trace: list[float], goal: float) -> float | None:
        bad = [k for k, v in enumerate(trace) if abs(v - goal) > 0.1]
        if not bad:
            return 0.0
        return None if bad[-1] == len(trace) - 1 else (bad[-1] + 1) * dt_s

    sp_trace = response(1.0, 0.0)
    load_trace = response(0.0, -10.0)
    ws = np.geomspace(1e-6, 20.0, 4000)
    loop = _loop(model, g, ws)
    mag, phase = np.abs(loop), np.unwrap(np.angle(loop))
    ms = float(np.max(1.0 / np.abs(1.0 + loop)))
    below = np.nonzero(phase <= -math.pi)[0]
    gm = float(1.0 / mag[below[0]]) if below.size else math.inf
    cross = np.nonzero(mag < 1.0)[0]
    pm = float(180.0 + math.degrees(phase[cross[0]])) if cross.size else 180.0
    return Prediction(overshoot_k=max(0.0, max(sp_trace) - 1.0), settling_s=settle(sp_trace, 1.0),
                      load_peak_k=max(abs(v) for v in load_trace),
                      load_recovery_s=settle(load_trace, 0.0), ms=ms, gain_margin=gm,
                      phase_margin_deg=pm)
