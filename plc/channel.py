"""Snapshots for observers, through bounded channels that never block the scan.

``Snapshot`` is immutable: everything an observer (the terminal view, the OPC UA publisher,
the historian) may read about one scan. ``SnapshotChannel.publish`` is O(subscribers) and never
waits: each subscriber has a bounded deque; when it is full the oldest snapshot is dropped and
counted (a slow observer loses intermediate snapshots, the scan never waits).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, replace
from typing import Mapping

from .alarms import Alarm
from .autotune import View as AutotuneView
from .commands import Event
from .image import ProcessImage
from .scan import ZoneView


@dataclass(frozen=True, slots=True)
class Snapshot:
    tick: int
    time_s: float
    phase: str
    held: bool
    interrupted: bool
    recipe_id: str | None
    batch_id: str | None
    phase_time_s: float
    tempered: bool
    pouring_released: bool
    zones: tuple[ZoneView, ...]
    inputs: ProcessImage
    outputs: ProcessImage
    alarms: tuple[Alarm, ...]          # every alarm (each condition id), sorted by id
    trips: tuple[str, ...]
    first_out: str | None
    events: tuple[Event, ...]
    stats: Mapping[str, float]
    settings: Mapping[str, Mapping[str, float]] = None  # zone -> Trim, Kp, Ki, Kd[, ManualOutput]
    autotune: Mapping[str, AutotuneView] = None          # zone -> its autotune (every zone)

    def with_events(self, events: tuple[Event, ...]) -> "Snapshot":
        """This snapshot carrying ``events`` instead of its own (a latest-wins channel that
        drops a snapshot hands its events on to the next one)."""
        return replace(self, events=events)


class Subscription:
    def __init__(self, maxlen: int):
        self._q: deque[Snapshot] = deque(maxlen=maxlen)
        self.dropped = 0
        self._lock = threading.Lock()

    def _put(self, snap: Snapshot) -> None:
        with self._lock:
            if len(self._q) == self._q.maxlen:
                self.dropped += 1
            self._q.append(snap)

    def drain(self) -> list[Snapshot]:
        with self._lock:
            items = list(self._q)
            self._q.clear()
        return items

    def latest(self) -> Snapshot | None:
        with self._lock:
            return self._q[-1] if self._q else None


class SnapshotChannel:
    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self.last: Snapshot | None = None

    def subscribe(self, maxlen: int = 64) -> Subscription:
        sub = Subscription(maxlen)
        self._subs = [*self._subs, sub]
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs = [s for s in self._subs if s is not sub]

    def publish(self, snap: Snapshot) -> None:
        self.last = snap
        for sub in self._subs:
            sub._put(snap)
