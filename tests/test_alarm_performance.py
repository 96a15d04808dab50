"""ISA-18.2 / EEMUA 191 alarm-system performance figures, in virtual time (no clock, no sleep)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import opcua_server.alarm_performance as perf_module
from opcua_server.alarm_performance import AlarmPerformance, transition_of
from plc.commands import Event

T0 = 1_772_357_400.0            # 2026-03-01 09:30 UTC
UA, AA, RTN, N, SH = ("unacknowledged_active", "acknowledged_active",
                      "unacknowledged_returned_to_normal", "normal", "shelved")


@dataclass(frozen=True)
class Row:                      # the fields of records.JournalRow the figures read
    alarm_id: str
    kind: str
    time_s: float
    state: str


def act(alarm_id: str, t: float) -> Row:
    return Row(alarm_id, "active", T0 + t, UA)


def activations(alarm_id: str, *times: float) -> list[Row]:
    return [act(alarm_id, t) for t in times]


def run(rows, since_s: float | None = T0) -> AlarmPerformance:
    p = AlarmPerformance(since_s)
    for r in rows:
        p.add(r)
    return p


# --------------------------------------------------------------------------- the tables

RATE = [
    # rows, now (s after T0), last_10min, average_per_10min, peak_10min
    ([], 0, 0, 0.0, 0),
    (activations("a", 0, 1, 2, 3, 4), 300, 5, 5.0, 5),           # the first 10 min: one window
    (activations("a", 0, 1, 2, 3, 4), 599.9, 5, 5.0, 5),
    (activations("a", 0, 1, 2, 3, 4), 600, 4, 5.0, 5),           # (now - 600, now]: 0 is out
    (activations("a", 0, 1, 2, 3, 4), 1200, 0, 2.5, 5),
    (activations("a", *range(0, 3600, 300)), 3600, 1, 2.0, 2),    # one every 5 min for an hour
    ([Row("a", "active", T0, SH), Row("a", "cleared", T0 + 1, SH)], 10, 0, 0.0, 0),   # shelved
    ([act("a", 0), Row("a", "acknowledged", T0 + 1, AA), Row("a", "comment", T0 + 2, AA),
      Row("a", "cleared", T0 + 3, N)], 10, 1, 1.0, 1),          # one annunciation, not four
    ([Row("a", "active", T0, SH), Row("a", "unshelved", T0 + 5, UA)], 10, 1, 1.0, 1),
    ([Row("a", "enabled", T0, N), Row("b", "unsuppressed", T0, UA)], 10, 1, 1.0, 1),
    ([act("a", 0), Row("", "restart", T0 + 1, "")], 10, 1, 1.0, 1),
]


@pytest.mark.parametrize("rows, now, last_10min, average, peak", RATE)
def test_alarm_rate(rows, now, last_10min, average, peak):
    f = run(rows).figures(T0 + now)
    assert (f.last_10min, f.average_per_10min, f.peak_10min) == (last_10min, pytest.approx(average), peak)
    assert f.annunciated == sum(1 for r in rows if r.state == UA)


ELEVEN_IN_100_S = activations("x", *range(0, 101, 10))           # the 11th at 100 s: a flood
FLOOD = [
    # rows, now, in_flood, floods, flood_time_s
    (activations("x", *range(0, 91, 10)), 100, False, 0, 0),      # ten: not yet
    (ELEVEN_IN_100_S, 100, True, 1, 0),
    (ELEVEN_IN_100_S, 400, True, 1, 300),
    # at 600 + 60 the seventh (at 60 s) leaves the window: four left, fewer than five: it ends
    (ELEVEN_IN_100_S, 659.9, True, 1, 559.9),
    (ELEVEN_IN_100_S, 660, False, 1, 560),
    (ELEVEN_IN_100_S, 5000, False, 1, 560),
    # still nine in the window at 650: the flood goes on (hysteresis), a new alarm does not start one
    (ELEVEN_IN_100_S + activations("y", 650), 650, True, 1, 550),
    # a second flood, an hour later
    (ELEVEN_IN_100_S + activations("z", *range(3600, 3711, 10)), 3800, True, 2, 560 + 100),
    (ELEVEN_IN_100_S + activations("z", *range(3600, 3711, 10)), 7200, False, 2, 560 + 570),
]


@pytest.mark.parametrize("rows, now, in_flood, floods, flood_time_s", FLOOD)
def test_alarm_floods(rows, now, in_flood, floods, flood_time_s):
    f = run(rows).figures(T0 + now)
    assert (f.in_flood, f.floods, f.flood_time_s) == (in_flood, floods, pytest.approx(flood_time_s))
    assert f.flood_percent == pytest.approx(100 * flood_time_s / max(now, 1e-9) if now else 0.0)


CHATTER = [
    # rows, now, chattering now, chattered since the start
    (activations("a", 0, 20, 59.9), 59.95, ("a",), ("a",)),
    (activations("a", 0, 20, 59.9), 60, (), ("a",)),              # (now - 60, now]: 0 is out
    (activations("a", 0, 20, 59.9), 100, (), ("a",)),            # stopped: still on the record
    (activations("a", 0, 30, 60), 60, (), ()),                    # 60 s from first to last: not
    (activations("a", 0, 30, 60, 89), 89, ("a",), ("a",)),
    (activations("a", 0, 1) + activations("b", 2, 3) + activations("a", 4), 5, ("a",), ("a",)),
    ([Row("a", k, T0 + t, s) for t, k, s in [(0, "active", UA), (1, "cleared", RTN),
                                              (2, "active", UA), (3, "shelved", SH),
                                              (4, "active", SH)]], 5, (), ()),   # shelved: fixed
]


@pytest.mark.parametrize("rows, now, chattering, chattered", CHATTER)
def test_chattering_alarms(rows, now, chattering, chattered):
    f = run(rows).figures(T0 + now)
    assert (f.chattering, f.chattered) == (chattering, chattered)


DAY = 24 * 3600
STALE = [
    # rows, now, stale
    (activations("a", 0), DAY, ()),                               # exactly 24 h: not more
    (activations("a", 0), DAY + 1, ("a",)),
    ([act("a", 0), Row("a", "acknowledged", T0 + 10, AA)], DAY + 1, ("a",)),
    ([act("a", 0), Row("a", "cleared", T0 + 10, RTN)], DAY + 1, ()),
    ([act("a", 0), Row("a", "shelved", T0 + 10, SH)], DAY + 1, ()),
    ([act("a", 0), Row("a", "disabled", T0 + 10, "out_of_service")], DAY + 1, ()),
    ([act("a", 0), Row("a", "shelved", T0 + 10, SH), Row("a", "unshelved", T0 + 20, UA)], DAY + 15, ()),
    ([act("a", 0), Row("a", "shelved", T0 + 10, SH), Row("a", "unshelved", T0 + 20, UA)], DAY + 21, ("a",)),
    (activations("b", 5) + activations("a", 100) + activations("c", 3 * DAY), 2 * DAY, ("b", "a")),
]


@pytest.mark.parametrize("rows, now, stale", STALE)
def test_stale_alarms(rows, now, stale):
    assert run(rows).figures(T0 + now).stale == stale


def test_the_ten_most_frequent():
    rows = [act(f"a{i:02d}", t) for i in range(12) for t in range(i + 1)]   # a00 once ... a11 12 times
    rows += activations("a00", 100)                                          # a00 and a01 twice: by id
    f = run(rows).figures(T0 + 3600)
    assert f.top == tuple((f"a{i:02d}", i + 1) for i in range(11, 2, -1)) + (("a02", 3),)
    assert len(f.top) == 10
    total = sum(range(1, 13)) + 1
    assert f.annunciated == total
    assert f.top_percent == pytest.approx(100 * sum(n for _, n in f.top) / total)
    assert run([]).figures(T0).top_percent == 0.0


# --------------------------------------------------------------------------- behaviour


def test_figures_change_nothing_and_time_only_goes_forward():
    p = run(ELEVEN_IN_100_S)
    later = p.figures(T0 + 700)
    assert not later.in_flood
    assert p.figures(T0 + 200).in_flood                      # asking for 700 did not end it
    assert p.figures(T0 + 700) == later
    p.add(act("x", 50))                                      # late: counts at 100 s
    f = p.figures(T0 + 665)
    assert f.last_10min == 5 and f.in_flood                  # 70, 80, 90, 100, 100
    assert not p.figures(T0 + 670).in_flood
    assert p.figures(T0 + 50).now_s == T0 + 50 and p.figures(T0 + 50).last_10min == 12


def test_the_period_starts_at_the_first_transition_unless_given():
    rows = activations("a", 1000, 1001)
    assert run(rows, since_s=None).figures(T0 + 1600).since_s == T0 + 1000
    assert run(rows, since_s=None).figures(T0 + 2200).average_per_10min == pytest.approx(1.0)
    assert run([], since_s=None).figures(T0).since_s == T0


def test_memory_stays_bounded_over_days_of_alarms():
    """A day of 30 alarms chattering every 7 s: only the windows' worth is kept."""
    p = AlarmPerformance(T0)
    ids = [f"zone.z{i}" for i in range(30)]
    t = 0.0
    while t < DAY:
        for i, alarm_id in enumerate(ids):
            p.add(Row(alarm_id, "active", T0 + t + i * 0.1, UA))
            p.add(Row(alarm_id, "cleared", T0 + t + i * 0.1 + 1, RTN))
        t += 7
    assert len(p._window) <= 30 * (600 // 7 + 1)
    assert all(len(r) <= 3 for r in p._recent.values()) and len(p._recent) == 30
    assert len(p._counts) == len(p._standing) + 30 == 30
    f = p.figures(T0 + t)
    assert f.in_flood and f.floods == 1 and len(f.chattering) == 30


def test_the_scan_events_and_the_core_transitions_are_read_too():
    alarms = pytest.importorskip("plc.alarms")
    event = Event("alarm", T0 + 5, "a: normal -> unacknowledged_active",
                  (("alarm_id", "a"), ("transition", "active"), ("to", UA)))
    assert transition_of(event) == ("a", "active", T0 + 5, UA)
    restart = Event("alarm_system", T0, "PLC started", (("transition", "restart"),))
    assert transition_of(restart) == ("", "restart", T0, "")

    @dataclass(frozen=True)
    class Transition:           # plc.alarms.AlarmTransition's fields read
        id: str
        kind: str
        time: float
        new: object

    assert transition_of(Transition("a", "active", T0, alarms.AlarmState.UNACK_ACTIVE)) == (
        "a", "active", T0, UA)
    p = AlarmPerformance(T0)
    for item in (event, restart, Transition("b", "active", T0 + 6, alarms.AlarmState.UNACK_ACTIVE)):
        p.add(item)
    assert p.figures(T0 + 10).top == (("a", 1), ("b", 1))


def test_the_module_is_pure():
    tree = ast.parse(Path(perf_module.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"asyncio", "socket", "time", "datetime", "asyncua", "sqlalchemy",
                           "threading", "os", "random"}, imported
