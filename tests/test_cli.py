"""The command line and the README: every command the README shows is executed here."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README, re.S)
    lines = [ln.split("  #")[0].strip() for b in blocks for ln in b.splitlines()]
    return [ln for ln in lines if ln.startswith(".venv/bin/")]


def run(cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    argv = shlex.split(cmd)
    argv[0] = str(BIN / Path(argv[0]).name)
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_the_readme_shows_commands():
    cmds = readme_commands()
    assert any("check-config" in c for c in cmds) and any("bench.control" in c for c in cmds)


@pytest.mark.parametrize("cmd", readme_commands())
def test_readme_command_runs(cmd):
    p = run(cmd)
    assert p.returncode == 0, p.stderr + p.stdout
    if "--json" in cmd:
        result = json.loads(p.stdout.strip().splitlines()[-1])
        assert result, "the JSON object is empty"
    if "simulate" in cmd:
        assert "pouring_released" in p.stdout and "final phase stopped" in p.stdout
    if " run " in cmd:
        assert "outputs safe (all off)" in p.stdout


def test_check_config_error_matches_the_readme_example(tmp_path):
    example = re.search(r"```\n(config/tempering-machine.yaml: .*?)\n```", README).group(1)
    src = (ROOT / "config" / "tempering-machine.yaml").read_text()
    pump = src.index("\n  pump:\n")
    kp = src.index("kp:", pump)
    end = src.index("\n", kp)
    bad = src[:kp] + "kp: -1" + src[end:]
    d = tmp_path / "config"
    d.mkdir()
    (d / "tempering-machine.yaml").write_text(bad)
    (d / "recipes.yaml").write_text((ROOT / "config" / "recipes.yaml").read_text())
    p = subprocess.run([str(BIN / "tempering"), "check-config", "config/tempering-machine.yaml"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [example]


def test_check_config_reports_every_problem_and_exits_nonzero(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("machine: {id: x}\nzones: 3\n")
    p = run(f".venv/bin/tempering check-config {f}")
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) >= 3 and all(ln.startswith(f"{f}: ") for ln in lines)
    assert any("zones" in ln for ln in lines) and "Traceback" not in p.stderr


def test_run_stops_cleanly_on_sigterm_with_outputs_safe(tmp_path):
    state = tmp_path / "state.json"
    p = subprocess.Popen([str(BIN / "tempering"), "run", "--state-file", str(state),
                          "--initial-temp-c", "45"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        # wait for the batch to start (the console prints events as lines when not a tty)
        line = ""
        while "batch_start" not in line:
            line = p.stdout.readline()
            assert line, p.stderr.read()
        p.terminate()
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert "outputs safe (all off)" in out and "phase stopped" in out
    saved = json.loads(state.read_text())
    assert saved["phase"] == "stopped" and saved["batch_seq"] == 1
