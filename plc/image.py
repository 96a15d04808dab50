"""The process image: typed points addressed by name, each with a quality and a timestamp.

Rules:
- A point is immutable. An image is an immutable mapping ``name -> Point``; the scan builds a
  new one each cycle (one writer), observers keep whatever snapshot they were handed.
- Every point carries a :class:`Quality` (good / uncertain / bad, with a reason) and the source
  timestamp of its value in seconds (the clock of whoever produced it; the core never reads a
  clock). A dead device is a bad point, never a silently stale value.
- Points are typed (bool / int / float): ``PointSpec.check`` refuses a value of the wrong type,
  so a register decoded as the wrong type fails at the edge, not inside the logic.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterator, Mapping, Union

Value = Union[bool, int, float]


class Quality(enum.IntEnum):
    """OPC UA-style quality (Part 4 §7.39 StatusCode severity: Good / Uncertain / Bad)."""

    GOOD = 0
    UNCERTAIN = 1
    BAD = 2


class PointType(enum.Enum):
    BOOL = "bool"
    INT = "int"
    FLOAT = "float"


@dataclass(frozen=True, slots=True)
class Point:
    value: Value
    quality: Quality = Quality.GOOD
    timestamp_s: float = 0.0
    reason: str = ""

    @property
    def good(self) -> bool:
        return self.quality is Quality.GOOD

    def usable_float(self) -> float | None:
        """The value as a finite float if the point is good, else None."""
        if self.quality is not Quality.GOOD:
            return None
        v = float(self.value)
        return v if math.isfinite(v) else None


def bad(reason: str, timestamp_s: float = 0.0, value: Value = 0.0) -> Point:
    return Point(value, Quality.BAD, timestamp_s, reason)


@dataclass(frozen=True, slots=True)
class PointSpec:
    name: str
    type: PointType
    unit: str = ""
    description: str = ""

    def check(self, value: object) -> Value:
        """Return the value if it fits the type, else raise TypeError naming the point."""
        t = self.type
        if t is PointType.BOOL:
            if isinstance(value, bool):
                return value
        elif t is PointType.INT:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"{self.name}: expected {t.value}, got {type(value).__name__} {value!r}")


_ZERO = {PointType.BOOL: False, PointType.INT: 0, PointType.FLOAT: 0.0}


def _fits(t: PointType, value: object) -> bool:
    if t is PointType.BOOL:
        return isinstance(value, bool)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        t is PointType.FLOAT or isinstance(value, int))


class ProcessImage(Mapping[str, Point]):
    """An immutable, typed set of points. Build with :meth:`build`; never mutated."""

    __slots__ = ("_points",)

    def __init__(self, points: Mapping[str, Point]):
        self._points = MappingProxyType(dict(points))

    @classmethod
    def build(cls, specs: Mapping[str, PointSpec], points: Mapping[str, Point]) -> "ProcessImage":
        """Check every point against its spec: unknown names and wrong types raise."""
        checked: dict[str, Point] = {}
        for name, point in points.items():
            spec = specs.get(name)
            if spec is None:
                raise KeyError(f"{name}: not a point of this image")
            if point.quality is Quality.BAD and not _fits(spec.type, point.value):
                point = Point(_ZERO[spec.type], point.quality, point.timestamp_s, point.reason)
            value = spec.check(point.value)
            checked[name] = point if value is point.value else Point(
                value, point.quality, point.timestamp_s, point.reason)
        return cls(checked)

    def __getitem__(self, name: str) -> Point:
        return self._points[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._points)

    def __len__(self) -> int:
        return len(self._points)

    def get_point(self, name: str) -> Point:
        """The point, or a bad point saying it is missing (a missing input is never 'good')."""
        p = self._points.get(name)
        return p if p is not None else bad("not provided")

    def values(self):  # type: ignore[override]
        return self._points.values()

    def __repr__(self) -> str:
        return f"ProcessImage({len(self)} points)"
