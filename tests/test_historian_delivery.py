"""Nothing lost, nothing doubled: the historian's delivery through a database outage and through
a kill -9 of the process, checked by querying the real server afterwards.

(a) Spool + Forwarder in this process stream numbered points (field ``seq`` = 0..N-1, each with
    its own fixed ns timestamp) to InfluxDB 1.x through Influx1Sink, and to VictoriaMetrics'
    v2 write API through Influx2Sink; the server is stopped mid-stream while production goes on,
    then started again. (b) ``python -m bench.loadgen`` streams to InfluxDB 1.x, is killed
    with SIGKILL mid-stream (by PID) and started again on the same spool directory.
In every case the server must hold exactly N points, every seq once.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT
from historian.forwarder import Forwarder
from historian.sinks import Influx1Sink, Influx2Sink
from historian.spool import Spool

ZONES = ("tank", "pump", "pipe", "tap")


def numbered_lines(first: int, n: int, t0_ns: int) -> list[str]:
    """Points ``seq`` = first..first+n-1, 1 ms apart (VictoriaMetrics keeps milliseconds)."""
    return [f"zone,machine=tm-1,zone={ZONES[s % 4]},batch=b1,recipe=dark-70 "
            f'temp_c={30 + s % 100 / 10:.1f},seq={s}i,quality="good" {t0_ns + s * 1_000_000}'
            for s in range(first, first + n)]


def influx_seqs(server) -> list[int]:
    return sorted(row["seq"] for row in server.rows("SELECT seq FROM zone"))


def stream_through_outage(server, sink, spool_dir: Path, n: int, chunk: int,
                          period_s: float) -> None:
    """Produce ``n`` points in chunks every ``period_s`` while the forwarder delivers; the
    server is stopped after a third of the chunks and started again after two thirds; then
    wait until the spool is empty."""
    spool = Spool(spool_dir, fsync_interval_s=0.2)
    forwarder = Forwarder(spool, sink, batch_max_lines=500, retry_min_s=0.05, retry_max_s=0.3)
    forwarder.start()
    t0_ns = time.time_ns() - n * 1_000_000
    chunks = n // chunk
    try:
        for k in range(chunks):
            if k == chunks // 3:
                server.stop()
            if k == 2 * chunks // 3:
                assert spool.stats().backlog_lines > chunk, "the outage was not seen"
                server.start()
            spool.append(numbered_lines(k * chunk, chunk, t0_ns))
            time.sleep(period_s)
        deadline = time.monotonic() + 20
        while spool.stats().backlog_lines and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = forwarder.stats()
        assert spool.stats().backlog_lines == 0, stats
        assert stats.retries_total > 0 and stats.delivered_total >= n
    finally:
        forwarder.stop()
        spool.close()
        sink.close()


def test_outage_influxdb1_every_point_exactly_once(influxdb1, tmp_path):
    n = 3000
    sink = Influx1Sink(influxdb1.url, influxdb1.database, timeout_s=2)
    stream_through_outage(influxdb1, sink, tmp_path / "spool", n, chunk=50, period_s=0.02)
    assert influx_seqs(influxdb1) == list(range(n))


def test_outage_victoria_metrics_every_point_exactly_once(victoria_metrics, tmp_path):
    n = 3000
    vm = victoria_metrics
    sink = Influx2Sink(vm.url, "historian-token", "plant", "tempering", timeout_s=2)
    stream_through_outage(vm, sink, tmp_path / "spool", n, chunk=50, period_s=0.02)
    series = vm.wait_export("zone_seq", n)
    seqs = sorted(v for s in series for v in s["values"])
    assert seqs == list(range(n))


# ------------------------------------------------------------------------- kill -9 (loadgen)


class LoadgenRun:
    """``python -m bench.loadgen`` as a child process; its stdout read by a thread."""

    def __init__(self, spool: Path, server, count: int, rate: float):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen", "--spool", str(spool),
             "--sink", "influxdb1", "--url", server.url, "--database", server.database,
             "--count", str(count), "--rate", str(rate), "--progress-s", "0.05",
             "--retry-min-s", "0.05", "--retry-max-s", "0.3", "--timeout-s", "2",
             "--drain-timeout-s", "30"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.last: dict[str, str] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_progress(self, until, timeout_s: float = 20.0) -> dict[str, str]:
        """Read progress lines until ``until(fields)`` holds (fields: produced, delivered,
        backlog, state, ... as strings)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            if line.startswith("progress "):
                self.last = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
                if until(self.last):
                    return self.last
        pytest.fail(f"loadgen never reached the wanted state; last progress {self.last}; "
                    f"exit {self.proc.poll()}")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        assert self.proc.returncode == -signal.SIGKILL

    def finish(self, timeout_s: float = 40.0) -> dict:
        """Wait for the exit; the final JSON line."""
        self.proc.wait(timeout=timeout_s)
        out = []
        while (line := self.lines.get(timeout=5)) is not None:
            out.append(line)
        assert self.proc.returncode == 0, self.proc.stderr.read()
        return json.loads(out[-1])

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()


def test_kill9_mid_stream_loses_and_doubles_nothing(influxdb1, tmp_path):
    """Killed once while delivering normally, once with the server down and a backlog in the
    spool; the third run resumes and drains: the server holds every point once."""
    n, spool = 20_000, tmp_path / "spool"
    runs = []
    try:
        runs.append(LoadgenRun(spool, influxdb1, n, rate=5000))
        runs[-1].wait_progress(lambda p: int(p["produced"]) >= 4000 and int(p["delivered"]) > 0)
        runs[-1].kill9()

        runs.append(LoadgenRun(spool, influxdb1, n, rate=5000))
        runs[-1].wait_progress(lambda p: int(p["produced"]) >= 9000)
        influxdb1.stop()
        runs[-1].wait_progress(lambda p: int(p["backlog"]) >= 2000)
        runs[-1].kill9()
        influxdb1.start()

        runs.append(LoadgenRun(spool, influxdb1, n, rate=0))
        report = runs[-1].finish()
    finally:
        for run in runs:
            run.close()
    assert report["produced"] == n and report["drained"] and report["backlog"] == 0
    assert report["resumed_from"] >= 9000 and report["dropped"] == 0
    assert influx_seqs(influxdb1) == list(range(n))
