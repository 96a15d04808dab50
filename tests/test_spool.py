"""The historian's on-disk spool: order, acknowledgement, recovery, bound, threads, kill -9.

The spool is real files in ``tmp_path``; time is injected where a decision depends on it (the
fsync interval). One test starts a child process and kills it with SIGKILL mid-stream.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from conftest import ROOT
from historian.spool import Batch, Spool, SpoolLocked


def line(i: int, pad: int = 0) -> str:
    return f"zone,machine=m1,zone=tank seq={i}i,temp_c={20 + i % 30}.5{'0' * pad} {1_700_000_000_000_000_000 + i}"


def drain(spool: Spool, max_lines: int = 5000, max_bytes: int = 4 * 2**20) -> list[str]:
    out: list[str] = []
    while (batch := spool.read_batch(max_lines, max_bytes)) is not None:
        out.extend(batch.lines)
        spool.ack(batch)
    return out


def segment_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("seg-*.lp"))


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


# ------------------------------------------------------------------ order and acknowledgement
def test_append_read_ack_in_order(spool_dir: Path) -> None:
    with Spool(spool_dir, fsync_interval_s=0) as sp:
        assert sp.read_batch() is None
        assert sp.append([line(i) for i in range(10)]) == 10
        assert sp.append([line(i) for i in range(10, 15)]) == 5
        first = sp.read_batch(max_lines=4)
        assert first is not None and first.lines == tuple(line(i) for i in range(4))
        assert first.start == (1, 0)
        # reading does not consume: the same lines come again until acknowledged
        again = sp.read_batch(max_lines=4)
        assert again == first
        sp.ack(again)
        st = sp.stats()
        assert (st.backlog_lines, st.acked_total, st.appended_total) == (11, 4, 15)
        assert drain(sp, max_lines=3) == [line(i) for i in range(4, 15)]
        st = sp.stats()
        assert (st.backlog_lines, st.backlog_bytes, st.acked_total) == (0, 0, 15)
        assert sp.read_batch() is None


def test_ack_must_be_the_batch_last_read(spool_dir: Path) -> None:
    with Spool(spool_dir, fsync_interval_s=0) as sp:
        sp.append([line(i) for i in range(6)])
        b1 = sp.read_batch(max_lines=2)
        assert b1 is not None
        sp.ack(b1)
        with pytest.raises(ValueError, match="last read"):
            sp.ack(b1)                                  # twice
        b2 = sp.read_batch(max_lines=2)
        forged = Batch(b2.lines, b2.start, b2.end, ((1, 0, b2.end[1], 2),))
        sp.read_batch(max_lines=2)
        with pytest.raises(ValueError):
            sp.ack(forged)
        assert sp.stats().acked_total == 2


def test_batch_limits_lines_and_bytes_but_never_stalls_on_a_long_line(spool_dir: Path) -> None:
    with Spool(spool_dir, fsync_interval_s=0) as sp:
        long_line = line(0, pad=500)
        sp.append([long_line, line(1), line(2)])
        b = sp.read_batch(max_bytes=100)
        assert b is not None and b.lines == (long_line,)     # longer than the budget, alone
        sp.ack(b)
        size = len(line(1)) + 1
        b = sp.read_batch(max_bytes=size + 1)
        assert b is not None and b.lines == (line(1),)
        sp.ack(b)
        assert drain(sp) == [line(2)]


def test_invalid_lines_are_refused_before_anything_is_written(spool_dir: Path) -> None:
    with Spool(spool_dir, fsync_interval_s=0) as sp:
        for bad in ("a b=1i 1\nc d=2i 2", "", "x\0y"):
            with pytest.raises(ValueError):
                sp.append([line(0), bad])
        assert sp.append([]) == 0
        assert sp.stats().appended_total == 0 and sp.read_batch() is None


def test_utf8_offsets_are_bytes(spool_dir: Path) -> None:
    with Spool(spool_dir, fsync_interval_s=0) as sp:
        lines = ['event,machine=m1,kind=alarm message="Temperatur über 34,5 °C" 1', line(1)]
        sp.append(lines)
        b = sp.read_batch(max_lines=1)
        assert b.lines == (lines[0],) and b.end == (1, len(lines[0].encode()) + 1)
        sp.ack(b)
    with Spool(spool_dir) as sp:
        assert drain(sp) == [line(1)]


# ------------------------------------------------------------------ recovery
def test_reopen_resumes_after_the_acknowledged_cursor(spool_dir: Path) -> None:
    with Spool(spool_dir, fsync_interval_s=0, segment_bytes=300) as sp:
        sp.append([line(i) for i in range(20)])
        b = sp.read_batch(max_lines=7)
        sp.ack(b)
        sp.read_batch(max_lines=5)                       # read, not acknowledged: comes again
    cursor = json.loads((spool_dir / "cursor.json").read_text())
    assert (cursor["segment"], cursor["offset"]) == b.end or cursor["offset"] == 0
    with Spool(spool_dir, fsync_interval_s=0, segment_bytes=300) as sp:
        assert sp.stats().backlog_lines == 13
        sp.append([line(i) for i in range(20, 25)])
        assert drain(sp, max_lines=4) == [line(i) for i in range(7, 25)]
    with Spool(spool_dir) as sp:
        assert sp.read_batch() is None and sp.stats().backlog_lines == 0


def test_torn_last_line_is_cut_on_open(spool_dir: Path) -> None:
    with Spool(spool_dir, fsync_interval_s=0) as sp:
        sp.append([line(i) for i in range(3)])
    seg = spool_dir / segment_files(spool_dir)[-1]
    with open(seg, "ab") as f:                           # a crash in the middle of a write
        f.write(line(3).encode()[:17])
    with Spool(spool_dir, fsync_interval_s=0) as sp:
        assert sp.stats().backlog_lines == 3
        sp.append([line(4)])                             # starts on a clean line boundary
        assert drain(sp) == [line(0), line(1), line(2), line(4)]


def test_nul_tail_after_power_loss_is_cut_on_open(spool_dir: Path) -> None:
    with Spool(spool_dir, fsync_interval_s=0) as sp:
        sp.append([line(i) for i in range(3)])
    seg = spool_dir / segment_files(spool_dir)[-1]
    with open(seg, "ab") as f:                           # extended, data never written
        f.write(b"\0" * 4096)
    with Spool(spool_dir, fsync_interval_s=0) as sp:
        assert drain(sp) == [line(i) for i in range(3)]
        assert seg.stat().st_size == sum(len(line(i)) + 1 for i in range(3))


def test_missing_or_corrupt_cursor_replays_rather_than_loses(spool_dir: Path) -> None:
    with Spool(spool_dir, fsync_interval_s=0) as sp:
        sp.append([line(i) for i in range(5)])
        sp.ack(sp.read_batch(max_lines=2))
    (spool_dir / "cursor.json").write_text("{not json")
    with Spool(spool_dir, fsync_interval_s=0) as sp:
        assert drain(sp) == [line(i) for i in range(5)]  # duplicates, never a loss
    assert (spool_dir / "cursor.json.corrupt").exists()


def test_cursor_beyond_the_data_is_clamped(spool_dir: Path) -> None:
    with Spool(spool_dir, fsync_interval_s=0) as sp:
        sp.append([line(i) for i in range(3)])
    (spool_dir / "cursor.json").write_text(json.dumps({"segment": 1, "offset": 10**6}))
    with Spool(spool_dir, fsync_interval_s=0) as sp:
        assert sp.read_batch() is None
        sp.append([line(3)])
        assert drain(sp) == [line(3)]


def test_stale_segments_before_the_cursor_are_deleted_on_open(spool_dir: Path) -> None:
    with Spool(spool_dir, fsync_interval_s=0, segment_bytes=150) as sp:
        sp.append([line(i) for i in range(3)])
        sp.append([line(i) for i in range(3, 6)])
    assert segment_files(spool_dir) == ["seg-000000000001.lp", "seg-000000000002.lp"]
    # a crash after the cursor moved into segment 2 but before segment 1 was deleted
    (spool_dir / "cursor.json").write_text(json.dumps({"segment": 2, "offset": 0}))
    with Spool(spool_dir, fsync_interval_s=0, segment_bytes=150) as sp:
        assert segment_files(spool_dir) == ["seg-000000000002.lp"]
        assert drain(sp) == [line(i) for i in range(3, 6)]


def test_a_second_opener_is_refused(spool_dir: Path) -> None:
    with Spool(spool_dir):
        with pytest.raises(SpoolLocked):
            Spool(spool_dir)
    Spool(spool_dir).close()                             # released on close


# ------------------------------------------------------------------ segments
def test_segments_rotate_batches_span_them_and_acked_ones_are_deleted(spool_dir: Path) -> None:
    with Spool(spool_dir, fsync_interval_s=0, segment_bytes=250) as sp:
        for i in range(0, 30, 3):
            sp.append([line(j) for j in range(i, i + 3)])
        files = segment_files(spool_dir)
        assert len(files) >= 4 and sp.stats().segments == len(files)
        assert all((spool_dir / f).stat().st_size < 250 + 3 * 80 for f in files)
        b = sp.read_batch(max_lines=12)
        assert b.lines == tuple(line(i) for i in range(12))
        assert len(b.parts) >= 2 and b.start == (1, 0)  # one batch across segments
        sp.ack(b)
        left = segment_files(spool_dir)
        # the segments wholly delivered are gone (the batch may end exactly at a segment's end)
        assert int(left[0][4:16]) in (b.end[0], b.end[0] + 1) and left == files[-len(left):]
        assert len(left) < len(files)
        assert drain(sp, max_lines=7) == [line(i) for i in range(12, 30)]
        # everything delivered: the last segment is replaced by a fresh one on the next append
        sp.append([line(30)])
        assert segment_files(spool_dir) == [f"seg-{int(files[-1][4:16]) + 1:012d}.lp"]
        assert sp.stats().used_bytes == len(line(30)) + 1
    with Spool(spool_dir, segment_bytes=250) as sp:
        assert drain(sp) == [line(30)]


# ------------------------------------------------------------------ bound and full policies
def test_drop_oldest_deletes_whole_oldest_segments_and_counts_them(spool_dir: Path) -> None:
    size = len(line(100)) + 1                # every line(i) from 100 to 999 has the same length
    with Spool(spool_dir, fsync_interval_s=0, max_bytes=10 * size, segment_bytes=2 * size) as sp:
        kept = [sp.append([line(i)]) for i in range(100, 110)]
        assert kept == [1] * 10 and sp.stats().dropped_total == 0
        assert sp.stats().fill == 1.0 and sp.stats().alarm
        assert sp.append([line(110), line(111)]) == 2   # needs 2 lines of room: segment 1 goes
        st = sp.stats()
        assert st.dropped_total == 2 and st.used_bytes <= st.capacity_bytes
        assert st.segments == 5 and segment_files(spool_dir)[0] == "seg-000000000002.lp"
        assert drain(sp) == [line(i) for i in range(102, 112)]


def test_drop_oldest_keeps_the_newest_of_an_append_larger_than_the_spool(spool_dir: Path) -> None:
    size = len(line(0)) + 1
    with Spool(spool_dir, fsync_interval_s=0, max_bytes=4 * size) as sp:
        sp.append([line(0)])
        assert sp.append([line(i) for i in range(1, 8)]) == 4
        assert sp.stats().dropped_total == 4            # line 0 and lines 1..3
        assert drain(sp) == [line(i) for i in range(4, 8)]


def test_drop_newest_refuses_what_does_not_fit_and_counts_it(spool_dir: Path) -> None:
    size = len(line(0)) + 1
    with Spool(spool_dir, fsync_interval_s=0, max_bytes=5 * size, segment_bytes=size,
               when_full="drop_newest") as sp:
        assert sp.append([line(i) for i in range(3)]) == 3
        assert sp.append([line(i) for i in range(3, 7)]) == 2    # room for two
        assert sp.append([line(7)]) == 0
        st = sp.stats()
        assert (st.dropped_total, st.appended_total, st.backlog_lines) == (3, 5, 5)
        sp.ack(sp.read_batch(max_lines=2))                       # delivered: room again
        assert sp.append([line(8), line(9)]) == 2
        assert drain(sp) == [line(i) for i in (2, 3, 4, 8, 9)]


def test_drop_oldest_under_a_pending_batch_skips_the_dropped_part_on_ack(spool_dir: Path) -> None:
    size = len(line(0)) + 1
    with Spool(spool_dir, fsync_interval_s=0, max_bytes=8 * size, segment_bytes=2 * size) as sp:
        for i in range(8):
            sp.append([line(i)])
        pending = sp.read_batch(max_lines=3)             # the forwarder is sending 0, 1, 2
        sp.append([line(8), line(9)])                    # drops segment 1 (lines 0, 1)
        assert sp.stats().dropped_total == 2
        sp.ack(pending)                                  # line 2 delivered, 0 and 1 skipped
        assert sp.stats().acked_total == 1
        assert drain(sp) == [line(i) for i in range(3, 10)]


def test_invalid_settings_are_refused(spool_dir: Path) -> None:
    with pytest.raises(ValueError, match="when_full"):
        Spool(spool_dir, when_full="block")
    with pytest.raises(ValueError):
        Spool(spool_dir, max_bytes=0)


# ------------------------------------------------------------------ set aside, fsync
def test_set_aside_writes_the_lines_and_the_reason(spool_dir: Path) -> None:
    wall = lambda: 1_700_000_000.0                       # 2023-11-14T22:13:20Z
    with Spool(spool_dir, fsync_interval_s=0, wall=wall) as sp:
        p1 = sp.set_aside([line(1), line(2)], 'partial write: unable to parse "bad": invalid field format\n')
        p2 = sp.set_aside([line(3)], "413 too large")
        assert p1.parent == spool_dir / "rejected" and p1 != p2
        assert p1.name.startswith("20231114T221320Z-") and p1.suffix == ".lp"
        assert p1.read_text() == f"{line(1)}\n{line(2)}\n"
        assert p1.with_suffix(".reason.txt").read_text() == \
            'partial write: unable to parse "bad": invalid field format\n'
        assert p2.with_suffix(".reason.txt").read_text() == "413 too large\n"
        assert sp.stats().set_aside_total == 3
    with Spool(spool_dir, fsync_interval_s=0, wall=wall) as sp:    # no name is reused
        p3 = sp.set_aside([line(4)], "x")
        assert p3 not in (p1, p2) and p1.read_text() == f"{line(1)}\n{line(2)}\n"


def count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_fsync_every_append_when_interval_is_zero(spool_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with Spool(spool_dir, fsync_interval_s=0) as sp:
        sp.append([line(0)])                             # creates the segment
        calls = count_fsyncs(monkeypatch)
        for i in range(1, 6):
            sp.append([line(i)])
        assert len(calls) == 5


def test_fsync_at_most_once_per_interval_on_append(spool_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    sp = Spool(spool_dir, fsync_interval_s=3600.0, clock=clock)   # the timer thread stays asleep
    try:
        sp.append([line(0)])
        calls = count_fsyncs(monkeypatch)
        for t in (0.1, 0.5, 3599.0):
            clock.t = t
            sp.append([line(1)])
        assert calls == []
        clock.t = 3600.0
        sp.append([line(2)])
        assert len(calls) == 1
        clock.t = 3601.0
        sp.append([line(3)])
        assert len(calls) == 1
    finally:
        sp.close()
    assert len(calls) == 2                               # close syncs the rest


def test_idle_appends_reach_the_disk_within_the_interval(spool_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with Spool(spool_dir, fsync_interval_s=0.05) as sp:
        sp.append([line(0)])
        calls = count_fsyncs(monkeypatch)
        done = threading.Event()
        real = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd), done.set()))
        sp.append([line(1)])                             # no further append comes
        assert done.wait(5.0), "the timer thread never synced the last append"


# ------------------------------------------------------------------ threads
def test_concurrent_append_and_read_ack_lose_and_duplicate_nothing(spool_dir: Path) -> None:
    total = 20_000
    rng = random.Random(7)
    chunks: list[list[str]] = []
    i = 0
    while i < total:
        n = min(rng.randint(1, 60), total - i)
        chunks.append([line(j) for j in range(i, i + n)])
        i += n
    received: list[str] = []
    errors: list[BaseException] = []
    with Spool(spool_dir, fsync_interval_s=0.01, segment_bytes=8192) as sp:
        def writer() -> None:
            try:
                for c in chunks:
                    assert sp.append(c) == len(c)
            except BaseException as e:   # noqa: BLE001  (reported by the test thread)
                errors.append(e)

        def reader() -> None:
            try:
                while len(received) < total:
                    if not sp.wait(5.0):
                        raise AssertionError(f"stalled at {len(received)} lines")
                    b = sp.read_batch(max_lines=rng.randint(1, 700))
                    if b is not None:
                        received.extend(b.lines)
                        sp.ack(b)
            except BaseException as e:   # noqa: BLE001
                errors.append(e)
        threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert received == [line(j) for j in range(total)]
        st = sp.stats()
        assert (st.backlog_lines, st.appended_total, st.acked_total, st.dropped_total) == \
            (0, total, total, 0)
        assert st.segments <= 1


def test_wait_times_out_and_wakes_on_append_and_interrupt(spool_dir: Path) -> None:
    with Spool(spool_dir, fsync_interval_s=0) as sp:
        assert sp.wait(0.01) is False
        woke = []
        t = threading.Thread(target=lambda: woke.append(sp.wait(30.0)))
        t.start()
        sp.append([line(0)])
        t.join(10)
        assert woke == [True]
        sp.ack(sp.read_batch())
        t = threading.Thread(target=lambda: woke.append(sp.wait(30.0)))
        t.start()
        while not t.is_alive():
            pass
        # interrupt wakes the waiter even with nothing to read (a forwarder being stopped)
        for _ in range(1000):
            sp.interrupt()
            t.join(0.01)
            if not t.is_alive():
                break
        assert woke == [True, False]


# ------------------------------------------------------------------ kill -9
CHILD = textwrap.dedent("""
    import sys, threading
    sys.path.insert(0, {root!r})
    out = threading.Lock()
    def say(text):
        with out:
            sys.stdout.write(text + "\\n")
            sys.stdout.flush()
    from historian.spool import Spool
    sp = Spool({d!r}, segment_bytes=4096, fsync_interval_s=1.0)
    def line(i):
        return f"zone,machine=m1,zone=tank seq={{i}}i,temp_c=21.5 {{1_700_000_000_000_000_000 + i}}"
    def reader():
        while True:
            sp.wait(1.0)
            b = sp.read_batch(max_lines=97)
            if b is not None:
                sp.ack(b)
                say("acked " + b.lines[-1].split("seq=")[1].split("i,")[0])
    threading.Thread(target=reader, daemon=True).start()
    i = 0
    while True:
        n = 1 + i % 13
        sp.append([line(j) for j in range(i, i + n)])
        i += n
        say(f"appended {{i}}")
