"""Alarm-system performance figures (ANSI/ISA-18.2-2016 §16.5 and §16.9, EEMUA 191): pure.

One job: turn the stream of alarm transitions (journal rows, ``plc.alarms.AlarmTransition`` or
the scan's "alarm" events, in time order) into the benchmark figures an alarm-management review
asks for. No clock inside: every time is an argument (seconds since the epoch, the alarms' wall
clock), so the figures can be computed again from the journal and tested in virtual time.

What is counted:
- An *annunciated alarm* is a transition that puts the alarm in front of the operator: one that
  leaves it unacknowledged and active (``AlarmState.UNACK_ACTIVE``): an activation, or an alarm
  still active that is unshelved, enabled or unsuppressed. Activations of a shelved, suppressed
  or disabled alarm are not annunciated and are not counted.
- *Alarm rate*: annunciated alarms in the trailing ``WINDOW_S`` (10 min, ``(now - 600, now]``),
  the average per 10 min since ``since_s`` (the first 10 min count as one whole window), the
  highest count seen in any trailing 10 min (ISA-18.2 Table 5: about 1 per 10 min is very
  likely acceptable, 2 the most manageable; at most 10 in any 10 min).
- *Flood*: begins when more than ``flood_start`` (10) alarms were annunciated in the trailing
  10 min, ends when fewer than ``flood_end`` (5) were (the usual hysteresis, so a flood does
  not flicker at its threshold). Figures: in flood now, floods begun, seconds in flood (and its
  share of the time since ``since_s``; ISA-18.2: under about 1 %).
- *Chattering*: an alarm annunciated ``CHATTER_COUNT`` (3) or more times within
  ``CHATTER_WINDOW_S`` (60 s, the span from the first to the last under 60 s). ``chattering``:
  those doing it now; ``chattered``: every one that did since ``since_s`` (target: none).
- *Stale*: annunciated (unacknowledged or acknowledged, active) without a break for more than
  ``STALE_S`` (24 h) at ``now``; a shelved, cleared or disabled alarm is not standing.
- *Most frequent*: the ``TOP`` (10) alarms annunciated most often since ``since_s`` (count,
  then id), and their share of all annunciations (EEMUA 191: the usual first target).

Memory is bounded: annunciation times are kept for the trailing 10 min only; per alarm id, its
last CHATTER_COUNT annunciation times, its count and since when it stands. Transitions must come in time order; one
older than the newest so far counts at the newest's time (the windows never go back).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from plc.alarms import AlarmState

WINDOW_S = 600.0
FLOOD_START = 10
FLOOD_END = 5
CHATTER_COUNT = 3
CHATTER_WINDOW_S = 60.0
STALE_S = 24 * 3600.0
TOP = 10

_UNACK_ACTIVE = AlarmState.UNACK_ACTIVE.value
_STANDING = frozenset({AlarmState.UNACK_ACTIVE.value, AlarmState.ACK_ACTIVE.value})
#: transitions that annunciate an alarm when they leave it unacknowledged and active
ANNUNCIATING = frozenset({"active", "unshelved", "enabled", "unsuppressed"})


@dataclass(frozen=True, slots=True)
class PerformanceFigures:
    """The figures at ``now_s`` (every time in seconds since the epoch)."""

    now_s: float
    since_s: float                       # start of the figures' period
    annunciated: int                     # annunciated alarms since since_s
    last_10min: int                      # ... in (now - 600 s, now]
    average_per_10min: float             # annunciated / (period / 600 s), period >= 600 s
    peak_10min: int                      # the most in any trailing 10 min since since_s
    in_flood: bool
    floods: int                          # floods begun since since_s (the current one too)
    flood_time_s: float                  # seconds in flood since since_s (up to now)
    flood_percent: float                 # flood_time_s as % of the period
    chattering: tuple[str, ...]          # >= 3 annunciations within 60 s, up to now
    chattered: tuple[str, ...]           # every alarm that chattered since since_s
    stale: tuple[str, ...]               # standing > 24 h at now, the longest first
    top: tuple[tuple[str, int], ...]     # the 10 most frequent (id, count), most first
    top_percent: float                   # their share of all annunciated alarms, %


def _plain(value: Any) -> Any:
    return getattr(value, "value", value)


def transition_of(item: Any) -> tuple[str, str, float, str]:
    """(alarm id, transition kind, time in epoch s, state after) of a journal row
    (``JournalRow``: alarm_id, kind, time_s, state), an ``AlarmTransition`` (id, kind, time,
    new) or a scan ``Event`` of kind "alarm"/"alarm_system" (data keys alarm_id, transition,
    to, alarm). State "" where not known."""
    if hasattr(item, "data") and hasattr(item, "get"):                    # plc.commands.Event
        alarm = item.get("alarm")
        kind = item.get("transition") or ("restart" if item.kind == "alarm_system" else "")
        time_s = getattr(alarm, "changed", None) or item.time_s
        state = _plain(item.get("to")) or _plain(getattr(alarm, "state", "")) or ""
        return str(item.get("alarm_id") or ""), str(kind), float(time_s), str(state)
    if hasattr(item, "alarm_id"):                                          # records.JournalRow
        return item.alarm_id, item.kind, float(item.time_s), str(item.state or "")
    return item.id, item.kind, float(item.time), str(_plain(item.new))    # AlarmTransition


class AlarmPerformance:
    """Accumulates transitions (``add``) and gives the figures at a time (``figures``).

    ``since_s``: the start of the period (None: the time of the first transition added, or
    ``now`` if none came). The thresholds default to the ISA-18.2 / EEMUA 191 benchmarks."""

    def __init__(self, since_s: float | None = None, *, flood_start: int = FLOOD_START,
                 flood_end: int = FLOOD_END, chatter_count: int = CHATTER_COUNT,
                 chatter_window_s: float = CHATTER_WINDOW_S, stale_s: float = STALE_S, top: int = TOP):
        if not 0 < flood_end <= flood_start + 1:
            raise ValueError(f"flood_end must be 1..flood_start+1, got {flood_end}")
        self.since_s = since_s
        self.flood_start, self.flood_end = flood_start, flood_end
        self.chatter_count, self.chatter_window_s = chatter_count, chatter_window_s
        self.stale_s, self.top_n = stale_s, top
        self._latest_s = float("-inf")
        self._window: deque[float] = deque()           # annunciations in the trailing 10 min
        self._recent: dict[str, deque[float]] = {}     # per alarm, its last CHATTER_COUNT annunciations
        self._counts: Counter[str] = Counter()
        self._standing: dict[str, float] = {}          # alarm -> annunciated since
        self._chattered: set[str] = set()
        self._total = self._peak = self._floods = 0
        self._flood_since: float | None = None         # in flood since (None: not in flood)
        self._flood_time_s = 0.0                       # of the floods that ended

    # ----------------------------------------------------------------------- input

    def add(self, item: Any) -> None:
        """One transition (see ``transition_of``); "restart" and other kinds without an alarm
        change nothing."""
        alarm_id, kind, time_s, state = transition_of(item)
        if not alarm_id:
            return
        if self.since_s is None:
            self.since_s = time_s
        t = max(time_s, self._latest_s)
        self._latest_s = t
        self._expire(t)
        annunciated = kind in ANNUNCIATING and (state == _UNACK_ACTIVE or (not state and kind == "active"))
        if state in _STANDING or (not state and kind == "active"):
            self._standing.setdefault(alarm_id, t)
        elif state or kind == "cleared":
            self._standing.pop(alarm_id, None)
        if annunciated:
            self._annunciate(alarm_id, t)

    def _annunciate(self, alarm_id: str, t: float) -> None:
        self._total += 1
        self._counts[alarm_id] += 1
        self._window.append(t)
        self._peak = max(self._peak, len(self._window))
        if self._flood_since is None and len(self._window) > self.flood_start:
            self._flood_since = t
            self._floods += 1
        recent = self._recent.get(alarm_id)
        if recent is None:
            recent = self._recent[alarm_id] = deque(maxlen=self.chatter_count)
        recent.append(t)
        if self._chatters(recent, t):
            self._chattered.add(alarm_id)

    def _chatters(self, recent: deque[float], t: float) -> bool:
        """The alarm's last CHATTER_COUNT annunciations all in (t - 60 s, t]."""
        return len(recent) == self.chatter_count and recent[0] > t - self.chatter_window_s

    def _flood_end(self, t: float) -> tuple[int, float | None]:
        """How many of the window's annunciations are out of it at ``t``, and when the current
        flood ended by then (None: it did not, or there is none)."""
        out, ended = 0, None
        for a in self._window:
            if a + WINDOW_S > t:
                break
            out += 1
            if ended is None and self._flood_since is not None and len(self._window) - out < self.flood_end:
                ended = a + WINDOW_S
        return out, ended

    def _expire(self, t: float) -> None:
        out, ended = self._flood_end(t)
        for _ in range(out):
            self._window.popleft()
        if ended is not None:
            self._flood_time_s += ended - self._flood_since
            self._flood_since = None

    # ----------------------------------------------------------------------- output

    def figures(self, now_s: float) -> PerformanceFigures:
        """The figures at ``now_s`` (changes nothing: may be asked at any time, as often as
        wanted; a ``now_s`` before the last transition counts as that transition's time)."""
        now = max(now_s, self._latest_s)
        since = self.since_s if self.since_s is not None else now
        out, ended = self._flood_end(now)
        flood_time = self._flood_time_s
        in_flood = self._flood_since is not None and ended is None
        if self._flood_since is not None:
            flood_time += (ended if ended is not None else now) - self._flood_since
        period_s = max(now - since, 0.0)
        chattering = tuple(sorted(a for a, r in self._recent.items() if self._chatters(r, now)))
        stale = tuple(a for a, s in sorted(self._standing.items(), key=lambda kv: (kv[1], kv[0]))
                      if now - s > self.stale_s)
        top = tuple(sorted(self._counts.items(), key=lambda kv: (-kv[1], kv[0]))[:self.top_n])
        return PerformanceFigures(
            now_s=now_s, since_s=since, annunciated=self._total, last_10min=len(self._window) - out,
            average_per_10min=self._total / max(period_s / WINDOW_S, 1.0), peak_10min=self._peak,
            in_flood=in_flood, floods=self._floods, flood_time_s=flood_time,
            flood_percent=100.0 * flood_time / period_s if period_s > 0 else 0.0,
            chattering=chattering, chattered=tuple(sorted(self._chattered)), stale=stale, top=top,
            top_percent=100.0 * sum(n for _, n in top) / self._total if self._total else 0.0)
