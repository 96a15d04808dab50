"""``tempering backup FILE`` and ``tempering restore FILE``: a whole machine in one archive, and
back, on this computer or on a new one.

A machine is its machine file with the register map and recipes file it names, the records
database (``opcua_server.records``), the OPC UA server's PKI (``<opcua.data_dir>/pki``) and the
PLC state file with the recipe book kept next to it (``plc_process.RecipeBookFile``). The
archive is a tar file, gzip-compressed, written atomically with mode 0600 (it holds password
hashes; with ``--include-keys`` the server's private key too)::

    manifest.json                  format, format_version, program, program_version,
                                   schema_version (records), machine_id, created (UTC ISO 8601),
                                   keys_included, machine_file, records (rows per table),
                                   members: [{path, size, sha256}, ...]
    machine/<machine file>         the machine file under its own name, and the register map
    machine/<map_file>             and the recipes file under the names it gives them (below
    machine/<recipes_file>         the machine file's directory: anything else is refused)
    records/<table>.jsonl          the records database, one row a line (below)
    pki/own/cert.der               the server's own certificate
    pki/own/key.pem                its private key: with --include-keys only
    pki/trusted/*, pki/rejected/*  the client certificates
    state/plc-state.json           machine.state_file, if the machine has one
    state/plc-state.recipes.json   the recipe book next to it, if there is one

Records: one form for SQLite and PostgreSQL, so that a backup of either restores into either
(``restore --database-url``): per table of ``opcua_server.records``, one JSON object a line,
column name -> text, number, true/false or null, in primary-key order. The snapshot is
consistent while the machine runs: SQLite through its online backup API into a temporary file,
read there; PostgreSQL every table in one REPEATABLE READ transaction. A restore writes the rows
into this program's tables (a column an older archive lacks takes its default, as the migration
would), advances PostgreSQL's id sequences past them, and opens the records once more, which
migrates them to this program's schema. The historian's data (spool, local history) is not part
of a machine backup.

Restore, in order; the first refusal ends it, with its reason, exit code 1, nothing changed:

1. The archive, whole, before anything else: a readable tar.gz; only regular files, with
   normal relative paths (no absolute or ``..`` path, no link: nothing can land outside); a
   manifest of a known format version; every member listed, present, of the listed size and
   sha256, none unlisted and each one a part of a machine backup; a records schema not newer
   than this program's (an older one is migrated); the machine file and its recipes valid
   (``opcua_server.config``'s loader on the copy extracted into a temporary directory).
2. The target: not running (the historian's spool lock is held, or the OPC UA endpoint accepts
   connections; a batch in progress in its state file is named), and without a machine of its
   own (records with users, a state file) unless ``--force``.
3. The change: everything is made in temporary directories beside its target (same file
   system), then the targets are moved aside and the new ones renamed in; the SQLite records
   are a new file put in place the same way, PostgreSQL's rows are replaced in one transaction
   after the renames. Any failure moves the old ones back. While it runs, the target's spool
   lock is held, so that a machine started meanwhile does not start.

Into ``--config MACHINE`` (default: the embedded default machine) the archive's machine file,
map and recipes replace the target's, and the records, PKI and state go where the restored
machine file puts them (relative to MACHINE's directory with ``machine.work_dir``, else to the
working directory). Into ``--out DIR`` (empty or absent): ``DIR/tempering-machine.yaml`` with
``machine.work_dir: .`` and the run-time paths at their defaults under DIR, every other setting
kept; the YAML text is edited line by line (comments stay), or, for a layout that editor does not
know (flow mappings), read and written again without comments; either way the result is loaded
back and must equal the archived configuration but for those paths.

The private key: without it in the archive, a target keeps its own certificate and key if it
has them, else the server makes new ones on its first start (clients must trust the new
certificate: said in the output).

Errors (the text says why; nothing was changed):
    Refused(Exception)
        BadArchive(Refused)        the archive is corrupt, tampered with, too new, or its
                                   machine is not valid
        MachineRunning(Refused)    the target machine runs (a running batch is named)
        TargetHasMachine(Refused)  the target has a machine of its own, and no --force
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from opcua_server.config import DEFAULT_CONFIG, load, with_work_dir
from plc.config import ConfigError

FORMAT = "tempering-backup"
FORMAT_VERSION = 1
KNOWN_FORMAT_VERSIONS = (1,)
PROGRAM = "tempering"                       # the distribution's name (pyproject.toml)
MANIFEST = "manifest.json"
STATE_MEMBER, BOOK_MEMBER = "state/plc-state.json", "state/plc-state.recipes.json"
OWN_CERT, OWN_KEY = "pki/own/cert.der", "pki/own/key.pem"
OUT_MACHINE_FILE = "tempering-machine.yaml"
#: ``restore --out``: the run-time paths of the restored machine file (relative to its
#: directory, ``machine.work_dir: .``); their defaults where the file does not set them.
OUT_PATHS: dict[tuple[str, ...], str] = {
    ("machine", "state_file"): "var/plc-state.json",
    ("opcua", "data_dir"): "var/opcua",
    ("historian", "spool_dir"): "var/spool",
    ("historian", "sink", "path"): "var/history.sqlite",
}
SPOOL_LOCK = "lock"                         # historian.spool's flock'ed file
PROBE_TIMEOUT_S = 0.5                       # the endpoint probe's connect timeout
ROWS_PER_INSERT = 1000


class Refused(Exception):
    """A backup or restore refused; the text says why; nothing was changed."""


class BadArchive(Refused):
    pass


class MachineRunning(Refused):
    pass


class TargetHasMachine(Refused):
    pass


# --------------------------------------------------------------------------- a machine's places


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


def _below(name: str) -> str | None:
    """``name`` as a normal relative POSIX path below its directory, else None."""
    p = PurePosixPath(name)
    if p.is_absolute() or not p.parts or ".." in p.parts or "\\" in name:
        return None
    return p.as_posix()


def _safe_url(url: str) -> str:
    """An SQLAlchemy URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _program_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PROGRAM)
    except PackageNotFoundError:
        return "unknown"


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tables():
    """The records' tables (``opcua_server.records``' metadata), in dependency order."""
    from opcua_server import records

    return records.users.metadata.sorted_tables


