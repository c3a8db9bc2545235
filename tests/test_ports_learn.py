"""`benchhub ports learn`: the wizard driven by the real polling hotplug source over a fake sysfs tree
that the tests mutate (an iPhone walking from port to port), with input through a real pipe; the port
map file; the topology's use of a learned map; and the `ports` commands."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from daemon import cli
from daemon.ios.base import DeviceMode
from daemon.models import PortRef
from daemon.usb.hotplug import PollingHotplug, SysfsEnumerator, UdevHotplug, UsbAction, UsbEvent
from daemon.usb.learn import (
    FdLines,
    HubToLearn,
    LearnError,
    PortLearner,
    Stage,
    common_parent,
    learn_ports,
    prime,
)
from daemon.usb.portmap import (
    HEADER,
    PortMapError,
    describe_port_map,
    load_port_map,
    load_port_map_if_present,
    render_port_map,
    save_port_map,
)
from daemon.usb.sysfs import UsbSysfs
from daemon.usb.topology import Topology
from tests.test_usb_sysfs import IPHONE_SERIAL, FakeSysfs

APPLE, IPHONE = 0x05AC, 0x12A8
ECID_HEX = "001A2C3E0E12802E"  # of IPHONE_SERIAL
OTHER_SERIAL = "00008110001C604A3405801E"
HUB_A = HubToLearn("hub-a", 4, "3-2.4")
PORTS = {1: "3-2.4.1", 2: "3-2.4.2", 3: "3-2.4.3", 4: "3-2.1"}
"""hub-a's physical ports: three on an internal hub at 3-2.4, the fourth on the first chip."""
DEADLINE = 5.0


@pytest.fixture
def fake(tmp_path: Path) -> FakeSysfs:
    fake = FakeSysfs(tmp_path / "sys")
    fake.add("3-2", 0x05E3, 0x0610, hub=True)
    fake.add("3-2.4", 0x05E3, 0x0610, hub=True)
    return fake


def plug(fake: FakeSysfs, path: str, serial: str = IPHONE_SERIAL) -> None:
    fake.add(path, APPLE, IPHONE, serial)


class Wizard:
    """`learn_ports` running as a task over the fake sysfs; `type()` writes to its input pipe,
    `expect()` waits (with a deadline) for a line containing a text, after the last one found."""

    def __init__(self, fake: FakeSysfs) -> None:
        self.fake = fake
        self.out: list[str] = []
        self.cursor = 0
        self.read_fd, self.write_fd = os.pipe()
        self.lines = FdLines(self.read_fd, poll_interval=0.02)
        self.task: asyncio.Task[PortLearner] | None = None

    def start(self, hubs: list[HubToLearn], fixed: dict[str, dict[int, str]] | None = None) -> None:
        hotplug = PollingHotplug(SysfsEnumerator(UsbSysfs(self.fake.root)), interval=0.02)
        self.task = asyncio.create_task(learn_ports(hubs, hotplug, self.lines, self.out.append, fixed=fixed))

    def type(self, text: str) -> None:
        os.write(self.write_fd, text.encode())

    async def expect(self, text: str) -> int:
        deadline = time.monotonic() + DEADLINE
        while True:
            for i in range(self.cursor, len(self.out)):
                if text in self.out[i]:
                    self.cursor = i + 1
                    return i
            if self.task is not None and self.task.done() and self.task.exception() is not None:
                raise AssertionError(f"wizard failed waiting for {text!r}") from self.task.exception()
            if time.monotonic() > deadline:
                raise AssertionError(f"no line with {text!r} in:\n" + "\n".join(self.out))
            await asyncio.sleep(0.005)

    async def finish(self) -> PortLearner:
        assert self.task is not None
        return await asyncio.wait_for(self.task, DEADLINE)

    async def learn(self, hub: str, port: int, path: str, serial: str = IPHONE_SERIAL) -> None:
        """The technician's round: plug when asked, unplug when asked."""
        await self.expect(f"Plug a device into {hub} port {port} (Enter: skip this port, q: finish)")
        plug(self.fake, path, serial)
        await self.expect(f"{hub} port {port} is {path} (normal mode, ECID ")
        await self.expect(f"Unplug the device from {hub} port {port}")
        self.fake.remove(path)
        await self.expect(f"Unplugged from {hub} port {port}.")

    def close(self) -> None:
        os.close(self.write_fd)  # EOF first, so the reader thread ends before its fd is closed
        self.lines.close()
        os.close(self.read_fd)


