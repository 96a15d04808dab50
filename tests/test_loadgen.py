"""``python -m bench.loadgen``: the stream it makes, its arguments, and a run against real
servers (InfluxDB 1.x with a SIGKILL and a restart on the same spool; the v2 API of
VictoriaMetrics)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from bench.loadgen import point
from conftest import ROOT

T0 = 1_700_000_000_000_000_000


def loadgen(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.loadgen", *args]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(loadgen(*args), cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_points_are_deterministic_line_protocol() -> None:
    assert point(0, T0, "m1") == f"zone,machine=m1,zone=load seq=0i,temp_c=20.00 {T0}"
    assert point(1234, T0, "m1") == \
        f"zone,machine=m1,zone=load seq=1234i,temp_c=22.34 {T0 + 1234 * 1_000_000}"
    assert point(7, T0, "m1") == point(7, T0, "m1")


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    base = ("--spool", str(tmp_path / "s"), "--url", "http://127.0.0.1:9", "--count", "1",
            "--rate", "1")
    for extra, message in ((("--sink", "influxdb1"), "--database"),
                           (("--sink", "influxdb2", "--org", "o", "--bucket", "b"), "--token"),
                           (("--sink", "influxdb1", "--database", "d", "--machine", "a b"), "--machine")):
        r = run(*base, *extra)
        assert r.returncode == 2 and message in r.stderr, (extra, r.stderr)


def test_kill_9_and_restart_store_every_point_once(tmp_path: Path, influxdb1) -> None:
    spool = tmp_path / "spool"
    args = ("--spool", str(spool), "--sink", "influxdb1", "--url", influxdb1.url, "--database",
            influxdb1.database, "--count", "6000", "--rate", "3000", "--progress-s", "0.05",
            "--fsync-interval-ms", "0", "--start-ns", str(T0), "--machine", "m1")
    proc = subprocess.Popen(loadgen(*args), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        for out in proc.stdout:
            assert out.startswith("progress "), out
            produced = int(out.split("produced=")[1].split()[0])
            if produced >= 1500:
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    state = json.loads((spool / "loadgen.state").read_text())
    assert 1500 <= state["next"] < 6000 and state["start_ns"] == T0
    r = run(*args[:-4])                                   # no --start-ns / --machine: the state's
    assert r.returncode == 0, r.stderr
    *progress, last = r.stdout.splitlines()
    assert progress and all(p.startswith("progress ") for p in progress)
    report = json.loads(last)
    assert report["produced"] == 6000 and report["resumed_from"] == state["next"]
    assert report["drained"] and report["backlog"] == 0 and report["dropped"] == 0
    assert "db=tempering" in report["sink"]
    rows = influxdb1.rows("SELECT count(seq), min(seq), max(seq) FROM zone WHERE machine = 'm1'")
    assert (rows[0]["count"], rows[0]["min"], rows[0]["max"]) == (6000, 0, 5999)
    rows = influxdb1.rows("SELECT seq, temp_c FROM zone WHERE seq = 4321")
    assert rows == [{"time": T0 + 4321 * 1_000_000, "seq": 4321, "temp_c": 23.21}]


def test_influxdb2_api_against_victoria_metrics(tmp_path: Path, victoria_metrics) -> None:
    r = run("--spool", str(tmp_path / "spool"), "--sink", "influxdb2", "--url",
            victoria_metrics.url, "--token-env", "LOADGEN_TEST_TOKEN", "--org", "o", "--bucket",
            "b", "--count", "500", "--rate", "0", "--start-ns", str(T0), "--machine", "m2",
            env={"LOADGEN_TEST_TOKEN": "secret-token"})
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.splitlines()[-1])
    assert (report["produced"], report["delivered"], report["drained"]) == (500, 500, True)
    assert "secret-token" not in r.stdout + r.stderr
    series = victoria_metrics.wait_export('{__name__="zone_seq",machine="m2"}', 500)
    assert sorted(int(v) for s in series for v in s["values"]) == list(range(500))
