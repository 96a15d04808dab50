"""A machine's records as JSON lines, and back: the records part of a backup archive.

One form for SQLite and PostgreSQL, so that a backup of either restores into either
(``restore --database-url``): per table of ``opcua_server.records``, one JSON object a line,
column name -> text, number, true/false or null, in primary-key order. ``snapshot`` is
consistent while the machine runs: SQLite through its online backup API into a temporary file,
read there; PostgreSQL every table in one REPEATABLE READ transaction. ``write`` puts the rows
into this program's tables (a column an older archive lacks takes its default, as the migration
would), advances PostgreSQL's id sequences past them, and opens the records once more, which
migrates them to this program's schema. The historian's data (spool, local history) is not part
of a machine's records.

Errors: ``Refused`` (``tempering.machine_dir``) when the records cannot be read; a failure of
``write`` is the database's own exception, its transaction rolled back.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path

from .machine_dir import Refused

ROWS_PER_INSERT = 1000


def tables():
    """The records' tables (``opcua_server.records``' metadata), in dependency order."""
    from opcua_server import records

    return records.users.metadata.sorted_tables


def safe_url(url: str) -> str:
    """An SQLAlchemy URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def snapshot(url: str, into: Path) -> tuple[str, dict[str, int]]:
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
            for table in tables():
                (into / f"{table.name}.jsonl").write_bytes(b"")
            return SCHEMA_VERSION, {t.name: 0 for t in tables()}
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
            for table in tables():
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
        raise Refused(f"the records database {safe_url(url)}: {getattr(e, 'orig', None) or e}") from None
    finally:
        engine.dispose()
        if copy is not None:
            copy.unlink(missing_ok=True)
    return schema, counts


def write(url: str, rows: Callable[[str], Iterable[dict]]) -> dict[str, int]:
    """The rows (``rows(table)``: a table's rows, as ``snapshot`` wrote them) into the records at
    ``url`` in one transaction: every table emptied, then filled; PostgreSQL's id sequences
    moved past the rows; then the records opened once more (migrated to this program's
    schema). Rows per table."""
    from sqlalchemy import delete, func, insert, select, text

    from opcua_server.records import Records

    records = Records(url)                   # the tables, made or migrated
    counts = {}
    try:
        with records.engine.begin() as db:
            ordered = tables()
            for table in reversed(ordered):
                db.execute(delete(table))
            for table in ordered:
                batch, n = [], 0
                for row in rows(table.name):
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