# --------------------------------------------------------------------------- backup


def _snapshot_records(url: str, into: Path) -> tuple[str, dict[str, int]]:
    """Every table's rows into ``into/<table>.jsonl``, one consistent snapshot; returns the
    records' schema version and the rows per table. A SQLite file that does not exist gives
    empty tables (the machine never ran)."""
    import sqlite3

    from sqlalchemy import create_engine, inspect, select
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from opcua_server.records import SCHEMA_VERSION

    parsed = make_url(url)
    copy = None
    options: dict = {}
    if parsed.get_backend_name() == "sqlite":
        source = Path(parsed.database or "")
        if not source.is_file():
            for table in _tables():
                (into / f"{table.name}.jsonl").write_bytes(b"")
            return SCHEMA_VERSION, {t.name: 0 for t in _tables()}
        copy = into / ".snapshot.db"         # the online backup API: a consistent copy
        src = sqlite3.connect(f"file:{urllib.parse.quote(str(source.absolute()))}?mode=ro", uri=True)
        dst = sqlite3.connect(copy)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        engine = create_engine(f"sqlite:///{copy}")
    else:
        engine = create_engine(parsed)
        options = {"isolation_level": "REPEATABLE READ"}
    schema, counts = SCHEMA_VERSION, {}
    try:
        with engine.connect().execution_options(**options) as db, db.begin():
            have = set(inspect(db).get_table_names())
            for table in _tables():
                present = ({c["name"] for c in inspect(db).get_columns(table.name)}
                           if table.name in have else set())
                columns = [c for c in table.columns if c.name in present]
                n = 0
                with open(into / f"{table.name}.jsonl", "w", encoding="utf-8", newline="\n") as f:
                    if columns:
                        query = select(*columns).order_by(*table.primary_key.columns)
                        for row in db.execute(query.execution_options(yield_per=ROWS_PER_INSERT)).mappings():
                            f.write(json.dumps(dict(row), ensure_ascii=False, separators=(",", ":")) + "\n")
                            if table.name == "meta" and row.get("key") == "schema":
                                schema = str(row["value"])
                            n += 1
                counts[table.name] = n
    except SQLAlchemyError as e:
        raise Refused(f"the records database {_safe_url(url)}: {getattr(e, 'orig', None) or e}") from None
    finally:
        engine.dispose()
        if copy is not None:
            copy.unlink(missing_ok=True)
    return schema, counts


