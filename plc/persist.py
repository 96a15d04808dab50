"""Atomic persistence of the PLC state that must survive a restart or a power loss.

The file is replaced atomically: write a temporary file in the same directory, fsync it,
``os.replace`` it over the old one, fsync the directory. A crash at any point leaves either the
old or the new content, never a torn file. A damaged file is reported and moved aside
(``*.corrupt``) and the PLC comes up in its safe default state.

``StateStore.save`` never blocks the scan: it hands the latest content to a writer thread
(a one-slot mailbox: intermediate contents are skipped, the last one always lands).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError("top level is not an object")
        return data
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        aside = path.with_name(path.name + ".corrupt")
        log.error("%s: unreadable PLC state (%s); moved to %s, starting from the safe default",
                  path, e, aside)
        try:
            os.replace(path, aside)
        except OSError:
            pass
        return None


class StateStore:
    def __init__(self, path: Path | str, background: bool = True):
        self.path = Path(path)
        self._background = background
        self._pending: dict | None = None
        self._last: dict | None = None
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.errors = 0
        self._failing = False
        if background:
            self._thread = threading.Thread(target=self._run, name="plc-state-writer", daemon=True)
            self._thread.start()

    def load(self) -> dict | None:
        data = read(self.path)
        self._last = data
        return data

    def save(self, data: dict) -> None:
        """Persist ``data`` if it differs from the last saved content."""
        if data == self._last:
            return
        self._last = data
        if not self._background:
            self._write(data)
            return
        with self._cv:
            self._pending = data
            self._cv.notify()

    def _write(self, data: dict) -> None:
        try:
            write_atomic(self.path, data)
        except OSError as e:
            self.errors += 1
            self._last = None  # retry on the next save, even if the content has not changed
            if not self._failing:  # once per outage, then quietly (retries come every scan)
                log.error("%s: cannot persist PLC state: %s", self.path, e)
            self._failing = True
        else:
            if self._failing:
                log.warning("%s: PLC state persisted again", self.path)
            self._failing = False

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._closed:
                    self._cv.wait()
                data, self._pending = self._pending, None
                closed = self._closed
            if data is not None:
                self._write(data)
            if closed and data is None:
                return

    def close(self) -> None:
        """Flush the last content and stop the writer."""
        if self._thread is None:
            return
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=5)
        self._thread = None