@pytest.fixture
async def wizard(fake: FakeSysfs) -> AsyncIterator[Wizard]:
    w = Wizard(fake)
    try:
        yield w
    finally:
        if w.task is not None and not w.task.done():
            w.task.cancel()
            await asyncio.gather(w.task, return_exceptions=True)
        w.close()


# ------------------------------------------------------------------------------------------- wizard


async def test_full_learn_of_a_four_port_hub(wizard: Wizard) -> None:
    wizard.start([HUB_A])
    await wizard.expect("Learning the port map of hub-a (4 ports)")
    await wizard.expect("iPhone or iPad")
    for port, path in PORTS.items():
        await wizard.learn("hub-a", port, path)
    learner = await wizard.finish()
    assert learner.learned == {"hub-a": PORTS}
    assert (learner.skipped, learner.quit, learner.count) == ([], False, 4)
    assert "hub-a: 4 of 4 ports learned." in wizard.out
    # the next port is only asked for after the device has left the previous one
    for port in (2, 3, 4):
        unplugged = wizard.out.index(f"Unplugged from hub-a port {port - 1}.")
        asked = next(i for i, line in enumerate(wizard.out) if f"into hub-a port {port} " in line)
        assert unplugged < asked
    summary = wizard.out[wizard.out.index("Learned 4 port(s).") :]
    assert "  port  1  3-2.4.1" in summary
    assert "  port  4  3-2.1" in summary
    assert 'common parent 3-2: suggested usb_path = "3-2" (the config says "3-2.4")' in summary[-1]


async def test_skip_then_quit_keeps_what_was_learned(wizard: Wizard) -> None:
    wizard.start([HUB_A])
    await wizard.learn("hub-a", 1, PORTS[1])
    await wizard.expect("Plug a device into hub-a port 2")
    wizard.type("\n")
    await wizard.expect("hub-a port 2: skipped.")
    await wizard.expect("Plug a device into hub-a port 3")
    plug(wizard.fake, PORTS[3])
    await wizard.expect("Unplug the device from hub-a port 3")
    wizard.type("q\n")  # finish while the device is still in
    learner = await wizard.finish()
    assert learner.learned == {"hub-a": {1: PORTS[1], 3: PORTS[3]}}
    assert learner.skipped == [PortRef("hub-a", 2)]
    assert learner.quit
    assert "  port  2  skipped" in wizard.out
    assert "  port  4  not learned" in wizard.out


async def test_quit_at_once_learns_nothing(wizard: Wizard) -> None:
    wizard.start([HUB_A, HubToLearn("hub-b", 2)])
    await wizard.expect("Plug a device into hub-a port 1")
    wizard.type("q\n")
    learner = await wizard.finish()
    assert (learner.learned, learner.count, learner.quit) == ({}, 0, True)
    assert "Learned 0 port(s)." in wizard.out


async def test_end_of_input_finishes(wizard: Wizard) -> None:
    wizard.start([HUB_A])
    await wizard.learn("hub-a", 1, PORTS[1])
    await wizard.expect("Plug a device into hub-a port 2")
    os.close(wizard.write_fd)
    wizard.write_fd = os.open(os.devnull, os.O_WRONLY)  # for close()
    learner = await wizard.finish()
    assert learner.learned == {"hub-a": {1: PORTS[1]}}
    assert learner.quit
    assert "Input closed; finishing." in wizard.out


async def test_same_path_for_two_ports_is_rejected(wizard: Wizard) -> None:
    wizard.start([HUB_A])
    await wizard.learn("hub-a", 1, PORTS[1])
    await wizard.expect("Plug a device into hub-a port 2")
    plug(wizard.fake, PORTS[1])  # back into port 1 by mistake
    rejected = await wizard.expect("Not taken: 3-2.4.1 is already hub-a port 1")
    assert "plug it into hub-a port 2" in wizard.out[rejected]
    await wizard.expect("Plug a device into hub-a port 2")  # asked again
    wizard.fake.remove(PORTS[1])
    plug(wizard.fake, PORTS[2])
    await wizard.expect("hub-a port 2 is 3-2.4.2")
    wizard.type("q\n")
    learner = await wizard.finish()
    assert learner.learned == {"hub-a": {1: PORTS[1], 2: PORTS[2]}}