def backup(out: Path, machine_file: Path, cfg, *, include_keys: bool = False) -> list[str]:
    """Write the archive of the machine ``cfg`` (loaded from ``machine_file``) to ``out``;
    the summary lines. Refused if the map or recipes file is not below the machine file's
    directory, or the records cannot be read; OSError if ``out`` cannot be written."""
    layout = Layout.of(machine_file, cfg)
    members: list[tuple[str, Path | bytes]] = [(f"machine/{layout.machine_file.name}",
                                                layout.machine_file.read_bytes())]
    for name in layout.names:
        normal = _below(name)
        if normal is None:
            raise Refused(f"{machine_file}: {name}: not below the machine file's directory; a "
                          f"backup keeps a machine's files there (move it, and name it so)")
        members.append((f"machine/{normal}", layout.file(name).read_bytes()))
    pki = layout.pki_dir
    own = [(OWN_CERT, pki / "own" / "cert.der")] + ([(OWN_KEY, pki / "own" / "key.pem")] if include_keys else [])
    for member, path in own:
        if path.is_file():
            members.append((member, path.read_bytes()))
    clients = {}
    for state in ("trusted", "rejected"):
        files = sorted(p for p in (pki / state).glob("*") if p.is_file() and not p.is_symlink()) \
            if (pki / state).is_dir() else []
        clients[state] = len(files)
        members += [(f"pki/{state}/{p.name}", p.read_bytes()) for p in files]
    phase = None
    for member, path in ((STATE_MEMBER, layout.state_file), (BOOK_MEMBER, layout.book_file)):
        try:
            data = path.read_bytes()        # replaced atomically by the PLC: whole or not at all
        except FileNotFoundError:
            continue
        members.append((member, data))
        if member == STATE_MEMBER:
            phase = _phase_text(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        schema, counts = _snapshot_records(layout.url, Path(tmp))
        members += [(f"records/{table}.jsonl", Path(tmp) / f"{table}.jsonl") for table in counts]
        listing = [{"path": name, "size": len(data) if isinstance(data, bytes) else data.stat().st_size,
                    "sha256": hashlib.sha256(data).hexdigest() if isinstance(data, bytes) else _sha256(data)}
                   for name, data in members]
        created = _utc_now()
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "program": PROGRAM,
                    "program_version": _program_version(), "schema_version": schema,
                    "machine_id": cfg.machine.id, "created": created, "keys_included": include_keys,
                    "machine_file": layout.machine_file.name, "records": counts, "members": listing}
        _write_archive(out, manifest, members)
    own_note = ("own certificate " + ("and private key" if include_keys and (pki / "own" / "key.pem").is_file()
                                      else "(private key not included: --include-keys)")
                if (pki / "own" / "cert.der").is_file() else "no own certificate yet")
    return [f"{out}: machine {cfg.machine.id}, {len(members) + 1} members, {out.stat().st_size} bytes, "
            f"mode 0600 ({PROGRAM} {manifest['program_version']}, records schema {schema}, {created})",
            f"  machine files  {', '.join(m[len('machine/'):] for m, _ in members if m.startswith('machine/'))}",
            f"  records        {_safe_url(layout.url)}: "
            + ", ".join(f"{table} {n}" for table, n in counts.items()),
            f"  pki            {own_note}; {clients['trusted']} trusted, {clients['rejected']} rejected",
            "  plc state      " + (f"{layout.state_file.name} (phase {phase})" if phase else "none")
            + (f", {layout.book_file.name}" if any(m == BOOK_MEMBER for m, _ in members) else "")]


def _write_archive(out: Path, manifest: dict, members: list[tuple[str, Path | bytes]]) -> None:
    """The tar.gz at ``out``, atomically (a temporary file beside it, then ``os.replace``),
    mode 0600: the manifest first, then the members."""
    mtime = int(datetime.now(timezone.utc).timestamp())
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w:gz") as tar:
                for name, data in [(MANIFEST, json.dumps(manifest, indent=1).encode()), *members]:
                    info = tarfile.TarInfo(name)
                    info.mode, info.mtime = 0o600, mtime
                    if isinstance(data, bytes):
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                    else:
                        info.size = data.stat().st_size
                        with open(data, "rb") as src:
                            tar.addfile(info, src)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _phase_text(data: bytes) -> str | None:
    try:
        state = json.loads(data)
    except ValueError:
        return None
    return str(state.get("phase", "idle")) if isinstance(state, dict) else None


# --------------------------------------------------------------------------- the archive, checked


@dataclass
class Archive:
    """An archive checked whole and extracted into ``root`` (a temporary directory)."""

    path: Path
    root: Path
    manifest: dict
    machine_text: bytes              # the machine file as archived
    raw_cfg: object                  # its config, run-time paths as written in it
    members: set[str]

    def file(self, member: str) -> Path:
        return self.root / member

    def has(self, member: str) -> bool:
        return member in self.members

    def rows(self, table: str):
        """The archived rows of ``table`` (none for a table the archive does not have)."""
        member = f"records/{table}.jsonl"
        if member in self.members:
            with open(self.file(member), encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)


def _refuse(path: Path, reason: str) -> BadArchive:
    return BadArchive(f"{path}: {reason}")