""")


def test_kill_9_mid_stream_loses_nothing_that_append_returned_for(spool_dir: Path) -> None:
    spool_dir.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT), d=str(spool_dir))],
                            stdout=subprocess.PIPE, text=True)
    appended = acked = 0
    assert proc.stdout is not None
    watchdog = threading.Timer(60.0, proc.kill)          # a silent child cannot hang the test
    watchdog.start()
    try:
        for out in proc.stdout:
            kind, value = out.split()
            if kind == "appended":
                appended = int(value)
            else:
                acked = int(value) + 1
            if appended >= 30_000 and acked > 0:
                break
            if appended >= 300_000:
                pytest.fail("the child's reader never acknowledged a batch")
        else:
            pytest.fail(f"child ended early (rc {proc.wait()})")
        os.kill(proc.pid, signal.SIGKILL)                # mid-stream, no clean-up at all
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with Spool(spool_dir, segment_bytes=4096) as sp:
        back = drain(sp, max_lines=1000)
    seqs = [int(s.split("seq=")[1].split("i,")[0]) for s in back]
    assert back == [
        f"zone,machine=m1,zone=tank seq={i}i,temp_c=21.5 {1_700_000_000_000_000_000 + i}"
        for i in seqs]
    first = seqs[0] if seqs else acked
    # the cursor never passes an unacknowledged line, and is never behind a reported ack
    assert first >= acked
    assert seqs == list(range(first, first + len(seqs)))     # contiguous: no gap, no duplicate
    assert first + len(seqs) >= appended                     # every returned append is back
