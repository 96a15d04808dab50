"""The historian's durable, bounded, on-disk spool of line-protocol lines.

One job: keep every line the historian samples until the forwarder has delivered it, across a
database outage and across a crash of the process, within a bound on disk.

On disk (``directory``)::

    seg-000000000001.lp   segments: UTF-8 line-protocol text, one line per "\\n"; appended
    seg-000000000002.lp   only to the last one; a new one starts when it reaches segment_bytes
    cursor.json           {"segment": n, "offset": bytes}: the first unacknowledged byte;
                          replaced atomically (write temp, fsync, os.replace, fsync directory)
    lock                  flock'ed while a Spool has the directory open (one opener at a time)
    rejected/<time>-<n>.lp, <time>-<n>.reason.txt
                          lines the server refused as malformed, set aside with its message

Every byte before the cursor is delivered; every byte after it is not. Segments wholly before the
cursor are deleted; a segment number is never reused, so a cursor naming a segment that no longer
exists means "the next existing segment, from its start".

Guarantees:

- **kill -9 of the process**: once ``append`` has returned, its lines are in the segment file
  through ``os.write`` (the kernel's page cache), so they survive the death of the process; the
  reopened spool reads them back in order. The cursor moves only after a delivery was
  acknowledged, so a crash can re-send a batch (at least once) but never skip one; a replayed
  point is the very same point (same tags, same ns timestamp) and the server stores it once.
- **power loss / kernel crash**: only what was fsync'ed survives: segments are fsync'ed at most
  ``fsync_interval_s`` after an append (0: in every append), a segment is fsync'ed when it is
  sealed, the cursor and the set-aside files on every write. The last unsynced second can be lost.
- **recovery on open**: a torn last line (a crash in the middle of a write, no "\\n"), or a tail of
  NUL bytes (a file extended but never written, after a power loss) is cut off; a cursor beyond
  the end of its segment is clamped; a missing or unreadable cursor restarts from the oldest
  segment (a duplicate delivery, never a loss).
- **bounded**: the unacknowledged lines never take more than ``max_bytes``; with the already
  delivered head of the segment being read, the segment files stay below ``max_bytes +
  segment_bytes`` (a segment is at most a quarter of the bound). When an append does not fit,
  ``when_full="drop_oldest"`` deletes the oldest segment(s), ``"drop_newest"`` refuses the lines
  that do not fit; either way the lost lines are counted in ``dropped_total``. The ``rejected/``
  directory is outside the bound (it holds only what the server refused).

Threads: ``append`` from one thread while another calls ``read_batch`` / ``ack`` / ``set_aside``;
one lock guards the in-memory state and the files. Counters in ``stats()`` count since open.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from plc.persist import write_atomic

log = logging.getLogger(__name__)

WHEN_FULL = ("drop_oldest", "drop_newest")
ALARM_FILL = 0.8
CURSOR_FILE = "cursor.json"
LOCK_FILE = "lock"
REJECTED_DIR = "rejected"
_PREFIX, _SUFFIX = "seg-", ".lp"
_READ_CHUNK = 4 * 2**20
_READ_STEP = 256 * 2**10


class SpoolLocked(OSError):
    """Another Spool (in this or another process) has the directory open."""


@dataclass(frozen=True)
class Batch:
    lines: tuple[str, ...]      # without trailing newline
    start: tuple[int, int]      # (segment number, byte offset) of the first line
    end: tuple[int, int]        # (segment number, byte offset) just after the last line
    # (segment, start offset, end offset, lines) of each segment the batch spans
    parts: tuple[tuple[int, int, int, int], ...] = ()


@dataclass(frozen=True)
class SpoolStats:
    backlog_lines: int          # appended, not yet acknowledged
    backlog_bytes: int
    capacity_bytes: int         # max_bytes
    fill: float                 # backlog_bytes / capacity_bytes, 0..1
    appended_total: int         # kept by append since open
    acked_total: int
    dropped_total: int          # lost to the full policy since open
    set_aside_total: int
    segments: int
    alarm: bool                 # fill >= 0.8
    used_bytes: int = 0         # bytes of the segment files (backlog + delivered head)


@dataclass
class _Segment:
    size: int                   # bytes of complete lines
    lines: int


def _seg_name(number: int) -> str:
    return f"{_PREFIX}{number:012d}{_SUFFIX}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(lines: Sequence[str]) -> list[bytes]:
    out = []
    for line in lines:
        if not isinstance(line, str) or not line or "\n" in line or "\0" in line:
            raise ValueError(f"not a single line of line protocol: {line!r:.80}")
        out.append(line.encode("utf-8") + b"\n")
    return out


class Spool:
    def __init__(self, directory: str | Path, *, max_bytes: int = 512 * 2**20,
                 segment_bytes: int = 4 * 2**20, when_full: str = "drop_oldest",
                 fsync_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        if when_full not in WHEN_FULL:
            raise ValueError(f"when_full: must be one of {', '.join(WHEN_FULL)} (got {when_full!r})")
        if max_bytes <= 0 or segment_bytes <= 0 or fsync_interval_s < 0:
            raise ValueError("max_bytes and segment_bytes must be > 0, fsync_interval_s >= 0")
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        # drop_oldest frees whole segments: keep each a small part of the bound
        self.segment_bytes = max(1, min(int(segment_bytes), self.max_bytes // 4))
        self.when_full = when_full
        self.fsync_interval_s = float(fsync_interval_s)
        self._clock, self._wall = clock, wall
        self._cv = threading.Condition()
        self._segs: dict[int, _Segment] = {}        # by number, oldest first
        self._cursor = (0, 0)                       # (segment, offset) of the first unacked byte
        self._cursor_lines = 0                      # lines before the cursor in its segment
        self._next_seg = 1
        self._fd: int | None = None                 # the active (last) segment, O_APPEND
        self._used = 0
        self._dirty = False
        self._last_sync = clock()
        self._last_read: Batch | None = None
        self._appended = self._acked = self._dropped = self._set_aside = 0
        self._full_logged = False
        self._rejected_n = 0
        self._closed = False
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / REJECTED_DIR).mkdir(exist_ok=True)
        self._lock_fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLocked(f"{self.directory}: spool already open elsewhere") from None
        try:
            self._recover()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._stopping = threading.Event()
        self._sync_thread: threading.Thread | None = None
        if self.fsync_interval_s > 0:
            self._sync_thread = threading.Thread(target=self._sync_loop, name="spool-fsync",
                                                 daemon=True)
            self._sync_thread.start()

    # ---------------------------------------------------------------- recovery
    def _recover(self) -> None:
        d = self.directory
        (d / (CURSOR_FILE + ".tmp")).unlink(missing_ok=True)
        numbers = sorted(int(p.name[len(_PREFIX):-len(_SUFFIX)]) for p in d.glob(f"{_PREFIX}*{_SUFFIX}")
                         if p.name[len(_PREFIX):-len(_SUFFIX)].isdigit())
        cursor = self._read_cursor()
        if cursor is None:
            cursor = (numbers[0] if numbers else 0, 0)
        seg, off = cursor
        for n in [n for n in numbers if n < seg]:   # acknowledged; a crash came before the delete
            (d / _seg_name(n)).unlink()
        numbers = [n for n in numbers if n >= seg]
        self._next_seg = max([seg + 1, *(n + 1 for n in numbers)])   # numbers are never reused
        for n in numbers:
            self._segs[n] = self._scan_segment(n)
        self._used = sum(s.size for s in self._segs.values())
        if seg in self._segs:
            off, self._cursor_lines = self._place_cursor(seg, off)
            self._cursor = (seg, off)
        else:
            self._cursor = (numbers[0] if numbers else self._next_seg, 0)
        self._normalize_cursor()
        if numbers:
            self._fd = os.open(d / _seg_name(numbers[-1]), os.O_WRONLY | os.O_APPEND)
        backlog = self._backlog_lines()
        if backlog:
            log.info("%s: %d lines to forward in %d segment(s)", d, backlog, len(numbers))

    def _read_cursor(self) -> tuple[int, int] | None:
        path = self.directory / CURSOR_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            seg, off = int(data["segment"]), int(data["offset"])
            if seg < 0 or off < 0:
                raise ValueError("negative position")
            return seg, off
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("%s: unreadable spool cursor (%s); forwarding again from the oldest segment "
                      "(the server stores a replayed point once)", path, e)
            os.replace(path, path.with_name(CURSOR_FILE + ".corrupt"))
            return None

    def _scan_segment(self, number: int) -> _Segment:
        """Count the lines; cut a torn last line or a NUL tail (crash or power loss mid-write)."""
        path = self.directory / _seg_name(number)
        lines = good = pos = 0
        with open(path, "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                nul = chunk.find(b"\0")
                if nul >= 0:
                    chunk = chunk[:nul]
                last = chunk.rfind(b"\n")
                if last >= 0:
                    lines += chunk.count(b"\n")
                    good = pos + last + 1
                pos += len(chunk)
                if nul >= 0:
                    break
        size = path.stat().st_size
        if size != good:
            log.warning("%s: cut %d bytes of a torn last line (a crash during a write)",
                        path, size - good)
            os.truncate(path, good)
        return _Segment(good, lines)

    def _place_cursor(self, seg: int, off: int) -> tuple[int, int]:
        """The cursor on a line boundary of ``seg``, and the lines before it."""
        size = self._segs[seg].size
        if off > size:
            log.warning("%s: cursor %d beyond the end of %s (%d bytes, lost to a power loss?)",
                        self.directory, off, _seg_name(seg), size)
            off = size
        if off == 0:
            return 0, 0
        with open(self.directory / _seg_name(seg), "rb") as f:
            head = f.read(off)
            if not head.endswith(b"\n"):   # never written by us: skip to the next line
                rest = f.read()
                nl = rest.find(b"\n")
                off, head = off + nl + 1, head + rest[:nl + 1]
        return off, head.count(b"\n")

    # ---------------------------------------------------------------- writing
    def append(self, lines: Sequence[str]) -> int:
        """Append ``lines`` (each one line of line protocol, no "\\n"); returns how many were kept.

        On return they are in the segment file (survive a kill -9). Raises ValueError for a line
        with "\\n" or NUL (nothing is written), OSError when the disk refuses the write (nothing
        of this append stays in the spool).
        """
        data = _encode(lines)
        with self._cv:
            self._check_open()
            if not data:
                return 0
            self._rotate_if_needed()
            data = self._make_room(data)
            if not data:
                return 0
            if self._fd is None:
                self._new_segment()
            blob = b"".join(data)
            self._write_all(blob)
            active = self._segs[next(reversed(self._segs))]
            active.size += len(blob)
            active.lines += len(data)
            self._used += len(blob)
            self._appended += len(data)
            self._dirty = True
            if self.fsync_interval_s == 0 or self._clock() - self._last_sync >= self.fsync_interval_s:
                self._sync_locked()
            self._cv.notify_all()
            return len(data)

    def _write_all(self, blob: bytes) -> None:
        assert self._fd is not None
        view, written = memoryview(blob), 0
        try:
            while written < len(blob):
                written += os.write(self._fd, view[written:])
        except OSError:
            if written:
                try:   # take back the part that made it: no torn line stays behind
                    os.ftruncate(self._fd, self._segs[next(reversed(self._segs))].size)
                except OSError:   # seal the segment at its last good size; recovery cuts the rest
                    try:
                        os.fsync(self._fd)
                    finally:
                        os.close(self._fd)
                        self._fd = None
            raise

    def _make_room(self, data: list[bytes]) -> list[bytes]:
        need = sum(len(b) for b in data)
        if self._backlog_bytes() + need <= self.max_bytes:
            return data
        before = self._dropped
        if self.when_full == "drop_newest":
            room, kept = self.max_bytes - self._backlog_bytes(), 0
            while kept < len(data) and len(data[kept]) <= room:
                room -= len(data[kept])
                kept += 1
            self._dropped += len(data) - kept
            data = data[:kept]
        else:
            while self._segs and self._backlog_bytes() + need > self.max_bytes:
                self._drop_segment(next(iter(self._segs)))
            while data and need > self.max_bytes:   # more than the whole spool: keep the newest
                need -= len(data.pop(0))
                self._dropped += 1
        if not self._full_logged:
            log.error("%s: spool full (%d bytes): %s, %d lines lost so far; the sink is not keeping up",
                      self.directory, self.max_bytes, self.when_full, self._dropped)
            self._full_logged = True
        log.debug("%s: %d lines lost to the full spool", self.directory, self._dropped - before)
        return data

    def _drop_segment(self, number: int) -> None:
        seg = self._segs.pop(number)
        unacked = seg.lines - (self._cursor_lines if number == self._cursor[0] else 0)
        if number >= self._cursor[0]:
            self._dropped += unacked
        if not self._segs and self._fd is not None:   # it was the last one, being appended to
            os.close(self._fd)
            self._fd = None
        (self.directory / _seg_name(number)).unlink()
        self._used -= seg.size
        if number >= self._cursor[0]:
            self._cursor = (next(iter(self._segs), self._next_seg), 0)
            self._cursor_lines = 0

    def _rotate_if_needed(self) -> None:
        if not self._segs:
            return
        number = next(reversed(self._segs))
        last = self._segs[number]
        if self._cursor == (number, last.size) and last.size > 0:
            # wholly acknowledged: start afresh instead of keeping delivered bytes around
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            del self._segs[number]
            self._used -= last.size
            (self.directory / _seg_name(number)).unlink()
            self._cursor, self._cursor_lines = (self._next_seg, 0), 0
        elif self._fd is not None and last.size >= self.segment_bytes:
            os.fsync(self._fd)         # a sealed segment is on stable storage
            os.close(self._fd)
            self._fd = None

    def _new_segment(self) -> None:
        number = self._next_seg
        self._fd = os.open(self.directory / _seg_name(number),
                           os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        self._next_seg += 1
        self._segs[number] = _Segment(0, 0)
        _fsync_dir(self.directory)
        self._normalize_cursor()

    def _sync_locked(self) -> None:
        if self._fd is not None and self._dirty:
            os.fsync(self._fd)
        self._dirty = False
        self._last_sync = self._clock()

    def _sync_loop(self) -> None:
        # every fsync_interval_s: what was appended since the last fsync reaches the disk at
        # most one interval after its append, even when no further append comes
        while not self._stopping.wait(self.fsync_interval_s):
            with self._cv:
                if self._closed:
                    return
                try:
                    self._sync_locked()
                except OSError as e:
                    log.error("%s: fsync failed: %s", self.directory, e)

    # ---------------------------------------------------------------- reading
    def read_batch(self, max_lines: int = 5000, max_bytes: int = 4 * 2**20) -> Batch | None:
        """The oldest unacknowledged lines in append order, without consuming them; None if
        none. At most ``max_lines`` lines and ``max_bytes`` bytes (but always at least one line)."""
        with self._cv:
            self._check_open()
            lines: list[str] = []
            parts: list[tuple[int, int, int, int]] = []
            budget = max_bytes
            for number, seg in self._segs.items():
                if number < self._cursor[0]:
                    continue
                off = self._cursor[1] if number == self._cursor[0] else 0
                if off >= seg.size:
                    continue
                if len(lines) >= max_lines or (budget <= 0 and lines):
                    break
                chunk = self._read_lines(number, off, seg.size, budget, max_lines - len(lines),
                                         first=not lines)
                if not chunk:
                    break
                end = off + sum(len(b) + 1 for b in chunk)
                lines.extend(b.decode("utf-8", errors="replace") for b in chunk)
                parts.append((number, off, end, len(chunk)))
                budget -= end - off
            if not lines:
                self._last_read = None
                return None
            batch = Batch(tuple(lines), (parts[0][0], parts[0][1]), (parts[-1][0], parts[-1][2]),
                          tuple(parts))
            self._last_read = batch
            return batch

    def _read_lines(self, number: int, off: int, size: int, budget: int, max_lines: int,
                    first: bool) -> list[bytes]:
        limit = min(size - off, max(budget, 0))
        buf, newlines = bytearray(), 0
        with open(self.directory / _seg_name(number), "rb") as f:
            f.seek(off)
            while len(buf) < limit and newlines < max_lines:   # no more than the lines needed
                piece = f.read(min(_READ_STEP, limit - len(buf)))
                if not piece:
                    break
                buf += piece
                newlines += piece.count(b"\n")
            cut = buf.rfind(b"\n")
            if cut < 0:
                if not first:
                    return []
                buf += f.read(size - off - len(buf))   # one line longer than the budget
                cut = buf.find(b"\n")
        return bytes(buf[:cut]).split(b"\n")[:max_lines]

    def wait(self, timeout_s: float) -> bool:
        """Block until something is to be read (True), the timeout or ``interrupt`` (False
        unless there is something to read by then)."""
        with self._cv:
            if not self._closed and not self._backlog_bytes():
                self._cv.wait(timeout_s)
            return not self._closed and self._backlog_bytes() > 0

    def interrupt(self) -> None:
        """Wake every ``wait`` now (a forwarder being stopped)."""
        with self._cv:
            self._cv.notify_all()

    def ack(self, batch: Batch) -> None:
        """``batch`` (the one last read) is delivered: move the cursor past it, persist it,
        delete the segments wholly before it. Parts of it already dropped by drop_oldest are
        skipped."""
        with self._cv:
            self._check_open()
            if batch is not self._last_read and batch != self._last_read:
                raise ValueError("ack: not the batch last read")
            self._normalize_cursor()
            for number, start, end, n in batch.parts:
                seg, off = self._cursor
                if number < seg or (number == seg and end <= off):
                    continue                      # dropped meanwhile (drop_oldest)
                if (number, start) != (seg, off):
                    raise ValueError(f"ack: batch part at {(number, start)}, cursor at {(seg, off)}")
                self._cursor = (number, end)
                self._cursor_lines += n
                self._acked += n
                self._normalize_cursor()
            self._last_read = None
            seg, off = self._cursor
            write_atomic(self.directory / CURSOR_FILE, {"segment": seg, "offset": off})
            for number in [k for k in self._segs if k < seg]:
                self._used -= self._segs.pop(number).size
                (self.directory / _seg_name(number)).unlink()
            if self._backlog_bytes() < ALARM_FILL * self.max_bytes:
                self._full_logged = False

    def _normalize_cursor(self) -> None:
        """Invariant: the cursor is in an existing segment (at the end of one only if it is the
        last), or at the start of the next segment to be made when there is none."""
        seg, off = self._cursor
        last = next(reversed(self._segs), None)
        while seg in self._segs and seg != last and off >= self._segs[seg].size:
            seg = next(k for k in self._segs if k > seg)
            off, self._cursor_lines = 0, 0
        self._cursor = (seg, off)

    def set_aside(self, lines: Sequence[str], reason: str) -> Path:
        """Write ``lines`` to ``rejected/<time>-<n>.lp`` and ``reason`` (the server's message) to
        ``rejected/<time>-<n>.reason.txt``, both fsync'ed; the caller then acks their batch."""
        with self._cv:
            self._check_open()
            rejected = self.directory / REJECTED_DIR
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._wall()))
            while True:
                self._rejected_n += 1
                path = rejected / f"{stamp}-{self._rejected_n}.lp"
                if not path.exists():
                    break
            for target, text in ((path.with_suffix(".reason.txt"), reason.rstrip("\n") + "\n"),
                                 (path, "".join(line + "\n" for line in lines))):
                with open(target, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
            _fsync_dir(rejected)
            self._set_aside += len(lines)
            return path

    # ---------------------------------------------------------------- state
    def _backlog_lines(self) -> int:
        seg = self._cursor[0]
        return sum(s.lines for n, s in self._segs.items() if n >= seg) - (
            self._cursor_lines if seg in self._segs else 0)

    def _backlog_bytes(self) -> int:
        seg, off = self._cursor
        return sum(s.size for n, s in self._segs.items() if n >= seg) - (
            off if seg in self._segs else 0)

    def stats(self) -> SpoolStats:
        with self._cv:
            backlog_bytes = self._backlog_bytes()
            fill = min(1.0, backlog_bytes / self.max_bytes)
            return SpoolStats(
                backlog_lines=self._backlog_lines(), backlog_bytes=backlog_bytes,
                capacity_bytes=self.max_bytes, fill=fill, appended_total=self._appended,
                acked_total=self._acked, dropped_total=self._dropped,
                set_aside_total=self._set_aside, segments=len(self._segs),
                alarm=fill >= ALARM_FILL, used_bytes=self._used)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.directory}: spool closed")

    def close(self) -> None:
        """fsync what was appended, release the directory. Idempotent."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._stopping.set()
            self._cv.notify_all()
            try:
                if self._fd is not None:
                    self._sync_locked()
                    os.close(self._fd)
                    self._fd = None
            finally:
                os.close(self._lock_fd)
        if self._sync_thread is not None and self._sync_thread is not threading.current_thread():
            self._sync_thread.join()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