def read_archive(path: Path, into: Path) -> Archive:
    """The archive at ``path`` checked whole (rule 1 of the module docstring) and extracted into
    the directory ``into``; BadArchive with the first problem otherwise."""
    import gzip
    import zlib

    found: dict[str, tuple[int, str]] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for info in tar:
                name = info.name
                if _below(name) != name:
                    raise _refuse(path, f"member {name}: " + (
                        "absolute path" if name.startswith("/") else
                        "path escapes the archive (..)" if ".." in PurePosixPath(name).parts else
                        "not a normal relative path"))
                if info.issym() or info.islnk():
                    raise _refuse(path, f"member {name}: a link (to {info.linkname})")
                if not info.isreg():
                    raise _refuse(path, f"member {name}: not a regular file")
                if name in found:
                    raise _refuse(path, f"member {name}: twice in the archive")
                target = into / name
                target.parent.mkdir(parents=True, exist_ok=True)
                h, size = hashlib.sha256(), 0
                with tar.extractfile(info) as src, open(target, "wb") as dst:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        h.update(block)
                        dst.write(block)
                        size += len(block)
                found[name] = (size, h.hexdigest())
    except FileNotFoundError:
        raise Refused(f"{path}: no such file") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise _refuse(path, f"not a readable tar.gz archive ({e or type(e).__name__})") from None
    if MANIFEST not in found:
        raise _refuse(path, f"no {MANIFEST}: not a {FORMAT} archive")
    try:
        manifest = json.loads((into / MANIFEST).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise _refuse(path, f"{MANIFEST}: not JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _refuse(path, f"{MANIFEST}: not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version not in KNOWN_FORMAT_VERSIONS:
        raise _refuse(path, f"{MANIFEST}: format version {version!r} is not one this program knows "
                            f"({', '.join(map(str, KNOWN_FORMAT_VERSIONS))})")
    _check_listing(path, manifest, found)
    members = set(found) - {MANIFEST}
    _check_parts(path, manifest, members)
    from opcua_server.records import SCHEMA_VERSION

    schema = str(manifest.get("schema_version"))
    if not schema.isdigit():
        raise _refuse(path, f"{MANIFEST}: records schema version {schema!r} is not a number")
    if int(schema) > int(SCHEMA_VERSION):
        raise _refuse(path, f"records schema {schema} is newer than this program's ({SCHEMA_VERSION}): "
                            f"restore it with {manifest.get('program', PROGRAM)} "
                            f"{manifest.get('program_version', '?')} or newer")
    archive = Archive(path, into, manifest, b"", None, members)
    _check_machine(archive)
    _check_records(archive)
    for member in (STATE_MEMBER, BOOK_MEMBER):
        if member in members:
            try:
                ok = isinstance(json.loads(archive.file(member).read_text(encoding="utf-8")), dict)
            except (ValueError, UnicodeDecodeError):
                ok = False
            if not ok:
                raise _refuse(path, f"member {member}: not a JSON object")
    return archive


def _check_listing(path: Path, manifest: dict, found: dict[str, tuple[int, str]]) -> None:
    listing = manifest.get("members")
    if not isinstance(listing, list) or not all(
            isinstance(m, dict) and isinstance(m.get("path"), str) and isinstance(m.get("size"), int)
            and isinstance(m.get("sha256"), str) for m in listing):
        raise _refuse(path, f"{MANIFEST}: members must be a list of {{path, size, sha256}}")
    listed = {m["path"]: m for m in listing}
    for name in listed:
        if _below(name) != name:
            raise _refuse(path, f"{MANIFEST}: member {name}: not a normal relative path")
        if name not in found:
            raise _refuse(path, f"member {name}: missing")
        size, sha = found[name]
        if size != listed[name]["size"]:
            raise _refuse(path, f"member {name}: {size} bytes, the manifest says {listed[name]['size']}")
        if sha != listed[name]["sha256"]:
            raise _refuse(path, f"member {name}: sha256 mismatch")
    for name in found:
        if name != MANIFEST and name not in listed:
            raise _refuse(path, f"member {name}: not in the manifest")


def _check_parts(path: Path, manifest: dict, members: set[str]) -> None:
    """Each member a part of a machine backup; the key only if the manifest says so."""
    tables = {t.name for t in _tables()}
    for name in sorted(members):
        top, _, rest = name.partition("/")
        ok = (top == "machine" or name in (STATE_MEMBER, BOOK_MEMBER, OWN_CERT, OWN_KEY)
              or (top == "records" and rest.endswith(".jsonl") and rest[:-6] in tables)
              or (top == "pki" and rest.count("/") == 1 and rest.split("/")[0] in ("trusted", "rejected")))
        if not ok:
            raise _refuse(path, f"member {name}: not a part of a machine backup")
    if OWN_KEY in members and manifest.get("keys_included") is not True:
        raise _refuse(path, f"member {OWN_KEY}: a private key, but the manifest says keys are not included")


def _check_machine(archive: Archive) -> None:
    """The machine file and what it names: valid (the program's loader), all of them members
    below ``machine/``, and no other member there."""
    from opcua_server.config import AppConfig
    from plc.config import load_all

    path, root = archive.path, archive.root
    name = archive.manifest.get("machine_file")
    member = f"machine/{name}" if isinstance(name, str) and _below(name) == name and "/" not in name else None
    if member is None or member not in archive.members:
        raise _refuse(path, f"{MANIFEST}: machine_file {name!r}: no such member")
    try:
        load(root / member)                 # as the machine will be loaded: all of it valid
        cfg, _ = load_all(root / member, model=AppConfig)   # the same, paths as written
    except ConfigError as e:
        prefix = f"{root}{os.sep}"
        raise _refuse(path, "the machine inside is not valid:\n  " + "\n  ".join(
            m.replace(prefix, "") for m in e.messages)) from None
    layout = Layout.of(root / member, cfg)
    named = {member}
    for file in layout.names:
        normal = _below(file)
        if normal is None or f"machine/{normal}" not in archive.members:
            raise _refuse(path, f"{member}: {file}: not a member below machine/")
        named.add(f"machine/{normal}")
    for other in archive.members:
        if other.startswith("machine/") and other not in named:
            raise _refuse(path, f"member {other}: not named by the machine file")
    archive.machine_text = (root / member).read_bytes()
    archive.raw_cfg = cfg


def _check_records(archive: Archive) -> None:
    """Every row a JSON object of the table's columns, the same columns in each row of a
    table, as many rows as the manifest says."""
    counts = archive.manifest.get("records")
    if not isinstance(counts, dict):
        raise _refuse(archive.path, f"{MANIFEST}: records must be the rows per table")
    for table in _tables():
        member = f"records/{table.name}.jsonl"
        if member not in archive.members:
            continue
        columns, first, n = set(table.columns.keys()), None, 0
        try:
            for n, row in enumerate(archive.rows(table.name), start=1):
                keys = set(row) if isinstance(row, dict) else None
                if keys is None or not keys <= columns:
                    raise _refuse(archive.path, f"member {member}: row {n}: "
                                  + ("not a JSON object" if keys is None else
                                     f"no column {', '.join(sorted(keys - columns))} in table {table.name}"))
                if first is not None and keys != first:
                    raise _refuse(archive.path, f"member {member}: row {n}: other columns than row 1")
                first = keys
        except (ValueError, UnicodeDecodeError) as e:
            raise _refuse(archive.path, f"member {member}: row {n + 1}: not JSON ({e})") from None
        if counts.get(table.name) != n:
            raise _refuse(archive.path, f"member {member}: {n} rows, the manifest says {counts.get(table.name)}")


# --------------------------------------------------------------------------- the target


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


def _running_batch(state_file: Path) -> str:
    """", or what the state file says of a batch in progress (``a batch of dark-70 is
    running (tempering-01-000004, heating)``)."""
    from plc.state import RUNNING

    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    phase = state.get("phase") if isinstance(state, dict) else None
    if phase not in {p.value for p in RUNNING}:
        return ""
    return (f"a batch of {state.get('recipe_id') or '?'} is running "
            f"({state.get('batch_id') or 'no batch id'}, {phase})")


def _user_count(layout: Layout) -> int:
    """The users in the target's records (0: no database, or no users table)."""
    sqlite = layout.sqlite_file
    if sqlite is not None:
        if not sqlite.is_file():
            return 0
        import sqlite3

        db = sqlite3.connect(f"file:{urllib.parse.quote(str(sqlite))}?mode=ro", uri=True)
        try:
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'users'").fetchone() is None:
                return 0
            return db.execute("SELECT count(*) FROM users").fetchone()[0]
        except sqlite3.Error as e:
            raise Refused(f"the records {sqlite}: cannot read: {e}") from None
        finally:
            db.close()
    from sqlalchemy import create_engine, func, inspect, select
    from sqlalchemy.exc import SQLAlchemyError

    from opcua_server.records import users

    engine = create_engine(layout.records_url)
    try:
        with engine.connect() as db:
            return db.scalar(select(func.count()).select_from(users)) if inspect(db).has_table("users") else 0
    except SQLAlchemyError as e:
        raise Refused(f"the records database {_safe_url(layout.records_url)}: "
                      f"{getattr(e, 'orig', None) or e}") from None
    finally:
        engine.dispose()


def _check_target(target: str, layouts: list[Layout], force: bool, *, probe: bool = True) -> list[int]:
    """Rule 2 of the module docstring for the target's ``layouts`` (the first: where the restore
    writes; more: where the machine there runs now). Returns the spool locks taken (fds)."""
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
        batch = next((b for b in (_running_batch(lay.state_file) for lay in layouts) if b), "")
        if why:
            raise MachineRunning(f"{target}: the machine is running ({'; '.join(dict.fromkeys(why))})"
                                 + (f"; {batch}" if batch else "") + ": stop it first")
        new = layouts[0]
        has = []
        users = _user_count(new)
        if users:
            has.append(f"{users} user{'s' if users != 1 else ''} in its records {_safe_url(new.url)}")
        if new.state_file.exists():
            has.append(f"a state file {new.state_file}"
                       + (f" ({batch.replace('is running', 'was interrupted')})" if batch else ""))
        if has and not force:
            raise TargetHasMachine(f"{target}: has a machine already ({'; '.join(has)}): --force "
                                   f"replaces it")
    except BaseException:
        for fd in locks:
            os.close(fd)
        raise
    return locks


# --------------------------------------------------------------------------- the change


def _move(src: Path, dst: Path) -> None:
    """One rename of the change (one place, so that a test can make it fail)."""
    os.rename(src, dst)


class _Swap:
    """Files and directories put in place together, or not at all. Each new one is made in a
    temporary directory beside its target (``stage``: the same file system, so renames are
    atomic); ``commit`` moves each target aside and renames the new one in; ``undo`` moves them
    back, in reverse; ``close`` removes the temporary directories (and, after an undo, the
    directories made for the targets)."""

    def __init__(self):
        self._items: list[tuple[Path, Path | None, Path]] = []    # target, new (None: goes), tmp
        self._done: list[tuple[Path, Path]] = []                  # renames done: (to, from)
        self._made: list[Path] = []

    def _mkdirs(self, directory: Path) -> None:
        missing = []
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        for d in reversed(missing):
            d.mkdir(mode=0o755)
            self._made.append(d)

    def _tmp(self, target: Path) -> Path:
        self._mkdirs(target.parent)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.restore-", dir=target.parent))

    def stage(self, target: Path) -> Path:
        """The path to make the new ``target`` at."""
        tmp = self._tmp(target)
        self._items.append((target, tmp / "new", tmp))
        return tmp / "new"

    def remove(self, target: Path) -> None:
        """``target`` goes (moved aside with the others), if it is there."""
        if os.path.lexists(target):
            self._items.append((target, None, self._tmp(target)))

    def commit(self) -> None:
        for target, new, tmp in self._items:
            if os.path.lexists(target):
                _move(target, tmp / "old")
                self._done.append((tmp / "old", target))
            if new is not None and os.path.lexists(new):
                _move(new, target)
                self._done.append((target, new))

    def undo(self) -> None:
        for moved_to, moved_from in reversed(self._done):
            os.rename(moved_to, moved_from)
        self._done.clear()

    def close(self, failed: bool) -> None:
        for _, _, tmp in self._items:
            shutil.rmtree(tmp, ignore_errors=True)
        if failed:
            for d in reversed(self._made):
                try:
                    d.rmdir()
                except OSError:
                    pass


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _build_pki(directory: Path, archive: Archive, keep_own: Path | None) -> str:
    """The PKI at ``directory`` (new): the archive's trusted and rejected certificates; its own
    certificate and key if the archive has the key, else ``keep_own`` (the target's own/, if it
    has a key) copied. What became of the own certificate, in words."""
    for sub in ("", "own", "trusted", "rejected"):
        (directory / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    for member in sorted(archive.members):
        if member.startswith(("pki/trusted/", "pki/rejected/")):
            _write(directory / member[len("pki/"):], archive.file(member).read_bytes())
    if archive.has(OWN_KEY):
        source = {"cert.der": archive.file(OWN_CERT), "key.pem": archive.file(OWN_KEY)}
        note = "own certificate and private key restored"
    elif keep_own is not None and (keep_own / "key.pem").is_file():
        source = {"cert.der": keep_own / "cert.der", "key.pem": keep_own / "key.pem"}
        note = ("the archive has no private key: this computer's own certificate and key are kept "
                "(clients trust it as before)")
    else:
        return ("the archive has no private key: the server makes a new own certificate on its "
                "first start; clients must trust the new certificate")
    for name, path in source.items():
        if path.is_file():
            _write(directory / "own" / name, path.read_bytes(), 0o600 if name == "key.pem" else 0o644)
    return note


def _write_records(url: str, archive: Archive) -> dict[str, int]:
    """The archive's rows into the records at ``url`` in one transaction: every table emptied,
    then filled; PostgreSQL's id sequences moved past the rows; then the records opened once
    more (migrated to this program's schema). Rows per table."""
    from sqlalchemy import delete, func, insert, select, text

    from opcua_server.records import Records

    records = Records(url)                   # the tables, made or migrated
    counts = {}
    try:
        with records.engine.begin() as db:
            tables = _tables()
            for table in reversed(tables):
                db.execute(delete(table))
            for table in tables:
                batch, n = [], 0
                for row in archive.rows(table.name):
                    batch.append(row)
                    if len(batch) == ROWS_PER_INSERT:
                        db.execute(insert(table), batch)
                        n, batch = n + len(batch), []
                if batch:
                    db.execute(insert(table), batch)
                counts[table.name] = n + len(batch)
                column = table.autoincrement_column
                if db.dialect.name == "postgresql" and column is not None:
                    top = db.scalar(select(func.max(column)))
                    db.execute(text("SELECT setval(pg_get_serial_sequence(:t, :c), :v, :called)"),
                               {"t": table.name, "c": column.name, "v": top or 1, "called": top is not None})
    finally:
        records.close()
    Records(url).close()
    return counts


def _with_values(model, values: dict[tuple[str, ...], object]):
    """A frozen config model with the fields at the dotted ``values`` paths replaced."""
    groups: dict[str, dict[tuple[str, ...], object]] = {}
    for path, value in values.items():
        groups.setdefault(path[0], {})[path[1:]] = value
    return model.model_copy(update={key: sub[()] if () in sub else _with_values(getattr(model, key), sub)
                                    for key, sub in groups.items()})


def _edit_yaml(text: str, values: dict[tuple[str, ...], str], insert: set[tuple[str, ...]]) -> str | None:
    """``text`` with the block-style keys of ``values`` (key paths -> YAML scalars) set where
    present, those in ``insert`` added at the top of their section where absent; comments and
    layout kept. None if a key to insert has no block-style section to go into."""
    lines = text.splitlines(keepends=True)
    stack: list[tuple[int, str]] = []
    seen: dict[tuple[str, ...], int] = {}             # key path -> its line
    child_indent: dict[tuple[str, ...], int] = {}
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")):
            continue
        indent = len(line) - len(line.lstrip(" "))
        key, sep, rest = stripped.partition(":")
        if not sep or (rest and not rest[0].isspace()) or " " in key:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (*(k for _, k in stack), key)
        child_indent.setdefault(path[:-1], indent)
        seen[path] = i
        stack.append((indent, key))
        if path in values:
            head = f"{line[:indent]}{key}: {values[path]}"
            at = line.find(" #", indent + len(key) + 1)
            lines[i] = head + ("" if at < 0 else " " * max(2, at + 1 - len(head)) + line[at + 1:].rstrip()) + "\n"
    added: dict[int, list[str]] = {}
    for path in sorted(insert):
        if path in seen:
            continue
        parent = path[:-1]
        if parent not in seen or lines[seen[parent]].split("#")[0].strip() != f"{parent[-1]}:":
            return None
        indent = child_indent.get(parent, 2 * len(parent))
        added.setdefault(seen[parent], []).append(f"{' ' * indent}{path[-1]}: {values[path]}\n")
    for i in sorted(added, reverse=True):
        lines[i + 1:i + 1] = added[i]
    return "".join(lines)


def _load_raw(path: Path):
    """The config of the machine file ``path``, run-time paths as written; ConfigError."""
    from opcua_server.config import AppConfig
    from plc.config import load_all

    return load_all(path, model=AppConfig)[0]


def _machine_text(archive: Archive, paths: dict[tuple[str, ...], str],
                  database_url: str | None) -> tuple[bytes, object, list[str]]:
    """The archived machine file with the key paths ``paths`` set (and ``machine.work_dir: .``
    with them) and ``opcua.database_url`` if given: ``(text, its config as written, notes)``.
    Edited line by line if that gives exactly the wanted config, else read and written again
    (its comments lost: said in the notes)."""
    import yaml

    from plc.configbase import _read_mapping         # the loader's YAML 1.2 reading

    values: dict[tuple[str, ...], object] = dict(paths)
    if paths:
        values[("machine", "work_dir")] = "."
    if database_url is not None:
        values[("opcua", "database_url")] = database_url or None     # "": SQLite in data_dir
    expected = _with_values(archive.raw_cfg, values).model_dump()
    member = archive.file(f"machine/{archive.manifest['machine_file']}")
    where = member.with_name(f".restored-{member.name}")     # beside the map and recipes
    scalars = {p: json.dumps(v) if p == ("opcua", "database_url") else str(v) for p, v in values.items()}
    text = archive.machine_text.decode("utf-8")
    inserts = {("machine", "work_dir"), ("opcua", "database_url")} & set(values)
    edited = _edit_yaml(text, scalars, inserts) if values else text
    notes: list[str] = []
    for attempt in ("lines", "again"):
        if attempt == "again":
            data = _read_mapping(member)
            for path, value in values.items():
                node = data
                for key in path[:-1]:
                    node = node.setdefault(key, {})
                node[path[-1]] = value
            edited = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
            notes = ["the machine file was written again without its comments (a layout the line "
                     "editor does not know)"]
        if edited is None:
            continue
        where.write_text(edited, encoding="utf-8")
        try:
            raw = _load_raw(where)
        except ConfigError:
            continue
        if raw.model_dump() == expected:
            return edited.encode("utf-8"), raw, notes
    raise Refused(f"{archive.path}: the machine file cannot be rewritten for its new place")


def _names(archive: Archive) -> list[str]:
    """The register map and recipes file as the archived machine file names them."""
    return [_below(n) for n in Layout.of(Path("m"), archive.raw_cfg).names]


def _current(target: Path) -> Layout | None:
    """The layout of the machine at ``target`` now (None: none, or a broken machine file)."""
    try:
        return Layout.of(target, load(target)[0]) if target.exists() else None
    except ConfigError:
        return None


def restore(archive: Archive, *, config: Path | None = None, out: Path | None = None,
            force: bool = False, database_url: str | None = None) -> list[str]:
    """Restore ``archive`` into the machine file ``config`` (default: the embedded default
    machine) or the new directory ``out`` (rules 2 and 3 of the module docstring), the records
    into ``database_url`` if given ("": the SQLite file in ``opcua.data_dir``); the summary
    lines. Refused, or the failure's own exception once the target is as it was."""
    text, raw, notes = _machine_text(archive, OUT_PATHS if out is not None else {}, database_url)
    if out is not None:
        target = out.absolute()
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise Refused(f"{target}: not an empty directory")
        final = Layout.of(target / OUT_MACHINE_FILE, with_work_dir(raw, target))
        layouts = [final]                   # nothing runs from an empty directory
    else:
        target = Path(config or DEFAULT_CONFIG).absolute()
        final = Layout.of(target, with_work_dir(raw, target.parent))
        current = _current(target)
        layouts = [final] + ([current] if current is not None and current != final else [])
        if len(layouts) > 1 and (current.data_dir, current.state_file) != (final.data_dir, final.state_file):
            notes.append(f"the data where the earlier machine file put it ({current.data_dir}, "
                         f"{current.state_file}) is left as it was")
    swap, failed = _Swap(), True
    locks = _check_target(str(target), layouts, force, probe=out is None)
    try:
        root = swap.stage(target) if out is not None else None    # the new directory, whole

        def at(path: Path) -> Path:
            """Where to make the new ``path``."""
            if root is None or not path.is_relative_to(target):
                return swap.stage(path)
            (root / path.relative_to(target)).parent.mkdir(parents=True, exist_ok=True)
            return root / path.relative_to(target)

        def gone(path: Path) -> None:
            if root is None or not path.is_relative_to(target):
                swap.remove(path)

        if root is not None:
            root.mkdir(mode=0o755)
        _write(at(final.machine_file), text)
        for name in _names(archive):
            _write(at(final.file(name)), archive.file(f"machine/{name}").read_bytes())
        sqlite = final.sqlite_file
        if sqlite is not None:
            new_db = at(sqlite)
            new_db.parent.mkdir(parents=True, exist_ok=True)
            counts = _write_records(f"sqlite:///{new_db}", archive)
            for suffix in ("-journal", "-wal", "-shm"):     # a stale journal must not meet the new file
                gone(sqlite.with_name(sqlite.name + suffix))
        own_note = _build_pki(at(final.pki_dir), archive, final.pki_dir / "own")
        for member, path in ((STATE_MEMBER, final.state_file), (BOOK_MEMBER, final.book_file)):
            if archive.has(member):
                _write(at(path), archive.file(member).read_bytes())
            else:
                gone(path)
        swap.commit()
        if sqlite is None:                  # PostgreSQL: one transaction, after the renames
            counts = _write_records(final.records_url, archive)
        failed = False
    except BaseException:
        swap.undo()
        raise
    finally:
        swap.close(failed)
        for fd in locks:
            os.close(fd)
    m = archive.manifest
    state = _phase_text(final.state_file.read_bytes()) if final.state_file.exists() else None
    return [f"{archive.path}: machine {m.get('machine_id')} (made {m.get('created')} by "
            f"{m.get('program')} {m.get('program_version')}, records schema {m.get('schema_version')}) "
            f"restored into {final.machine_file}",
            f"  machine files  {final.machine_file.name}, {', '.join(_names(archive))}"
            + ("" if out is None else f" (machine.work_dir ., run-time paths under {target / 'var'})"),
            f"  records        {_safe_url(final.url)}: " + ", ".join(f"{t} {n}" for t, n in counts.items()),
            f"  pki            {final.pki_dir}: {own_note}",
            "  plc state      " + (f"{final.state_file} (phase {state})" if state else "none"),
            *(f"  note: {n}" for n in notes),
            f"start it: tempering run --config {final.machine_file}"]


# --------------------------------------------------------------------------- the command line


def cmd_backup(args) -> int:
    machine_file = Path(args.config or DEFAULT_CONFIG)
    try:
        cfg, _ = load(machine_file)
    except ConfigError as e:
        print("\n".join(e.messages), file=sys.stderr)
        return 1
    if args.data_dir:
        cfg = cfg.model_copy(update={"opcua": cfg.opcua.model_copy(update={"data_dir": args.data_dir})})
    out = Path(args.file)
    if out.is_dir():
        print(f"tempering backup: {out}: cannot write: it is a directory", file=sys.stderr)
        return 2
    try:
        lines = backup(out, machine_file, cfg, include_keys=args.include_keys)
    except Refused as e:
        print(f"tempering backup: {e}; nothing written", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"tempering backup: {e.filename or out}: {e.strerror or e}; nothing written", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


def cmd_restore(args) -> int:
    path = Path(args.file)
    try:
        with tempfile.TemporaryDirectory(prefix="tempering-restore-") as tmp:
            archive = read_archive(path, Path(tmp))
            lines = restore(archive, config=Path(args.config) if args.config else None,
                            out=Path(args.out) if args.out else None, force=args.force,
                            database_url="" if args.database_url == "sqlite" else args.database_url)
    except Refused as e:
        print(f"tempering restore: {e}; nothing changed", file=sys.stderr)
        return 1
    except Exception as e:                  # a failure of the change itself: put back
        print(f"tempering restore: {path}: failed ({type(e).__name__}: {e}); the target is as it "
              f"was", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


def add_parser(sub, where) -> None:
    """``tempering backup`` and ``tempering restore``; ``where`` is the shared parent parser
    with ``--config`` and ``--data-dir``."""
    b = sub.add_parser("backup", parents=[where],
                       help="one archive of the machine: its files, records, PKI and PLC state")
    b.add_argument("file", metavar="FILE", help="the archive to write (tar.gz, mode 0600)")
    b.add_argument("--include-keys", action="store_true",
                   help="the OPC UA server's private key too (keep the archive safe)")
    b.set_defaults(func=cmd_backup)
    r = sub.add_parser("restore", help="a machine from a backup archive, checked whole first")
    r.add_argument("file", metavar="FILE", help="the archive (tempering backup)")
    target = r.add_mutually_exclusive_group()
    target.add_argument("--config", metavar="MACHINE",
                        help="replace this machine (default: the embedded default machine)")
    target.add_argument("--out", metavar="DIR", help="a new machine directory (empty or absent)")
    r.add_argument("--force", action="store_true", help="replace a machine that has users or a state file")
    r.add_argument("--database-url", metavar="URL",
                   help="the records go into this database (an SQLAlchemy URL, e.g. from SQLite to "
                        "PostgreSQL; sqlite: the SQLite file in opcua.data_dir); the restored "
                        "machine file names it")
    r.set_defaults(func=cmd_restore)