async def test_path_of_a_hub_not_being_learned_is_rejected(wizard: Wizard) -> None:
    wizard.start([HUB_A], fixed={"hub-b": {1: "3-2.4.1"}})
    await wizard.expect("Plug a device into hub-a port 1")
    plug(wizard.fake, "3-2.4.1")
    line = await wizard.expect("Not taken: 3-2.4.1 is hub-b port 1 (3-2.4.1) in the saved port map")
    assert "learn hub-b again if its cabling changed" in wizard.out[line]
    wizard.type("q\n")
    assert (await wizard.finish()).learned == {}


async def test_device_present_at_start_is_ignored(wizard: Wizard) -> None:
    plug(wizard.fake, PORTS[3], OTHER_SERIAL)  # another iPhone already sits on port 3
    wizard.start([HUB_A])
    await wizard.expect("Ignoring 1 iOS device(s) already plugged in (3-2.4.3)")
    await wizard.expect("Plug a device into hub-a port 1")
    plug(wizard.fake, PORTS[1])
    await wizard.expect("hub-a port 1 is 3-2.4.1")  # not 3-2.4.3, which was there all along
    wizard.fake.remove(PORTS[1])
    await wizard.expect("Plug a device into hub-a port 2")
    # the phone that was there at the start counts once it is moved
    wizard.fake.remove(PORTS[3])
    plug(wizard.fake, PORTS[2], OTHER_SERIAL)
    await wizard.expect("hub-a port 2 is 3-2.4.2 (normal mode, ECID 001C604A3405801E)")
    wizard.type("q\n")
    learner = await wizard.finish()
    assert learner.learned == {"hub-a": {1: PORTS[1], 2: PORTS[2]}}


async def test_redo_and_leave_plugged(wizard: Wizard) -> None:
    wizard.start([HubToLearn("hub-a", 2)])
    await wizard.expect("Plug a device into hub-a port 1")
    plug(wizard.fake, PORTS[2])  # the wrong port
    await wizard.expect("hub-a port 1 is 3-2.4.2")
    wizard.type("r\n")
    await wizard.expect("Forgot 3-2.4.2 for hub-a port 1.")
    await wizard.expect("Plug a device into hub-a port 1")
    plug(wizard.fake, PORTS[1], OTHER_SERIAL)  # a second phone, into the right port
    await wizard.expect("hub-a port 1 is 3-2.4.1")
    wizard.type("\n")  # leave it in and go on
    await wizard.expect("Not waiting for the unplug; the device stays on 3-2.4.1.")
    await wizard.expect("Plug a device into hub-a port 2")
    wizard.fake.remove(PORTS[2])
    plug(wizard.fake, PORTS[2])
    await wizard.expect("hub-a port 2 is 3-2.4.2")
    wizard.fake.remove(PORTS[2])
    learner = await wizard.finish()
    assert learner.learned == {"hub-a": {1: PORTS[1], 2: PORTS[2]}}


async def test_two_hubs_in_turn(wizard: Wizard) -> None:
    wizard.start([HubToLearn("hub-a", 1), HubToLearn("hub-b", 1)])
    await wizard.learn("hub-a", 1, "3-2.4.1")
    await wizard.expect("hub-a: 1 of 1 ports learned.")
    await wizard.expect("Next hub: hub-b.")
    await wizard.learn("hub-b", 1, "3-2.1")
    learner = await wizard.finish()
    assert learner.learned == {"hub-a": {1: "3-2.4.1"}, "hub-b": {1: "3-2.1"}}
    assert any("common parent 3-2.4 (from one port only: a guess)" in line for line in wizard.out)


def event(action: UsbAction, path: str) -> UsbEvent:
    return UsbEvent(action, path, APPLE, IPHONE, IPHONE_SERIAL, DeviceMode.NORMAL, 0x1A2C3E0E12802E, None)


