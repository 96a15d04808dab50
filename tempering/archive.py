"""The machine backup archive: its manifest and member names, writing it, and reading it back
checked whole.

The archive is a tar file, gzip-compressed, written atomically with mode 0600 (it holds password
hashes; with ``--include-keys`` the server's private key too)::

    manifest.json                  format, format_version, program, program_version,
                                   schema_version (records), machine_id, created (UTC ISO 8601),
                                   keys_included, machine_file, records (rows per table),
                                   members: [{path, size, sha256}, ...]
    machine/<machine file>         the machine file under its own name, and the register map
    machine/<map_file>             and the recipes file under the names it gives them (below
    machine/<recipes_file>         the machine file's directory: anything else is refused)
    records/<table>.jsonl          the records database, one row a line (``tempering.records_dump``)
    pki/own/cert.der               the server's own certificate
    pki/own/key.pem                its private key: with --include-keys only
    pki/trusted/*, pki/rejected/*  the client certificates
    state/plc-state.json           machine.state_file, if the machine has one
    state/plc-state.recipes.json   the recipe book next to it, if there is one

``read_archive`` checks the archive whole, before a restore changes anything (rule 1 of a
restore, ``tempering.backup``): a readable tar.gz; only regular files, with normal relative paths
(no absolute or ``..`` path, no link: nothing can land outside); a manifest of a known format
version; every member listed, present, of the listed size and sha256, none unlisted and each one
a part of a machine backup; a records schema not newer than this program's (an older one is
migrated); the machine file and its recipes valid (``opcua_server.config``'s loader on the copy
extracted into a temporary directory); every records row a JSON object of its table's columns.

Errors (the text says why):
    Refused(Exception)             ``tempering.machine_dir``; here: no such archive file
        BadArchive(Refused)        the archive is corrupt, tampered with, too new, or its
                                   machine is not valid
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from opcua_server.config import load
from plc.config import ConfigError

from .machine_dir import Layout, Refused, below
from .records_dump import tables

FORMAT = "tempering-backup"
FORMAT_VERSION = 1
KNOWN_FORMAT_VERSIONS = (1,)
PROGRAM = "tempering"                       # the distribution's name (pyproject.toml)
MANIFEST = "manifest.json"
STATE_MEMBER, BOOK_MEMBER = "state/plc-state.json", "state/plc-state.recipes.json"
OWN_CERT, OWN_KEY = "pki/own/cert.der", "pki/own/key.pem"


class BadArchive(Refused):
    pass


# --------------------------------------------------------------------------- writing


def _program_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PROGRAM)
    except PackageNotFoundError:
        return "unknown"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_of(members: list[tuple[str, Path | bytes]], *, schema_version: str, machine_id: str,
             keys_included: bool, machine_file: str, records: dict[str, int]) -> dict:
    """The manifest of an archive of ``members`` (member name, its data or the file holding
    it) made now: this program's format and version, the facts given, each member's size and
    sha256."""
    listing = [{"path": name, "size": len(data) if isinstance(data, bytes) else data.stat().st_size,
                "sha256": hashlib.sha256(data).hexdigest() if isinstance(data, bytes) else _sha256(data)}
               for name, data in members]
    created = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "program": PROGRAM,
            "program_version": _program_version(), "schema_version": schema_version,
            "machine_id": machine_id, "created": created, "keys_included": keys_included,
            "machine_file": machine_file, "records": records, "members": listing}


def write_archive(out: Path, manifest: dict, members: list[tuple[str, Path | bytes]]) -> None:
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


# --------------------------------------------------------------------------- reading, checked


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
    """The archive at ``path`` checked whole (the module docstring) and extracted into the
    directory ``into``; BadArchive with the first problem otherwise (Refused: no such file)."""
    found: dict[str, tuple[int, str]] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for info in tar:
                name = info.name
                if below(name) != name:
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
        if below(name) != name:
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
    names = {t.name for t in tables()}
    for name in sorted(members):
        top, _, rest = name.partition("/")
        ok = (top == "machine" or name in (STATE_MEMBER, BOOK_MEMBER, OWN_CERT, OWN_KEY)
              or (top == "records" and rest.endswith(".jsonl") and rest[:-6] in names)
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
    member = f"machine/{name}" if isinstance(name, str) and below(name) == name and "/" not in name else None
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
        normal = below(file)
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
    for table in tables():
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
