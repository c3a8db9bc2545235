"""Our usbmuxd Listen client (`daemon.usb.usbmux`) against the simulated usbmuxd, and its parser."""

from __future__ import annotations

import asyncio
import plistlib
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.ios.base import DeviceInfo
from daemon.sim.devices import make_device
from daemon.sim.usbmuxd import FakeUsbmuxd
from daemon.usb.usbmux import (
    UsbmuxAttached,
    UsbmuxClient,
    UsbmuxDetached,
    UsbmuxEvent,
    list_devices,
    location_to_bus_devnum,
    resolve_address,
)
from daemon.usb.usbmux_protocol import (
    PacketDecoder,
    UsbmuxProtocolError,
    decode_plist,
    encode_packet,
    encode_plist,
    parse_device_message,
)


def device(index: int) -> DeviceInfo:
    return make_device(11, index).info()


@pytest.fixture
async def mux(socket_path: Path) -> AsyncIterator[FakeUsbmuxd]:
    fake = FakeUsbmuxd(socket_path)
    await fake.start()
    yield fake
    await fake.stop()


def client(mux: FakeUsbmuxd) -> UsbmuxClient:
    return UsbmuxClient(mux.socket_path, settle=0.05, reply_timeout=1.0, backoff=lambda _n: 0.05)


async def take(events: AsyncIterator[UsbmuxEvent], count: int, wait: float = 2.0) -> list[UsbmuxEvent]:
    return [await asyncio.wait_for(anext(events), wait) for _ in range(count)]


async def nothing_more(events: AsyncIterator[UsbmuxEvent], wait: float = 0.2) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(events), wait)


async def test_attach_detach_stream(mux: FakeUsbmuxd) -> None:
    a, b = device(0), device(1)
    first = mux.attach(a, "3-2.1")
    assert first is not None
    c = client(mux)
    async with aclosing(c.events()) as events:
        (initial,) = await take(events, 1)
        assert initial == UsbmuxAttached(
            first.device_id, a.udid, first.location_id, 0x12A8, "USB", 480_000_000
        )
        assert location_to_bus_devnum(initial.location_id) == (3, 2)
        second = mux.attach(b, "3-2.2")
        assert second is not None
        (attached,) = await take(events, 1)
        assert isinstance(attached, UsbmuxAttached)
        assert (attached.device_id, attached.udid, attached.location_id) == (
            second.device_id,
            b.udid,
            second.location_id,
        )
        mux.detach(usb_path="3-2.1")
        (detached,) = await take(events, 1)
        assert detached == UsbmuxDetached(first.device_id, a.udid, first.location_id, 0x12A8)
        assert set(c.devices) == {second.device_id}


async def test_reattach_gets_new_device_id(mux: FakeUsbmuxd) -> None:
    a = device(0)
    mux.attach(a, "1-1.3")
    c = client(mux)
    async with aclosing(c.events()) as events:
        got = await take(events, 1)
        mux.attach(a, "1-1.3")  # re-enumeration (erase, reboot, trust)
        got += await take(events, 2)
        assert [type(e).__name__ for e in got] == ["UsbmuxAttached", "UsbmuxDetached", "UsbmuxAttached"]
        assert got[0].device_id == got[1].device_id < got[2].device_id
        assert got[0].location_id != got[2].location_id  # a new devnum too
        assert {e.udid for e in got} == {a.udid}


async def test_network_devices_are_ignored(mux: FakeUsbmuxd) -> None:
    mux.attach(device(0), "1-1.1", connection_type="Network")
    c = client(mux)
    async with aclosing(c.events()) as events:
        usb = mux.attach(device(1), "1-1.2")
        mux.attach(device(2), "1-1.3", connection_type="Network")
        mux.detach(usb_path="1-1.1")
        usb2 = mux.attach(device(3), "1-1.4")
        got = await take(events, 2)
        assert usb is not None
        assert usb2 is not None
        assert [e.device_id for e in got] == [usb.device_id, usb2.device_id]
        await nothing_more(events)


@pytest.mark.parametrize("renumber", [False, True])
async def test_usbmuxd_restart_resynchronises(mux: FakeUsbmuxd, renumber: bool) -> None:
    stays, leaves, arrives = device(0), device(1), device(2)
    gone = mux.attach(leaves, "1-1.2")
    kept = mux.attach(stays, "1-1.1")  # renumbered from 2 to 1 by a new usbmuxd process
    assert kept is not None
    assert gone is not None
    c = client(mux)
    async with aclosing(c.events()) as events:
        assert len(await take(events, 2)) == 2
        await mux.stop()
        mux.detach(usb_path="1-1.2")  # while usbmuxd is down
        new = mux.attach(arrives, "1-1.3")
        await asyncio.sleep(0.15)  # at least one failed reconnect
        await mux.start(renumber=renumber)
        got = await take(events, 4 if renumber else 2)
        await nothing_more(events)
    assert c.connects == 2
    assert new is not None
    detached = [e for e in got if isinstance(e, UsbmuxDetached)]
    attached = [e for e in got if isinstance(e, UsbmuxAttached)]
    # Every Detached comes before every Attached, so a consumer never sees a UDID go after it came back.
    assert got == [*detached, *attached]
    if renumber:  # a new usbmuxd process: the device that stayed has a new DeviceID (which the
        # device that left used to have): reported as gone and back, the honest usbmux-level view
        assert {e.udid for e in detached} == {stays.udid, leaves.udid}
        assert {e.udid for e in attached} == {stays.udid, arrives.udid}
    else:
        assert detached == [UsbmuxDetached(gone.device_id, leaves.udid, gone.location_id, 0x12A8)]
        assert [(e.device_id, e.udid) for e in attached] == [(new.device_id, arrives.udid)]
    assert {d.udid for d in c.devices.values()} == {stays.udid, arrives.udid}