def test_learner_waits_for_the_unplug() -> None:
    """Sans-IO: after a plug, only the removal of that device (or Enter) moves on."""
    added, removed = UsbAction.ADDED, UsbAction.REMOVED
    learner = PortLearner([HubToLearn("hub-a", 2)], present=["3-2.9"])
    assert learner.on_usb(event(added, "3-2.9")) == []  # present at the start: not a plug
    assert learner.current == PortRef("hub-a", 1)
    out = learner.on_usb(event(added, "3-2.1"))
    assert out[0] == f"hub-a port 1 is 3-2.1 (normal mode, ECID {ECID_HEX})."
    assert learner.stage is Stage.UNPLUG
    assert learner.on_usb(event(removed, "3-2.9")) == []  # some other device leaving
    ignored = learner.on_usb(event(added, "3-2.2"))  # the next port plugged too early
    assert ignored[0].startswith("Ignored a device on 3-2.2")
    assert (learner.stage, learner.current) == (Stage.UNPLUG, PortRef("hub-a", 1))
    assert learner.on_line("what?") == ["Unknown answer 'what?'.", learner.prompt()]
    out = learner.on_usb(event(removed, "3-2.1"))
    assert out[-1] == "Plug a device into hub-a port 2 (Enter: skip this port, q: finish)"
    assert learner.on_usb(event(added, "3-2.1.3"))[0].startswith(
        "Not taken: 3-2.1.3 overlaps hub-a port 1 (3-2.1); is a hub in that port?"
    )
    assert learner.on_usb(event(added, "3-2.9"))[0].startswith("hub-a port 2 is 3-2.9")  # replugged
    learner.on_usb(event(removed, "3-2.9"))
    assert learner.stage is Stage.DONE
    assert learner.on_line("") == []
    assert learner.learned == {"hub-a": {1: "3-2.1", 2: "3-2.9"}}


def test_common_parent() -> None:
    assert common_parent(["3-2.4.1", "3-2.4.2", "3-2.1"]) == "3-2"
    assert common_parent(["3-2.4.1", "3-2.4.2"]) == "3-2.4"
    assert common_parent(["3-2.4.1"]) == "3-2.4"
    assert common_parent(["3-2.1", "4-2.2"]) is None  # two buses
    assert common_parent(["3-1", "3-2"]) is None  # on the root hub
    assert common_parent(["3-10.1", "3-1.2"]) is None  # not a string prefix
    assert common_parent([]) is None


async def test_a_failing_enumeration_is_a_learn_error(tmp_path: Path) -> None:
    hotplug = PollingHotplug(SysfsEnumerator(UsbSysfs(tmp_path / "nope")), interval=0.02)

    async def no_input() -> AsyncIterator[str]:
        return
        yield

    with pytest.raises(LearnError, match="cannot list USB devices"):
        await learn_ports([HUB_A], hotplug, no_input(), print)


