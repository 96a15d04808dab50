"""plc.config: the default files load; every bad input becomes one exact, located message.

Table-driven: each case patches the default machine (or recipes) data, writes it under
tmp_path and expects the complete list of messages. No I/O beyond tmp_path (and reading the
repository's default files).
"""

from __future__ import annotations

import copy
import math
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from plc.config import (
    ZONE_NAMES,
    AcceptanceCriteria,
    ZONE_NUMBERS,
    ZONE_OUTPUTS,
    ConfigError,
    MachineConfig,
    OutputName,
    RecipeBook,
    load_all,
    load_machine_config,
    load_recipes,
)

ROOT = Path(__file__).resolve().parent.parent
MACHINE_FILE = ROOT / "config" / "tempering-machine.yaml"
RECIPES_FILE = ROOT / "config" / "recipes.yaml"
REGISTER_MAP_FILE = ROOT / "config" / "register-map.yaml"

DELETE = object()


def patched(data: dict, patch: dict) -> dict:
    """Copy of ``data`` with each ``dotted.path: value`` of ``patch`` set (or DELETEd)."""
    data = copy.deepcopy(data)
    for dotted, value in patch.items():
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return data


def write(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def machine_data() -> dict:
    return yaml.safe_load(MACHINE_FILE.read_text())


@pytest.fixture
def recipes_data() -> dict:
    return yaml.safe_load(RECIPES_FILE.read_text())


def machine_errors(tmp_path: Path, data: dict | str) -> list[str]:
    file = write(tmp_path / "machine.yaml", data)
    with pytest.raises(ConfigError) as info:
        load_machine_config(file)
    assert info.value.path == file
    prefix = f"{file}: "
    assert all(m.startswith(str(file)) for m in info.value.messages)
    return [m.removeprefix(prefix) for m in info.value.messages]


def recipe_errors(tmp_path: Path, data: dict | str) -> list[str]:
    file = write(tmp_path / "recipes.yaml", data)
    with pytest.raises(ConfigError) as info:
        load_recipes(file)
    assert info.value.path == file
    return [m.removeprefix(f"{file}: ") for m in info.value.messages]


# --------------------------------------------------------------------------- the defaults


def test_default_files_load():
    cfg, book = load_all(MACHINE_FILE)
    assert isinstance(cfg, MachineConfig) and isinstance(book, RecipeBook)
    assert list(cfg.zones) == list(ZONE_NAMES)
    assert {name: z.number for name, z in cfg.zones.items()} == ZONE_NUMBERS
    assert cfg.period_s == pytest.approx(0.1)
    assert cfg.machine.default_recipe in book
    assert book.ids == ("dark-70", "milk-35", "white-28")
    dark = book["dark-70"]
    assert (dark.heating_goal, dark.cooling_goal, dark.pouring_goal) == (48.0, 27.5, 31.5)
    assert dark.pouring_goal < dark.working_max <= dark.heating_goal
    assert dark.fountain_enabled and dark.mixer_enabled and dark.vibration_enabled
    assert (dark.pedal, dark.pedal_on_time, dark.pedal_off_time) == ("auto", 3.0, 2.0)


def test_working_max_belongs_to_recipes_not_the_machine():
    cfg = load_machine_config(MACHINE_FILE)
    assert "working_max_margin" not in type(cfg.machine_config).model_fields
    assert all(r.working_max for r in load_recipes(RECIPES_FILE).recipes.values())


def test_zone_outputs_constant_matches_the_output_type():
    assert ZONE_OUTPUTS == typing.get_args(OutputName)


def test_models_are_frozen():
    cfg = load_machine_config(MACHINE_FILE)
    with pytest.raises(ValidationError):
        cfg.zones["pump"].kp = 1.0
    with pytest.raises(ValidationError):
        cfg.scan = None


def test_period_falls_back_to_sending_interval(tmp_path, machine_data):
    data = patched(machine_data, {"scan.period_ms": DELETE, "system.sending_interval": 250})
    assert load_machine_config(write(tmp_path / "m.yaml", data)).period_s == pytest.approx(0.25)
    data = patched(machine_data, {"scan.period_ms": None, "system.sending_interval": 50})
    assert load_machine_config(write(tmp_path / "m.yaml", data)).period_s == pytest.approx(0.05)
    data = patched(machine_data, {"scan.period_ms": 20, "system.sending_interval": 50})
    assert load_machine_config(write(tmp_path / "m.yaml", data)).period_s == pytest.approx(0.02)


def test_zones_come_out_in_zone_number_order(tmp_path, machine_data):
    machine_data["zones"] = dict(reversed(list(machine_data["zones"].items())))
    cfg = load_machine_config(write(tmp_path / "m.yaml", machine_data))
    assert list(cfg.zones) == list(ZONE_NAMES)


# --------------------------------------------------------------------------- machine: one problem each

OUTPUTS = ", ".join(ZONE_OUTPUTS)

MACHINE_CASES = [
    ({"zones.pump.kp": -1}, "zones.pump.kp: must be >= 0 (got -1)"),
    ({"zones.pump.ki": -0.1}, "zones.pump.ki: must be >= 0 (got -0.1)"),
    ({"zones.pump.kp": "40"}, "zones.pump.kp: must be a number (got '40')"),
    ({"zones.pump.kp": True}, "zones.pump.kp: must be a number (got true)"),
    ({"zones.pump.kp": [1]}, "zones.pump.kp: must be a number (got [1])"),
    ({"machine_config.set_temp1": math.nan}, "machine_config.set_temp1: must be a finite number (got nan)"),
    ({"machine_config.pump_delay": -1}, "machine_config.pump_delay: must be >= 0 (got -1)"),
    ({"machine_config.phase_tolerance": 0}, "machine_config.phase_tolerance: must be > 0 (got 0)"),
    ({"system.parity": "mark"}, "system.parity: must be one of none, odd, even (got 'mark')"),
    ({"system.stop_bits": 3}, "system.stop_bits: must be one of 1, 2 (got 3)"),
    ({"system.stop_bits": 1.0}, "system.stop_bits: must be an integer (got 1.0)"),
    ({"system.stop_bits": True}, "system.stop_bits: must be an integer (got true)"),
    ({"system.baud_rate": 0}, "system.baud_rate: must be > 0 (got 0)"),
    ({"system.baud_rate": 19200.5}, "system.baud_rate: must be an integer (got 19200.5)"),
    ({"system.serial_port": 5}, "system.serial_port: must be a string (got 5)"),
    ({"system.sending_interval": 0}, "system.sending_interval: must be >= 1 (got 0)"),
    ({"scan.period_ms": 20000}, "scan.period_ms: must be <= 10000 (got 20000)"),
    ({"scan.watchdog_max_consecutive_overruns": 0},
     "scan.watchdog_max_consecutive_overruns: must be >= 1 (got 0)"),
    ({"scan.watchdog_max_cycle_factor": 1}, "scan.watchdog_max_cycle_factor: must be > 1 (got 1)"),
    ({"scan.pwm_period_s": 0}, "scan.pwm_period_s: must be > 0 (got 0)"),
    ({"error_settings.phase_count": 2}, "error_settings.phase_count: must be one of 1, 3 (got 2)"),
    ({"error_settings.no_progress_s": 0}, "error_settings.no_progress_s: must be > 0 (got 0)"),
    ({"error_settings.no_progress_k": -1}, "error_settings.no_progress_k: must be > 0 (got -1)"),
    ({"error_settings.max_shelve_s": "8h"},
     "error_settings.max_shelve_s: must be a number (got '8h')"),
    ({"error_settings.max_shelve_s": 700000},
     "error_settings.max_shelve_s: must be <= 604800 (got 700000)"),
    ({"zones.pump.fc_threshold": 101}, "zones.pump.fc_threshold: must be <= 100 (got 101)"),
    ({"zones.pump.heat_control_range": 0}, "zones.pump.heat_control_range: must be > 0 (got 0)"),
    ({"zones.pump.i_motor1": -0.5}, "zones.pump.i_motor1: must be >= 0 (got -0.5)"),
    ({"zones.pump.number": 5}, "zones.pump.number: must be <= 4 (got 5)"),
    ({"machine.id": ""}, "machine.id: must not be empty (got '')"),
    ({"machine.default_recipe": "Dark 70"},
     "machine.default_recipe: must be lower-case letters, digits and '-' only (got 'Dark 70')"),
    ({"machine.name": DELETE}, "machine.name: missing field"),
    ({"scan": DELETE}, "scan: missing field"),
    ({"machine_config.working_max_margin": 2.5}, "machine_config.working_max_margin: unknown field"),
    ({"colour": "brown"}, "colour: unknown field"),
    ({"zones": "all"}, "zones: must be a mapping (got 'all')"),
    ({"system": [1, 2]}, "system: must be a mapping (got [1, 2])"),
    ({"zones.pump.heating_outputs": "heater_pump"},
     "zones.pump.heating_outputs: must be a list (got 'heater_pump')"),
    ({"zones.pump.heating_outputs": ["heater_pump", "heater_x"]},
     f"zones.pump.heating_outputs[1]: must be one of {OUTPUTS} (got 'heater_x')"),
    # cross-field checks inside one section
    ({"zones.pump.min_temp": 60},
     "zones.pump: min_temp must be < max_temp (got min_temp=60.0, max_temp=60.0)"),
    ({"zones.pump.heating_outputs": []}, "zones.pump.heating_outputs: must name at least one output"),
    ({"machine_config.abs_min_heat": 65},
     "machine_config: abs_min_heat must be < abs_max_heat (got abs_min_heat=65.0, abs_max_heat=65.0)"),
    ({"machine_config.pump_min_heat": 55},
     "machine_config: pump_min_heat must be < pump_max_heat (got pump_min_heat=55.0, pump_max_heat=50.0)"),
    ({"machine_config.tank_max_heat": 66},
     "machine_config: tank_max_heat must be <= abs_max_heat (got tank_max_heat=66.0, abs_max_heat=65.0)"),
    ({"system.warning_limit": 3.0},
     "system: warning_limit must be < error_limit (got warning_limit=3.0, error_limit=3.0)"),
    ({"error_settings.voltage_low_limit": 250},
     "error_settings: voltage_low_limit must be < voltage_high_limit "
     "(got voltage_low_limit=250.0, voltage_high_limit=242.0)"),
    # the zones as a whole
    ({"zones.fountain": DELETE}, "zones: missing zone(s) fountain"),
    ({"zones.pump.number": 4}, "zones.pump.number: must be 3 for zone pump (got 4)"),
    ({"zones.pump.first_cooling_outputs": ["cool1_tank"]},
     "zones.pump.first_cooling_outputs: output cool1_tank is already used by "
     "zones.tank_bottom.first_cooling_outputs"),
    ({"zones.pump.heating_outputs": ["heater_pump", "heater_pump"]},
     "zones.pump.heating_outputs: output heater_pump is already used by zones.pump.heating_outputs"),
    ({"zones.pump.max_temp": 66},
     "zones.pump: max_temp must be <= machine_config.abs_max_heat "
     "(got max_temp=66.0, machine_config.abs_max_heat=65.0)"),
]


@pytest.mark.parametrize("patch, expected", MACHINE_CASES, ids=[m.split(":")[0] for _, m in MACHINE_CASES])
def test_machine_problem_gives_one_exact_message(tmp_path, machine_data, patch, expected):
    assert machine_errors(tmp_path, patched(machine_data, patch)) == [expected]


def test_unknown_zone_name(tmp_path, machine_data):
    machine_data["zones"]["pumpe"] = machine_data["zones"].pop("pump")
    assert machine_errors(tmp_path, machine_data) == [
        "zones.pumpe: key must be one of tank_bottom, tank_wall, pump, fountain (got 'pumpe')",
    ]


def test_all_problems_of_a_file_at_once(tmp_path, machine_data):
    data = patched(machine_data, {
        "machine.name": DELETE,
        "machine_config.bogus": 1,
        "system.parity": "mark",
        "system.warning_limit": 5.0,
        "zones.pump.kp": -1,
        "zones.fountain.ki": "high",
    })
    assert machine_errors(tmp_path, data) == [
        "machine.name: missing field",
        "machine_config.bogus: unknown field",
        "system.parity: must be one of none, odd, even (got 'mark')",
        "zones.pump.kp: must be >= 0 (got -1)",
        "zones.fountain.ki: must be a number (got 'high')",
    ]


def test_several_cross_field_problems_of_one_section(tmp_path, machine_data):
    data = patched(machine_data, {"zones.pump.min_temp": 70, "zones.pump.heating_outputs": [],
                                  "machine_config.abs_min_heat": 70,
                                  "machine_config.pump_min_heat": 50})
    assert machine_errors(tmp_path, data) == [
        "machine_config: abs_min_heat must be < abs_max_heat (got abs_min_heat=70.0, abs_max_heat=65.0)",
        "machine_config: pump_min_heat must be < pump_max_heat (got pump_min_heat=50.0, pump_max_heat=50.0)",
        "zones.pump: min_temp must be < max_temp (got min_temp=70.0, max_temp=60.0)",
        "zones.pump.heating_outputs: must name at least one output",
    ]


# --------------------------------------------------------------------------- YAML text


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    text = MACHINE_FILE.read_text().replace("    kp: 80.0\n", "    kp: [80.0\n", 1)
    line = text.splitlines().index("    kp: [80.0") + 1
    file = write(tmp_path / "m.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_machine_config(file)
    [full] = info.value.messages
    location, problem = full.split(": ", 1)
    path, reported_line, column = location.rsplit(":", 2)
    assert path == str(file)
    assert int(reported_line) > line and int(column) >= 1   # PyYAML notices at the next key
    assert problem.endswith(f"(while parsing a flow sequence started at line {line})")


def test_yaml_syntax_error_on_the_line_itself(tmp_path):
    file = write(tmp_path / "m.yaml", "machine:\n  id: a: b\n")
    with pytest.raises(ConfigError) as info:
        load_machine_config(file)
    assert info.value.messages == [f"{file}:2:8: mapping values are not allowed here"]


def test_duplicate_key_is_an_error(tmp_path):
    text = MACHINE_FILE.read_text().replace("    kp: 80.0\n", "    kp: 80.0\n    kp: 3.0\n", 1)
    line = text.splitlines().index("    kp: 3.0") + 1
    file = write(tmp_path / "m.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_machine_config(file)
    assert info.value.messages == [f"{file}:{line}:5: duplicate key 'kp'"]


@pytest.mark.parametrize("line, replacement, expected", [
    ("  parity: none", "  parity: no", "system.parity: must be one of none, odd, even (got 'no')"),
    ("  parity: none", "  parity: off", "system.parity: must be one of none, odd, even (got 'off')"),
    ("    kp: 80.0", "    kp: yes", "zones.pump.kp: must be a number (got 'yes')"),
    ("    kp: 80.0", "    kp: '80.0'", "zones.pump.kp: must be a number (got '80.0')"),
])
def test_yaml_1_1_words_stay_strings(tmp_path, line, replacement, expected):
    text = MACHINE_FILE.read_text().replace(line + " ", replacement + " ", 1)
    text = text.replace(line + "\n", replacement + "\n", 1)
    assert machine_errors(tmp_path, text) == [expected]


def test_yaml_1_2_numbers(tmp_path):
    text = (MACHINE_FILE.read_text()
            .replace("  pump_delay: 60 ", "  pump_delay: 060 ")
            .replace("  mixer_delay: 10 ", "  mixer_delay: 1e1 "))
    params = load_machine_config(write(tmp_path / "m.yaml", text)).machine_config
    assert (params.pump_delay, params.mixer_delay) == (60, 10.0)


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"),
    ("", "file is empty"),
    ("# only a comment\n", "file is empty"),
    ("- machine\n- zones\n", "top level must be a mapping of sections (got a list)"),
    ("just text\n", "top level must be a mapping of sections (got a str)"),
    (b"machine: \xff\n", "not UTF-8 text (byte 9)"),
])
def test_unreadable_files(tmp_path, content, expected):
    file = tmp_path / "m.yaml"
    if isinstance(content, bytes):
        file.write_bytes(content)
    elif content is not None:
        file.write_text(content)
    for load in (load_machine_config, load_recipes, load_all):
        with pytest.raises(ConfigError) as info:
            load(file)
        assert info.value.messages == [f"{file}: {expected}"]
        assert info.value.path == file


def test_a_directory_is_not_a_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_machine_config(tmp_path)
    assert info.value.messages == [f"{tmp_path}: is a directory, not a file"]


def test_config_error_str_joins_messages(tmp_path, machine_data):
    file = write(tmp_path / "m.yaml", patched(machine_data, {"zones.pump.kp": -1, "zones.pump.ki": -1}))
    with pytest.raises(ConfigError) as info:
        load_machine_config(file)
    assert str(info.value) == "\n".join(info.value.messages)
    assert len(info.value.messages) == 2


def test_nothing_is_returned_on_error(tmp_path, machine_data):
    file = write(tmp_path / "m.yaml", patched(machine_data, {"zones.pump.kp": -1}))
    result = None
    with pytest.raises(ConfigError):
        result = load_all(file)
    assert result is None


# --------------------------------------------------------------------------- recipes

R = "recipes.dark-70"

RECIPE_CASES = [
    ({"heating_goal": 61}, [f"{R}.heating_goal: must be <= 60 (got 61)"]),
    ({"heating_goal": 39.9}, [f"{R}.heating_goal: must be >= 40 (got 39.9)"]),
    ({"cooling_goal": 19}, [f"{R}.cooling_goal: must be >= 20 (got 19)"]),
    ({"pouring_goal": 61}, [f"{R}.pouring_goal: must be <= 60 (got 61)"]),
    ({"cooling_goal": 32},
     [f"{R}: cooling_goal must be <= pouring_goal (got cooling_goal=32.0, pouring_goal=31.5)"]),
    ({"pouring_goal": 49},
     [f"{R}: pouring_goal must be <= heating_goal (got pouring_goal=49.0, heating_goal=48.0)",
      f"{R}: pouring_goal must be < working_max (got pouring_goal=49.0, working_max=34.5)"]),
    ({"working_max": 31.5},
     [f"{R}: pouring_goal must be < working_max (got pouring_goal=31.5, working_max=31.5)"]),
    ({"working_max": 49},
     [f"{R}: working_max must be <= heating_goal (got working_max=49.0, heating_goal=48.0)"]),
    ({"heating_goal": 40, "cooling_goal": 40, "pouring_goal": 40, "working_max": 40},
     [f"{R}: cooling_goal must be < heating_goal (got cooling_goal=40.0, heating_goal=40.0)",
      f"{R}: pouring_goal must be < working_max (got pouring_goal=40.0, working_max=40.0)"]),
    ({"pedal": "foot"}, [f"{R}.pedal: must be one of manual, auto (got 'foot')"]),
    ({"pedal_on_time": 0}, [f"{R}.pedal_on_time: must be > 0 (got 0)"]),
    ({"pedal_off_time": -2}, [f"{R}.pedal_off_time: must be > 0 (got -2)"]),
    ({"mixer_enabled": "yes"}, [f"{R}.mixer_enabled: must be true or false (or 1/0) (got 'yes')"]),
    ({"mixer_enabled": 2}, [f"{R}.mixer_enabled: must be true or false (or 1/0) (got 2)"]),
    ({"mixer_enabled": 1.0}, [f"{R}.mixer_enabled: must be true or false (or 1/0) (got 1.0)"]),
    ({"heating_goal": "48"}, [f"{R}.heating_goal: must be a number (got '48')"]),
    ({"name": DELETE}, [f"{R}.name: missing field"]),
    ({"colour": "brown"}, [f"{R}.colour: unknown field"]),
    ({"acceptance": {"pouring_min_share": 1.5}},
     [f"{R}.acceptance.pouring_min_share: must be <= 1 (got 1.5)"]),
    ({"acceptance": {"pouring_band_k": 0, "heating_dwell_s": -1}},
     [f"{R}.acceptance.heating_dwell_s: must be >= 0 (got -1)",
      f"{R}.acceptance.pouring_band_k: must be > 0 (got 0)"]),
    ({"acceptance": {"tolerance_k": "0.5"}}, [f"{R}.acceptance.tolerance_k: must be a number (got '0.5')"]),
    ({"acceptance": {"cooling_undershoot_k": -0.1}},
     [f"{R}.acceptance.cooling_undershoot_k: must be >= 0 (got -0.1)"]),
    ({"acceptance": {"band": 1}}, [f"{R}.acceptance.band: unknown field"]),
]


def test_acceptance_is_optional_and_partial(tmp_path, recipes_data):
    """A recipe without ``acceptance`` gets the defaults; one with some fields, the rest."""
    data = patched(recipes_data, {f"{R}.acceptance": {"pouring_band_k": 0.8}})
    book = load_recipes(write(tmp_path / "recipes.yaml", data))
    assert book["dark-70"].acceptance == AcceptanceCriteria(pouring_band_k=0.8)
    assert book["milk-35"].acceptance == AcceptanceCriteria()
    assert load_recipes(RECIPES_FILE)["dark-70"].acceptance == AcceptanceCriteria()


@pytest.mark.parametrize("patch, expected", RECIPE_CASES)
def test_recipe_problem_gives_exact_messages(tmp_path, recipes_data, patch, expected):
    data = patched(recipes_data, {f"recipes.dark-70.{k}": v for k, v in patch.items()})
    assert recipe_errors(tmp_path, data) == expected


@pytest.mark.parametrize("data, expected", [
    ({"recipes": {}}, ["recipes: must have at least 1 entry (got {})"]),
    ({}, ["recipes: missing field"]),
    ({"recipes": []}, ["recipes: must be a mapping (got [])"]),
])
def test_recipe_book_shape(tmp_path, data, expected):
    assert recipe_errors(tmp_path, data) == expected


def test_recipe_ids_are_slugs(tmp_path, recipes_data):
    recipes_data["recipes"]["Dark 70"] = recipes_data["recipes"].pop("dark-70")
    assert recipe_errors(tmp_path, recipes_data) == [
        "recipes.Dark 70: key must be lower-case letters, digits and '-' only (got 'Dark 70')",
    ]


def test_legacy_0_1_booleans_are_accepted(tmp_path, recipes_data):
    data = patched(recipes_data, {"recipes.dark-70.mixer_enabled": 0,
                                  "recipes.dark-70.fountain_enabled": 1})
    dark = load_recipes(write(tmp_path / "r.yaml", data))["dark-70"]
    assert dark.mixer_enabled is False and dark.fountain_enabled is True


# --------------------------------------------------------------------------- load_all


def copy_defaults(directory: Path, machine: dict, recipes: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write(directory / "recipes.yaml", recipes)
    write(directory / "register-map.yaml", REGISTER_MAP_FILE.read_text())
    return write(directory / "machine.yaml", machine)


def test_recipes_file_is_relative_to_the_machine_file(tmp_path, machine_data, recipes_data,
                                                      monkeypatch):
    file = copy_defaults(tmp_path / "etc", machine_data, recipes_data)
    monkeypatch.chdir(tmp_path)
    cfg, book = load_all(Path("etc") / "machine.yaml")
    assert cfg.machine.recipes_file == "recipes.yaml" and "dark-70" in book
    assert file.exists()


def test_missing_recipes_file(tmp_path, machine_data, recipes_data):
    file = copy_defaults(tmp_path, patched(machine_data, {"machine.recipes_file": "nope.yaml"}),
                         recipes_data)
    with pytest.raises(ConfigError) as info:
        load_all(file)
    assert info.value.messages == [f"{tmp_path / 'nope.yaml'}: no such file"]


def test_bad_recipes_file_names_the_recipes_file(tmp_path, machine_data, recipes_data):
    file = copy_defaults(tmp_path, machine_data,
                         patched(recipes_data, {"recipes.dark-70.pedal": "foot"}))
    with pytest.raises(ConfigError) as info:
        load_all(file)
    recipes = tmp_path / "recipes.yaml"
    assert info.value.path == recipes
    assert info.value.messages == [f"{recipes}: {R}.pedal: must be one of manual, auto (got 'foot')"]


def test_default_recipe_must_exist(tmp_path, machine_data, recipes_data):
    file = copy_defaults(tmp_path, patched(machine_data, {"machine.default_recipe": "dark-80"}),
                         recipes_data)
    with pytest.raises(ConfigError) as info:
        load_all(file)
    assert info.value.path == file
    assert info.value.messages == [
        f"{file}: machine.default_recipe: no such recipe in {tmp_path / 'recipes.yaml'} "
        "(got 'dark-80'; have dark-70, milk-35, white-28)",
    ]


def test_recipes_must_fit_the_machine(tmp_path, machine_data, recipes_data):
    recipes = patched(recipes_data, {"recipes.dark-70.heating_goal": 55,
                                     "recipes.white-28.pouring_goal": 26,
                                     "recipes.white-28.cooling_goal": 25})
    file = copy_defaults(tmp_path, machine_data, recipes)
    with pytest.raises(ConfigError) as info:
        load_all(file)
    rfile = tmp_path / "recipes.yaml"
    assert info.value.messages == [
        f"{rfile}: recipes.dark-70.heating_goal: must be <= machine_config.tank_max_heat "
        f"of {file} (50.0) (got 55.0)",
        f"{rfile}: recipes.white-28.pouring_goal: must be > machine_config.pump_min_heat "
        f"of {file} (26.0) (got 26.0)",
    ]


# --------------------------------------------------------------------------- the twin section


class TwinSection(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    mass_kg: float = Field(gt=0)


class AppConfig(MachineConfig):
    twin: TwinSection


def with_twin(machine_data: dict, twin: object) -> dict:
    return {**machine_data, "twin": twin}


def test_plc_alone_tolerates_a_twin_section(tmp_path, machine_data):
    file = write(tmp_path / "m.yaml", with_twin(machine_data, {"anything": [1, 2]}))
    cfg = load_machine_config(file)
    assert type(cfg) is MachineConfig and not hasattr(cfg, "twin")


def test_subclass_validates_its_twin_section(tmp_path, machine_data, recipes_data):
    file = copy_defaults(tmp_path, with_twin(machine_data, {"mass_kg": 50}), recipes_data)
    cfg, _ = load_all(file, model=AppConfig)
    assert isinstance(cfg, AppConfig) and cfg.twin.mass_kg == 50.0
    assert cfg.period_s == pytest.approx(0.1)      # the base behaviour is inherited

    file = write(tmp_path / "m.yaml", with_twin(machine_data, {"mass_kg": -5, "extra": 1}))
    with pytest.raises(ConfigError) as info:
        load_machine_config(file, model=AppConfig)
    assert [m.removeprefix(f"{file}: ") for m in info.value.messages] == [
        "twin.mass_kg: must be > 0 (got -5)",
        "twin.extra: unknown field",
    ]

    without = {k: v for k, v in machine_data.items() if k != "twin"}
    file = write(tmp_path / "m.yaml", without)
    with pytest.raises(ConfigError) as info:
        load_machine_config(file, model=AppConfig)
    assert info.value.messages == [f"{file}: twin: missing field"]


def test_subclass_keeps_the_base_checks(tmp_path, machine_data):
    file = write(tmp_path / "m.yaml", with_twin(patched(machine_data, {"zones.pump.number": 4}),
                                                {"mass_kg": 50}))
    with pytest.raises(ConfigError) as info:
        load_machine_config(file, model=AppConfig)
    assert info.value.messages == [f"{file}: zones.pump.number: must be 3 for zone pump (got 4)"]


# --------------------------------------------------------------------------- the fieldbus section

L = "fieldbus.links.io"

FIELDBUS_CASES = [
    ({f"{L}.timeout_ms": 0}, [f"{L}.timeout_ms: must be >= 1 (got 0)"]),
    ({f"{L}.timeout_ms": 250.0}, [f"{L}.timeout_ms: must be an integer (got 250.0)"]),
    ({f"{L}.retries": 11}, [f"{L}.retries: must be <= 10 (got 11)"]),
    ({f"{L}.max_read_registers": 126}, [f"{L}.max_read_registers: must be <= 125 (got 126)"]),
    ({f"{L}.max_read_bits": 2001}, [f"{L}.max_read_bits: must be <= 2000 (got 2001)"]),
    ({f"{L}.max_gap_registers": 125}, [f"{L}.max_gap_registers: must be <= 124 (got 125)"]),
    ({f"{L}.reconnect_max_ms": 50}, [f"{L}.reconnect_max_ms: must be >= 100 (got 50)"]),
    ({f"{L}.demote_after": 0}, [f"{L}.demote_after: must be >= 1 (got 0)"]),
    ({f"{L}.port": 70000}, [f"{L}.port: must be <= 65535 (got 70000)"]),
    ({f"{L}.host": DELETE}, [f"{L}.host: missing field"]),
    ({f"{L}.baud_rate": 19200}, [f"{L}.baud_rate: unknown field"]),
    ({f"{L}.transport": "udp"}, [f"{L}.transport: must be one of tcp, rtu (got 'udp')"]),
    ({f"{L}.transport": DELETE}, [f"{L}.transport: missing field"]),
    ({f"{L}.transport": "rtu"},
     [f"{L}.device: missing field", f"{L}.host: unknown field", f"{L}.port: unknown field"]),
    ({f"{L}.devices": {300: {"timeout_ms": 500}}}, [f"{L}.devices.300: key must be <= 247 (got 300)"]),
    ({f"{L}.devices": {2: {"timeout_ms": 0}}}, [f"{L}.devices.2.timeout_ms: must be >= 1 (got 0)"]),
    ({f"{L}.devices": {2: {"timeout": 5}}}, [f"{L}.devices.2.timeout: unknown field"]),
    ({"fieldbus.links": {}}, ["fieldbus.links: must have at least 1 entry (got {})"]),
    ({"fieldbus.stale_after_ms": 0}, ["fieldbus.stale_after_ms: must be >= 1 (got 0)"]),
    ({"fieldbus.map_file": DELETE},
     ["fieldbus: give the register map: map_file (a file relative to the machine file) or points"]),
]


@pytest.mark.parametrize("patch, expected", FIELDBUS_CASES,
                         ids=[next(iter(p)) for p, _ in FIELDBUS_CASES])
def test_fieldbus_problem_gives_exact_messages(tmp_path, machine_data, patch, expected):
    assert machine_errors(tmp_path, patched(machine_data, patch)) == expected


def test_fieldbus_link_names_are_slugs(tmp_path, machine_data):
    machine_data["fieldbus"]["links"]["IO"] = machine_data["fieldbus"]["links"].pop("io")
    assert machine_errors(tmp_path, machine_data) == [
        "fieldbus.links.IO: key must be lower-case letters, digits and '-' only (got 'IO')"]


def test_rtu_link_and_per_device_overrides(tmp_path, machine_data):
    data = patched(machine_data, {"fieldbus.links": {
        "io": machine_data["fieldbus"]["links"]["io"],
        "rs485": {"transport": "rtu", "device": "/dev/ttyUSB0", "baud_rate": 19200,
                  "parity": "none", "stop_bits": 2, "timeout_ms": 100, "retries": 2,
                  "devices": {2: {"timeout_ms": 500}, 3: {"retries": 0}}},
    }})
    fb = load_machine_config(write(tmp_path / "m.yaml", data)).fieldbus
    rtu = fb.links["rs485"]
    assert (rtu.transport, rtu.device, rtu.parity, rtu.stop_bits) == ("rtu", "/dev/ttyUSB0", "none", 2)
    assert (rtu.timeout_s(1), rtu.timeout_s(2), rtu.timeout_s(3)) == (0.1, 0.5, 0.1)
    assert (rtu.retries_for(1), rtu.retries_for(2), rtu.retries_for(3)) == (2, 2, 0)
    assert fb.links["io"].transport == "tcp" and fb.points == ()   # map_file: load_all reads it


def test_default_fieldbus():
    cfg, _ = load_all(MACHINE_FILE)
    fb = cfg.fieldbus
    io = fb.links["io"]
    assert (io.transport, io.host, io.port) == ("tcp", "127.0.0.1", 5020)
    assert io == type(io)(transport="tcp", host="127.0.0.1", port=5020)   # every default written out
    assert fb.map_file == "register-map.yaml" and fb.stale_after_ms == 1000
    assert len(fb.points) == 25 and fb.points[0].name == "temp_tank_bottom"


def test_no_fieldbus_section(tmp_path, machine_data, recipes_data):
    del machine_data["fieldbus"]
    cfg, _ = load_all(copy_defaults(tmp_path, machine_data, recipes_data))
    assert cfg.fieldbus is None


def test_map_file_is_relative_to_the_machine_file(tmp_path, machine_data, recipes_data, monkeypatch):
    data = patched(machine_data, {"fieldbus.map_file": "io/map.yaml"})
    copy_defaults(tmp_path / "etc", data, recipes_data)
    (tmp_path / "etc" / "io").mkdir()
    (tmp_path / "etc" / "io" / "map.yaml").write_text(REGISTER_MAP_FILE.read_text())
    monkeypatch.chdir(tmp_path)
    cfg, _ = load_all(Path("etc") / "machine.yaml")
    assert len(cfg.fieldbus.points) == 25


def test_missing_map_file(tmp_path, machine_data, recipes_data):
    file = copy_defaults(tmp_path, patched(machine_data, {"fieldbus.map_file": "nope.yaml"}),
                         recipes_data)
    with pytest.raises(ConfigError) as info:
        load_all(file)
    assert info.value.messages == [f"{tmp_path / 'nope.yaml'}: no such file"]


def test_bad_map_file_names_the_map_file_and_the_point(tmp_path, machine_data, recipes_data):
    file = copy_defaults(tmp_path, machine_data, recipes_data)
    map_file = tmp_path / "register-map.yaml"
    text = map_file.read_text()
    text = text.replace("name: temp_pump,        link: io,", "name: temp_pump,        link: rs485,")
    text = text.replace("address: 2, description: \"Heater zone 3\"", "address: 1, description: \"x\"")
    map_file.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_all(file)
    assert info.value.path == map_file
    assert info.value.messages == [
        f"{map_file}: points[2] (temp_pump).link: no such link in fieldbus.links (have io) "
        "(got 'rs485')",
        f"{map_file}: points[16] (heater_pump).address: coil 1 of unit 3 on link io is already "
        "written by points[15] (heater_tank_wall) (got 1)",
    ]


def inline_points(*patches) -> list[dict]:
    points = yaml.safe_load(REGISTER_MAP_FILE.read_text())["points"]
    for index, fields in patches:
        points[index].update(fields)
    return points


def test_inline_points(tmp_path, machine_data, recipes_data):
    data = patched(machine_data, {"fieldbus.map_file": DELETE, "fieldbus.points": inline_points()})
    cfg, _ = load_all(copy_defaults(tmp_path, data, recipes_data))
    from_file, _ = load_all(MACHINE_FILE)
    assert cfg.fieldbus.points == from_file.fieldbus.points and cfg.fieldbus.map_file is None


def test_inline_points_are_validated_like_a_map_file(tmp_path, machine_data):
    points = inline_points((2, {"bits": [1]}), (3, {"link": "rs485"}))
    del points[13]                                                   # pedal
    data = patched(machine_data, {"fieldbus.map_file": DELETE, "fieldbus.points": points})
    assert machine_errors(tmp_path, data) == [
        "fieldbus.points[2] (temp_pump).bits: only for type bool, not with type int16 (got [1])",
        "fieldbus.points[3] (temp_fountain).link: no such link in fieldbus.links (have io) "
        "(got 'rs485')",
        "fieldbus.points: PLC point(s) not mapped: pedal",
    ]


def test_map_file_and_inline_points_together(tmp_path, machine_data):
    data = patched(machine_data, {"fieldbus.points": inline_points()})
    assert machine_errors(tmp_path, data) == ["fieldbus: give either map_file or points, not both"]


def test_work_dir_puts_the_run_time_paths_next_to_the_machine_file(tmp_path):
    """machine.work_dir: the relative run-time paths resolve under it (itself relative to the
    machine file); absolute ones and the machine without a work_dir stay as they are."""
    from opcua_server.config import DEFAULT_CONFIG, load

    text = DEFAULT_CONFIG.read_text()
    machine = tmp_path / "m1"
    machine.mkdir()
    for name in ("recipes.yaml", "register-map.yaml"):
        (machine / name).write_text((DEFAULT_CONFIG.parent / name).read_text())
    (machine / "tempering-machine.yaml").write_text(text.replace(
        "  default_recipe: dark-70\n", "  default_recipe: dark-70\n  work_dir: data\n").replace(
        "spool_dir: var/spool", "spool_dir: /srv/spool"))
    cfg, _ = load(machine / "tempering-machine.yaml")
    base = machine.resolve() / "data"
    assert cfg.machine.state_file == str(base / "var/plc-state.json")
    assert cfg.opcua.data_dir == str(base / "var/opcua")
    assert cfg.opcua.records_url == f"sqlite:///{base / 'var/opcua/tempering.db'}"
    assert cfg.historian.sink.path == str(base / "var/history.sqlite")
    assert cfg.historian.spool_dir == "/srv/spool"
    default, _ = load()
    assert default.machine.work_dir is None and default.opcua.data_dir == "var/opcua"
