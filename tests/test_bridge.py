"""The link between the PLC process and the plant window (``plc.bridge``), both ends in the
test's loop over a real Unix socket: latest wins without losing events, commands and their
verdicts, each side seeing the other go."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from plc.bridge import MAX_CARRIED_EVENTS, PlcClient, PlcUnavailable, WindowPort
from plc.channel import Snapshot
from plc.commands import Event, Hold, StartRecipe


def snap(tick: int, events=(), padding: int = 0) -> Snapshot:
    settings = {"pump": {"Trim": 0.0}} | {f"zone{i}": {"Kp": float(i)} for i in range(padding)}
    return Snapshot(tick, float(tick), "idle", False, False, None, None, 0.0, False, False, (),
                    None, None, (), (), None, tuple(events), {}, settings)


@pytest.fixture
def sock():
    d = Path(tempfile.mkdtemp(prefix="bridge-"))
    yield d / "plc.sock"
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


async def until(predicate, timeout_s=5.0):
    async def wait():
        while not predicate():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(wait(), timeout_s)


async def test_a_window_that_does_not_read_loses_snapshots_never_their_events(sock):
    """The PLC publishes 1,500 big snapshots while the window reads nothing: publish never
    waits, the snapshots are dropped (counted) rather than queued, and every event reaches the
    window once it reads again."""
    port = WindowPort(sock, lambda cmd: None)
    await port.start()
    reader, writer = await asyncio.open_unix_connection(str(sock))     # a window that hangs
    await until(lambda: port.connects == 1)
    for tick in range(1500):
        port.publish(snap(tick, [Event("alarm", float(tick), f"alarm {tick}")], padding=500))
        if tick % 10 == 0:
            await asyncio.sleep(0)             # the loop runs between scans
    assert port.dropped > 1000
    assert port._writer.transport.get_write_buffer_size() < 1024 * 1024   # bounded, not queued
    writer.close()
    await until(lambda: port._writer is None)
    client = PlcClient(sock)
    sub = client.channel.subscribe(maxlen=10_000)
    stop = asyncio.Event()
    task = asyncio.create_task(client.run(stop))
    await until(lambda: client.latest is not None)
    port.publish(snap(1500))
    await until(lambda: client.latest.tick == 1500)
    received = [e.message for s in sub.drain() for e in s.events]
    sent_to_the_hung_window = 1500 - len(received)
    assert received == [f"alarm {t}" for t in range(sent_to_the_hung_window, 1500)]   # none lost
    assert client.plc_dropped == port.dropped and port.events_dropped == 0
    stop.set()
    await task
    await port.close()


async def test_events_wait_for_a_window_up_to_a_bound(sock):
    port = WindowPort(sock, lambda cmd: None)
    for tick in range(MAX_CARRIED_EVENTS + 10):
        port.publish(snap(tick, [Event("alarm", float(tick), f"alarm {tick}")]))
    assert len(port._pending.events) == MAX_CARRIED_EVENTS
    assert port._pending.events[0].message == "alarm 10" and port.events_dropped == 10


async def test_a_command_gets_the_scans_verdict_and_a_lost_plc_answers_plainly(sock):
    submitted = []
    port = WindowPort(sock, submitted.append)
    await port.start()
    client = PlcClient(sock, verdict_timeout_s=2.0)
    stop = asyncio.Event()
    task = asyncio.create_task(client.run(stop))
    port.publish(snap(1))
    await until(lambda: client.latest is not None and port.status() == "")

    async def scan_answers():               # the next scan refuses it, with its reason
        await until(lambda: submitted)
        cmd = submitted[0]
        port.publish(snap(2, [Event("command_refused", 2.0, "refused", (
            ("command", cmd.name), ("user", cmd.user), ("command_id", cmd.id),
            ("origin", cmd.origin), ("reason", "a batch is heating; stop or abort it first")))]))
    answer = asyncio.create_task(scan_answers())
    sent, verdict = await client.command(StartRecipe("dark-70", user="op", origin="opcua"))
    await answer
    assert submitted[0] == sent and sent.id and sent.user == "op" and sent.origin == "opcua"
    assert not verdict.accepted and verdict.reason == "a batch is heating; stop or abort it first"
    assert verdict.command_id == sent.id
    await port.close()                      # the PLC process is gone
    await until(lambda: client.status() != "")
    with pytest.raises(PlcUnavailable):
        await client.command(Hold(user="op"))
    stop.set()
    await task


async def test_each_side_reports_the_other_lost(sock):
    now = [0.0]
    port = WindowPort(sock, lambda cmd: None, lost_after_s=3.0, first_connect_s=60.0,
                      clock=lambda: now[0])
    await port.start()
    assert port.status() == ""                                  # starting: not yet a fault
    now[0] = 61.0
    assert "no plant window connected for 61 s" in port.status()
    client = PlcClient(sock)
    stop = asyncio.Event()
    task = asyncio.create_task(client.run(stop))
    await until(lambda: port.connects == 1)
    assert port.status() == ""
    now[0] = 65.0                                               # no beat heard for 4 s
    assert port.status().startswith("plant window silent for 4.0 s")
    stop.set()
    await task
    await until(lambda: port._writer is None)
    now[0] = 70.0
    assert port.status().startswith("plant window disconnected")
    await port.close()


async def test_events_a_hung_window_did_not_take_go_to_its_successor(sock):
    """Sent, never acknowledged (the window hung with them in its socket): its successor gets
    them; what a window acknowledged in its beat is not sent again."""
    port = WindowPort(sock, lambda cmd: None)
    await port.start()
    first = PlcClient(sock)
    stop1 = asyncio.Event()
    task1 = asyncio.create_task(first.run(stop1))
    port.publish(snap(1, [Event("alarm", 1.0, "taken")]))
    await until(lambda: first.latest is not None and first.latest.tick == 1)
    await until(lambda: not port._unacked)                   # its beat acknowledged tick 1
    stop1.set()
    await task1
    hung_r, hung_w = await asyncio.open_unix_connection(str(sock))   # the next one never reads
    await until(lambda: port.connects == 2 and port._writer is not None)
    port.publish(snap(2, [Event("alarm", 2.0, "sent to the hung window")]))
    await asyncio.sleep(0.1)                                 # written to its socket, unread
    hung_w.close()
    await until(lambda: port._writer is None)
    port.publish(snap(3, [Event("alarm", 3.0, "while nobody was there")]))
    second = PlcClient(sock)
    sub = second.channel.subscribe()
    stop2 = asyncio.Event()
    task2 = asyncio.create_task(second.run(stop2))
    await until(lambda: second.latest is not None)
    got = [e.message for s in sub.drain() for e in s.events]
    assert got == ["sent to the hung window", "while nobody was there"]
    stop2.set()
    await task2
    await port.close()


async def test_the_batch_floor_reaches_the_controller_on_connect_and_after_each_record(sock, program, make_inputs):
    """The window tells the PLC the records' highest batch number before the first command (on
    every connection) and again when it changes; the Controller numbers its next batch above it."""
    from plc.runtime import Controller

    c = Controller(program)
    port = WindowPort(sock, c.submit, on_batch_floor=c.set_batch_floor)
    await port.start()
    client = PlcClient(sock)
    client.set_batch_floor(122)                 # from the records, before the PLC is there
    stop = asyncio.Event()
    task = asyncio.create_task(client.run(stop))
    await until(lambda: c._batch_floor == 122)
    client.set_batch_floor(130)                 # a batch record of a later number was stored
    client.set_batch_floor(125)                 # never lowered
    await until(lambda: c._batch_floor == 130)
    c.submit(StartRecipe("dark-70", user="op"))
    c.cycle(make_inputs(), 0.0)
    assert c.state.batch_id == f"{program.machine_id}-000131"
    stop.set()
    await task
    await port.close()
    floors: list[int] = []
    port2 = WindowPort(sock, lambda cmd: None, on_batch_floor=floors.append)
    await port2.start()                         # a restarted PLC hears the floor again
    stop2 = asyncio.Event()
    task = asyncio.create_task(client.run(stop2))
    await until(lambda: floors == [130])
    stop2.set()
    await task
    await port2.close()