class QuietMonitor:
    """A udev monitor that never has anything to say (readiness from a real socket)."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair()

    def fileno(self) -> int:
        return self.ours.fileno()

    def poll(self, timeout: float | None = None) -> Any:
        return None


async def test_prime_udev_source_reports_only_later_changes(fake: FakeSysfs) -> None:
    plug(fake, "3-2.4.3")
    monitor = QuietMonitor()
    source = UdevHotplug(sysfs=UsbSysfs(fake.root), monitor=monitor)
    try:
        assert await prime(source) == {"3-2.4.3"}
        plug(fake, "3-2.4.4", OTHER_SERIAL)  # arrives between the priming and the stream's own scan
        stream = source.events()
        try:
            first = await asyncio.wait_for(anext(stream), DEADLINE)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        assert (first.action, first.usb_path) == (UsbAction.ADDED, "3-2.4.4")
    finally:
        monitor.ours.close()
        monitor.theirs.close()


def test_fd_lines_close_stops_the_thread_without_eof() -> None:
    read_fd, write_fd = os.pipe()
    lines = FdLines(read_fd, poll_interval=0.02)

    async def first_line() -> str:
        return await anext(aiter(lines))

    os.write(write_fd, b"hello\r\n")
    assert asyncio.run(first_line()) == "hello"
    lines.close()
    assert lines._thread is not None
    assert not lines._thread.is_alive()
    os.close(write_fd)
    os.close(read_fd)


# ----------------------------------------------------------------------------------------- the file


def test_saved_file_round_trips_and_keeps_other_hubs(tmp_path: Path) -> None:
    path = tmp_path / "ports.toml"
    assert save_port_map(path, {"hub-b": {2: "1-4.2", 1: "1-4.1"}}) == []
    assert save_port_map(path, {"hub-a": PORTS}) == []
    text = path.read_text()
    first = text.splitlines()[0]
    assert first.startswith(HEADER + " ")
    assert datetime.fromisoformat(first.removeprefix(HEADER + " ")).tzinfo is not None
    assert '[hub-a]\n1 = "3-2.4.1"\n2 = "3-2.4.2"\n3 = "3-2.4.3"\n4 = "3-2.1"\n' in text
    assert load_port_map(path) == {"hub-b": {1: "1-4.1", 2: "1-4.2"}, "hub-a": PORTS}
    assert list(load_port_map(path)) == ["hub-b", "hub-a"]  # file order kept
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # the station runs as another user
    # re-learning a hub replaces it wholesale; a kept port on a path just learned is dropped
    path.chmod(0o640)
    notes = save_port_map(path, {"hub-a": {1: "1-4.1"}})
    assert notes == [
        "dropped hub-b port 1 (1-4.1) from the saved map: 1-4.1 was just learned as hub-a port 1"
    ]
    assert load_port_map(path) == {"hub-b": {2: "1-4.2"}, "hub-a": {1: "1-4.1"}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ports.toml"]  # no temporary left


def test_failed_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ports.toml"
    save_port_map(path, {"hub-a": {1: "3-2.1"}})
    before = path.read_text()

    def refuse(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        save_port_map(path, {"hub-a": {1: "3-2.2"}})
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ports.toml"]


def test_render_refuses_a_bad_map() -> None:
    with pytest.raises(ValueError, match="not a USB path"):
        render_port_map({"hub-a": {1: "3-2.0"}})
    with pytest.raises(ValueError, match=r"is also hub-a\.1"):
        render_port_map({"hub-a": {1: "3-2.1"}, "hub-b": {1: "3-2.1"}})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[hub-a]\nx = "3-2.1"', "hub-a.x: port numbers are whole numbers from 1 (got 'x')"),
        ('[hub-a]\n0 = "3-2.1"', "hub-a.0: port numbers are whole numbers from 1 (got '0')"),
        ('[hub-a]\n1 = "3-2.0"', "hub-a.1: '3-2.0' is not a USB path like \"3-2.4.1\""),
        ("[hub-a]\n1 = 5", "hub-a.1: 5 is not a USB path"),
        (
            '[hub-a]\n1 = "3-2.1"\n\n[hub-b]\n2 = "3-2.1"',
            "hub-b.2: 3-2.1 is also hub-a.1; one USB path is one port",
        ),
        ('[hub-a]\n1 = "3-2.1"\n2 = "3-2.1.4"', "hub-a.2: 3-2.1.4 overlaps 3-2.1, which is hub-a.1"),
        (
            '[Hub_A]\n1 = "3-2.1"',
            "[Hub_A]: is not a hub id (lowercase letters, digits and '-', as [[hubs]] id"
            " in the station config); rename the table to the hub's id",
        ),
        ('hub-a = "3-2.1"', "hub-a: must be a [hub-id] table"),
        ("[hub-a\n", "not valid TOML"),
    ],
)
def test_bad_port_map_gives_one_line_naming_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "ports.toml"
    path.write_text(text)
    with pytest.raises(PortMapError) as caught:
        load_port_map(path)
    [line] = caught.value.lines
    assert line.startswith(f"{path}: ")
    assert expected in line
    assert "\n" not in line
    assert "benchhub ports learn" in line or "rename the table" in line  # and how to fix it


def test_every_bad_line_is_reported_and_a_missing_file_is_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "ports.toml"
    path.write_text('[hub-a]\n1 = "3-2.1"\nx = "3-2.2"\n3 = "nope"\n')
    with pytest.raises(PortMapError) as caught:
        load_port_map(path)
    assert [line.split(": ")[1] for line in caught.value.lines] == ["hub-a.x", "hub-a.3"]
    with pytest.raises(FileNotFoundError):
        load_port_map(tmp_path / "missing.toml")
    assert load_port_map_if_present(tmp_path / "missing.toml") == {}
    assert load_port_map_if_present(None) == {}
    with pytest.raises(PortMapError):
        load_port_map_if_present(path)


# ------------------------------------------------------------------------------------------ topology


def test_learned_paths_win_over_the_hub_reported_map() -> None:
    topology = Topology.from_config([("hub-a", 4, "3-2")])
    topology.set_port_paths("hub-a", {1: "4.1", 2: "4.2", 3: "4.3"})
    assert topology.port_for("3-2.4.1") == PortRef("hub-a", 1)
    # the bench says ports 1 and 2 are the other way round, and port 4 is behind the first chip
    assert topology.apply_learned({"hub-a": {1: "3-2.4.2", 2: "3-2.4.1", 4: "3-2.1"}}) == []
    assert topology.port_for("3-2.4.2") == PortRef("hub-a", 1)
    assert topology.port_for("3-2.4.1") == PortRef("hub-a", 2)
    assert topology.port_for("3-2.4.3") == PortRef("hub-a", 3)  # not learned: the hub's map
    assert topology.port_for("3-2.1") == PortRef("hub-a", 4)
    assert topology.port_for("3-2.4.2.3") == PortRef("hub-a", 1)  # behind port 1
    assert topology.port_for("3-2.4") is None
    assert topology.usb_path(PortRef("hub-a", 1)) == "3-2.4.2"
    assert not topology.fully_learned("hub-a")
    # the hub reconnects and reports its map again: the learned paths still win
    topology.set_port_paths("hub-a", {1: "4.1", 2: "4.2", 3: "4.3", 4: "4.4"})
    assert topology.port_for("3-2.4.1") == PortRef("hub-a", 2)
    assert topology.port_for("3-2.4.4") is None  # port 4 is learned elsewhere
    # a newer map replaces the old one entirely
    topology.apply_learned({})
    assert topology.port_for("3-2.4.1") == PortRef("hub-a", 1)


def test_hub_for_finds_hubs_through_learned_paths() -> None:
    # hub-b has no usb_path configured (so a guessed `2-1`); its ports were learned on bus 5
    topology = Topology.from_config([("hub-a", 4, "5-1"), ("hub-b", 2, None), ("hub-c", 4, "5-1.3")])
    assert topology.hub_for("5-1.3") == "hub-a"
    topology.apply_learned({"hub-b": {1: "5-1.3", 2: "5-4.2"}})
    assert topology.fully_learned("hub-b")
    assert topology.hub_for("5-4.2") == "hub-b"  # not below any configured usb_path
    assert topology.port_for("5-4.2") == PortRef("hub-b", 2)
    assert topology.hub_for("5-4.2.1") == "hub-b"
    assert topology.hub_for("5-4.3") is None
    assert topology.hub_for("5-1.3") == "hub-b"  # the learned port is deeper than hub-a's usb_path
    assert topology.port_for("5-1.3") == PortRef("hub-b", 1)
    assert topology.hub_for("5-1.2") == "hub-a"
    # hub-c hangs on hub-b's port 1: what is below it is hub-c's, as port_for says too
    assert topology.hub_for("5-1.3.2") == "hub-c"
    assert topology.port_for("5-1.3.2") == PortRef("hub-c", 2)


def test_apply_learned_notes_what_it_cannot_place() -> None:
    topology = Topology.from_config([("hub-a", 2, "3-2")])
    notes = topology.apply_learned({"hub-a": {1: "3-2.1", 3: "3-2.3"}, "old": {1: "1-1.1"}})
    assert notes == [
        "port map: hub 'old' is not in the config; its 1 port(s) are ignored",
        "port map: hub 'hub-a' has 2 ports; learned port(s) 3 are ignored",
    ]
    assert topology.port_for("3-2.3") is None
    assert topology.hub_for("1-1.1") is None
    with pytest.raises(ValueError, match="not a USB path"):
        topology.apply_learned({"hub-a": {1: "3-2.x"}})


# ------------------------------------------------------------------------------------------------ CLI

CONFIG = """
[station]
id = "bench-1"
{port_map}

