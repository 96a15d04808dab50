"""Load generator: N numbered points through the real spool and forwarder to a real server.

One job: a reproducible stream for the delivery tests and the benchmark. Point i (0..N-1) is
always the very same line::

    zone,machine=<id>,zone=load seq=<i>i,temp_c=<20.00 + (i % 1000) / 100> <T0 + i * 1_000_000>

so appending it twice (a restart after kill -9 between an append and the state file) stores it
once on the server. Usage::

    python -m bench.loadgen --spool DIR --sink influxdb1 --url http://127.0.0.1:8086 \\
        --database tempering --count 100000 --rate 5000
    python -m bench.loadgen --spool DIR --sink influxdb2 --url URL --token-env INFLUX_TOKEN \\
        --org ORG --bucket BUCKET --count 100000 --rate 0          # 0: as fast as it goes

``DIR/loadgen.state`` (JSON: ``next``, ``start_ns``, ``machine``) is replaced atomically after
every append, so a restart on the same ``--spool`` resumes at the next point with the same T0
(``--start-ns`` defaults to the state's, else to now rounded to the millisecond); the spool itself
hands the forwarder what was appended but not delivered. The state survives kill -9 (os.replace),
not necessarily a power loss (it is not fsync'ed: a re-sent point is harmless).

stdout, flushed line by line: ``progress produced=.. delivered=.. backlog=.. state=.. rate=..``
about every ``--progress-s``, then one JSON line::

    {"produced": N, "resumed_from": i0, "produced_this_run": .., "delivered": .., "set_aside": ..,
     "dropped": .., "backlog": .., "drained": true, "elapsed_s": .., "sink": "<name>"}

``produced`` counts points 0..N-1 over every run; ``delivered`` / ``set_aside`` / ``dropped``
count this run's forwarder and spool. Exit 0 once the spool is drained or ``--drain-timeout-s``
has passed (``drained`` false: the rest stays in the spool for the next run), also after SIGTERM /
SIGINT (production stops, no drain, ``"stopped": true``); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from historian.forwarder import Forwarder
from historian.sinks import Influx1Sink, Influx2Sink, Sink
from historian.spool import Spool

STATE_FILE = "loadgen.state"
APPEND_MAX_LINES = 5000
STEP_NS = 1_000_000
_MACHINE = re.compile(r"^[A-Za-z0-9_.-]+$")   # a tag value that needs no escaping


def point(i: int, start_ns: int, machine: str) -> str:
    """Point ``i`` of the stream: the same text every time it is made."""
    return (f"zone,machine={machine},zone=load seq={i}i,temp_c={20 + (i % 1000) / 100:.2f} "
            f"{start_ns + i * STEP_NS}")


def read_state(spool_dir: Path) -> dict | None:
    try:
        return json.loads((spool_dir / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def write_state(spool_dir: Path, state: dict) -> None:
    tmp = spool_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state), encoding="utf-8")
    os.replace(tmp, spool_dir / STATE_FILE)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--spool", required=True, type=Path, help="spool directory (kept across runs)")
    p.add_argument("--sink", required=True, choices=("influxdb1", "influxdb2"))
    p.add_argument("--url", required=True)
    p.add_argument("--database", help="influxdb1: database")
    p.add_argument("--retention-policy", help="influxdb1: retention policy")
    p.add_argument("--username", help="influxdb1: user")
    p.add_argument("--password-env", metavar="VAR", help="influxdb1: read the password from VAR")
    p.add_argument("--token", help="influxdb2: token (visible in ps; prefer --token-env)")
    p.add_argument("--token-env", metavar="VAR", help="influxdb2: read the token from VAR")
    p.add_argument("--org", help="influxdb2: organization")
    p.add_argument("--bucket", help="influxdb2: bucket")
    p.add_argument("--ca-file")
    p.add_argument("--no-verify-tls", action="store_true")
    p.add_argument("--count", required=True, type=int, help="points 0..N-1 in all")
    p.add_argument("--rate", required=True, type=float, help="points per second (0: unlimited)")
    p.add_argument("--start-ns", type=int, help="timestamp of point 0 (default: the state's, else now)")
    p.add_argument("--machine", help="machine tag: letters, digits, _ . - (default: the state's, "
                   "else loadgen)")
    p.add_argument("--drain-timeout-s", type=float, default=60.0)
    p.add_argument("--progress-s", type=float, default=1.0)
    p.add_argument("--batch-max-lines", type=int, default=5000)
    p.add_argument("--retry-min-s", type=float, default=0.2)
    p.add_argument("--retry-max-s", type=float, default=2.0)
    p.add_argument("--fsync-interval-ms", type=float, default=1000.0)
    p.add_argument("--spool-max-mb", type=float, default=512.0)
    p.add_argument("--when-full", choices=("drop_oldest", "drop_newest"), default="drop_oldest")
    p.add_argument("--timeout-s", type=float, default=10.0, help="the sink's request timeout")
    args = p.parse_args(argv)
    if args.count < 0 or args.rate < 0:
        p.error("--count and --rate must be >= 0")
    if args.machine is not None and not _MACHINE.match(args.machine):
        p.error(f"--machine: letters, digits, _ . - only (got {args.machine!r})")
    if args.sink == "influxdb1" and not args.database:
        p.error("--sink influxdb1 needs --database")
    if args.sink == "influxdb2":
        if not (args.org and args.bucket):
            p.error("--sink influxdb2 needs --org and --bucket")
        if args.token_env:
            args.token = os.environ.get(args.token_env)
            if args.token is None:
                p.error(f"--token-env: ${args.token_env} is not set")
        if not args.token:
            p.error("--sink influxdb2 needs --token or --token-env")
    return args


def make_sink(args: argparse.Namespace) -> Sink:
    tls = {"verify_tls": not args.no_verify_tls, "ca_file": args.ca_file, "timeout_s": args.timeout_s}
    if args.sink == "influxdb1":
        password = os.environ.get(args.password_env) if args.password_env else None
        return Influx1Sink(args.url, args.database, args.retention_policy, args.username,
                           password, **tls)
    return Influx2Sink(args.url, args.token, args.org, args.bucket, **tls)


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def resume(args: argparse.Namespace) -> tuple[int, int, str]:
    """(next point, T0, machine) from ``DIR/loadgen.state`` and the arguments; exit 2 on a mismatch."""
    state = read_state(args.spool) or {}
    for key, given in (("start_ns", args.start_ns), ("machine", args.machine)):
        if given is not None and state.get(key) not in (None, given):
            sys.stderr.write(f"--{key.replace('_', '-')} {given}: {args.spool / STATE_FILE} was "
                             f"started with {state[key]}\n")
            sys.exit(2)
    start_ns = state.get("start_ns") or args.start_ns or time.time_ns() // STEP_NS * STEP_NS
    return int(state.get("next", 0)), int(start_ns), state.get("machine") or args.machine or "loadgen"


class LoadGenerator:
    def __init__(self, args: argparse.Namespace, spool: Spool, forwarder: Forwarder,
                 stop: threading.Event, next_point: int, start_ns: int, machine: str):
        self.args, self.spool, self.forwarder, self.stop = args, spool, forwarder, stop
        self.next = self.resumed_from = next_point
        self.start_ns, self.machine = start_ns, machine
        self._next_progress = 0.0

    def produce(self) -> None:
        """Append points up to --count at --rate (catching up if behind), state after each."""
        rate, count = self.args.rate, self.args.count
        started, first = time.monotonic(), self.next
        while self.next < count and not self.stop.is_set():
            now = time.monotonic()
            due = count if rate == 0 else min(count, first + int((now - started) * rate) + 1)
            if due > self.next:
                hi = min(due, self.next + APPEND_MAX_LINES)
                self.spool.append([point(i, self.start_ns, self.machine)
                                   for i in range(self.next, hi)])
                self.next = hi
                write_state(self.args.spool, {"next": self.next, "start_ns": self.start_ns,
                                              "machine": self.machine})
            else:
                self.stop.wait(min(0.05, started + (self.next - first) / rate - now))
            self.progress()

    def drain(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.spool.stats().backlog_lines > 0:
            if self.stop.is_set() or time.monotonic() >= deadline:
                return False
            self.stop.wait(0.02)
            self.progress()
        return True

    def progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_progress:
            return
        self._next_progress = now + self.args.progress_s
        st = self.forwarder.stats()
        say(f"progress produced={self.next} delivered={st.delivered_total} "
            f"backlog={st.spool.backlog_lines} state={st.state} rate={st.rate_lines_per_s:.0f}"
            + (f" error={st.last_error!r}" if st.state == "retrying" else ""))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    next_point, start_ns, machine = resume(args)
    spool = Spool(args.spool, max_bytes=int(args.spool_max_mb * 2**20), when_full=args.when_full,
                  fsync_interval_s=args.fsync_interval_ms / 1000)
    sink = make_sink(args)
    forwarder = Forwarder(spool, sink, batch_max_lines=args.batch_max_lines,
                          retry_min_s=args.retry_min_s, retry_max_s=args.retry_max_s)
    try:
        gen = LoadGenerator(args, spool, forwarder, stop, next_point, start_ns, machine)
        forwarder.start()
        gen.produce()
        drained = gen.drain(args.drain_timeout_s) if not stop.is_set() else False
        gen.progress(force=True)
    finally:
        forwarder.stop()
        sink.close()
    fw, sp = forwarder.stats(), spool.stats()
    spool.close()
    report = {"produced": gen.next, "resumed_from": gen.resumed_from,
              "produced_this_run": gen.next - gen.resumed_from, "delivered": fw.delivered_total,
              "set_aside": fw.set_aside_total, "dropped": sp.dropped_total,
              "backlog": sp.backlog_lines, "drained": drained,
              "elapsed_s": round(time.monotonic() - started, 3), "sink": sink.name}
    if stop.is_set():
        report["stopped"] = True
    say(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
