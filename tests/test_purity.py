"""The pure core stays pure (the README, How it works: no clock, no I/O in the scan).

1. No pure module imports an I/O, clock, threading or randomness library (checked on the
   source with ``ast``, so an import inside a function counts too). The I/O contract
   (``plc.contract``) and the register codec (``plc.modbus.codec``) are plain data and code:
   no pydantic, no YAML; the contract imports nothing of the configuration, the program or the
   register map. No module of ``plc`` imports, directly or through others, a module that
   imports it.
2. Determinism: the same scripted run through ``scan`` twice gives equal outputs, states and
   events at every scan, and the same digest in fresh interpreters with different hash seeds.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, Rig  # noqa: E402  (tests/ is on sys.path: rootdir conftest)
from plc.commands import (Abort, Acknowledge, Hold, Reset, Resume, SetManual, SetTrim,
                          StartRecipe, Stop)
from plc.image import bad

PURE = ("plc.image", "plc.pid", "plc.alarms", "plc.commands", "plc.state", "plc.contract",
        "plc.tuning", "plc.autotune",
        "plc.program", "plc.interlocks", "plc.sequencer", "plc.scan", "plc.configbase",
        "plc.modbus.pdu", "plc.modbus.codec", "plc.modbus.regmap", "plc.modbus.legacy",
        "opcua_server.batches")
FORBIDDEN = {"asyncio", "socket", "time", "pymodbus", "asyncua", "sqlalchemy",
             "influxdb_client", "threading", "os", "random"}
#: pure and free of the config machinery too: usable by anything, importing nothing heavy
PLAIN = {"plc.contract": {"plc.image"}, "plc.modbus.codec": {"plc.modbus.pdu"}}
PLAIN_FORBIDDEN = {"pydantic", "pydantic_core", "yaml"}


def imported_modules(source: str, package: str) -> set[str]:
    """Every module the source imports; ``if TYPE_CHECKING:`` blocks (never run) are skipped."""
    tree = ast.parse(source)
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
            for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0]
                if node.module:
                    found.add(f"{base}.{node.module}")
                else:
                    found |= {f"{base}.{a.name}" for a in node.names}
            else:
                found.add(node.module or "")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
            found |= {a.value for a in node.args[:1] if isinstance(a, ast.Constant)}
    return found


def source_of(module: str) -> str:
    spec = importlib.util.find_spec(module)
    assert spec and spec.origin
    return Path(spec.origin).read_text(encoding="utf-8")


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module):
    mods = imported_modules(source_of(module), module.rpartition(".")[0])
    tops = {m.split(".")[0] for m in mods}
    assert not tops & FORBIDDEN, f"{module} imports {sorted(tops & FORBIDDEN)}"
    # and among the project's own modules it imports only other pure ones
    own = {m for m in mods if m.startswith("plc.")}
    assert own <= set(PURE), f"{module} imports impure {sorted(own - set(PURE))}"


@pytest.mark.parametrize("module", sorted(PLAIN))
def test_contract_and_codec_are_plain(module):
    mods = imported_modules(source_of(module), module.rpartition(".")[0])
    tops = {m.split(".")[0] for m in mods}
    assert not tops & PLAIN_FORBIDDEN, f"{module} imports {sorted(tops & PLAIN_FORBIDDEN)}"
    own = {m for m in mods if m.startswith("plc.")}
    assert own <= PLAIN[module], f"{module} imports {sorted(own - PLAIN[module])}"


def plc_import_graph() -> dict[str, set[str]]:
    """Module of ``plc`` -> the modules of ``plc`` it imports at run time (packages'
    ``__init__`` included; ``if TYPE_CHECKING:`` imports are never run and left out)."""
    spec = importlib.util.find_spec("plc")
    assert spec and spec.origin
    root = Path(spec.origin).parent
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        is_init = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_init else parts)
        package = name if is_init else name.rpartition(".")[0]
        graph[name] = {m for m in imported_modules(path.read_text(encoding="utf-8"), package)
                       if m.startswith("plc")}
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_module_of_plc_imports_its_importer():
    graph = plc_import_graph()
    assert {"plc.contract", "plc.config", "plc.modbus.regmap"} <= set(graph)
    for start in graph:
        path, seen, todo = {start: (start,)}, set(), [start]
        while todo:
            here = todo.pop()
            for dep in sorted(graph[here]):
                assert dep != start, f"import cycle: {' -> '.join((*path[here], start))}"
                if dep not in seen:
                    seen.add(dep)
                    path[dep] = (*path[here], dep)
                    todo.append(dep)


def test_the_checker_sees_imports():
    src = ("import os\nfrom time import monotonic\nfrom . import runtime\nfrom .io import x\n"
           "def f():\n import socket\n__import__('random')\n"
           "if TYPE_CHECKING:\n from .config import MachineConfig\n")
    assert imported_modules(src, "plc") == {"os", "time", "plc.runtime", "plc.io", "socket",
                                            "random"}


# --- determinism ------------------------------------------------------------------------------

def scripted_run(program) -> list[tuple]:
    """A run through every phase with commands, a trip and a reset; one record per scan."""
    r = Rig(program)
    script: dict[int, tuple] = {
        0: (StartRecipe("dark-70", user="op"), SetTrim("pump", 0.4)),
        50: (SetManual("fountain", 35.0),),
        120: (SetManual("fountain", None),),
        300: (Hold(user="op"),),
        400: (Resume(user="op"),),
        2500: (Acknowledge(None, user="op"),),
        3050: (Stop(user="op"),),
        3060: (StartRecipe("white-28", user="op"),),
        3700: (Reset(user="op"),),          # refused: the trip is still active
        3720: (Reset(user="op"),),
        3730: (StartRecipe("milk-35"),),
        3800: (Abort(),),
    }
    temps = [(0, 20.0), (200, 48.0), (1400, 27.5), (2200, 31.5)]
    records = []
    for k in range(3850):
        for at, t in temps:
            if k == at:
                r.set_all(t)
                if at == 200:
                    r.set(pump=48.4)
                if at == 1400:
                    r.set(pump=27.9)
                if at == 2200:
                    r.set(pump=31.9)
        if 2800 <= k < 2830:
            r.set(fountain=28.0 + 0.05 * (k - 2800))
        r.overrides = {"estop_ok": False} if 3600 <= k < 3710 else {}
        if 3300 <= k < 3320:
            r.overrides["current_mixer"] = 9.0 if k < 3310 else 1.5
        if k == 3100:
            r.overrides["temp_pump"] = bad("blip")   # trips the pump sensor
        res = r.scan(*script.get(k, ()), watchdog="late" if k == 3750 else "")
        records.append((res.outputs, res.state, res.events, res.zones, res.demands))
    return records


def test_same_script_same_results(program):
    a, b = scripted_run(program), scripted_run(program)
    assert len(a) == len(b) == 3850
    for k, (ra, rb) in enumerate(zip(a, b)):
        assert ra == rb, f"scan {k} differs"
    # the script exercised what it claims to (or the comparison proves little)
    kinds = {e.kind for rec in a for e in rec[2]}
    assert {"batch_start", "batch_end", "phase", "trip", "alarm", "pouring_released",
            "command_accepted", "command_refused"} <= kinds
    phases = {rec[1].phase.value for rec in a}
    assert phases >= {"heating", "cooling", "pouring", "stopped", "fault", "idle"}


def digest(records) -> str:
    h = hashlib.sha256()
    for outputs, state, events, zones, demands in records:
        row = {
            "out": sorted((n, p.value, int(p.quality), p.timestamp_s) for n, p in outputs.items()),
            "persist": state.persistent(),
            "alarms": sorted((k, a.state.value, a.changed) for k, a in state.alarms.items()),
            "zones": sorted((n, z.pid.output, z.pid.integral, z.reached)
                            for n, z in state.zones.items()),
            "timers": sorted(state.timers.items()),
            "seq": [state.phase_time_s, state.dwell_s, state.mixer_run_s, state.pump_warm_s],
            "events": [(e.kind, e.time_s, e.message, repr(e.data)) for e in events],
            "views": [(v.name, v.pv_c, v.sp_c, v.output_pct) for v in zones],
        }
        h.update(json.dumps(row, sort_keys=True, default=repr).encode())
    return h.hexdigest()


def test_same_digest_across_interpreters_and_hash_seeds(program):
    code = ("import sys; sys.path.insert(0, 'tests'); from conftest import *; "
            "from plc.config import load_all; from plc.program import Program; "
            "import test_purity as t; cfg, book = load_all(MACHINE_FILE); "
            "print(t.digest(t.scripted_run(Program.from_config(cfg, book))))")
    from plc.config import load_all
    from plc.program import Program
    from conftest import MACHINE_FILE
    here = digest(scripted_run(Program.from_config(*load_all(MACHINE_FILE))))   # as the children
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == here, f"hash seed {seed}"


def test_no_nan_leaks_into_outputs(program):
    for outputs, *_ in scripted_run(program)[::50]:
        assert all(isinstance(p.value, bool) for p in outputs.values())
        assert all(not (isinstance(p.timestamp_s, float) and math.isnan(p.timestamp_s))
                   for p in outputs.values())
