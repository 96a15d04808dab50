"""A machine's places on disk, and whether it runs.

``Layout`` says where the files of a machine are: its machine file and the register map and
recipes file it names, the records, the OPC UA server's PKI, the PLC state file with its recipe
book, the historian's spool, and its OPC UA endpoint. ``below`` tells whether a file the machine
file names stays below the machine file's directory.

``claim`` is the one check, before a machine's files are replaced (``tempering restore``,
``tempering migrate --force``), that no machine runs there: the historian's spool lock must be
free, and is taken and held until the caller closes it (a machine started meanwhile does not
start); the OPC UA endpoint must not accept connections. A batch in progress in a state file is
named in the refusal, because stopping a machine mid-batch is the operator's call.

``exchange`` swaps two directories in one step, where the system can.

Errors (the text says why; nothing was changed):
    Refused(Exception)             a change to a machine refused (``tempering.archive`` and
                                   ``tempering.backup`` add their own kinds)
        MachineRunning(Refused)    the machine runs (its running batch named)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

SPOOL_LOCK = "lock"                         # historian.spool's flock'ed file
PROBE_TIMEOUT_S = 0.5                       # the endpoint probe's connect timeout


class Refused(Exception):
    """A change to a machine (a backup, a restore, a migration over it) refused; the text says
    why; nothing was changed."""


class MachineRunning(Refused):
    pass


@dataclass(frozen=True)
class Layout:
    """Where a machine's files are (absolute): its machine file and the files it names, the
    records, the PKI, the PLC's state and the historian's spool; its OPC UA endpoint."""

    machine_file: Path
    names: tuple[str, ...]          # the register map (if a file) and the recipes file, as named
    records_url: str
    data_dir: Path
    state_file: Path
    spool_dir: Path
    host: str
    port: int

    @classmethod
    def of(cls, machine_file: Path, cfg) -> Layout:
        """``cfg`` (run-time paths as ``opcua_server.config.load`` gives them; relative ones are
        relative to the working directory) of the machine file ``machine_file``."""
        names = [cfg.machine.recipes_file]
        if cfg.fieldbus is not None and cfg.fieldbus.map_file is not None:
            names.insert(0, cfg.fieldbus.map_file)
        return cls(Path(machine_file).absolute(), tuple(names), cfg.opcua.database_url or "",
                   Path(cfg.opcua.data_dir).absolute(), Path(cfg.machine.state_file).absolute(),
                   Path(cfg.historian.spool_dir).absolute(), cfg.opcua.host, cfg.opcua.port)

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    @property
    def book_file(self) -> Path:            # plc_process: state_path.with_suffix(".recipes.json")
        return self.state_file.with_suffix(".recipes.json")

    @property
    def sqlite_file(self) -> Path | None:
        """The SQLite file of the records (None: another database)."""
        if not self.records_url:
            return self.data_dir / "tempering.db"
        from sqlalchemy.engine import make_url

        url = make_url(self.records_url)
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return None
        return Path(url.database).absolute()

    @property
    def url(self) -> str:
        """The records' SQLAlchemy URL."""
        sqlite = self.sqlite_file
        return f"sqlite:///{sqlite}" if sqlite is not None else self.records_url

    def file(self, name: str) -> Path:
        """A file the machine file names (relative to its directory)."""
        return self.machine_file.parent / name


def below(name: str) -> str | None:
    """``name`` as a normal relative POSIX path below its directory, else None."""
    p = PurePosixPath(name)
    if p.is_absolute() or not p.parts or ".." in p.parts or "\\" in name:
        return None
    return p.as_posix()


# --------------------------------------------------------------------------- whether it runs


def _spool_lock(spool_dir: Path) -> int | None:
    """The spool's lock taken (an fd to close), None if it has no lock file; MachineRunning's
    reason as BlockingIOError if a running machine holds it."""
    try:
        fd = os.open(spool_dir / SPOOL_LOCK, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _endpoint_answers(host: str, port: int) -> bool:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        with socket.create_connection((host, port), PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def running_batch(*state_files: Path) -> str:
    """"", or what the first of the PLC state files ``state_files`` that has a batch in progress
    says of it (``a batch of dark-70 is running (tempering-01-000004, heating)``)."""
    from plc.state import RUNNING

    for state_file in state_files:
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        phase = state.get("phase") if isinstance(state, dict) else None
        if phase in {p.value for p in RUNNING}:
            return (f"a batch of {state.get('recipe_id') or '?'} is running "
                    f"({state.get('batch_id') or 'no batch id'}, {phase})")
    return ""


def claim(target: str, *layouts: Layout, probe: bool = True) -> list[int]:
    """Make sure that no machine runs at ``layouts`` (the places of the machine ``target``:
    where it is to be written and, if elsewhere, where the machine there runs now), and keep it
    so: each historian spool lock is taken and each OPC UA endpoint must not answer. Returns the
    spool locks taken (fds; close them when done: until then a machine there does not start).
    MachineRunning otherwise, every reason and a batch in progress named (``<target>: the
    machine is running (<why>); <batch>: stop it first``), no lock kept. ``probe=False`` (a new,
    empty directory: nothing runs there): nothing checked, no lock taken."""
    locks, why = [], []
    try:
        for layout in layouts if probe else ():
            try:
                fd = _spool_lock(layout.spool_dir)
            except BlockingIOError:
                why.append(f"its historian spool {layout.spool_dir} is locked")
            else:
                if fd is not None:
                    locks.append(fd)
            if _endpoint_answers(layout.host, layout.port):
                why.append(f"its OPC UA endpoint {layout.host}:{layout.port} accepts connections")
        if why:
            batch = running_batch(*(layout.state_file for layout in layouts))
            raise MachineRunning(f"{target}: the machine is running ({'; '.join(dict.fromkeys(why))})"
                                 + (f"; {batch}" if batch else "") + ": stop it first")
    except BaseException:
        for fd in locks:
            os.close(fd)
        raise
    return locks


# --------------------------------------------------------------------------- changing it


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    system cannot."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
