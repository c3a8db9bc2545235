"""The cfgutil backend: its pure output parser, and the backend against the fake cfgutil as a real
subprocess (`daemon.sim.cfgutil_fake`)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.ios.base import (
    DeviceGoneError,
    ServiceUnavailableError,
    SetupPlan,
    UnexpectedReplyError,
    UpdateTarget,
)
from daemon.ios.cfgutil import CfgutilBackend, CfgutilTimeoutError, device_info, skip_flags
from daemon.ios.cfgutil_output import (
    CfgutilAlreadyPreparedError,
    CfgutilConfigurationUnavailableError,
    CfgutilError,
    cfgutil_ecid,
    interpret,
    normalize_ecid,
    parse_json_output,
    udid_to_ecid,
)
from daemon.ios.cloudconfig import MdmUrlMismatchError
from daemon.ios.pmd3 import RestoreUnavailableError
from daemon.sim.cfgutil_fake import STATE_ENV

FAKE = [sys.executable, "-m", "daemon.sim.cfgutil_fake"]
ECID = "001C604A3405801E"
UDID = "00008110-001C604A3405801E"
MDM = "https://mdm.example.com/enroll"

# -- parser, on literal samples of the documented shape -------------------------------------------------

LIST_TWO = b"""{
  "Command": "list",
  "Output": {
    "0x1C604A3405801E": {"UDID": "00008110-001C604A3405801E", "ECID": "0x1C604A3405801E",
                          "deviceType": "iPhone14,4", "name": "iPhone", "locationID": 1179648},
    "0x2A": {"UDID": "00008030-00000000000002A", "deviceType": "iPad13,1", "name": "iPad"}
  },
  "Devices": ["0x1C604A3405801E", "0x2A"],
  "Type": "CommandOutput"
}"""

GET_ONE = b"""{"Command": "get", "Type": "CommandOutput", "Devices": ["0x1C604A3405801E"],
 "Output": {"0x1C604A3405801E": {"UDID": "00008110-001C604A3405801E", "ECID": "0x1C604A3405801E",
  "serialNumber": "F2LXYZ123456", "deviceType": "iPhone14,4", "deviceClass": "iPhone",
  "firmwareVersion": "17.5", "buildVersion": "21F79", "activationState": "Activated"}}}"""

ERROR = b"""{"Type": "Error", "Message": "The configuration is not available.", "Code": 33001,
 "Domain": "ConfigurationErrorDomain", "AffectedDevices": ["0x1C604A3405801E"]}"""


def test_parse_list_of_two_devices() -> None:
    reply = parse_json_output(LIST_TWO, "list")
    assert reply.command == "list"
    assert set(reply.output) == {ECID, "000000000000002A"}
    assert reply.devices == (ECID, "000000000000002A")
    assert udid_to_ecid(reply, UDID.lower()) == ECID
    assert udid_to_ecid(reply, "nope") is None


def test_parse_get_maps_to_device_info() -> None:
    reply = parse_json_output(GET_ONE, "info")
    info = device_info(ECID, reply.for_device(ECID, "info"))
    assert (info.udid, info.ecid, info.serial, info.product_type) == (
        UDID,
        ECID,
        "F2LXYZ123456",
        "iPhone14,4",
    )
    assert (info.ios_version, info.build, info.device_class) == ("17.5", "21F79", "iPhone")
    assert info.activation_state == "Activated"
    assert not info.in_setup_assistant
    with pytest.raises(DeviceGoneError):
        reply.for_device("0000000000000001", "info")


def test_missing_property_is_unexpected() -> None:
    reply = parse_json_output(GET_ONE.replace(b'"serialNumber": "F2LXYZ123456", ', b""), "info")
    with pytest.raises(UnexpectedReplyError, match="serialNumber"):
        device_info(ECID, reply.for_device(ECID, "info"))


def test_error_output_is_typed() -> None:
    with pytest.raises(CfgutilConfigurationUnavailableError) as caught:
        parse_json_output(ERROR, "setup")
    assert caught.value.cfgutil_code == 33001
    assert caught.value.domain == "ConfigurationErrorDomain"
    prepared = (
        b'{"Code": 607, "Message": "The device is already prepared and must be erased to change settings."}'
    )
    with pytest.raises(CfgutilAlreadyPreparedError):
        interpret(1, prepared, b"", "setup")
    with pytest.raises(CfgutilError) as generic:
        interpret(1, b'{"Type": "Error", "Message": "Something else.", "Code": 5}', b"", "erase")
    assert type(generic.value) is CfgutilError
    assert not isinstance(generic.value, DeviceGoneError)


def test_per_device_errors() -> None:
    doc = {"Output": {"Errors": {"0x1C604A3405801E": {"Code": -402653030, "Message": "Pairing refused."}}}}
    reply = parse_json_output(json.dumps(doc).encode(), "erase")
    with pytest.raises(CfgutilError, match="Pairing refused"):
        reply.for_device(ECID, "erase")


@pytest.mark.parametrize(
    "stdout",
    [b"", b"   \n", b"<<not JSON>>", b"[1, 2]", b'{"Output": [1]}', b'{"Output": {"nope": {}}}', b"\xff\xfe"],
)
def test_garbage_and_empty_are_unexpected(stdout: bytes) -> None:
    with pytest.raises(UnexpectedReplyError):
        interpret(0, stdout, b"", "info")


def test_failed_exit_without_json() -> None:
    with pytest.raises(DeviceGoneError):
        interpret(1, b"", b"cfgutil: error: no devices found\n", "info")
    with pytest.raises(CfgutilError, match="exit status 70"):
        interpret(70, b"oops", b"something broke", "info")


def test_ecid_spellings() -> None:
    assert normalize_ecid("0x1C604A3405801E") == ECID
    assert normalize_ecid(0x1C604A3405801E) == ECID
    assert normalize_ecid("zz") is None
    assert normalize_ecid(True) is None
    assert cfgutil_ecid(ECID) == "0x1C604A3405801E"


def test_skip_flags() -> None:
    flags, unknown = skip_flags(("Location", "SIMSetup", "sim-setup", "Bogus"))
    assert flags == ["--skip-location", "--skip-sim-setup"]
    assert unknown == ["Bogus"]


# -- the backend against the fake cfgutil ----------------------------------------------------------------


def device(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "UDID": UDID,
        "serialNumber": "F2LXYZ123456",
        "deviceType": "iPhone14,4",
        "deviceClass": "iPhone",
        "firmwareVersion": "17.5",
        "buildVersion": "21F79",
        "activationState": "Activated",
        "name": "iPhone",
        "locationID": 1179648,
        "supervised": True,
        "cloudConfiguration": None,
        "assignedConfiguration": {"ConfigurationURL": MDM, "OrganizationName": "Example Org"},
    }
    values.update(changes)
    return values


class Fake:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **state: Any) -> None:
        self.path.write_text(json.dumps(state))

    def read(self) -> dict[str, Any]:
        data = json.loads(self.path.read_text())
        assert isinstance(data, dict)
        return data

    def backend(self, **kwargs: Any) -> CfgutilBackend:
        env = {**os.environ, STATE_ENV: str(self.path)}
        return CfgutilBackend(FAKE, env=env, timeout=kwargs.pop("timeout", 20.0), **kwargs)


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    state = Fake(tmp_path / "cfgutil.json")
    state.write(devices={"0x1C604A3405801E": device()})
    return state


def no_progress(percent: int | None, detail: str | None) -> None:
    pass


async def test_info(fake: Fake) -> None:
    info = await fake.backend().info(UDID)
    assert (info.udid, info.ecid, info.product_type, info.ios_version) == (UDID, ECID, "iPhone14,4", "17.5")
    assert not info.in_setup_assistant


async def test_erase_then_setup_then_cloud_configuration(fake: Fake) -> None:
    backend = fake.backend()
    await backend.erase(UDID)
    assert (await backend.info(UDID)).in_setup_assistant
    before = await backend.cloud_configuration(UDID)
    assert before is not None
    assert not before.applied
    seen: list[tuple[int | None, str | None]] = []
    await backend.setup(
        UDID, SetupPlan(expected_mdm_url=MDM, skip_panes=("Location",)), lambda p, d: seen.append((p, d))
    )
    after = await backend.cloud_configuration(UDID)
    assert after is not None
    assert after.applied
    assert (after.configuration_url, after.organization) == (MDM, "Example Org")
    assert seen[-1][0] == 100
    with pytest.raises(CfgutilAlreadyPreparedError):
        await backend.setup(UDID, SetupPlan(), no_progress)


async def test_setup_without_assignment_and_wrong_mdm(fake: Fake) -> None:
    fake.write(devices={"0x1C604A3405801E": device(assignedConfiguration=None)})
    with pytest.raises(CfgutilConfigurationUnavailableError):
        await fake.backend().setup(UDID, SetupPlan(), no_progress)
    fake.write(devices={"0x1C604A3405801E": device()})
    with pytest.raises(MdmUrlMismatchError):
        await fake.backend().setup(UDID, SetupPlan(expected_mdm_url="https://other.example"), no_progress)


async def test_erase_unsupervised_is_refused(fake: Fake) -> None:
    fake.write(devices={"0x1C604A3405801E": device(supervised=False)})
    with pytest.raises(CfgutilError, match="not supervised"):
        await fake.backend().erase(UDID)
    assert fake.read()["devices"]["0x1C604A3405801E"]["activationState"] == "Activated"


async def test_device_missing(fake: Fake) -> None:
    backend = fake.backend()
    with pytest.raises(DeviceGoneError):
        await backend.info("00008110-000000000000BEEF")
    fake.write(devices={})
    with pytest.raises(DeviceGoneError):
        await backend.erase(UDID)


async def test_garbage_output(fake: Fake) -> None:
    fake.write(devices={"0x1C604A3405801E": device()}, garbage=["get"])
    with pytest.raises(UnexpectedReplyError):
        await fake.backend().info(UDID)


async def test_cfgutil_missing(tmp_path: Path) -> None:
    backend = CfgutilBackend(str(tmp_path / "no-such-cfgutil"))
    with pytest.raises(ServiceUnavailableError, match="not available"):
        await backend.info(UDID)


async def test_timeout_kills_cfgutil(fake: Fake, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    fake.write(devices={"0x1C604A3405801E": device()}, hang=["erase"], hang_pid_file=str(pid_file))
    backend = fake.backend(timeout=1.5)
    started = time.monotonic()
    with pytest.raises(CfgutilTimeoutError) as caught:
        await backend.erase(UDID)
    assert isinstance(caught.value, ServiceUnavailableError)
    assert time.monotonic() - started < 5
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)


async def test_update_is_refused(fake: Fake) -> None:
    with pytest.raises(RestoreUnavailableError):
        await fake.backend().update(UDID, UpdateTarget("18.0", "22A3354"), erase=True, progress=no_progress)
