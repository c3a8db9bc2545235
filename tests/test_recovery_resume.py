"""A restore that fails part-way leaves the device in Recovery: the port restores it again, by ECID.

Station tests run the production station against the simulated bench (as tests/test_station_usb.py
does): the sim's world-level restore leaves a device in Recovery when an `update` fault strikes
part-way, and the simulated USB host shows it as iBoot does (PID 0x1281, `ECID:` in the serial, no
usbmuxd). The backend tests drive `Pymobiledevice3Backend.restore_from_recovery` through
`ProcessRestorer` and the fake worker process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from daemon.ios import restore_worker
from daemon.ios.base import DeviceMode, ProgressFn, UpdateTarget
from daemon.ios.cfgutil import CfgutilBackend
from daemon.ios.pmd3 import Pymobiledevice3Backend, RestoreUnavailableError
from daemon.ios.restore import (
    EventFn,
    LogEvent,
    ProcessRestorer,
    RestoreCode,
    RestoreError,
    RestoreEvent,
    RestoreOutcome,
    RestoreRequest,
    TouchEvent,
)
from daemon.models import PortRef
from daemon.sim.faults import Fault, FaultKind
from daemon.station import Station, build_sim_world
from daemon.workflow.actions import Action, ActionRejected
from daemon.workflow.phases import Phase
from tests.conftest import eventually, running, station_config
from tests.mqtt_broker import Mosquitto
from tests.test_station_usb import device_needing
from tests.test_usb_sysfs import RECOVERY_SERIAL

A1, A2 = PortRef("hub-a", 1), PortRef("hub-a", 2)
ECID = "001C604A3405801E"
FAKE_WORKER = (sys.executable, "-m", "daemon.sim.restore_worker", "--speed", "20000")
RESTORING = {"steps": ["update", "erase"], "reenumeration_window": 0.5}
"""The steps that matter here (enrollment and setup are other tests' business)."""


def update_rows(station: Station, ref: PortRef) -> list[tuple[Phase, int, str | None, str | None]]:
    return [
        (row.phase, row.attempt, row.error.code if row.error else None, row.detail)
        for row in station.store.history(ref=ref)
        if row.step == "update"
    ]


# -- the station ------------------------------------------------------------------------------------


async def test_a_restore_failing_part_way_is_restored_again_from_recovery(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(tmp_path, mosquitto, devices=0, workflow=RESTORING)
    world = build_sim_world(config)
    world.inject(Fault("update", FaultKind.FAIL, A1, at=0.5, message="restore_failed after touch"))
    async with running(config, world) as station:
        device = device_needing(world, update=True)
        world.plug(A1, device)
        await eventually(lambda: station.store.port(A1).phase is Phase.DONE, what="done")
        assert device.mode is DeviceMode.NORMAL
        assert int(device.ios_version.split(".")[0]) >= 18  # the new iOS, from the second restore
        assert (device.started["update"], device.completed["update"]) == (2, 1)
        rows = update_rows(station, A1)
        # The failed attempt, then the restore resumed from Recovery as the step's second attempt.
        assert rows[0][:3] == (Phase.UPDATING, 1, None)
        phase, attempt, error, detail = rows[1]
        assert (phase, attempt, error) == (Phase.UPDATING, 2, "simulated_fault")
        assert detail is not None
        assert "device is in Recovery; its iOS must be restored" in detail
        resumed = [r for r in station.store.history(ref=A1) if "resumed_from_recovery" in r.extra]
        assert [r.extra["resumed_from_recovery"] for r in resumed] == [device.ecid_hex]
        finished = station.store.history(ref=A1)[-1]
        assert finished.phase is Phase.DONE
        assert "restored from Recovery" in str(
            [r.extra.get("completed", {}).get("update") for r in station.store.history(ref=A1)]
        )


async def test_restores_that_keep_failing_need_attention_and_retry_restores_from_recovery(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(tmp_path, mosquitto, devices=0, workflow=RESTORING)
    world = build_sim_world(config)
    # update's retries are 1: two attempts, both failing part-way.
    world.inject(Fault("update", FaultKind.FAIL, A1, at=0.5, times=2, message="restore_failed after touch"))
    async with running(config, world) as station:
        device = device_needing(world, update=True)
        world.plug(A1, device)
        await eventually(lambda: station.store.port(A1).phase is Phase.NEEDS_ATTENTION, what="attention")
        state = station.store.port(A1)
        assert state.error is not None
        assert state.error.code == "simulated_fault"
        assert "left in Recovery mode" in state.error.message
        assert state.step == "update"
        assert (device.started["update"], device.completed["update"]) == (2, 0)
        assert device.mode is DeviceMode.RECOVERY
        assert [r[:2] for r in update_rows(station, A1)] == [
            (Phase.UPDATING, 1),
            (Phase.UPDATING, 2),
            (Phase.NEEDS_ATTENTION, 2),
        ]
        # A person looked at it and asks for another restore: by ECID, from Recovery.
        assert await station.act(A1, Action.RETRY) == "retrying update from Recovery"
        await eventually(lambda: station.store.port(A1).phase is Phase.DONE, what="done after retry")
        assert (device.started["update"], device.completed["update"]) == (3, 1)


async def test_a_device_in_recovery_with_another_ecid_is_never_restored(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(tmp_path, mosquitto, devices=0, workflow=RESTORING)
    world = build_sim_world(config)
    # Device A is pulled out half-way through its restore: the port remembers A at `update`.
    world.inject(Fault("update", FaultKind.UNPLUG, A1, at=0.5))
    async with running(config, world) as station:
        first = device_needing(world, update=True)
        world.plug(A1, first)
        await eventually(lambda: station.store.port(A1).phase is Phase.INTERRUPTED, what="interrupted")
        # Another device, in Recovery, goes into that port: not the recorded ECID, no history.
        stranger = device_needing(world, update=True)
        world.plug(A1, stranger, DeviceMode.RECOVERY)
        await eventually(lambda: station.store.port(A1).phase is Phase.NEEDS_ATTENTION, what="attention")
        state = station.store.port(A1)
        assert state.error is not None
        assert state.error.code == "recovery_mode"
        assert stranger.ecid_hex in state.error.message
        assert "no history" in state.error.message
        assert stranger.started["update"] == 0
        assert stranger.mode is DeviceMode.RECOVERY
        assert station.store.device(f"ecid:{stranger.ecid_hex}") is None  # nothing recorded against it
        with pytest.raises(ActionRejected, match="Recovery mode and is not the one this port worked on"):
            await station.act(A1, Action.RETRY)
        assert stranger.started["update"] == 0
        # The first device still has its interrupted restore, to resume wherever it turns up.
        record = station.store.device(f"ecid:{first.ecid_hex}")
        assert record is not None
        assert (record.phase, record.step) == (Phase.INTERRUPTED, "update")


async def test_a_known_device_replugged_in_recovery_resumes_its_restore(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(tmp_path, mosquitto, devices=0, workflow=RESTORING)
    world = build_sim_world(config)
    world.inject(Fault("update", FaultKind.UNPLUG, A1, at=0.5))
    async with running(config, world) as station:
        device = device_needing(world, update=True)
        world.plug(A1, device)
        await eventually(lambda: station.store.port(A1).phase is Phase.INTERRUPTED, what="interrupted")
        world.plug(A2, device, DeviceMode.RECOVERY)  # it shows up elsewhere, in Recovery
        await eventually(lambda: station.store.port(A2).phase is Phase.DONE, what="done on port 2")
        rows = station.store.history(ref=A2)
        assert rows[0].phase is Phase.DETECTED
        assert rows[0].detail is not None
        assert "Recovery" in rows[0].detail
        assert rows[1].phase is Phase.UPDATING
        assert (device.started["update"], device.completed["update"]) == (2, 1)
        assert device.mode is DeviceMode.NORMAL


async def test_a_device_left_in_recovery_when_the_daemon_stopped_is_restored_after_the_restart(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    # A long backoff: the daemon is stopped while the failed restore's device waits in Recovery.
    workflow = {**RESTORING, "policy": {"update": {"backoff": 1000}}}
    config = station_config(tmp_path, mosquitto, devices=0, workflow=workflow)
    world = build_sim_world(config)
    world.inject(Fault("update", FaultKind.FAIL, A1, at=0.5, message="restore_failed after touch"))
    device = device_needing(world, update=True)
    async with running(config, world) as station:
        world.plug(A1, device)
        modes: list[DeviceMode] = []

        def failed_part_way() -> bool:
            modes.append(device.mode)
            return DeviceMode.RESTORE in modes and device.mode is DeviceMode.RECOVERY

        await eventually(failed_part_way, what="restore mode, then left in Recovery")
    assert device.mode is DeviceMode.RECOVERY
    async with running(config, world) as station:
        await eventually(lambda: station.store.port(A1).phase is Phase.DONE, what="done after the restart")
        rows = station.store.history(ref=A1)
        stopped = [r for r in rows if r.phase is Phase.INTERRUPTED]
        assert [r.step for r in stopped] == ["update"]
        assert (stopped[0].detail or "").startswith("daemon stopped during update")
        resumed = [r for r in rows if r.detail and "resuming its restore" in r.detail]
        assert len(resumed) == 1
        assert resumed[0].phase is Phase.DETECTED
        assert (device.started["update"], device.completed["update"]) == (2, 1)


async def test_a_provisioned_device_in_recovery_needs_attention(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(tmp_path, mosquitto, devices=0, workflow=RESTORING)
    world = build_sim_world(config)
    async with running(config, world) as station:
        device = device_needing(world, update=False)
        world.plug(A1, device)
        await eventually(lambda: station.store.port(A1).phase is Phase.DONE, what="done")
        world.unplug(A1)
        await eventually(lambda: station.store.port(A1).phase is Phase.EMPTY, what="empty")
        world.plug(A2, device, DeviceMode.RECOVERY)
        await eventually(lambda: station.store.port(A2).phase is Phase.NEEDS_ATTENTION, what="attention")
        state = station.store.port(A2)
        assert state.error is not None
        assert state.error.code == "recovery_mode"
        assert "already provisioned" in state.error.message
        assert device.started["update"] == 0


async def test_an_erase_install_makes_the_device_forget_its_pairing(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(tmp_path, mosquitto, devices=0, workflow=RESTORING)
    world = build_sim_world(config)
    async with running(config, world) as station:
        device = device_needing(world, update=True)
        world.plug(A1, device)
        await eventually(lambda: station.store.port(A1).phase is Phase.DONE, what="done")
        assert device.completed["erase"] == 1  # by the erase-install restore
        assert station.bus is not None
        lockdown = station.bus.usbmuxd.lockdown[device.udid]
        # Paired once before the restore, and again after it: the erase-install wiped the pairing.
        assert lockdown.requests.count("Pair") == 2


# -- pymobiledevice3 backend and restorer -----------------------------------------------------------


class RecordingRestorer:
    """A `Restorer` that remembers each request and event on the way to the real one."""

    def __init__(self, inner: ProcessRestorer) -> None:
        self.inner = inner
        self.requests: list[RestoreRequest] = []
        self.events: list[RestoreEvent] = []

    async def restore(
        self, request: RestoreRequest, progress: ProgressFn, *, on_event: EventFn | None = None
    ) -> RestoreOutcome:
        self.requests.append(request)
        return await self.inner.restore(request, progress, on_event=self.events.append)


def no_progress(percent: int | None, detail: str | None) -> None:
    del percent, detail


async def test_pmd3_restores_a_device_in_recovery_by_ecid(tmp_path: Path) -> None:
    inner = ProcessRestorer(FAKE_WORKER, timeout=20)
    restorer = RecordingRestorer(inner)
    # No usbmuxd at this address: the backend must not need lockdownd for a device in Recovery.
    backend = Pymobiledevice3Backend(str(tmp_path / "no-usbmuxd"), tmp_path / "records", restorer=restorer)
    target = UpdateTarget("18.6.2", "22G100", ipsw=tmp_path / "iPhone_18.6.2.ipsw")
    await backend.restore_from_recovery("0x1C604A3405801E", target, erase=False, progress=no_progress)
    [request] = restorer.requests
    assert (request.ecid, request.udid, request.recovery) == (ECID, None, True)
    assert request.worker_args()[-1] == "--recovery"
    outcome = inner.last_outcome(ECID)
    assert outcome is not None
    assert outcome.ok
    assert outcome.modes[0] is DeviceMode.RECOVERY  # found in Recovery: no EnterRecovery
    assert DeviceMode.NORMAL not in outcome.modes[:-1]
    touches = [e.what for e in restorer.events if isinstance(e, TouchEvent)]
    assert touches == ["send_iboot"]
    logs = [e.message for e in restorer.events if isinstance(e, LogEvent)]
    assert any(f"ECID {ECID}" in m and "recovery=True" in m for m in logs)


async def test_pmd3_restore_from_recovery_failing_again_says_it_touched(tmp_path: Path) -> None:
    worker = (*FAKE_WORKER, "--fail-at", "50", "--error", "restore_failed")
    backend = Pymobiledevice3Backend(
        str(tmp_path / "no-usbmuxd"), tmp_path, restorer=ProcessRestorer(worker, timeout=20)
    )
    target = UpdateTarget("18.6.2", "22G100", ipsw=tmp_path / "x.ipsw")
    with pytest.raises(RestoreError) as caught:
        await backend.restore_from_recovery(ECID, target, erase=True, progress=no_progress)
    assert caught.value.code == "restore_failed"
    assert caught.value.touched
    assert caught.value.outcome.modes[0] is DeviceMode.RECOVERY


async def test_restore_from_recovery_needs_a_restorer_and_cfgutil_refuses(tmp_path: Path) -> None:
    target = UpdateTarget("18.6.2", "22G100", ipsw=tmp_path / "x.ipsw")
    with pytest.raises(RestoreUnavailableError, match="in Recovery"):
        await Pymobiledevice3Backend(None, tmp_path).restore_from_recovery(
            ECID, target, erase=False, progress=no_progress
        )
    cfgutil = CfgutilBackend(str(tmp_path / "no-such-cfgutil"))
    with pytest.raises(RestoreUnavailableError, match="cfgutil backend does not restore") as caught:
        await cfgutil.restore_from_recovery(ECID, target, erase=False, progress=no_progress)
    assert (caught.value.code, caught.value.retryable) == ("restore_unavailable", False)


async def test_the_real_worker_finds_a_recovery_device_on_usb_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--recovery` (`find_device(usb_only=True)`): the device is looked for among USB devices by the
    ECID in its iBoot serial string; usbmuxd and lockdownd are never asked."""

    async def no_lockdown(*args: object) -> None:
        raise AssertionError("a device in Recovery is not looked for through usbmuxd")

    class FakeIRecv:
        def __init__(self, ecid: int, timeout: int) -> None:
            self.ecid = ecid

    usb: list[tuple[int, int, str | None]] = []
    monkeypatch.setattr(restore_worker, "_normal_mode_device", no_lockdown)
    monkeypatch.setattr(restore_worker, "_usb_apple_devices", lambda: usb)
    monkeypatch.setattr(restore_worker, "IRecv", FakeIRecv)
    with pytest.raises(restore_worker.WorkerFailure) as caught:
        await restore_worker.find_device(int(ECID, 16), None, 0, usb_only=True)
    assert caught.value.code is RestoreCode.NO_DEVICE
    assert caught.value.message.endswith("in Recovery or DFU mode")
    usb.append((0x05AC, 0x1281, RECOVERY_SERIAL.replace("001A2C3E0E12802E", ECID)))
    device, mode = await restore_worker.find_device(int(ECID, 16), None, 0, usb_only=True)
    assert mode is DeviceMode.RECOVERY
    irecv: object = device.irecv
    assert isinstance(irecv, FakeIRecv)
    assert irecv.ecid == int(ECID, 16)
