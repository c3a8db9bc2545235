"""The simulated usbmuxd + lockdownd, driven by pymobiledevice3's own client, unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import plistlib
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymobiledevice3 import usbmux
from pymobiledevice3.exceptions import (
    BadDevError,
    ConnectionFailedError,
    ConnectionFailedToUsbmuxdError,
    ConnectionTerminatedError,
    GetProhibitedError,
)
from pymobiledevice3.lockdown import create_using_usbmux

from daemon.ios.base import DeviceInfo, DeviceMode
from daemon.sim.devices import make_device
from daemon.sim.usbmuxd import FakeUsbmuxd
from daemon.usb.usbmux_protocol import HEADER, encode_packet, encode_plist, location_to_bus_devnum


def device(index: int, seed: int = 7) -> DeviceInfo:
    return make_device(seed, index).info()


@pytest.fixture
async def mux(
    socket_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[FakeUsbmuxd]:
    monkeypatch.setenv("USBMUXD_SOCKET_ADDRESS", str(socket_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    fake = FakeUsbmuxd(socket_path)
    await fake.start()
    yield fake
    await fake.stop()


async def raw_request(path: Path, packet: bytes) -> dict[str, object] | bytes:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(packet)
        header = await asyncio.wait_for(reader.readexactly(16), 2)
        length, version, _message, _tag = HEADER.unpack(header)
        body = await reader.readexactly(length - 16)
        return plistlib.loads(body) if version == 1 else header + body
    finally:
        writer.close()


async def test_list_devices_with_pymobiledevice3(mux: FakeUsbmuxd) -> None:
    a, b = device(0), device(1)
    mux.attach(a, "3-2.1")
    mux.attach(b, "3-2.2")
    found = await asyncio.wait_for(usbmux.list_devices(), 2)
    assert [(d.serial, d.connection_type) for d in found] == [(a.udid, "USB"), (b.udid, "USB")]
    assert mux.requests == ["ReadBUID", "ListDevices"]  # the version probe, then the request


async def test_listen_with_pymobiledevice3(mux: FakeUsbmuxd) -> None:
    a, b = device(0), device(1)
    mux.attach(a, "3-2.1")
    conn = await usbmux.create_mux()
    try:
        await conn.listen()
        await asyncio.wait_for(conn.receive_device_state_update(), 2)
        assert [d.serial for d in conn.devices] == [a.udid]
        entry = mux.attach(b, "3-2.2")
        assert entry is not None
        await asyncio.wait_for(conn.receive_device_state_update(), 2)
        assert {d.serial for d in conn.devices} == {a.udid, b.udid}
        mux.detach(usb_path="3-2.1")
        await asyncio.wait_for(conn.receive_device_state_update(), 2)
        assert [d.devid for d in conn.devices] == [entry.device_id]
    finally:
        await conn.close()


async def test_lockdown_unpaired_reads(mux: FakeUsbmuxd, tmp_path: Path) -> None:
    info = device(0)
    mux.attach(info, "1-1.4")
    ld = await asyncio.wait_for(
        create_using_usbmux(serial=info.udid, autopair=False, pairing_records_cache_folder=tmp_path / "pmd3"),
        5,
    )
    async with ld:
        assert not ld.paired
        assert ld.udid == info.udid
        assert ld.ecid == int(info.ecid, 16)
        assert ld.product_version == info.ios_version
        assert ld.product_type == info.product_type
        assert "SerialNumber" not in ld.all_values  # needs a session, like a real device
        with pytest.raises(GetProhibitedError):
            await ld.get_value(key="SerialNumber")
    assert "Pair" not in mux.lockdown[info.udid].requests


@pytest.mark.parametrize("session_ssl", [True, False])
async def test_lockdown_autopair_then_session(mux: FakeUsbmuxd, tmp_path: Path, session_ssl: bool) -> None:
    info = device(1)
    mux.attach(info, "1-1.4")
    mux.lockdown[info.udid].session_ssl = session_ssl
    cache = tmp_path / "pmd3"
    ld = await asyncio.wait_for(create_using_usbmux(serial=info.udid, pairing_records_cache_folder=cache), 5)
    async with ld:
        assert ld.paired
        assert ld.all_values["SerialNumber"] == info.serial
        assert ld.all_values["UniqueChipID"] == int(info.ecid, 16)
        assert ld.all_values["ActivationState"] == info.activation_state
        assert ld.product_build_version == info.build
    assert info.udid in mux.pair_records  # SavePairRecord
    assert (cache / f"{info.udid}.plist").exists()
    state = mux.lockdown[info.udid]
    assert state.requests == ["QueryType", "GetValue", "GetValue", "Pair", "StartSession", "GetValue"]

    # Second time the record comes from usbmuxd: straight to the session, no Pair.
    state.requests.clear()
    ld = await asyncio.wait_for(create_using_usbmux(serial=info.udid, pairing_records_cache_folder=cache), 5)
    async with ld:
        assert ld.paired
    assert state.requests == ["QueryType", "GetValue", "StartSession", "GetValue"]


async def test_connect_errors(mux: FakeUsbmuxd) -> None:
    entry = mux.attach(device(0), "1-1.1")
    assert entry is not None
    with pytest.raises(ConnectionFailedError):
        await usbmux.MuxDevice(entry.device_id, entry.udid, "USB").connect(49152)
    with pytest.raises(BadDevError):
        await usbmux.MuxDevice(999, entry.udid, "USB").connect(62078)


async def test_detach_closes_device_streams(mux: FakeUsbmuxd, tmp_path: Path) -> None:
    info = device(0)
    mux.attach(info, "1-1.1")
    ld = await create_using_usbmux(serial=info.udid, autopair=False, pairing_records_cache_folder=tmp_path)
    mux.detach(udid=info.udid)
    with pytest.raises(ConnectionTerminatedError):
        await asyncio.wait_for(ld.service.recvall(1), 2)
    await ld.close()


async def test_device_ids_locations_product_ids(mux: FakeUsbmuxd) -> None:
    iphone = make_device(7, 0)
    first = mux.attach(iphone, "3-2.1")
    second = mux.attach(iphone, "3-2.1")  # re-enumeration: same port, new DeviceID and devnum
    assert first is not None
    assert second is not None
    assert second.device_id > first.device_id
    assert location_to_bus_devnum(first.location_id)[0] == 3
    assert location_to_bus_devnum(second.location_id) == (3, location_to_bus_devnum(first.location_id)[1] + 1)
    assert list(mux.devices) == [second.device_id]
    assert mux.usb_path_for_location(second.location_id) == "3-2.1"
    assert mux.attach(iphone, "3-2.1", DeviceMode.RECOVERY) is None  # not a usbmuxd device
    assert mux.device_at("3-2.1") is None


async def test_ipad_product_id(mux: FakeUsbmuxd) -> None:
    ipad = dataclasses.replace(device(2), device_class="iPad")
    entry = mux.attach(ipad, "1-1.2")
    assert entry is not None
    assert entry.product_id == 0x12AB
    reply = await raw_request(mux.socket_path, encode_plist({"MessageType": "ListDevices"}, 5))
    assert isinstance(reply, dict)
    (listed,) = reply["DeviceList"]  # type: ignore[misc]
    assert listed["Properties"]["ProductID"] == 0x12AB
    assert listed["Properties"]["LocationID"] == entry.location_id


async def test_pair_records_and_buid(mux: FakeUsbmuxd) -> None:
    path = mux.socket_path
    reply = await raw_request(
        Path(path), encode_plist({"MessageType": "ReadPairRecord", "PairRecordID": "X"}, 3)
    )
    assert reply == {"MessageType": "Result", "Number": 2}
    save = {"MessageType": "SavePairRecord", "PairRecordID": "X", "PairRecordData": b"rec"}
    assert await raw_request(Path(path), encode_plist(save, 4)) == {"MessageType": "Result", "Number": 0}
    read = await raw_request(
        Path(path), encode_plist({"MessageType": "ReadPairRecord", "PairRecordID": "X"}, 5)
    )
    assert read == {"PairRecordData": b"rec"}
    delete = {"MessageType": "DeletePairRecord", "PairRecordID": "X"}
    assert await raw_request(Path(path), encode_plist(delete, 6)) == {"MessageType": "Result", "Number": 0}
    assert (await raw_request(Path(path), encode_plist({"MessageType": "ReadBUID"}, 7)))["BUID"]  # type: ignore[index]
    bogus = await raw_request(Path(path), encode_plist({"MessageType": "Bogus"}, 8))
    assert bogus == {"MessageType": "Result", "Number": 1}


async def test_binary_protocol_gets_badversion(mux: FakeUsbmuxd) -> None:
    reply = await raw_request(Path(mux.socket_path), encode_packet(0, 3, 9))  # binary LISTEN
    assert isinstance(reply, bytes)
    _length, version, message, tag = HEADER.unpack(reply[:16])
    assert (version, message, tag) == (0, 1, 9)
    assert struct.unpack("<I", reply[16:]) == (6,)


async def test_stop_is_a_restart(mux: FakeUsbmuxd) -> None:
    mux.attach(device(0), "1-1.1")
    conn = await usbmux.create_mux()
    await conn.listen()
    await asyncio.wait_for(conn.receive_device_state_update(), 2)  # the initial Attached
    await mux.stop()
    with pytest.raises(Exception, match="closed"):
        await asyncio.wait_for(conn.receive_device_state_update(), 2)
    await conn.close()
    with pytest.raises(ConnectionFailedToUsbmuxdError):
        await usbmux.list_devices()
    await mux.start()
    assert len(await usbmux.list_devices()) == 1


REQUESTS = [
    "ReadBUID",
    "ListDevices",
    "Listen",
    "Connect",
    "ReadPairRecord",
    "SavePairRecord",
    "DeletePairRecord",
]
plist_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=8),
    st.binary(max_size=8),
    st.booleans(),
    st.just({}),
)
request_plists = st.builds(
    lambda kind, fields: plistlib.dumps({"MessageType": kind, **fields}),
    st.sampled_from(REQUESTS),
    st.dictionaries(
        st.sampled_from(["DeviceID", "PortNumber", "PairRecordID", "PairRecordData"]), plist_values
    ),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    junk=st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda body, version, message, tag: encode_packet(version, message, tag, body),
            st.one_of(st.binary(max_size=100), request_plists),
            st.integers(0, 3),
            st.sampled_from([1, 2, 3, 8, 99]),
            st.integers(0, 2**32 - 1),
        ),
    )
)
async def test_fuzz_server_survives(mux: FakeUsbmuxd, junk: bytes) -> None:
    """Garbage gets an error reply or a closed connection, never a crashed handler or server."""
    crashes: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: crashes.append(context))
    mux.attach(device(0), "1-1.1")
    reader, writer = await asyncio.open_unix_connection(str(mux.socket_path))
    writer.write(junk)
    writer.write_eof()
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(reader.read(), 2)  # until the server has dealt with it and hung up
    writer.close()
    reply = await raw_request(Path(mux.socket_path), encode_plist({"MessageType": "ReadBUID"}, 1))
    assert isinstance(reply, dict)
    assert "BUID" in reply
    assert crashes == []
