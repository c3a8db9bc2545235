"""The simulated MCInstall and mobileactivationd, driven by pymobiledevice3's own client code."""

from __future__ import annotations

import asyncio
import plistlib
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymobiledevice3 import usbmux
from pymobiledevice3.exceptions import (
    CloudConfigurationAlreadyPresentError,
    ConnectionFailedError,
    InvalidServiceError,
    ProfileError,
)
from pymobiledevice3.lockdown import UsbmuxLockdownClient, create_using_usbmux
from pymobiledevice3.services.mobile_activation import MobileActivationService
from pymobiledevice3.services.mobile_config import MobileConfigService

from daemon.sim.mcinstall import (
    SERVICE_NAME,
    McInstallResponder,
    MemoryDeviceEffects,
    parse_profile,
)
from daemon.sim.services import FrameDecoder, ServiceProtocolError, encode_frame
from daemon.sim.usbmuxd import FakeUsbmuxd
from tests.ios_bench import ADE_PROFILE, MDM_URL, IosBench, ios_bench, short_dir, supervisor_identity

__all__ = ["ios_bench", "short_dir"]


async def lockdown(bench: IosBench, udid: str, folder: Path | None = None) -> UsbmuxLockdownClient:
    return await asyncio.wait_for(
        create_using_usbmux(serial=udid, pairing_records_cache_folder=folder or bench.records), 10
    )


async def until(listener: usbmux.MuxConnection, done: Callable[[list[usbmux.MuxDevice]], bool]) -> None:
    """Read usbmuxd Listen events until the device list satisfies `done`."""
    async with asyncio.timeout(3):
        while True:
            await listener.receive_device_state_update()
            if done(listener.devices):
                return


def profile(identifier: str = "com.example.wifi", *, mdm: bool = False) -> bytes:
    content: list[dict[str, Any]] = [{"PayloadType": "com.apple.wifi.managed", "SSID_STR": "bench"}]
    if mdm:
        content.append({"PayloadType": "com.apple.mdm", "ServerURL": MDM_URL})
    return plistlib.dumps(
        {
            "PayloadType": "Configuration",
            "PayloadIdentifier": identifier,
            "PayloadUUID": str(uuid.uuid4()).upper(),
            "PayloadVersion": 1,
            "PayloadDisplayName": "Bench Wi-Fi",
            "PayloadContent": content,
        }
    )


@pytest.mark.parametrize("ssl", [True, False])
async def test_set_cloud_configuration_once_per_erase(ios_bench: IosBench, ssl: bool) -> None:
    ios_bench.mcinstall.ssl = ssl
    info = ios_bench.plug()
    async with await lockdown(ios_bench, info.udid) as ld, MobileConfigService(ld) as mc:
        await mc.hello()
        await mc.flush()
        assert await mc.get_cloud_configuration() is None
        await mc.set_cloud_configuration({"OrganizationName": "Bench", "AllowPairing": True})
        stored = await mc.get_cloud_configuration()
        with pytest.raises(CloudConfigurationAlreadyPresentError):
            await mc.set_cloud_configuration({"OrganizationName": "Again"})
    # The device forces these (mc_mobile_tunnel `_commandSetCloudConfiguration:`).
    assert stored == {
        "OrganizationName": "Bench",
        "AllowPairing": True,
        "ConfigurationSource": 2,
        "CloudConfigurationUIComplete": True,
        "ConfigurationWasApplied": True,
        "IsMandatory": True,
        "IsMDMUnremovable": False,
    }
    assert ios_bench.mcinstall.requests == [
        "HelloHostIdentifier",
        "Flush",
        "GetCloudConfiguration",
        "SetCloudConfiguration",
        "GetCloudConfiguration",
        "SetCloudConfiguration",
    ]
    assert "StartService" in ios_bench.lockdown(info.udid).requests