[[hubs]]
id = "cart-1"
kind = "datamation"
usb_path = "3-2"
ports = 2

[[hubs]]
id = "sim-a"
kind = "sim"
ports = 4

[sim]
"""


def write_config(tmp_path: Path, port_map: str | None = "ports.toml") -> Path:
    directory = tmp_path / "etc"
    directory.mkdir(exist_ok=True)
    path = directory / "station.toml"
    path.write_text(CONFIG.format(port_map=f'port_map = "{port_map}"' if port_map else ""))
    return path


def benchhub(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )


def test_ports_show(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = benchhub("ports", "show", "--config", str(config), cwd=elsewhere)
    assert proc.returncode == 1, proc.stderr
    assert "no port map at" in proc.stderr
    assert "benchhub ports learn" in proc.stderr

    # relative to the config file, not to the working directory
    (config.parent / "ports.toml").write_text(
        f'{HEADER} 2025-01-01T00:00:00+00:00\n[cart-1]\n2 = "3-2.4.1"\n\n[gone]\n1 = "1-1.1"\n'
    )
    proc = benchhub("ports", "show", "--config", str(config), cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"port map {config.parent / 'ports.toml'}",
        "cart-1 (2 ports): 1 learned",
        "  port  2  3-2.4.1",
        "  not learned: 1 (the hub's own map or usb_path.<port>)",
        "sim-a (4 ports): 0 learned",
        "gone: in the map but not in the config (ignored)",
        "  port  1  1-1.1",
    ]

    (config.parent / "ports.toml").write_text('[cart-1]\nfirst = "3-2.4.1"\n')
    proc = benchhub("ports", "show", "--config", str(config), cwd=elsewhere)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"benchhub: config error: {config.parent / 'ports.toml'}: cart-1.first: ")


def test_describe_port_map_ranges() -> None:
    lines = describe_port_map({"hub-a": {2: "1-2.2", 3: "1-2.3", 9: "1-2.9"}}, {"hub-a": 8})
    assert lines == [
        "hub-a (8 ports): 2 learned",
        "  port  2  1-2.2",
        "  port  3  1-2.3",
        "  not learned: 1, 4-8 (the hub's own map or usb_path.<port>)",
        "  ignored: port(s) 9 (the hub has 8 ports)",
    ]


@pytest.mark.parametrize(
    ("port_map", "args", "message"),
    [
        (None, [], "set port_map in [station] of the config, or pass --output FILE"),
        ("ports.toml", ["--hub", "nope"], "--hub nope: no such hub in"),
        ("ports.toml", ["--hub", "sim-a"], "hub sim-a is simulated: no USB ports to learn"),
    ],
)
def test_ports_learn_usage_errors(
    tmp_path: Path, port_map: str | None, args: list[str], message: str
) -> None:
    config = write_config(tmp_path, port_map)
    proc = benchhub("ports", "learn", "--config", str(config), *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (config.parent / "ports.toml").exists()


def test_ports_show_without_a_configured_map_is_a_usage_error(tmp_path: Path) -> None:
    proc = benchhub("ports", "show", "--config", str(write_config(tmp_path, None)), cwd=tmp_path)
    assert proc.returncode == 2
    assert "set port_map in [station]" in proc.stderr


class Sink:
    """A thread-safe stdout for the CLI running in a worker thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        with self.lock:
            self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        with self.lock:
            return "".join(self.parts)


