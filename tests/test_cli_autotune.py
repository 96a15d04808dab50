"""``tempering autotune``: on the machine's twin in virtual time (a table, ``--json`` last, the
gains written into a machine file with its comments kept; an unknown zone is a usage error), and
``--server`` against the running test machine over OPC UA (its own client certificate, trusted
in the server's PKI; Start refused by role and by state; an experiment followed until it is
aborted; a pending proposal rejected or accepted)."""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from asyncua import ua

from machines import InProcessMachine, until
from plc import autotune as tune_mod
from plc.tuning import Gains, Model, Prediction
from tempering.cli import main
from test_opcua_autotune import call, read

CONFIG = Path(__file__).resolve().parent.parent / "config"


def test_autotune_on_the_twin_prints_a_table_and_the_json_last(capsys):
    assert main(["autotune", "pump", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("pump ") and "accepted" in line for line in out)    # the table
    result = json.loads(out[-1])
    assert result["mode"] == "twin" and result["ok"] is True and list(result["zones"]) == ["pump"]
    pump = result["zones"]["pump"]
    model, gains, pred = pump["model"], pump["gains"], pump["prediction"]
    assert 0.0 < model["gain_k_per_pct"] < 1.0 and 0.0 < model["tau_s"] < 20000 and 0.0 <= model["dead_s"] < 120
    assert 0.0 < gains["kp"] < 1000 and 0.0 < gains["ki"] < 1000 and 0.0 <= gains["kd"] <= 1000
    assert pump["previous"]["kp"] == 80.0                      # the default machine's pump
    assert 0.0 <= pred["overshoot_k"] < 1.0 and 1.0 <= pred["ms"] < 4.0 and pred["phase_margin_deg"] > 0.0


def test_an_unknown_zone_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["autotune", "pump", "mixer"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown zone 'mixer'" in err and "tank_bottom, tank_wall, pump, fountain" in err
    assert main(["autotune", "pump", "--accept"]) == 2         # a --server option without --server
    assert "--accept only with --server" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["autotune", "pump", "--amplitude", "150"])
    assert exit_.value.code == 2 and "5..100" in capsys.readouterr().err


def test_write_puts_the_proposed_gains_into_the_machine_file_and_keeps_its_comments(tmp_path, capsys):
    for f in CONFIG.glob("*.yaml"):
        shutil.copy(f, tmp_path / f.name)
    machine = tmp_path / "tempering-machine.yaml"
    before = machine.read_text()
    assert main(["autotune", "TankBottom", "--config", str(machine), "--write", str(machine), "--json"]) == 0
    gains = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["zones"]["tank_bottom"]["gains"]
    after = machine.read_text()
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(changed) == 2 + (gains["kd"] != 0.0) and len(before.splitlines()) == len(after.splitlines())
    assert changed[0][1].split("#")[1] == changed[0][0].split("#")[1] == " %/K"         # comments kept
    zone = yaml.safe_load(after)["zones"]["tank_bottom"]
    assert all(zone[k] == pytest.approx(gains[k], rel=1e-3, abs=1e-9) for k in ("kp", "ki", "kd"))
    assert main(["check-config", str(machine)]) == 0


def server_args(m, opcua_pki, user: str, *more: str) -> list[str]:
    return ["autotune", "pump", "--server", m.endpoint, "--user", user,
            "--data-dir", opcua_pki.settings.data_dir, *more]


async def test_server_start_is_refused_by_role_and_by_state(opcua_pki, monkeypatch, capsys):
    async with InProcessMachine(opcua_pki) as m:
        monkeypatch.setenv("TEMPERING_PASSWORD", opcua_pki.password("operator"))
        assert await asyncio.to_thread(main, server_args(m, opcua_pki, "operator")) == 1
        assert "refused: BadUserAccessDenied" in capsys.readouterr().err
        cli = Path(opcua_pki.settings.data_dir) / "cli" / "own" / "cert.der"
        assert cli.is_file() and any(e.state == "trusted" and e.path.read_bytes() == cli.read_bytes()
                                     for e in opcua_pki.pki.list())
        monkeypatch.setenv("TEMPERING_PASSWORD", opcua_pki.password("technician"))
        assert await asyncio.to_thread(main, server_args(m, opcua_pki, "technician", "--json")) == 1
        captured = capsys.readouterr()
        assert "refused: BadInvalidState" in captured.err and "only while a batch heats" in captured.err
        assert json.loads(captured.out.strip().splitlines()[-1])["ok"] is False
        monkeypatch.setenv("TEMPERING_PASSWORD", "wrong")
        assert await asyncio.to_thread(main, server_args(m, opcua_pki, "technician")) == 1
        assert "tempering autotune: " + m.endpoint in capsys.readouterr().err
        async with await opcua_pki.client("viewer") as viewer:
            assert await read(viewer, m, "pump", "Stage") == "idle"


async def test_server_follows_the_experiment_until_it_ends(opcua_pki, monkeypatch, capsys):
    async with InProcessMachine(opcua_pki, initial_temp_c=48.0) as m:
        async with await opcua_pki.client("operator") as op, await opcua_pki.client("technician") as tech:
            sequencer = op.get_node(m.nodes.objects["Sequencer"].nodeid)
            await sequencer.call_method(m.nodes.methods["StartRecipe"].nodeid,
                                        ua.Variant("dark-70", ua.VariantType.String))
            await sequencer.call_method(m.nodes.methods["Hold"].nodeid)
            output = tech.get_node(m.nodes.zones["pump"]["Output"])

            async def loop_active():
                return await output.read_value() != 0.0
            await until(loop_active, timeout_s=30.0)
            monkeypatch.setenv("TEMPERING_PASSWORD", opcua_pki.password("technician"))
            cli = asyncio.create_task(asyncio.to_thread(main, server_args(m, opcua_pki, "technician",
                                                                          "--amplitude", "20", "--accept")))

            async def settling():
                return await read(tech, m, "pump", "Stage") == "settle"
            await until(settling, timeout_s=20.0)
            await asyncio.sleep(2.0)                    # a poll or two of the command line
            assert await call(tech, m, "pump", "Abort") == "Good"
            assert await asyncio.wait_for(cli, 20.0) == 1
        captured = capsys.readouterr()
        assert "pump: settle" in captured.out and "pump: aborted" in captured.out
        assert "aborted by technician" in captured.err


async def test_server_rejects_or_accepts_a_pending_proposal(opcua_pki, monkeypatch, capsys):
    async with InProcessMachine(opcua_pki) as m:
        state = m.controller.state
        proposal = tune_mod.Outcome(
            zone="pump", status=tune_mod.PROPOSED, message="a proposal", time_s=0.0, user="technician",
            model=Model(gain_k_per_pct=0.0135, tau_s=35.5, dead_s=9.2, rms_k=0.05, samples=600, step_s=1.0),
            gains=Gains(kp=142.2, ki=4.0),
            prediction=Prediction(overshoot_k=0.17, settling_s=110.0, load_peak_k=0.05, load_recovery_s=0.0,
                                  ms=1.59, gain_margin=3.15, phase_margin_deg=61.2),
            previous={"kp": 80.0, "ki": 0.8, "kd": 0.0})
        m.controller.state = replace(state, autotune_outcomes={**state.autotune_outcomes, "pump": proposal})
        monkeypatch.setenv("TEMPERING_PASSWORD", opcua_pki.password("technician"))
        async with await opcua_pki.client("viewer") as viewer:
            async def stage(want):
                return await read(viewer, m, "pump", "Stage") == want
            await until(lambda: stage("proposed"))
            assert await asyncio.to_thread(main, server_args(m, opcua_pki, "technician", "--reject-pending",
                                                             "--json")) == 0
            out = capsys.readouterr().out.strip().splitlines()
            assert "pump: proposal rejected" in out
            assert json.loads(out[-1])["zones"]["pump"]["gains"]["kp"] == 142.2
            await until(lambda: stage("rejected"))
            assert await viewer.get_node(m.nodes.zones["pump"]["Kp"]).read_value() == 80.0
            assert await asyncio.to_thread(main, server_args(m, opcua_pki, "technician", "--accept-pending")) == 1
            assert "refused: BadInvalidState" in capsys.readouterr().err

            m.controller.state = replace(m.controller.state, autotune_outcomes={
                **m.controller.state.autotune_outcomes, "pump": proposal})
            await until(lambda: stage("proposed"))
            assert await asyncio.to_thread(main, server_args(m, opcua_pki, "technician", "--accept-pending")) == 0

            async def applied():
                return await viewer.get_node(m.nodes.zones["pump"]["Kp"]).read_value() == 142.2
            await until(applied)
        assert any(e["target"] == "pump.Autotune.Accept" and e["result"] == "Good" and e["user"] == "technician"
                   for e in m.records.audit_entries(100))