async def test_download_and_apply_cloud_configuration(ios_bench: IosBench) -> None:
    info = ios_bench.plug(setup_assistant=True)
    effects = ios_bench.effects(info.udid)
    async with await lockdown(ios_bench, info.udid) as ld, MobileConfigService(ld) as mc:
        with pytest.raises(ProfileError, match="33000"):  # not assigned to an MDM server yet
            await mc.download_and_apply_cloud_configuration()
        effects.assigned = dict(ADE_PROFILE)
        await mc.download_and_apply_cloud_configuration()
        config = await mc.get_cloud_configuration()
        with pytest.raises(CloudConfigurationAlreadyPresentError):
            await mc.download_and_apply_cloud_configuration()
    assert config == ADE_PROFILE
    assert effects.fetched == 2  # the third request was refused before asking Apple


async def test_download_and_apply_with_mdm_profile_is_acknowledged(ios_bench: IosBench) -> None:
    info = ios_bench.plug()
    async with await lockdown(ios_bench, info.udid) as ld, MobileConfigService(ld) as mc:
        await mc.install_profile(profile("com.example.mdm", mdm=True))
        await mc.download_and_apply_cloud_configuration()  # already enrolled: nothing to fetch
    assert ios_bench.effects(info.udid).fetched == 0


async def test_profiles(ios_bench: IosBench) -> None:
    info = ios_bench.plug()
    async with await lockdown(ios_bench, info.udid) as ld, MobileConfigService(ld) as mc:
        await mc.install_profile(profile("com.example.a"))
        await mc.install_profile(profile("com.example.b"))
        listed = await mc.get_profile_list()
        await mc.remove_profile("com.example.a")
        after = await mc.get_profile_list()
        with pytest.raises(ProfileError, match="1000"):
            await mc.install_profile(b"not a profile")
    assert listed["OrderedIdentifiers"] == ["com.example.a", "com.example.b"]
    assert listed["ProfileManifest"]["com.example.a"] == {"Description": "Bench Wi-Fi", "IsActive": True}
    assert listed["ProfileMetadata"]["com.example.b"]["PayloadVersion"] == 1
    assert after["OrderedIdentifiers"] == ["com.example.b"]


async def test_erase_acknowledges_then_drops_and_returns_in_setup_assistant(ios_bench: IosBench) -> None:
    info = ios_bench.plug(usb_path="3-2.4")
    first = ios_bench.mux.device_at("3-2.4")
    assert first is not None
    effects = ios_bench.effects(info.udid)
    listener = await usbmux.create_mux()
    try:
        await listener.listen()
        await asyncio.wait_for(listener.receive_device_state_update(), 2)  # the initial Attached
        async with await lockdown(ios_bench, info.udid) as ld, MobileConfigService(ld) as mc:
            await mc.set_cloud_configuration({"OrganizationName": "Before"})
            await mc.erase_device(preserve_data_plan=True, disallow_proximity_setup=False)
        assert effects.erased == 1
        assert await usbmux.list_devices() == []  # off USB right after the acknowledgement
        await until(listener, lambda devices: not devices)  # Detached (after the pairing's Paired)
        await until(listener, bool)  # back after the reset
        (back,) = listener.devices
    finally:
        await listener.close()
    assert back.serial == info.udid
    assert back.devid != first.device_id  # a new enumeration
    state = ios_bench.lockdown(info.udid)
    assert (state.info.activation_state, state.info.in_setup_assistant) == ("Unactivated", True)
    assert state.paired_hosts == set()
    # The device forgot the pairing: the old record is refused (InvalidHostID), pairing again works.
    ld = await asyncio.wait_for(
        create_using_usbmux(serial=info.udid, autopair=False, pairing_records_cache_folder=ios_bench.records),
        5,
    )
    async with ld:
        assert not ld.paired
    async with await lockdown(ios_bench, info.udid) as ld, MobileConfigService(ld) as mc:
        assert await mc.get_cloud_configuration() is None