class CliBench:
    """`benchhub ports learn` in-process, in a worker thread: hotplug over the fake sysfs, stdin a
    real pipe, stdout a `Sink`."""

    def __init__(self, fake: FakeSysfs, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fake = fake
        self.read_fd, self.write_fd = os.pipe()
        self.sink = Sink()
        monkeypatch.setattr(
            cli,
            "open_hotplug",
            lambda **_: PollingHotplug(SysfsEnumerator(UsbSysfs(fake.root)), interval=0.02),
        )
        monkeypatch.setattr(sys, "stdin", SimpleNamespace(fileno=lambda: self.read_fd))
        self.monkeypatch = monkeypatch
        self.runs: list[threading.Thread] = []

    def run(self, *args: str) -> Callable[[], Any]:
        """Start `benchhub ARGS`; returns a coroutine function that waits for its exit code."""
        # here, not at set-up: pytest points sys.stdout at its own capture when the test starts
        self.monkeypatch.setattr(sys, "stdout", self.sink)
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(cli.main(list(args))), daemon=True)
        thread.start()
        self.runs.append(thread)

        async def exit_code() -> int:
            deadline = time.monotonic() + DEADLINE
            while thread.is_alive():
                assert time.monotonic() < deadline, f"benchhub {args} still running:\n{self.sink.text()}"
                await asyncio.sleep(0.005)
            return result[0]

        return exit_code

    def type(self, text: str) -> None:
        os.write(self.write_fd, text.encode())

    async def expect(self, text: str, after: int = 0) -> None:
        deadline = time.monotonic() + DEADLINE
        while text not in self.sink.text()[after:]:
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.sink.text()}"
            await asyncio.sleep(0.005)

    def close(self) -> None:
        os.close(self.write_fd)  # EOF: a wizard still running finishes
        for thread in self.runs:
            thread.join(DEADLINE)
        os.close(self.read_fd)


@pytest.fixture
def cli_bench(fake: FakeSysfs, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliBench]:
    bench = CliBench(fake, monkeypatch)
    try:
        yield bench
    finally:
        bench.close()


