"""`Pymobiledevice3Backend`: pymobiledevice3's real client code against the simulated usbmuxd, lockdownd,
MCInstall and mobileactivationd (`tests.ios_bench`)."""

from __future__ import annotations

import asyncio
import dataclasses
import plistlib
import sys
from pathlib import Path
from typing import Any

import pytest
from pymobiledevice3 import exceptions as pmd3
from pymobiledevice3 import pair_records as pmd3_pair_records
from pymobiledevice3.lockdown import create_using_usbmux

from daemon.ios.base import (
    CloudConfig,
    DeviceError,
    DeviceGoneError,
    NotPairedError,
    PairingRefusedError,
    ServiceUnavailableError,
    SetupPlan,
    UnexpectedReplyError,
    UpdateTarget,
)
from daemon.ios.cloudconfig import MdmUrlMismatchError, cloud_config_from_details
from daemon.ios.pmd3 import (
    CloudConfigAlreadyAppliedError,
    McInstallRejectedError,
    Pmd3NotPairedError,
    Pmd3PairingRefusedError,
    Pymobiledevice3Backend,
    RestoreUnavailableError,
    SupervisionIdentity,
    device_info,
    in_setup_assistant,
    translate,
)
from daemon.ios.restore import ProcessRestorer, RestoreError
from daemon.sim.mcinstall import MemoryDeviceEffects
from tests.ios_bench import ADE_PROFILE, MDM_URL, IosBench, ios_bench, short_dir, supervisor_identity

__all__ = ["ios_bench", "short_dir"]


SYSTEM_USBMUXD = Path("/var/run/usbmuxd").exists()


def backend(bench: IosBench, **options: Any) -> Pymobiledevice3Backend:
    return Pymobiledevice3Backend(None, bench.records, **options)


class Progress:
    def __init__(self) -> None:
        self.calls: list[tuple[int | None, str | None]] = []

    def __call__(self, percent: int | None, detail: str | None) -> None:
        self.calls.append((percent, detail))


# -- info ----------------------------------------------------------------------------------------------