async def test_activation_state(ios_bench: IosBench) -> None:
    activated, fresh = (
        ios_bench.plug(0, usb_path="1-1.1"),
        ios_bench.plug(1, usb_path="1-1.2", setup_assistant=True),
    )
    async with await lockdown(ios_bench, activated.udid) as ld:
        assert await MobileActivationService(ld).state() == "Activated"
    async with await lockdown(ios_bench, fresh.udid) as ld:
        assert await MobileActivationService(ld).state() == "Unactivated"
    # Both answers came from the service, not from pymobiledevice3's lockdownd fallback.
    assert ios_bench.activation.commands == ["GetActivationStateRequest"] * 2


async def test_unknown_service_is_refused(ios_bench: IosBench) -> None:
    info = ios_bench.plug()
    async with await lockdown(ios_bench, info.udid) as ld:
        with pytest.raises(InvalidServiceError):
            await ld.start_lockdown_service("com.apple.afc")


async def test_service_port_takes_one_connection(ios_bench: IosBench) -> None:
    ios_bench.mcinstall.ssl = False
    info = ios_bench.plug()
    async with await lockdown(ios_bench, info.udid) as ld:
        attributes = await ld.get_service_connection_attributes(SERVICE_NAME)
    assert attributes["EnableServiceSSL"] is False
    (device,) = await usbmux.list_devices()
    sock = await device.connect(attributes["Port"])
    try:
        with pytest.raises(ConnectionFailedError):
            await device.connect(attributes["Port"])
    finally:
        sock.close()


async def test_supervised_pairing_skips_the_trust_dialog(ios_bench: IosBench, tmp_path: Path) -> None:
    cert, key, der = supervisor_identity(tmp_path / "supervisor")
    keybag = tmp_path / "keybag.pem"
    keybag.write_bytes(cert.read_bytes() + key.read_bytes())
    info = ios_bench.plug(setup_assistant=True)
    async with await lockdown(ios_bench, info.udid) as ld, MobileConfigService(ld) as mc:
        await mc.set_cloud_configuration({"IsSupervised": True, "SupervisorHostCertificates": [der]})
    state = ios_bench.lockdown(info.udid)
    state.paired_hosts.clear()
    state.pair_policy = "deny"  # a person would refuse; supervision does not ask
    ld = await asyncio.wait_for(
        create_using_usbmux(
            serial=info.udid, autopair=False, pairing_records_cache_folder=tmp_path / "other"
        ),
        5,
    )
    async with ld:
        await ld.pair_supervised(keybag, timeout=0)
        assert await ld.validate_pairing()
        assert ld.all_values["SerialNumber"] == info.serial
    assert state.requests.count("Pair") == 3  # the first pairing, then challenge and response


# -- transport-free -----------------------------------------------------------------------------------


def test_frame_decoder_reassembles_and_rejects_junk() -> None:
    data = encode_frame({"RequestType": "Flush"}) + encode_frame({"RequestType": "GetProfileList"})
    decoder = FrameDecoder()
    messages = [m for i in range(len(data)) for m in decoder.feed(data[i : i + 1])]
    assert [m["RequestType"] for m in messages] == ["Flush", "GetProfileList"]
    with pytest.raises(ServiceProtocolError):
        FrameDecoder().feed(struct.pack(">I", 5) + b"junk!")
    with pytest.raises(ServiceProtocolError):
        FrameDecoder(max_frame=10).feed(struct.pack(">I", 11))


def test_parse_profile() -> None:
    parsed = parse_profile(profile("com.example.mdm", mdm=True))
    assert (parsed.identifier, parsed.display_name, parsed.is_mdm) == ("com.example.mdm", "Bench Wi-Fi", True)


class _Effects(MemoryDeviceEffects):
    def __init__(self) -> None:
        super().__init__(FakeUsbmuxd("/nonexistent"), "UDID", reboot_after=None)
        self.erase_calls: list[tuple[bool, bool]] = []

    def erase(self, *, preserve_data_plan: bool, disallow_proximity_setup: bool) -> None:
        self.erase_calls.append((preserve_data_plan, disallow_proximity_setup))


