"""Unmanaged USB hub driver (Datamation and other hubs without a control protocol).

The hub lives in a fake sysfs tree (tests/usbhub_fixtures/sysfs.py) laid out as Linux lays it
out; hub class control transfers go to a pyusb backend double (tests/usbhub_fixtures/pyusb.py)
through the real `usb.core` code path.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubdrivers.base import Capability, HubError, PortEventKind, PortMode, diff_ports
from hubdrivers.usbhub import (
    OverCurrentProtection,
    PortSpeed,
    PowerMechanism,
    PowerSwitching,
    UsbHubDriver,
    UsbParseError,
    parse_device_descriptor,
    parse_hub_descriptor,
    parse_port_status,
    parse_sysfs_descriptors,
)
from hubdrivers.usbhub import sysfs as sysfs_module
from tests.usbhub_fixtures.descriptors import (
    LPSM_GANGED,
    LPSM_INDIVIDUAL,
    LPSM_NONE,
    hub_descriptor,
    hub_sysfs_descriptors,
)
from tests.usbhub_fixtures.pyusb import FakeHubDevice, FakeUsbBackend
from tests.usbhub_fixtures.sysfs import FakeSysfs

APPLE = 0x05AC
IPHONE = 0x12A8


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def sysfs(tmp_path: Path) -> FakeSysfs:
    """Hub 1-2 (USB 2.0, 4 ports) with iPhones on ports 1 and 3."""
    tree = FakeSysfs(tmp_path / "sys/bus/usb/devices")
    tree.add_hub("1-2", 4)
    tree.add_device("1-2.1", vid=APPLE, pid=IPHONE, serial="00008030001A2B3C0E12802E")
    tree.add_device("1-2.3", vid=APPLE, pid=IPHONE, serial="00008101000A1B2C3D4E5F60")
    return tree


def fake_hub(tree: FakeSysfs, name: str, descriptor: bytes, **kwargs: Any) -> FakeHubDevice:
    """The pyusb-side twin of a sysfs hub (same bus number and device address)."""
    devnum = int((tree.root / name / "devnum").read_text())
    bus = int(name.split("-", maxsplit=1)[0])
    return FakeHubDevice(bus=bus, address=devnum, hub_descriptor=descriptor, **kwargs)


def driver_for(
    tree: FakeSysfs, backend: FakeUsbBackend | None, path: str = "1-2", ports: int | None = None
) -> UsbHubDriver:
    return UsbHubDriver(path, ports, sysfs_root=tree.root, usb_backend=backend, use_pyusb=backend is not None)


def disable(tree: FakeSysfs, hub: str, port: int) -> str:
    return tree.disable_writes(hub, port).strip()


# --------------------------------------------------------------- descriptor parsing


def test_usb2_hub_descriptor_with_individual_switching() -> None:
    desc = parse_hub_descriptor(hub_descriptor(4, LPSM_INDIVIDUAL, non_removable=[4]))
    assert desc.ports == 4
    assert not desc.superspeed
    assert desc.power_switching is PowerSwitching.INDIVIDUAL
    assert desc.per_port_power
    assert desc.over_current is OverCurrentProtection.INDIVIDUAL
    assert desc.power_on_to_good_ms == 100
    assert desc.non_removable == frozenset({4})


def test_superspeed_hub_descriptor() -> None:
    raw = bytes.fromhex("0c2a0409003200000000" + "0400")  # 4 ports, ppps, port 2 non-removable
    desc = parse_hub_descriptor(raw)
    assert desc.superspeed
    assert desc.ports == 4
    assert desc.per_port_power
    assert desc.non_removable == frozenset({2})
    assert not desc.port_indicators


@pytest.mark.parametrize(
    ("lpsm", "expected"),
    [
        (0b00, PowerSwitching.GANGED),
        (0b01, PowerSwitching.INDIVIDUAL),
        (0b10, PowerSwitching.NONE),
        (0b11, PowerSwitching.NONE),
    ],
)
def test_lpsm_bits_follow_usb2_table_11_13(lpsm: int, expected: PowerSwitching) -> None:
    desc = parse_hub_descriptor(hub_descriptor(4, lpsm))
    assert desc.power_switching is expected
    assert desc.per_port_power is (expected is PowerSwitching.INDIVIDUAL)


def test_ganged_switching_on_a_one_port_hub_is_per_port() -> None:
    assert parse_hub_descriptor(hub_descriptor(1, LPSM_GANGED)).per_port_power


def test_seven_port_and_eight_port_usb2_descriptors_size_their_bitmaps() -> None:
    seven = parse_hub_descriptor(hub_descriptor(7, non_removable=[7]))
    eight = parse_hub_descriptor(hub_descriptor(8, non_removable=[8]))
    assert hub_descriptor(7)[0] == 9  # 7 + 2 x 1 byte
    assert hub_descriptor(8)[0] == 11  # 7 + 2 x 2 bytes
    assert seven.non_removable == {7}
    assert eight.non_removable == {8}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "too short"),
        (bytes.fromhex("0929040900"), "truncated"),
        (bytes.fromhex("0904040900320000ff"), "not a hub descriptor"),
        (bytes.fromhex("0529040900320000ff"), "bDescLength"),
        (bytes.fromhex("0929000900320000ff"), "no ports"),
        (bytes.fromhex("0c2a1009003200000000" + "0000"), "max 15"),
    ],
)
def test_malformed_hub_descriptors(raw: bytes, message: str) -> None:
    with pytest.raises(UsbParseError, match=message):
        parse_hub_descriptor(raw)


def test_usb2_port_status_word() -> None:
    status = parse_port_status(bytes.fromhex("03050100"), superspeed=False)  # 0x0503, change 0x0001
    assert status.connected
    assert status.enabled
    assert status.powered
    assert status.speed is PortSpeed.HIGH
    assert status.change == 0x0001
    assert not status.over_current
    off = parse_port_status(bytes.fromhex("00000000"), superspeed=False)
    assert not off.powered
    assert off.speed is None
    low = parse_port_status((0x0303).to_bytes(2, "little") + b"\0\0", superspeed=False)
    assert low.speed is PortSpeed.LOW
    assert not parse_port_status((0x0301 | 0x0008).to_bytes(2, "little") + b"\0\0", False).enabled


def test_superspeed_port_status_uses_bit_9_for_power() -> None:
    ss = parse_port_status((0x0203).to_bytes(2, "little") + b"\0\0", superspeed=True)
    assert ss.powered
    assert ss.connected
    assert ss.link_state == 0  # U0
    assert ss.speed is PortSpeed.SUPER
    # 0x0100 is a link-state bit on USB3 (Recovery), not power
    assert not parse_port_status((0x0100).to_bytes(2, "little") + b"\0\0", superspeed=True).powered
    u3 = parse_port_status((0x0200 | 0x0060).to_bytes(2, "little") + b"\0\0", superspeed=True)
    assert u3.suspended


@pytest.mark.parametrize("length", [0, 3, 5, 8])
def test_port_status_must_be_four_bytes(length: int) -> None:
    with pytest.raises(UsbParseError):
        parse_port_status(bytes(length), superspeed=False)


@pytest.mark.parametrize("superspeed", [False, True])
def test_sysfs_descriptors_hold_device_and_config_but_no_hub_descriptor(superspeed: bool) -> None:
    raw = parse_sysfs_descriptors(hub_sysfs_descriptors(0x05E3, 0x0610, superspeed=superspeed))
    assert raw.device.is_hub
    assert raw.device.superspeed_hub is superspeed
    assert raw.device.vendor_id == 0x05E3
    assert raw.has_hub_interface
    (config,) = raw.configurations
    (interface,) = config.interfaces
    assert interface.interface_class == 0x09
    assert [e.address for e in interface.endpoints] == [0x81]
    assert 0x29 not in _descriptor_types(hub_sysfs_descriptors(0x05E3, 0x0610, superspeed=superspeed))


def _descriptor_types(data: bytes) -> list[int]:
    types, offset = [], 0
    while offset < len(data):
        types.append(data[offset + 1])
        offset += data[offset]
    return types


@given(st.binary(max_size=300))
def test_hub_descriptor_parser_raises_only_its_error(data: bytes) -> None:
    try:
        desc = parse_hub_descriptor(data)
    except UsbParseError:
        return
    assert 1 <= desc.ports <= 255
    assert desc.non_removable <= frozenset(range(1, desc.ports + 1))


@given(st.binary(min_size=2, max_size=80).map(lambda b: bytes([b[0], 0x29 | (b[1] & 1) * 3]) + b[2:]))
def test_hub_descriptor_parser_on_hub_typed_noise(data: bytes) -> None:
    with contextlib.suppress(UsbParseError):
        parse_hub_descriptor(data)


@given(st.binary(max_size=16), st.booleans())
def test_port_status_parser_raises_only_its_error(data: bytes, superspeed: bool) -> None:
    try:
        status = parse_port_status(data, superspeed)
    except UsbParseError:
        return
    assert status.powered in (True, False)
    assert status.speed is None or isinstance(status.speed, PortSpeed)


@given(st.binary(max_size=200))
def test_device_descriptor_parsers_raise_only_their_error(data: bytes) -> None:
    for parse in (parse_device_descriptor, parse_sysfs_descriptors):
        with contextlib.suppress(UsbParseError):
            parse(data)


@given(st.binary(max_size=120))
def test_sysfs_descriptor_parser_on_noise_after_a_real_device_descriptor(tail: bytes) -> None:
    data = hub_sysfs_descriptors(0x05E3, 0x0610)[:18] + tail
    try:
        raw = parse_sysfs_descriptors(data)
    except UsbParseError:
        return
    assert raw.device.is_hub


@given(
    st.integers(1, 255),
    st.sampled_from([LPSM_GANGED, LPSM_INDIVIDUAL, LPSM_NONE]),
    st.sets(st.integers(1, 255)),
)
def test_hub_descriptor_round_trip(ports: int, lpsm: int, non_removable: set[int]) -> None:
    wanted = {p for p in non_removable if p <= ports}
    desc = parse_hub_descriptor(hub_descriptor(ports, lpsm, non_removable=wanted))
    assert desc.ports == ports
    assert desc.power_switching is PowerSwitching(lpsm)
    assert desc.non_removable == wanted


# ------------------------------------------------------------------------------ probing


async def test_individual_switching_and_writable_disable_files_give_port_power(sysfs: FakeSysfs) -> None:
    hub = fake_hub(sysfs, "1-2", hub_descriptor(4, LPSM_INDIVIDUAL))
    backend = FakeUsbBackend(hub)
    driver = driver_for(sysfs, backend, ports=4)

    info = await driver.open()

    assert driver.capabilities == {Capability.PORT_POWER}
    assert Capability.ATTACH_SENSE not in driver.capabilities
    assert info.capabilities == driver.capabilities
    assert info.port_count == 4
    assert info.model == "GenesysLogic USB2.1 Hub [05e3:0610]"
    assert info.firmware == "6.60"
    assert info.serial == "1-2"  # the hub has no serial string: its stable USB path stands in
    assert driver.probe is not None
    assert driver.probe.halves[0].mechanism is PowerMechanism.SYSFS
    # the switching mode came from a class GET_DESCRIPTOR(0x29) to the hub itself
    (request,) = backend.requests
    assert (request.bmRequestType, request.bRequest, request.wValue, request.wIndex) == (0xA0, 6, 0x2900, 0)
    assert backend.open_handles == 0  # sysfs switches power; no libusb handle is kept
    await driver.close()


@pytest.mark.parametrize(("lpsm", "word"), [(LPSM_GANGED, "ganged"), (LPSM_NONE, "none")])
async def test_ganged_or_unswitched_hub_has_no_port_power(sysfs: FakeSysfs, lpsm: int, word: str) -> None:
    backend = FakeUsbBackend(fake_hub(sysfs, "1-2", hub_descriptor(4, lpsm)))
    driver = driver_for(sysfs, backend)
    await driver.open()

    assert driver.capabilities == frozenset()
    assert driver.probe is not None
    assert f"reports {word} power switching" in driver.probe.reason
    with pytest.raises(HubError, match="cannot switch port power"):
        await driver.set_mode(1, PortMode.OFF)
    assert disable(sysfs, "1-2", 1) == "0"
    assert [r.bRequest for r in backend.requests] == [6]  # nothing but the descriptor read
    await driver.close()


async def test_without_the_hub_descriptor_power_is_not_claimed_even_with_disable_files(
    sysfs: FakeSysfs,
) -> None:
    """sysfs has no hub descriptor; the kernel creates `disable` on every hub, switching or not."""
    denied = FakeUsbBackend(fake_hub(sysfs, "1-2", hub_descriptor(4), deny_open=True))
    for driver, why in (
        (driver_for(sysfs, denied), "Access denied"),
        (driver_for(sysfs, None), "pyusb disabled"),
    ):
        await driver.open()
        assert driver.capabilities == frozenset()
        assert driver.probe is not None
        assert "power switching mode unknown" in driver.probe.reason
        assert why in driver.probe.reason
        with pytest.raises(HubError):
            await driver.set_mode(3, PortMode.OFF)
        await driver.close()


async def test_missing_hub_fails_open_with_a_clear_message(tmp_path: Path) -> None:
    tree = FakeSysfs(tmp_path / "devices")
    driver = UsbHubDriver("1-2", sysfs_root=tree.root, use_pyusb=False)
    with pytest.raises(HubError, match=r"no USB device at 1-2 .*unplugged"):
        await driver.open()
    await driver.close()  # safe after a failed open
    with pytest.raises(HubError, match="not open"):
        await driver.poll()


async def test_open_refuses_a_device_that_is_not_a_hub(tmp_path: Path) -> None:
    tree = FakeSysfs(tmp_path / "devices")
    tree.add_device("1-2")
    with pytest.raises(HubError, match="not a hub"):
        await UsbHubDriver("1-2", sysfs_root=tree.root, use_pyusb=False).open()


async def test_open_refuses_a_port_count_mismatch(sysfs: FakeSysfs) -> None:
    with pytest.raises(HubError, match="has 4 ports, the configuration says 7"):
        await driver_for(sysfs, None, ports=7).open()


@pytest.mark.parametrize("path", ["usb1", "1-0:1.0", "1-2.", "", "1-2-port1", "0-1"])
def test_constructor_rejects_non_device_paths(path: str) -> None:
    with pytest.raises(ValueError, match="not a USB hub path"):
        UsbHubDriver(path)


# -------------------------------------------------------------------------------- poll


async def test_poll_reports_enumerated_children_and_diff_gives_attach_detach(sysfs: FakeSysfs) -> None:
    driver = driver_for(sysfs, None)
    await driver.open()

    first = await driver.poll()
    assert [(s.port, s.attached, s.mode, s.current_ma) for s in first] == [
        (1, True, PortMode.SYNC, 0),
        (2, False, PortMode.SYNC, 0),
        (3, True, PortMode.SYNC, 0),
        (4, False, PortMode.SYNC, 0),
    ]
    events = diff_ports({}, first)
    assert [(e.port, e.kind) for e in events] == [
        (1, PortEventKind.ATTACHED),
        (2, PortEventKind.DETACHED),
        (3, PortEventKind.ATTACHED),
        (4, PortEventKind.DETACHED),
    ]

    sysfs.add_device("1-2.2")
    sysfs.remove("1-2.1")
    second = await driver.poll()
    events = diff_ports({s.port: s for s in first}, second)
    assert [(e.port, e.kind) for e in events] == [(1, PortEventKind.DETACHED), (2, PortEventKind.ATTACHED)]
    assert await driver.port_paths() == {1: "1", 2: "2", 3: "3", 4: "4"}
    await driver.close()


async def test_poll_fails_when_the_hub_leaves_or_re_enumerates(sysfs: FakeSysfs) -> None:
    driver = driver_for(sysfs, None)
    await driver.open()
    (sysfs.root / "1-2" / "devnum").write_text("77\n")
    with pytest.raises(HubError, match="re-enumerated"):
        await driver.poll()
    sysfs.remove("1-2")
    with pytest.raises(HubError, match="disappeared"):
        await driver.poll()


# --------------------------------------------------------------------------- port power


async def test_power_cycle_writes_1_then_0_to_the_ports_disable_file(sysfs: FakeSysfs) -> None:
    backend = FakeUsbBackend(fake_hub(sysfs, "1-2", hub_descriptor(4)))
    driver = driver_for(sysfs, backend)
    await driver.open()
    writes: list[tuple[str, int, bool]] = []
    real_write = sysfs_module.SysfsUsb.write_disabled

    def recording(self: sysfs_module.SysfsUsb, hub: str, port: int, disabled: bool) -> None:
        writes.append((hub, port, disabled))
        real_write(self, hub, port, disabled)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sysfs_module.SysfsUsb, "write_disabled", recording)
        await driver.set_mode(3, PortMode.OFF)
        assert disable(sysfs, "1-2", 3) == "1"
        assert [s.mode for s in await driver.poll()] == [
            PortMode.SYNC,
            PortMode.SYNC,
            PortMode.OFF,
            PortMode.SYNC,
        ]
        await driver.set_mode(3, PortMode.SYNC)

    assert writes == [("1-2", 3, True), ("1-2", 3, False)]
    assert [disable(sysfs, "1-2", n) for n in (1, 2, 3, 4)] == ["0", "0", "0", "0"]
    assert [s.mode for s in await driver.poll()] == [PortMode.SYNC] * 4
    assert [r.bRequest for r in backend.requests] == [6]  # no hub class power requests
    await driver.close()


async def test_usb3_hub_switches_both_halves_through_peer_links(sysfs: FakeSysfs) -> None:
    sysfs.add_hub("2-2", 4, superspeed=True)
    sysfs.link_peers("1-2", "2-2", 4)
    sysfs.add_device("2-2.4", vid=APPLE, pid=0x12A8)  # a USB-C iPhone enumerating at SuperSpeed
    backend = FakeUsbBackend(
        fake_hub(sysfs, "1-2", hub_descriptor(4)),
        fake_hub(sysfs, "2-2", hub_descriptor(4, superspeed=True), superspeed=True),
    )
    driver = driver_for(sysfs, backend)
    await driver.open()

    assert driver.capabilities == {Capability.PORT_POWER}
    assert driver.probe is not None
    assert [h.name for h in driver.probe.halves] == ["1-2", "2-2"]
    assert [(r.address, r.wValue) for r in backend.requests] == [
        (backend.hubs[0].address, 0x2900),
        (backend.hubs[1].address, 0x2A00),  # SuperSpeed hub descriptor from the SuperSpeed half
    ]
    assert [s.attached for s in await driver.poll()] == [True, False, True, True]

    await driver.set_mode(2, PortMode.OFF)
    assert (disable(sysfs, "1-2", 2), disable(sysfs, "2-2", 2)) == ("1", "1")
    assert {disable(sysfs, hub, n) for hub in ("1-2", "2-2") for n in (1, 3, 4)} == {"0"}
    await driver.set_mode(2, PortMode.SYNC)
    assert (disable(sysfs, "1-2", 2), disable(sysfs, "2-2", 2)) == ("0", "0")
    await driver.close()


async def test_configuring_the_superspeed_half_also_finds_the_usb2_half(sysfs: FakeSysfs) -> None:
    sysfs.add_hub("2-2", 4, superspeed=True)
    sysfs.link_peers("1-2", "2-2", 4)
    backend = FakeUsbBackend(
        fake_hub(sysfs, "1-2", hub_descriptor(4)),
        fake_hub(sysfs, "2-2", hub_descriptor(4, superspeed=True), superspeed=True),
    )
    driver = driver_for(sysfs, backend, path="2-2")
    await driver.open()
    assert driver.capabilities == {Capability.PORT_POWER}
    assert [s.attached for s in await driver.poll()] == [True, False, True, False]  # via 1-2.1, 1-2.3
    await driver.set_mode(1, PortMode.OFF)
    assert (disable(sysfs, "2-2", 1), disable(sysfs, "1-2", 1)) == ("1", "1")
    await driver.close()


async def test_superspeed_hub_without_peers_does_not_claim_power(sysfs: FakeSysfs) -> None:
    sysfs.add_hub("2-2", 4, superspeed=True)
    backend = FakeUsbBackend(fake_hub(sysfs, "2-2", hub_descriptor(4, superspeed=True), superspeed=True))
    driver = driver_for(sysfs, backend, path="2-2")
    await driver.open()
    assert driver.capabilities == frozenset()
    assert driver.probe is not None
    assert "USB 2.0 half" in driver.probe.reason
    await driver.close()


async def test_usb3_hub_whose_other_half_gangs_does_not_claim_power(sysfs: FakeSysfs) -> None:
    sysfs.add_hub("2-2", 4, superspeed=True)
    sysfs.link_peers("1-2", "2-2", 4)
    backend = FakeUsbBackend(
        fake_hub(sysfs, "1-2", hub_descriptor(4)),
        fake_hub(sysfs, "2-2", hub_descriptor(4, LPSM_GANGED, superspeed=True), superspeed=True),
    )
    driver = driver_for(sysfs, backend)
    await driver.open()
    assert driver.capabilities == frozenset()
    assert driver.probe is not None
    assert "2-2: hub descriptor reports ganged" in driver.probe.reason
    await driver.close()


async def test_without_disable_files_pyusb_sends_clear_and_set_port_power(tmp_path: Path) -> None:
    tree = FakeSysfs(tmp_path / "devices")
    tree.add_hub("1-2", 4, disable_files=False)  # Linux < 6.0
    hub = fake_hub(tree, "1-2", hub_descriptor(4))
    backend = FakeUsbBackend(hub)
    driver = driver_for(tree, backend)
    await driver.open()
    assert driver.capabilities == {Capability.PORT_POWER}
    assert driver.probe is not None
    assert driver.probe.halves[0].mechanism is PowerMechanism.PYUSB
    backend.requests.clear()

    await driver.set_mode(3, PortMode.OFF)
    assert hub.port_status[3] & 0x0100 == 0
    assert [s.mode for s in await driver.poll()][2] is PortMode.OFF
    await driver.set_mode(3, PortMode.SYNC)
    assert hub.port_status[3] & 0x0100

    assert [(r.bmRequestType, r.bRequest, r.wValue, r.wIndex) for r in backend.requests] == [
        (0x23, 1, 8, 3),  # CLEAR_FEATURE(PORT_POWER), port 3
        (0xA3, 0, 0, 3),  # GET_STATUS(port 3): power really off?
        (0x23, 3, 8, 3),  # SET_FEATURE(PORT_POWER), port 3
        (0xA3, 0, 0, 3),
    ]
    assert backend.open_handles == 1
    await driver.close()
    assert backend.open_handles == 0


async def test_unwritable_disable_files_fall_back_to_pyusb(
    sysfs: FakeSysfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("os.access", lambda path, mode: False)  # as a non-root user would see it
    backend = FakeUsbBackend(fake_hub(sysfs, "1-2", hub_descriptor(4)))
    driver = driver_for(sysfs, backend)
    await driver.open()
    assert driver.probe is not None
    assert driver.probe.halves[0].mechanism is PowerMechanism.PYUSB
    await driver.set_mode(1, PortMode.OFF)
    assert disable(sysfs, "1-2", 1) == "0"
    assert backend.requests[-2].bRequest == 1
    await driver.close()


async def test_a_hub_that_ignores_port_power_is_caught(tmp_path: Path) -> None:
    tree = FakeSysfs(tmp_path / "devices")
    tree.add_hub("1-2", 4, disable_files=False)
    backend = FakeUsbBackend(fake_hub(tree, "1-2", hub_descriptor(4), switches=False))
    driver = driver_for(tree, backend)
    await driver.open()
    with pytest.raises(HubError, match="does not really switch"):
        await driver.set_mode(2, PortMode.OFF)
    await driver.close()


async def test_ports_chaining_a_hub_are_never_switched(sysfs: FakeSysfs) -> None:
    sysfs.add_device("1-2.2", vid=0x05E3, pid=0x0608, device_class=0x09)  # an internal hub chip
    backend = FakeUsbBackend(fake_hub(sysfs, "1-2", hub_descriptor(4)))
    driver = driver_for(sysfs, backend)
    await driver.open()
    assert driver.capabilities == {Capability.PORT_POWER}
    assert driver.probe is not None
    assert driver.probe.refused_ports == {2}

    with pytest.raises(HubError, match="chains a hub"):
        await driver.set_mode(2, PortMode.OFF)
    assert disable(sysfs, "1-2", 2) == "0"

    sysfs.add_device("1-2.4", device_class=0x09)  # a hub plugged in after open
    with pytest.raises(HubError, match="chains a hub"):
        await driver.set_mode(4, PortMode.OFF)
    sysfs.remove("1-2.4")
    with pytest.raises(HubError, match="chains a hub"):  # still refused: it was a hub port once
        await driver.set_mode(4, PortMode.OFF)
    assert disable(sysfs, "1-2", 4) == "0"

    await driver.set_mode(1, PortMode.OFF)  # the others still switch
    assert disable(sysfs, "1-2", 1) == "1"
    await driver.close()


async def test_non_removable_ports_are_never_switched(sysfs: FakeSysfs) -> None:
    backend = FakeUsbBackend(fake_hub(sysfs, "1-2", hub_descriptor(4, non_removable=[4])))
    driver = driver_for(sysfs, backend)
    await driver.open()
    with pytest.raises(HubError, match="built-in device"):
        await driver.set_mode(4, PortMode.OFF)
    await driver.close()


async def test_a_hub_whose_ports_all_chain_hubs_has_no_port_power(tmp_path: Path) -> None:
    tree = FakeSysfs(tmp_path / "devices")
    tree.add_hub("1-2", 2)
    tree.add_hub("1-2.1", 4)
    tree.add_hub("1-2.2", 4)
    driver = driver_for(tree, FakeUsbBackend(fake_hub(tree, "1-2", hub_descriptor(2))))
    await driver.open()
    assert driver.capabilities == frozenset()
    assert driver.probe is not None
    assert "every port chains a hub" in driver.probe.reason
    assert [s.attached for s in await driver.poll()] == [True, True]
    await driver.close()


@pytest.mark.parametrize("mode", [PortMode.CHARGE, PortMode.BIASED])
async def test_charge_and_biased_modes_are_not_supported(sysfs: FakeSysfs, mode: PortMode) -> None:
    driver = driver_for(sysfs, FakeUsbBackend(fake_hub(sysfs, "1-2", hub_descriptor(4))))
    await driver.open()
    with pytest.raises(HubError, match="only switch port power"):
        await driver.set_mode(1, mode)
    with pytest.raises(HubError, match="does not exist"):
        await driver.set_mode(5, PortMode.OFF)
    await driver.close()


async def test_leds_are_not_supported(sysfs: FakeSysfs) -> None:
    from hubdrivers.base import LedPattern

    driver = driver_for(sysfs, None)
    await driver.open()
    with pytest.raises(HubError, match="no per-port LEDs"):
        await driver.set_led(1, LedPattern.SOLID)


async def test_malformed_sysfs_attributes_are_a_hub_error(sysfs: FakeSysfs) -> None:
    (sysfs.root / "1-2" / "maxchild").write_text("four\n")
    with pytest.raises(HubError, match="cannot probe USB hub 1-2"):
        await driver_for(sysfs, None).open()


async def test_a_failed_half_rolls_the_other_half_back_on(tmp_path: Path) -> None:
    tree = FakeSysfs(tmp_path / "devices")
    tree.add_hub("1-2", 4)
    tree.add_hub("2-2", 4, superspeed=True, disable_files=False)  # switched with pyusb instead
    tree.link_peers("1-2", "2-2", 4)
    backend = FakeUsbBackend(
        fake_hub(tree, "1-2", hub_descriptor(4)),
        fake_hub(tree, "2-2", hub_descriptor(4, superspeed=True), superspeed=True, switches=False),
    )
    driver = driver_for(tree, backend)
    await driver.open()
    assert driver.probe is not None
    assert [h.mechanism for h in driver.probe.halves] == [PowerMechanism.SYSFS, PowerMechanism.PYUSB]

    with pytest.raises(HubError, match=r"2-2 port 3 .*does not really switch"):
        await driver.set_mode(3, PortMode.OFF)
    assert disable(tree, "1-2", 3) == "0"  # the USB 2.0 half was powered back on
    assert [s.mode for s in await driver.poll()][2] is PortMode.SYNC
    await driver.close()