async def test_info_pairs_once_and_keeps_the_record_in_the_station_directory(
    ios_bench: IosBench, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_home_folder() -> Path:
        raise AssertionError("pymobiledevice3's home folder (fixed at import) must not be used")

    monkeypatch.setattr(pmd3_pair_records, "get_home_folder", no_home_folder)
    info = ios_bench.plug()
    devices = backend(ios_bench)
    assert await devices.info(info.udid) == info
    assert (ios_bench.records / f"{info.udid}.plist").exists()
    assert info.udid in ios_bench.mux.pair_records  # mirrored to usbmuxd, as pymobiledevice3 does
    state = ios_bench.lockdown(info.udid)
    assert state.requests.count("Pair") == 1
    state.requests.clear()
    assert await devices.info(info.udid) == info
    assert "Pair" not in state.requests
    assert "StopSession" not in state.requests  # the connection is just closed


async def test_info_in_setup_assistant(ios_bench: IosBench) -> None:
    fresh = ios_bench.plug(0, usb_path="1-1.1", setup_assistant=True)
    result = await backend(ios_bench).info(fresh.udid)
    assert (result.activation_state, result.in_setup_assistant) == ("Unactivated", True)
    # Activated, but Setup Assistant has not finished: no SetupDone in com.apple.purplebuddy.
    halfway = dataclasses.replace(ios_bench.plug(1, usb_path="1-1.2"), in_setup_assistant=True)
    ios_bench.mux.attach(halfway, "1-1.2")
    result = await backend(ios_bench).info(halfway.udid)
    assert (result.activation_state, result.in_setup_assistant) == ("Activated", True)


async def test_info_pairing_refused(ios_bench: IosBench) -> None:
    info = ios_bench.plug()
    ios_bench.lockdown(info.udid).pair_policy = "deny"
    with pytest.raises(PairingRefusedError) as caught:
        await backend(ios_bench).info(info.udid)
    error = caught.value
    assert isinstance(error, Pmd3PairingRefusedError)
    assert (error.code, error.retryable) == ("pairing_refused", False)
    assert error.unpaired is not None
    assert (error.unpaired.udid, error.unpaired.ecid) == (info.udid, info.ecid)
    assert (error.unpaired.product_type, error.unpaired.ios_version) == (info.product_type, info.ios_version)
    assert info.ecid in error.message
    assert error.unpaired.hardware_model == "D16AP"
    assert not (ios_bench.records / f"{info.udid}.plist").exists()


async def test_info_trust_dialog_pending(ios_bench: IosBench) -> None:
    info = ios_bench.plug()
    ios_bench.lockdown(info.udid).pair_policy = "pending"
    with pytest.raises(NotPairedError) as caught:
        await backend(ios_bench, pair_timeout=0).info(info.udid)
    assert isinstance(caught.value, Pmd3NotPairedError)
    assert caught.value.retryable
    assert "Trust" in caught.value.message
    assert caught.value.unpaired is not None
    assert caught.value.unpaired.udid == info.udid
    ios_bench.lockdown(info.udid).pair_policy = "accept"  # someone tapped Trust
    assert (await backend(ios_bench, pair_timeout=0).info(info.udid)).serial == info.serial


async def test_info_of_absent_device_and_absent_usbmuxd(ios_bench: IosBench) -> None:
    with pytest.raises(DeviceGoneError):
        await backend(ios_bench).info("00008030-0000000000000001")
    await ios_bench.mux.stop()
    with pytest.raises(ServiceUnavailableError, match="usbmuxd"):
        await backend(ios_bench).info("00008030-0000000000000001")


async def test_explicit_usbmuxd_address_is_used_for_the_pair_record_too(
    ios_bench: IosBench, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pymobiledevice3 mirrors a new pair record to the *default* usbmuxd whatever `usbmux_address`
    says (`PlistUsbmuxLockdownClient.save_pair_record` calls `usbmux.create_mux()` bare)."""
    info = ios_bench.plug()
    monkeypatch.delenv("USBMUXD_SOCKET_ADDRESS")
    if not SYSTEM_USBMUXD:
        with pytest.raises(pmd3.ConnectionFailedToUsbmuxdError):
            await create_using_usbmux(
                serial=info.udid,
                usbmux_address=str(ios_bench.socket),
                pairing_records_cache_folder=ios_bench.records / "pmd3",
            )
        ios_bench.lockdown(info.udid).paired_hosts.clear()
    devices = Pymobiledevice3Backend(str(ios_bench.socket), ios_bench.records)
    assert (await devices.info(info.udid)).serial == info.serial
    assert info.udid in ios_bench.mux.pair_records


async def test_supervised_pairing(ios_bench: IosBench, tmp_path: Path) -> None:
    cert, key, der = supervisor_identity(tmp_path / "supervisor")
    info = ios_bench.plug(setup_assistant=True)
    await backend(ios_bench).set_cloud_configuration(
        info.udid, {"IsSupervised": True, "SupervisorHostCertificates": [der]}
    )
    state = ios_bench.lockdown(info.udid)
    state.paired_hosts.clear()  # as if this host had never paired
    state.pair_policy = "deny"
    with pytest.raises(PairingRefusedError):
        await Pymobiledevice3Backend(None, tmp_path / "a").info(info.udid)
    supervised = Pymobiledevice3Backend(None, tmp_path / "b", supervision=SupervisionIdentity(cert, key))
    assert (await supervised.info(info.udid)).serial == info.serial
    assert list((tmp_path / "b").iterdir()) == [tmp_path / "b" / f"{info.udid}.plist"]  # keybag removed


# -- erase ---------------------------------------------------------------------------------------------


async def test_erase_returns_on_the_acknowledgement_and_the_device_comes_back(ios_bench: IosBench) -> None:
    info = ios_bench.plug(usb_path="2-1.3")
    devices = backend(ios_bench)
    await devices.set_cloud_configuration(info.udid, {"OrganizationName": "Before"})
    await devices.erase(info.udid)
    assert ios_bench.effects(info.udid).erased == 1
    assert ios_bench.mux.device_at("2-1.3") is None  # detached right after the acknowledgement
    with pytest.raises(DeviceGoneError):
        await devices.info(info.udid)
    for _ in range(150):  # the simulated reset takes 0.2 s
        if ios_bench.mux.device_at("2-1.3") is not None:
            break
        await asyncio.sleep(0.02)
    state = ios_bench.lockdown(info.udid)
    state.requests.clear()
    after = await devices.info(info.udid)  # the device forgot the pairing: paired again
    assert (after.activation_state, after.in_setup_assistant) == ("Unactivated", True)
    assert state.requests.count("Pair") == 1
    assert await devices.cloud_configuration(info.udid) == CloudConfig(applied=False)


async def test_erase_by_a_device_that_drops_without_acknowledging(ios_bench: IosBench) -> None:
    """pymobiledevice3 suppresses ConnectionTerminatedError around EraseDevice, so a drop before the
    acknowledgement cannot be told from one after it; both count as accepted."""
    info = ios_bench.plug()
    ios_bench.mcinstall.faults["EraseDevice"] = None
    await backend(ios_bench).erase(info.udid)
    assert ios_bench.effects(info.udid).erased == 0


# -- cloud configuration and setup ---------------------------------------------------------------------


async def test_cloud_configuration_before_and_after_setup(ios_bench: IosBench) -> None:
    info = ios_bench.plug(setup_assistant=True)
    devices = backend(ios_bench)
    assert await devices.cloud_configuration(info.udid) == CloudConfig(applied=False)
    ios_bench.effects(info.udid).assigned = dict(ADE_PROFILE)
    progress = Progress()
    await devices.setup(info.udid, SetupPlan(expected_mdm_url=MDM_URL), progress)
    expected = CloudConfig(
        applied=True, configuration_url=MDM_URL, organization="Example Corp", is_mdm_unremovable=True
    )
    assert await devices.cloud_configuration(info.udid) == expected
    assert progress.calls[-1] == (100, f"managed by Example Corp ({MDM_URL})")
    assert ios_bench.mcinstall.requests[-4:] == [
        "GetCloudConfiguration",
        "DownloadAndApplyCloudConfiguration",
        "GetCloudConfiguration",
        "GetCloudConfiguration",
    ]


async def test_setup_before_assignment_is_rejected(ios_bench: IosBench) -> None:
    info = ios_bench.plug(setup_assistant=True)
    with pytest.raises(McInstallRejectedError, match="33000") as caught:
        await backend(ios_bench).setup(info.udid, SetupPlan(), Progress())
    assert caught.value.retryable  # the portal may not have assigned the device yet


async def test_setup_applies_once_per_erase(ios_bench: IosBench) -> None:
    info = ios_bench.plug(setup_assistant=True)
    ios_bench.effects(info.udid).assigned = dict(ADE_PROFILE)
    devices = backend(ios_bench)
    await devices.setup(info.udid, SetupPlan(), Progress())
    with pytest.raises(CloudConfigAlreadyAppliedError) as caught:
        await devices.setup(info.udid, SetupPlan(), Progress())
    assert (caught.value.code, caught.value.retryable) == ("cloud_config_already_applied", False)
    assert ios_bench.effects(info.udid).fetched == 1


async def test_setup_maps_the_devices_14002(ios_bench: IosBench) -> None:
    """Details that do not count as applied still block the device (mc_mobile_tunnel checks for any)."""
    info = ios_bench.plug(setup_assistant=True)
    effects = ios_bench.effects(info.udid)
    effects.assigned = dict(ADE_PROFILE)
    effects.details = {"IsMandatory": False}
    with pytest.raises(CloudConfigAlreadyAppliedError, match="14002"):
        await backend(ios_bench).setup(info.udid, SetupPlan(), Progress())


async def test_set_cloud_configuration_twice(ios_bench: IosBench) -> None:
    info = ios_bench.plug(setup_assistant=True)
    devices = backend(ios_bench)
    await devices.set_cloud_configuration(info.udid, {"OrganizationName": "Bench"})
    with pytest.raises(CloudConfigAlreadyAppliedError, match="14002"):
        await devices.set_cloud_configuration(info.udid, {"OrganizationName": "Bench"})
    config = await devices.cloud_configuration(info.udid)
    assert config == CloudConfig(applied=True, organization="Bench")


async def test_setup_with_the_wrong_mdm_server(ios_bench: IosBench) -> None:
    info = ios_bench.plug(setup_assistant=True)
    ios_bench.effects(info.udid).assigned = {**ADE_PROFILE, "ConfigurationURL": "https://other.example/mdm"}
    with pytest.raises(UnexpectedReplyError) as caught:
        await backend(ios_bench).setup(info.udid, SetupPlan(expected_mdm_url=MDM_URL), Progress())
    assert isinstance(caught.value, MdmUrlMismatchError)
    assert MDM_URL in caught.value.message
    assert "https://other.example/mdm" in caught.value.message
    assert not caught.value.retryable


class _GoneWhileFetching(MemoryDeviceEffects):
    async def fetch_cloud_configuration(self) -> dict[str, Any]:
        self.mux.detach(udid=self.udid)  # unplugged while the device talks to Apple
        await asyncio.sleep(30)
        raise AssertionError("unreachable")


async def test_device_gone_mid_call(ios_bench: IosBench) -> None:
    info = ios_bench.plug(setup_assistant=True)
    ios_bench.devices.devices[info.udid] = _GoneWhileFetching(ios_bench.mux, info.udid)
    with pytest.raises(DeviceGoneError):
        await backend(ios_bench).setup(info.udid, SetupPlan(), Progress())


class _SlowApple(MemoryDeviceEffects):
    async def fetch_cloud_configuration(self) -> dict[str, Any]:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")


async def test_setup_timeout(ios_bench: IosBench) -> None:
    info = ios_bench.plug(setup_assistant=True)
    ios_bench.devices.devices[info.udid] = _SlowApple(ios_bench.mux, info.udid)
    with pytest.raises(ServiceUnavailableError, match="in time"):
        await backend(ios_bench, setup_timeout=0.5).setup(info.udid, SetupPlan(), Progress())


@pytest.mark.parametrize(
    "reply",
    [
        b"this is not a plist",
        plistlib.dumps(["a", "list"]),
        plistlib.dumps({"Status": "Error", "ErrorChain": []}),
        plistlib.dumps({"Status": "Error", "ErrorChain": "nope"}),
        plistlib.dumps({"Status": "Acknowledged", "CloudConfiguration": "nope"}),
        plistlib.dumps({"Status": "Acknowledged", "CloudConfiguration": {"ConfigurationURL": 5}}),
    ],
)
async def test_malformed_mcinstall_reply(ios_bench: IosBench, reply: bytes) -> None:
    info = ios_bench.plug()
    ios_bench.mcinstall.faults["GetCloudConfiguration"] = reply
    devices = backend(ios_bench)
    with pytest.raises(UnexpectedReplyError):
        await devices.cloud_configuration(info.udid)
    del ios_bench.mcinstall.faults["GetCloudConfiguration"]
    assert await devices.cloud_configuration(info.udid) == CloudConfig(applied=False)


async def test_connection_dropped_without_reply(ios_bench: IosBench) -> None:
    info = ios_bench.plug()
    ios_bench.mcinstall.faults["GetCloudConfiguration"] = None
    with pytest.raises(DeviceGoneError):
        await backend(ios_bench).cloud_configuration(info.udid)


async def test_mcinstall_missing(ios_bench: IosBench) -> None:
    info = ios_bench.plug()
    del ios_bench.mux.services["com.apple.mobile.MCInstall"]
    with pytest.raises(ServiceUnavailableError, match="InvalidServiceError"):
        await backend(ios_bench).cloud_configuration(info.udid)


# -- transport-free ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (pmd3.UserDeniedPairingError(), PairingRefusedError),
        (pmd3.PairingDialogResponsePendingError(), NotPairedError),
        (pmd3.PasswordRequiredError(), NotPairedError),
        (pmd3.InvalidHostIDError(), NotPairedError),
        (pmd3.FatalPairingError(), NotPairedError),
        (pmd3.NotPairedError(), NotPairedError),
        (pmd3.CloudConfigurationAlreadyPresentError(), CloudConfigAlreadyAppliedError),
        (pmd3.ProfileError("rejected"), McInstallRejectedError),
        (pmd3.ConnectionFailedToUsbmuxdError(), ServiceUnavailableError),
        (pmd3.NoDeviceConnectedError(), DeviceGoneError),
        (pmd3.DeviceNotFoundError("X", "not found"), DeviceGoneError),
        (pmd3.BadDevError(), DeviceGoneError),
        (pmd3.ConnectionFailedError(), ServiceUnavailableError),
        (pmd3.MuxException(), ServiceUnavailableError),
        (pmd3.ConnectionTerminatedError(), DeviceGoneError),
        (ConnectionResetError(), DeviceGoneError),
        (asyncio.IncompleteReadError(b"", 4), DeviceGoneError),
        (pmd3.InvalidServiceError("x", "UDID", "18.1"), ServiceUnavailableError),
        (pmd3.StartServiceError("svc", "Nope"), ServiceUnavailableError),
        (pmd3.IncorrectModeError(), ServiceUnavailableError),
        (pmd3.ProtocolError(), UnexpectedReplyError),
        (pmd3.LockdownError("odd", "UDID", "18.1"), UnexpectedReplyError),
        (PermissionError(), ServiceUnavailableError),
        (pmd3.PyMobileDevice3Exception("?"), DeviceError),
    ],
)
def test_translate(exc: Exception, expected: type[DeviceError]) -> None:
    error = translate(exc, "UDID", "info")
    assert type(error) is expected
    assert error.message.startswith("info on UDID: ")


def test_in_setup_assistant() -> None:
    assert in_setup_assistant("Unactivated", {"SetupDone": True})
    assert in_setup_assistant("Activated", {})
    assert not in_setup_assistant("Activated", {"SetupDone": True})
    assert not in_setup_assistant("Activated", None)  # unreadable domain: only activation can tell


def test_device_info_names_what_is_missing() -> None:
    values = {
        "UniqueDeviceID": "U",
        "UniqueChipID": 0x1C604A3405801E,
        "SerialNumber": "S",
        "ProductType": "iPhone14,5",
        "ProductVersion": "18.1",
        "BuildVersion": "22B83",
        "DeviceClass": "iPhone",
        "ActivationState": "Activated",
    }
    assert device_info(values, {"SetupDone": True}).ecid == "001C604A3405801E"
    with pytest.raises(UnexpectedReplyError, match="SerialNumber"):
        device_info({**values, "SerialNumber": None}, None)
    with pytest.raises(UnexpectedReplyError, match="UniqueChipID"):
        device_info({**values, "UniqueChipID": -1}, None)


def test_cloud_config_from_details() -> None:
    assert cloud_config_from_details(None) == CloudConfig(applied=False)
    assert cloud_config_from_details({"IsMandatory": False}) == CloudConfig(applied=False)
    assert cloud_config_from_details({"ConfigurationWebURL": "https://x"}).configuration_url == "https://x"
    with pytest.raises(UnexpectedReplyError):
        cloud_config_from_details(["not", "a", "dict"])


# -- update: the restorer, in a worker process -----------------------------------------------------

FAKE_WORKER = (sys.executable, "-m", "daemon.sim.restore_worker", "--speed", "20000")


async def test_update_reads_the_ecid_then_restores_in_a_worker_process(ios_bench: IosBench) -> None:
    info = ios_bench.plug()
    devices = backend(ios_bench, restorer=ProcessRestorer(FAKE_WORKER, timeout=20))
    progress = Progress()
    target = UpdateTarget("18.6.2", "22G100", ipsw=Path("/cache/iPhone_18.6.2.ipsw"))
    await devices.update(info.udid, target, erase=False, progress=progress)
    percents = [p for p, _ in progress.calls if p is not None]
    assert percents
    assert percents[-1] == 100
    assert any(detail and "Recovery" in detail for _, detail in progress.calls)


async def test_a_failed_restore_says_whether_the_device_was_touched(ios_bench: IosBench) -> None:
    info = ios_bench.plug()
    worker = (*FAKE_WORKER, "--fail-at", "50", "--error", "restore_failed")
    devices = backend(ios_bench, restorer=ProcessRestorer(worker, timeout=20))
    target = UpdateTarget("18.6.2", "22G100", ipsw=Path("/cache/iPhone_18.6.2.ipsw"))
    with pytest.raises(RestoreError) as caught:
        await devices.update(info.udid, target, erase=True, progress=Progress())
    assert caught.value.code == "restore_failed"
    assert caught.value.touched  # half way: the update step must check before trying again
    assert caught.value.outcome.ecid == info.ecid


async def test_update_without_restorer_or_ipsw_is_unavailable(ios_bench: IosBench) -> None:
    no_file = UpdateTarget("18.6.2", "22G100")
    with pytest.raises(RestoreUnavailableError) as caught:
        await backend(ios_bench).update("X", no_file, erase=False, progress=Progress())
    assert (caught.value.code, caught.value.retryable) == ("restore_unavailable", False)
    restorer = ProcessRestorer(FAKE_WORKER)
    with pytest.raises(RestoreUnavailableError):
        await backend(ios_bench, restorer=restorer).update("X", no_file, erase=False, progress=Progress())