@pytest.mark.parametrize(
    ("request_", "status"),
    [
        ("not a dict", "CommandFormatError"),
        ({}, "CommandFormatError"),
        ({"RequestType": 7}, "CommandFormatError"),
        ({"RequestType": "Bogus"}, "CommandFormatError"),
        ({"RequestType": "SetCloudConfiguration"}, "CommandFormatError"),
        ({"RequestType": "SetCloudConfiguration", "CloudConfiguration": "x"}, "CommandFormatError"),
        ({"RequestType": "RemoveProfile", "ProfileIdentifier": b"junk"}, "CommandFormatError"),
        ({"RequestType": "RemoveProfile"}, "CommandFormatError"),
        ({"RequestType": "InstallProfile"}, "Error"),
        ({"RequestType": "EraseDevice", "PreserveDataPlan": "yes"}, "CommandFormatError"),
        ({"RequestType": "RemoveProfile", "ProfileIdentifier": "com.example.none"}, "Acknowledged"),
    ],
)
async def test_responder_answers_bad_requests(request_: object, status: str) -> None:
    effects = _Effects()
    outcome = await McInstallResponder(effects).handle(request_)
    assert outcome.reply["Status"] == status
    assert outcome.after is None
    assert effects.erase_calls == []


async def test_erase_resets_only_after_the_reply() -> None:
    effects = _Effects()
    outcome = await McInstallResponder(effects).handle({"RequestType": "EraseDevice"})
    assert outcome.reply == {"Status": "Acknowledged"}
    assert effects.erase_calls == []
    assert outcome.after is not None
    outcome.after()
    assert effects.erase_calls == [(False, False)]  # no PreserveDataPlan: the data plan is erased


plist_values = st.recursive(
    st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=8), st.binary(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
request_types = st.sampled_from(
    [
        "HelloHostIdentifier",
        "GetCloudConfiguration",
        "SetCloudConfiguration",
        "DownloadAndApplyCloudConfiguration",
        "GetProfileList",
        "InstallProfile",
        "RemoveProfile",
        "EraseDevice",
        "Bogus",
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    kind=request_types,
    fields=st.dictionaries(
        st.sampled_from(["CloudConfiguration", "Payload", "ProfileIdentifier", "PreserveDataPlan", "X"]),
        plist_values,
        max_size=3,
    ),
)
async def test_responder_never_raises(kind: str, fields: dict[str, Any]) -> None:
    outcome = await McInstallResponder(_Effects()).handle({"RequestType": kind, **fields})
    assert isinstance(outcome.reply.get("Status"), str)
    assert FrameDecoder().feed(encode_frame(outcome.reply)) == [outcome.reply]  # the wire can carry it


@pytest.mark.parametrize("ssl", [True, False])
@pytest.mark.parametrize(
    "junk",
    [b"\x00\x00\x00\x05junk!", b"\xff\xff\xff\xff", b"GET / HTTP/1.0\r\n\r\n", b"\x16\x03\x01\x00\x02ab"],
)
async def test_service_survives_junk(ios_bench: IosBench, ssl: bool, junk: bytes) -> None:
    crashes: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: crashes.append(context))
    ios_bench.mcinstall.ssl = ssl
    info = ios_bench.plug()
    async with await lockdown(ios_bench, info.udid) as ld:
        attributes = await ld.get_service_connection_attributes(SERVICE_NAME)
        (device,) = await usbmux.list_devices()
        sock = await device.connect(attributes["Port"])
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(junk)
        writer.write_eof()
        async with asyncio.timeout(3):
            await reader.read()  # the device hangs up
        writer.close()
        async with MobileConfigService(ld) as mc:  # and still serves the next client
            assert await mc.get_cloud_configuration() is None
    assert crashes == []