async def test_cli_learn_saves_the_map(tmp_path: Path, fake: FakeSysfs, cli_bench: CliBench) -> None:
    config = write_config(tmp_path)
    exit_code = cli_bench.run("ports", "learn", "--config", str(config))
    await cli_bench.expect("Skipping sim-a: simulated, no USB ports.")
    await cli_bench.expect("USB hotplug: polling sysfs")
    for port, path in ((1, "3-2.3"), (2, "3-2.1")):
        await cli_bench.expect(f"Plug a device into cart-1 port {port}")
        plug(fake, path)
        await cli_bench.expect(f"Unplug the device from cart-1 port {port}")
        fake.remove(path)
    assert await exit_code() == 0, cli_bench.sink.text()
    saved = config.parent / "ports.toml"
    assert load_port_map(saved) == {"cart-1": {1: "3-2.3", 2: "3-2.1"}}
    assert f"Saved 2 port(s) to {saved}." in cli_bench.sink.text()
    assert 'suggested usb_path = "3-2" (as configured)' in cli_bench.sink.text()

    # again, but the technician quits at once: exit 1, the file stays as it was
    before = saved.read_text()
    mark = len(cli_bench.sink.text())
    exit_code = cli_bench.run("ports", "learn", "--config", str(config))
    await cli_bench.expect("Plug a device into cart-1 port 1", after=mark)
    cli_bench.type("q\n")
    assert await exit_code() == 1
    assert saved.read_text() == before
    assert "Learned 0 port(s)." in cli_bench.sink.text()[mark:]


TERMINAL_CHILD = """
import sys
from daemon import cli
from daemon.usb.hotplug import PollingHotplug, SysfsEnumerator
from daemon.usb.sysfs import UsbSysfs

cli.open_hotplug = lambda **_: PollingHotplug(SysfsEnumerator(UsbSysfs(sys.argv[1])), interval=0.02)
sys.exit(cli.main(sys.argv[2:]))
"""


class Terminal:
    """`benchhub ports learn` in a child process whose stdin, stdout and stderr are a pseudo-terminal
    (canonical mode: the line discipline hands over whole lines, as at a real console)."""

    def __init__(self, fake: FakeSysfs, *args: str) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", TERMINAL_CHILD, str(fake.root), *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
        os.close(slave)
        self.output = b""

    async def expect(self, text: str, within: float = 20.0) -> None:
        """Read the terminal until `text` shows (the child's start-up takes a moment: imports)."""
        deadline = time.monotonic() + within
        while text.encode() not in self.output:
            assert time.monotonic() < deadline, f"no {text!r} on the terminal:\n{self.output.decode()}"
            ready, _, _ = select.select([self.master], [], [], 0)
            if ready:
                try:
                    self.output += os.read(self.master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    await asyncio.sleep(0.01)
            else:
                await asyncio.sleep(0.005)

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    async def exit_code(self) -> int:
        deadline = time.monotonic() + DEADLINE
        while (code := self.proc.poll()) is None:
            assert time.monotonic() < deadline, self.output.decode()
            await asyncio.sleep(0.01)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


async def test_cli_learn_at_a_terminal(tmp_path: Path, fake: FakeSysfs) -> None:
    config = write_config(tmp_path)
    terminal = Terminal(fake, "ports", "learn", "--config", str(config), "--hub", "cart-1")
    try:
        await terminal.expect("Plug a device into cart-1 port 1")
        plug(fake, "3-2.3")
        await terminal.expect("Unplug the device from cart-1 port 1")
        fake.remove("3-2.3")
        await terminal.expect("Plug a device into cart-1 port 2")
        terminal.type("\n")  # Enter: skip
        await terminal.expect("cart-1 port 2: skipped.")
        assert await terminal.exit_code() == 0, terminal.output.decode()
    finally:
        terminal.close()
    assert load_port_map(config.parent / "ports.toml") == {"cart-1": {1: "3-2.3"}}

    terminal = Terminal(fake, "ports", "learn", "--config", str(config))
    try:
        await terminal.expect("Plug a device into cart-1 port 1")
        terminal.proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert await terminal.exit_code() == 1
        await terminal.expect("interrupted; nothing saved")
    finally:
        terminal.close()
    assert load_port_map(config.parent / "ports.toml") == {"cart-1": {1: "3-2.3"}}
