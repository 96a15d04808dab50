"""The embedded history store: SQLite, for a machine with no InfluxDB (the default).

One job: keep the lines the historian forwards, queryable by series and time, for
``retention_days``. Rows are keyed by (measurement, tags, field, timestamp), so writing the same
line twice (a replay after an outage or a crash) stores it once, exactly as InfluxDB does. The
OPC UA server's HistoryRead of zone temperatures reads ``read_raw``.

Lines are parsed with the line-protocol rules the historian writes (``historian.schema``):
escaped ``,`` ``=`` and space in measurement and tags, quoted strings with ``\\"`` and ``\\\\``,
``i`` integers, ``true``/``false``, nanosecond timestamps.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Sequence

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sample (
    measurement TEXT NOT NULL,
    tags        TEXT NOT NULL,      -- canonical: JSON object with sorted keys
    field       TEXT NOT NULL,
    ts_ns       INTEGER NOT NULL,
    num         REAL,
    text        TEXT,
    PRIMARY KEY (measurement, tags, field, ts_ns)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sample_time ON sample (ts_ns);
"""


class LineError(ValueError):
    pass


def _split(text: str, sep: str, quotes: bool = False) -> list[str]:
    """Split on ``sep`` outside backslash escapes (and outside double quotes if ``quotes``)."""
    parts, cur, i, quoted = [], [], 0, False
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i:i + 2])
            i += 2
            continue
        if quotes and c == '"':
            quoted = not quoted
        if c == sep and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_line(text: str) -> tuple[str, dict[str, str], dict[str, object], int]:
    """(measurement, tags, fields, ts_ns) of one line; LineError if it is not valid."""
    parts = _split(text.strip(), " ", quotes=True)
    if len(parts) != 3:
        raise LineError(f"expected 'measurement,tags fields timestamp': {text[:120]!r}")
    head, field_text, ts_text = parts
    keys = _split(head, ",")
    measurement = _unescape(keys[0])
    tags = {}
    for kv in keys[1:]:
        k, _, v = kv.partition("=")
        tags[_unescape(k)] = _unescape(v)
    fields: dict[str, object] = {}
    for kv in _split(field_text, ",", quotes=True):
        k, eq, v = kv.partition("=")
        if not eq or not v:
            raise LineError(f"bad field {kv!r} in {text[:120]!r}")
        if v.startswith('"') and v.endswith('"') and len(v) >= 2:
            fields[_unescape(k)] = _unescape(v[1:-1])
        elif v in ("true", "false", "t", "f", "T", "F", "TRUE", "FALSE", "True", "False"):
            fields[_unescape(k)] = v.lower().startswith("t")
        elif v.endswith("i"):
            fields[_unescape(k)] = int(v[:-1])
        else:
            fields[_unescape(k)] = float(v)
    try:
        ts = int(ts_text)
    except ValueError:
        raise LineError(f"bad timestamp {ts_text!r}") from None
    return measurement, tags, fields, ts


def tag_key(tags: dict[str, str]) -> str:
    return json.dumps(tags, sort_keys=True, separators=(",", ":"))


class LocalStore:
    def __init__(self, path: str | Path, retention_days: float = 30.0,
                 wall=time.time):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.retention_s = retention_days * 86400.0
        self.wall = wall
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._pruned_at = 0.0

    def write_lines(self, lines: Sequence[str]) -> None:
        """Store every line (all or nothing); LineError names the first bad line."""
        rows = []
        for text in lines:
            m, tags, fields, ts = parse_line(text)
            key = tag_key(tags)
            for f, v in fields.items():
                if isinstance(v, str):
                    rows.append((m, key, f, ts, None, v))
                else:
                    rows.append((m, key, f, ts, float(v), None))
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT OR REPLACE INTO sample VALUES (?, ?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            now = self.wall()
            if now - self._pruned_at > 3600:
                self._pruned_at = now
                self._db.execute("DELETE FROM sample WHERE ts_ns < ?", (int((now - self.retention_s) * 1e9),))

    def read_raw(self, measurement: str, field: str, tags: dict[str, str], start_ns: int, end_ns: int,
                 limit: int = 10_000) -> list[tuple[int, float | str]]:
        """(ts_ns, value) of one field in [start_ns, end_ns), oldest first, of every series whose
        tags include ``tags`` (so a zone's history spans its batches)."""
        sql = ("SELECT ts_ns, tags, COALESCE(num, text) FROM sample WHERE measurement = ? "
               "AND field = ? AND ts_ns >= ? AND ts_ns < ? ORDER BY ts_ns")
        out: list[tuple[int, float | str]] = []
        with self._lock:
            for t, key, v in self._db.execute(sql, (measurement, field, start_ns, end_ns)):
                row_tags = json.loads(key)
                if all(row_tags.get(k) == want for k, want in tags.items()):
                    out.append((int(t), v))
                    if len(out) >= limit:
                        break
        return out

    def count(self, measurement: str | None = None) -> int:
        with self._lock:
            if measurement is None:
                return self._db.execute("SELECT COUNT(*) FROM sample").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM sample WHERE measurement = ?",
                                    (measurement,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
