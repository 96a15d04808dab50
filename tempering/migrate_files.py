"""The files of a migrated machine as text, and loader messages traced back to the legacy files.

One job for ``tempering.migrate``: render the machine file and the recipes file of a migration
(YAML that ``opcua_server.config.load`` reads back to the same values: block sections, flow
lists, strings quoted where YAML 1.2 would read them otherwise), keep each recipe's legacy Id
and Description as a comment (``# legacy Recipe.csv Id 2: ...``, read back by
``legacy_ids_of`` so ``tempering export-legacy`` keeps the Ids), and turn a loader's message
about a staged file (``tempering-machine.yaml: zones.pump.max_temp: ...``) into one about the
CSV cell it came from (``Configuration.csv:4: MaxTemp: ...``). Pure: text in, text out.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from plc.modbus.legacy import _Dumper

from .legacy_csv import Row

__all__ = ["Origin", "legacy_ids_of", "machine_text", "recipes_text", "trace_back"]

#: A machine or recipes file path (``zones.pump.max_temp``) -> (CSV file, line, column).
Origin = dict[str, tuple[str, int, str]]
_LEGACY_ID = re.compile(r"^\s*# legacy Recipe\.csv Id (\d+)(?:: (.*))?$")


class _BlockDumper(_Dumper):
    """Sections in block style, lists (zone outputs, bits) in flow style, strings as
    ``plc.modbus.legacy`` quotes them (read back as the same strings)."""


_BlockDumper.add_representer(tuple, lambda d, v: d.represent_sequence(
    "tag:yaml.org,2002:seq", list(v), flow_style=True))
_BlockDumper.add_representer(list, lambda d, v: d.represent_sequence(
    "tag:yaml.org,2002:seq", v, flow_style=True))


def _dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True,
                     default_flow_style=False, width=100)


def machine_text(machine: dict, source: str) -> str:
    """The machine file of ``machine`` (section -> fields), migrated from ``source``."""
    head = [f"# Machine file migrated from the legacy machine's CSV files ({Path(source).name}/)",
            "# by `tempering migrate`; see migration-report.txt. Fields and their meaning: the",
            "# default machine, config/tempering-machine.yaml. Check with `tempering check-config`.",
            ""]
    return "\n".join(head) + "".join(_dump({k: v}) + "\n" for k, v in machine.items())


def recipes_text(recipes: dict, legacy_ids: dict[str, int], rows: dict[str, Row], source: str) -> str:
    """The recipes file: each recipe with its legacy Id and Description as a comment."""
    lines = [f"# Recipes migrated from the legacy Recipe.csv ({Path(source).name}/) by `tempering migrate`.",
             "# Fields and rules: config/recipes.yaml. Temperatures in degC, pedal times in s.", "",
             "recipes:"]
    for code, values in recipes.items():
        lines.append(f"  {code}:")
        if code in legacy_ids:
            description = rows[code].text("description")
            lines.append(f"    # legacy Recipe.csv Id {legacy_ids[code]}" +
                         (f": {description}" if description else ""))
        lines += ["    " + line for line in _dump(values).rstrip("\n").split("\n")]
        lines.append("")
    return "\n".join(lines)


def legacy_ids_of(recipes_text: str) -> dict[str, tuple[int, str]]:
    """Recipe id -> (its legacy Recipe.csv Id, Description), from the comments a migration
    writes into the recipes file."""
    out, current = {}, None
    for line in recipes_text.splitlines():
        match = re.match(r"^  ([a-z0-9-]+):\s*$", line)
        if match:
            current = match.group(1)
            continue
        legacy = _LEGACY_ID.match(line)
        if legacy and current:
            out[current] = (int(legacy.group(1)), legacy.group(2) or "")
    return out


def trace_back(msg: str, stage: str, origin: Origin, machine_file: str) -> str | None:
    """A loader's message about a file staged in ``stage``, as ``<csv>:<line>: <column>: ...``
    (a ``machine_config.<field> of <machine_file>`` in it named by its CSV column); None when it
    is about no field read from a legacy file."""
    text = msg.replace(stage + os.sep, "")
    match = re.match(r"^([^:]+): ([A-Za-z0-9_.\-\[\]() ]+): (.*)$", text)
    if not match:
        return None
    path, rest = match.group(2), match.group(3)
    probe = path
    while probe:
        if probe in origin:
            file, line, column = origin[probe]
            where = f"{file}:{line}" if line else file
            rest = re.sub(r"(machine_config\.[a-z0-9_]+) of " + re.escape(machine_file),
                          lambda found: _origin_name(found.group(1), origin), rest)
            return f"{where}: {column or path}: {rest}" if probe == path else f"{where}: {path}: {rest}"
        probe = probe.rpartition(".")[0]
    return None


def _origin_name(path: str, origin: Origin) -> str:
    """``Machine.csv TankMaxHeat`` for ``machine_config.tank_max_heat``."""
    if path in origin:
        file, _line, column = origin[path]
        return f"{file} {column}"
    return path
