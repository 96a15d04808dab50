"""``tempering backup FILE`` and ``tempering restore FILE``: a whole machine in one archive, and
back, on this computer or on a new one.

A machine is its machine file with the register map and recipes file it names, the records
database (``opcua_server.records``), the OPC UA server's PKI (``<opcua.data_dir>/pki``) and the
PLC state file with the recipe book kept next to it (``plc_process.RecipeBookFile``). Here: the
backup (gathering them), the restore (the checks of the target and the change) and the command
line. The archive's layout and its checks: ``tempering.archive``; the records in it, one form
for SQLite and PostgreSQL: ``tempering.records_dump``; a machine's places on disk and whether it
runs: ``tempering.machine_dir``. The historian's data (spool, local history) is not part of a
machine backup.

Restore, in order; the first refusal ends it, with its reason, exit code 1, nothing changed:

1. The archive, whole, before anything else (``tempering.archive.read_archive``): a readable
   tar.gz of regular files with normal relative paths, every member listed in the manifest and
   as listed, a known format version, a records schema not newer than this program's, the
   machine file and its recipes valid.
2. The target: not running (``tempering.machine_dir.claim``: the historian's spool lock is
   held, or the OPC UA endpoint accepts connections; a batch in progress in its state file is
   named), and without a machine of its own (records with users, a state file) unless
   ``--force``.
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
    Refused(Exception)             tempering.machine_dir
        BadArchive(Refused)        tempering.archive: the archive is corrupt, tampered with, too
                                   new, or its machine is not valid
        MachineRunning(Refused)    tempering.machine_dir: the target machine runs (a running
                                   batch is named)
        TargetHasMachine(Refused)  the target has a machine of its own, and no --force
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import urllib.parse
from pathlib import Path

from opcua_server.config import DEFAULT_CONFIG, load, with_work_dir
from plc.config import ConfigError

from . import records_dump
from .archive import (BOOK_MEMBER, OWN_CERT, OWN_KEY, PROGRAM, STATE_MEMBER, Archive, manifest_of,
                      read_archive, write_archive)
from .machine_dir import Layout, Refused, below, claim, running_batch
from .records_dump import safe_url

OUT_MACHINE_FILE = "tempering-machine.yaml"
#: ``restore --out``: the run-time paths of the restored machine file (relative to its
#: directory, ``machine.work_dir: .``); their defaults where the file does not set them.
OUT_PATHS: dict[tuple[str, ...], str] = {
    ("machine", "state_file"): "var/plc-state.json",
    ("opcua", "data_dir"): "var/opcua",
    ("historian", "spool_dir"): "var/spool",
    ("historian", "sink", "path"): "var/history.sqlite",
}


class TargetHasMachine(Refused):
    pass


# --------------------------------------------------------------------------- backup


def backup(out: Path, machine_file: Path, cfg, *, include_keys: bool = False) -> list[str]:
    """Write the archive of the machine ``cfg`` (loaded from ``machine_file``) to ``out``;
    the summary lines. Refused if the map or recipes file is not below the machine file's
    directory, or the records cannot be read; OSError if ``out`` cannot be written."""
    layout = Layout.of(machine_file, cfg)
    members: list[tuple[str, Path | bytes]] = [(f"machine/{layout.machine_file.name}",
                                                layout.machine_file.read_bytes())]
    for name in layout.names:
        normal = below(name)
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
        schema, counts = records_dump.snapshot(layout.url, Path(tmp))
        members += [(f"records/{table}.jsonl", Path(tmp) / f"{table}.jsonl") for table in counts]
        manifest = manifest_of(members, schema_version=schema, machine_id=cfg.machine.id,
                               keys_included=include_keys, machine_file=layout.machine_file.name,
                               records=counts)
        write_archive(out, manifest, members)
    own_note = ("own certificate " + ("and private key" if include_keys and (pki / "own" / "key.pem").is_file()
                                      else "(private key not included: --include-keys)")
                if (pki / "own" / "cert.der").is_file() else "no own certificate yet")
    return [f"{out}: machine {cfg.machine.id}, {len(members) + 1} members, {out.stat().st_size} bytes, "
            f"mode 0600 ({PROGRAM} {manifest['program_version']}, records schema {schema}, {manifest['created']})",
            f"  machine files  {', '.join(m[len('machine/'):] for m, _ in members if m.startswith('machine/'))}",
            f"  records        {safe_url(layout.url)}: "
            + ", ".join(f"{table} {n}" for table, n in counts.items()),
            f"  pki            {own_note}; {clients['trusted']} trusted, {clients['rejected']} rejected",
            "  plc state      " + (f"{layout.state_file.name} (phase {phase})" if phase else "none")
            + (f", {layout.book_file.name}" if any(m == BOOK_MEMBER for m, _ in members) else "")]


def _phase_text(data: bytes) -> str | None:
    try:
        state = json.loads(data)
    except ValueError:
        return None
    return str(state.get("phase", "idle")) if isinstance(state, dict) else None


# --------------------------------------------------------------------------- the target


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
        raise Refused(f"the records database {safe_url(layout.records_url)}: "
                      f"{getattr(e, 'orig', None) or e}") from None
    finally:
        engine.dispose()


def _check_no_machine(target: str, layouts: list[Layout], force: bool) -> None:
    """Rule 2 of the module docstring, once ``claim`` has found the target's ``layouts`` (the
    first: where the restore writes; more: where the machine there runs now) not running:
    TargetHasMachine if it has a machine of its own, unless ``force``."""
    batch = running_batch(*(layout.state_file for layout in layouts))
    new = layouts[0]
    has = []
    users = _user_count(new)
    if users:
        has.append(f"{users} user{'s' if users != 1 else ''} in its records {safe_url(new.url)}")
    if new.state_file.exists():
        has.append(f"a state file {new.state_file}"
                   + (f" ({batch.replace('is running', 'was interrupted')})" if batch else ""))
    if has and not force:
        raise TargetHasMachine(f"{target}: has a machine already ({'; '.join(has)}): --force "
                               f"replaces it")


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


# --------------------------------------------------------------------------- the machine file, placed


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
    return [below(n) for n in Layout.of(Path("m"), archive.raw_cfg).names]


def _current(target: Path) -> Layout | None:
    """The layout of the machine at ``target`` now (None: none, or a broken machine file)."""
    try:
        return Layout.of(target, load(target)[0]) if target.exists() else None
    except ConfigError:
        return None


# --------------------------------------------------------------------------- restore


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
    locks = claim(str(target), *layouts, probe=out is None)     # held until the end
    try:
        _check_no_machine(str(target), layouts, force)
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
            counts = records_dump.write(f"sqlite:///{new_db}", archive.rows)
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
            counts = records_dump.write(final.records_url, archive.rows)
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
            f"  records        {safe_url(final.url)}: " + ", ".join(f"{t} {n}" for t, n in counts.items()),
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