async def test_starts_before_usbmuxd(socket_path: Path) -> None:
    fake = FakeUsbmuxd(socket_path)
    fake.attach(device(0), "2-1")
    c = UsbmuxClient(str(socket_path), settle=0.05, backoff=lambda _n: 0.05)
    async with aclosing(c.events()) as events:
        pending = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.15)
        assert not pending.done()
        await fake.start()
        try:
            event = await asyncio.wait_for(pending, 2)
            assert isinstance(event, UsbmuxAttached)
        finally:
            await fake.stop()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 16,  # length 0
        b"\xff\xff\xff\x7f" + b"\x00" * 12,  # absurd length
        encode_packet(1, 8, 0, b"<plist>not xml"),
        encode_plist({"MessageType": "Attached", "DeviceID": "x"}, 0),
        encode_plist({"MessageType": "Surprise"}, 0),
        encode_packet(0, 4, 0, b"\x01\x00"),  # binary DEVICE_ADD
    ],
    ids=["length-0", "length-huge", "bad-xml", "bad-device-id", "unknown-type", "binary"],
)
async def test_malformed_packet_resets_connection(mux: FakeUsbmuxd, garbage: bytes) -> None:
    a = device(0)
    entry = mux.attach(a, "1-1.1")
    c = client(mux)
    async with aclosing(c.events()) as events:
        await take(events, 1)
        assert mux.inject(garbage) == 1
        b = mux.attach(device(1), "1-1.2")
        # Whether or not the Attached got through before the reset, it is reported exactly once.
        (event,) = await take(events, 1)
        assert b is not None
        assert event.device_id == b.device_id
        await nothing_more(events)
        assert entry is not None
        assert set(c.devices) == {entry.device_id, b.device_id}
    assert c.connects == 2


async def test_paired_is_not_an_event(mux: FakeUsbmuxd) -> None:
    entry = mux.attach(device(0), "1-1.1")
    assert entry is not None
    c = client(mux)
    async with aclosing(c.events()) as events:
        await take(events, 1)
        mux.inject_plist({"MessageType": "Paired", "DeviceID": entry.device_id})
        await nothing_more(events)
        assert c.connects == 1


async def test_one_shot_list_devices(mux: FakeUsbmuxd) -> None:
    entry = mux.attach(device(0), "5-1.2")
    assert entry is not None
    (listed,) = await list_devices(str(mux.socket_path))
    assert (listed.udid, listed.location_id, listed.product_id) == (entry.udid, entry.location_id, 0x12A8)


def test_resolve_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("USBMUXD_SOCKET_ADDRESS", raising=False)
    assert resolve_address() == "/var/run/usbmuxd"
    monkeypatch.setenv("USBMUXD_SOCKET_ADDRESS", "/tmp/x")
    assert resolve_address() == "/tmp/x"
    monkeypatch.setenv("USBMUXD_SOCKET_ADDRESS", "UNIX:/tmp/y")
    assert resolve_address() == "/tmp/y"
    monkeypatch.setenv("USBMUXD_SOCKET_ADDRESS", "127.0.0.1:27015")
    assert resolve_address() == ("127.0.0.1", 27015)
    assert resolve_address("/explicit") == "/explicit"


def test_location_to_bus_devnum() -> None:
    assert location_to_bus_devnum((3 << 16) | 17) == (3, 17)
    assert location_to_bus_devnum(0x1000B) == (1, 11)  # from a usbmuxd #216 log


def _parse_all(data: bytes, chunk: int) -> None:
    decoder = PacketDecoder()
    for start in range(0, len(data), chunk):
        for packet in decoder.feed(data[start : start + chunk]):
            parse_device_message(decode_plist(packet))


VALID = encode_plist(
    {
        "MessageType": "Attached",
        "DeviceID": 4,
        "Properties": {
            "ConnectionSpeed": 480000000,
            "ConnectionType": "USB",
            "DeviceID": 4,
            "LocationID": 0x30005,
            "ProductID": 0x12A8,
            "SerialNumber": "00008030-0001D0A1E001B75B",
        },
    },
    0,
)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=300), chunk=st.integers(1, 64))
def test_fuzz_parser_random_bytes(data: bytes, chunk: int) -> None:
    with suppress(UsbmuxProtocolError):
        _parse_all(data, chunk)


@settings(max_examples=400, deadline=None)
@given(
    flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, len(VALID)),
    chunk=st.integers(1, 64),
)
def test_fuzz_parser_mutated_packets(flips: list[tuple[int, int]], cut: int, chunk: int) -> None:
    data = bytearray(VALID)
    for index, value in flips:
        data[index] = value
    with suppress(UsbmuxProtocolError):
        _parse_all(bytes(data[:cut]) + VALID, chunk)


@settings(max_examples=200, deadline=None)
@given(
    body=st.dictionaries(
        st.sampled_from(["MessageType", "DeviceID", "Properties", "Number"]),
        st.one_of(
            st.sampled_from(["Attached", "Detached", "Paired", "Result"]),
            st.integers(-(2**63), 2**64 - 1),
            st.booleans(),
            st.dictionaries(
                st.sampled_from(
                    ["SerialNumber", "LocationID", "ProductID", "ConnectionType", "ConnectionSpeed"]
                ),
                st.one_of(st.text(max_size=5), st.integers(-5, 2**40), st.binary(max_size=3)),
            ),
        ),
    )
)
def test_fuzz_parser_wrong_types(body: dict[str, object]) -> None:
    try:
        payload = plistlib.dumps(body)
    except (OverflowError, TypeError, ValueError):  # not representable in a plist
        return
    with suppress(UsbmuxProtocolError):
        _parse_all(encode_packet(1, 8, 0, payload), 1000)
