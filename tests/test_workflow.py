"""The whole workflow on a simulated station: every phase, faults, unplugs, resumes, operator actions.

These run the production station (store, runners, hub supervisor, publisher to a real Mosquitto)
against the simulated bench at high speed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.models import PortRef
from daemon.sim.devices import make_device
from daemon.sim.faults import Fault, FaultKind
from daemon.station import Station, build_sim_world
from daemon.workflow.actions import Action, ActionRejected
from daemon.workflow.phases import Phase
from daemon.workflow.steps.base import StepContext
from daemon.workflow.steps.enroll import EnrollStep
from tests.conftest import eventually, running, station_config
from tests.mqtt_broker import Mosquitto

A1 = PortRef("hub-a", 1)
PIPELINE = [Phase.DETECTED, Phase.UPDATING, Phase.ERASING, Phase.ENROLLING, Phase.AWAITING_ASSIGNMENT]


def phases_of(station: Station, ref: PortRef) -> list[Phase]:
    return [row.phase for row in station.store.history(ref=ref)]


def all_done(station: Station) -> bool:
    occupied = [s for s in station.ports() if s.phase is not Phase.EMPTY]
    return bool(occupied) and all(s.phase is Phase.DONE for s in occupied)


async def test_eight_devices_reach_done_with_complete_history(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(tmp_path, mosquitto, devices=8)
    async with running(config) as station:
        await eventually(lambda: all_done(station), what="all 8 ports done")
        states = station.ports()
        assert [s.phase for s in states] == [Phase.DONE] * 8
        devices = station.store.devices()
        assert len(devices) == 8
        for device in devices:
            history = station.store.history(device_key=device.key)
            path = [h.phase for h in history]
            assert path[0] is Phase.DETECTED
            assert path[-1] is Phase.DONE
            # Every step either ran (a transition into its phase) or was skipped with a reason.
            skipped: dict[str, str] = {}
            for row in history:
                skipped.update(row.extra.get("skipped", {}))
            ran = {h.step for h in history if h.step}
            for step in ("update", "erase", "enroll", "assign", "setup"):
                assert (step in ran) != (step in skipped), (step, path, skipped)
            assert all(h.ts >= history[0].ts for h in history)
            assert device.identity.serial
            assert device.identity.ecid
            assert device.identity.udid
            sim = station.world.devices[int(device.identity.ecid, 16)]
            assert sim.completed["setup"] == 1
            assert sim.completed["enroll"] == 1
            assert sim.cloud_config_applied


async def test_a_failing_step_is_retried_then_fails_with_the_error(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(tmp_path, mosquitto, devices=1)
    world = build_sim_world(config)
    world.inject(Fault("setup", FaultKind.FAIL, A1, times=99, message="lockdown said no"))
    async with running(config, world) as station:
        await eventually(lambda: station.store.port(A1).phase is Phase.FAILED, what="port failed")
        state = station.store.port(A1)
        retries = config.workflow.policy_for("setup").retries
        assert state.step == "setup"
        assert state.attempt == retries + 1
        assert state.error is not None
        # The device answers DownloadAndApplyCloudConfiguration with an MCInstall error, which
        # pymobiledevice3 raises and the backend reports as a rejection.
        assert state.error.code == "mcinstall_rejected"
        assert "lockdown said no" in state.error.message
        attempts = [h for h in station.store.history(ref=A1) if h.phase is Phase.SETTING_UP]
        assert [h.attempt for h in attempts] == list(range(1, retries + 2))
        assert all(h.error is not None for h in attempts[1:])


async def test_a_transient_failure_recovers_on_retry(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(tmp_path, mosquitto, devices=1)
    world = build_sim_world(config)
    world.inject(Fault("erase", FaultKind.FAIL, A1, times=1))
    async with running(config, world) as station:
        await eventually(lambda: all_done(station), what="done after one retry")
        erasing = [h.attempt for h in station.store.history(ref=A1) if h.phase is Phase.ERASING]
        assert erasing == [1, 2]


async def test_timeout_counts_as_a_failed_attempt(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(tmp_path, mosquitto, devices=1, workflow={"minimum_ios": "26.1"})
    world = build_sim_world(config)
    device = world.new_device(26)
    device.ios_version, device.build = "17.5.1", "21F90"
    world.plug(A1, device)
    world.inject(Fault("update", FaultKind.SLOW, A1, times=1, factor=1000))
    async with running(config, world) as station:
        await eventually(lambda: all_done(station), within=30, what="done after a timed-out restore")
        updating = [h for h in station.store.history(ref=A1) if h.phase is Phase.UPDATING]
        assert [h.attempt for h in updating] == [1, 2]
        assert updating[1].error is not None
        assert updating[1].error.code == "timeout"


async def test_unplug_mid_step_interrupts_and_replug_resumes(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(tmp_path, mosquitto, devices=1)
    world = build_sim_world(config)
    world.inject(Fault("enroll", FaultKind.UNPLUG, A1, at=0.5))
    async with running(config, world) as station:
        await eventually(lambda: station.store.port(A1).phase is Phase.INTERRUPTED, what="interrupted")
        state = station.store.port(A1)
        assert state.step == "enroll"
        assert state.device is not None
        assert state.device.serial
        device = world.devices[int(state.device.ecid or "0", 16)]
        assert device.completed["enroll"] == 0
        world.plug(A1, device)
        await eventually(lambda: all_done(station), what="resumed to done")
        path = phases_of(station, A1)
        resumed_at = path.index(Phase.INTERRUPTED)
        # After the replug: detect again, then straight back to enrolling (nothing before it re-runs).
        assert path[resumed_at + 1 : resumed_at + 3] == [Phase.DETECTED, Phase.ENROLLING]
        assert device.completed["erase"] == 1
        assert device.completed["enroll"] == 1


async def test_device_moved_to_another_port_resumes_there(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(tmp_path, mosquitto, devices=1)
    world = build_sim_world(config)
    world.inject(Fault("setup", FaultKind.UNPLUG, A1, at=0.2))
    async with running(config, world) as station:
        await eventually(lambda: station.store.port(A1).phase is Phase.INTERRUPTED, what="interrupted")
        ecid = station.store.port(A1).device.ecid  # type: ignore[union-attr]
        device = world.devices[int(ecid or "0", 16)]
        other = PortRef("hub-a", 5)
        world.plug(other, device)
        await eventually(lambda: station.store.port(other).phase is Phase.DONE, what="done on port 5")
        assert list(phases_of(station, other))[:2] == [Phase.DETECTED, Phase.SETTING_UP]
        assert station.store.port(A1).phase is Phase.INTERRUPTED
        assert device.completed["setup"] == 1


async def test_unverifiable_interrupted_unsafe_step_needs_attention(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(tmp_path, mosquitto, devices=1)
    world = build_sim_world(config)
    world.inject(Fault("setup", FaultKind.UNPLUG, A1, at=0.5))
    async with running(config, world) as station:
        await eventually(lambda: station.store.port(A1).phase is Phase.INTERRUPTED, what="interrupted")
        assert station.store.port(A1).step == "setup"
        device = next(iter(world.devices.values()))
        # Back on the port, the device cannot say whether its cloud configuration was applied.
        world.inject(Fault("setup-check", FaultKind.UNKNOWN, A1))
        world.plug(A1, device)
        await eventually(
            lambda: station.store.port(A1).phase is Phase.NEEDS_ATTENTION, what="needs attention"
        )
        state = station.store.port(A1)
        assert state.error is not None
        assert state.error.code == "unknown_state"
        assert state.step == "setup"
        # The operator looked at the device and retries: the step runs and the device finishes.
        assert await station.act(A1, Action.RETRY) == "retrying setup"
        await eventually(lambda: all_done(station), what="done after operator retry")
        assert device.completed["setup"] == 1


async def test_an_interrupted_enrollment_is_asked_for_again_not_twice(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Enrolling only watches (the technician adds the device): after an unplug the step asks
    again, unless the device already arrived in the organisation meanwhile."""
    config = station_config(tmp_path, mosquitto, devices=1)
    world = build_sim_world(config)
    world.inject(Fault("enroll", FaultKind.UNPLUG, A1, at=0.5, replug_after=0.05))
    async with running(config, world) as station:
        await eventually(lambda: all_done(station), what="done")
        device = next(iter(world.devices.values()))
        assert device.completed["enroll"] == 1
        assert device.started["enroll"] == 2  # Configurator's first try lost the device
        assert world.in_organisation(device.serial)


async def test_operator_abort_skip_and_power_cycle(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(tmp_path, mosquitto, devices=1, sim={"assign_delay": 10_000_000})
    async with running(config) as station:
        await eventually(
            lambda: station.store.port(A1).phase is Phase.AWAITING_ASSIGNMENT, what="awaiting assignment"
        )
        # Retrying a port that is running makes no sense; the reason comes back to the operator.
        with pytest.raises(ActionRejected, match="does not apply to a port that is awaiting_assignment"):
            await station.act(A1, Action.RETRY)
        assert await station.act(A1, Action.ABORT) == "aborted"
        state = station.store.port(A1)
        assert state.phase is Phase.FAILED
        assert state.error is not None
        assert state.error.code == "aborted"
        # Power-cycling re-enumerates the device; the port keeps its (failed) outcome.
        assert await station.act(A1, Action.POWER_CYCLE) == "port power-cycled"
        await eventually(lambda: station.store.port(A1).phase is Phase.EMPTY, what="power-cycle unplug seen")
        await eventually(
            lambda: station.store.port(A1).phase is Phase.AWAITING_ASSIGNMENT, what="retrying assign"
        )
        # The admin is slow today: skip the step by hand (e.g. assigned via another account).
        history_before = len(station.store.history(ref=A1))
        world = station.world
        device = next(iter(world.devices.values()))
        world.apple.portal_assign(device.serial, world.apple.server_id("benchhub MDM"))  # the admin did
        assert await station.act(A1, Action.SKIP) == "skipped assign"
        await eventually(lambda: all_done(station), what="done after skip")
        rows = station.store.history(ref=A1)[history_before:]
        assert rows[0].actor == "operator"
        assert rows[0].extra["skipped_by_operator"] == "assign"
        assert rows[0].phase is Phase.SETTING_UP


async def test_a_device_that_cannot_reach_the_minimum_needs_attention(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(tmp_path, mosquitto, devices=0, workflow={"minimum_ios": "18.0"})
    world = build_sim_world(config)
    # An iPhone 8: its last iOS is 16.
    iphone8 = next(d for i in range(1000) if (d := make_device(seed=1, index=i)).product_type == "iPhone10,4")
    world.plug(A1, iphone8)
    async with running(config, world) as station:
        await eventually(
            lambda: station.store.port(A1).phase is Phase.NEEDS_ATTENTION, what="needs attention"
        )
        state = station.store.port(A1)
        assert state.step == "update"
        assert state.error is not None
        assert state.error.code == "unsupported_device"
        assert "iPhone10,4" in state.error.message
        assert iphone8.completed["erase"] == 0  # nothing destructive happened


async def test_a_bug_in_a_step_fails_that_port_only(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = station_config(tmp_path, mosquitto, devices=3)
    original = EnrollStep.run

    async def broken_on_port_2(self: EnrollStep, ctx: StepContext) -> str | None:
        if ctx.ref.port == 2:
            raise KeyError("a bug")
        return await original(self, ctx)

    monkeypatch.setattr(EnrollStep, "run", broken_on_port_2)
    async with running(config) as station:
        a2 = PortRef("hub-a", 2)
        await eventually(
            lambda: (
                station.store.port(a2).phase is Phase.FAILED
                and all(station.store.port(PortRef("hub-a", n)).phase is Phase.DONE for n in (1, 3))
            ),
            what="port 2 failed, the others done",
        )
        error = station.store.port(a2).error
        assert error is not None
        assert error.code == "internal_error"
        assert "KeyError" in error.message


async def test_hub_link_outage_is_reported_and_recovered(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(tmp_path, mosquitto, devices=1)
    async with running(config) as station:
        await eventually(lambda: station.store.hub_statuses().get("hub-a") is True, what="hub online")
        station.world.set_hub_online("hub-a", False)
        await eventually(lambda: station.store.hub_statuses()["hub-a"] is False, what="hub offline")
        station.world.set_hub_online("hub-a", True)
        await eventually(lambda: station.store.hub_statuses()["hub-a"] is True, within=10, what="hub back")
        await eventually(lambda: all_done(station), what="the device finished regardless")


async def test_a_device_set_up_for_another_mdm_needs_attention(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(
        tmp_path, mosquitto, devices=1, workflow={"mdm_url": "https://mdm.other.example/enroll"}
    )
    async with running(config) as station:
        await eventually(
            lambda: station.store.port(A1).phase is Phase.NEEDS_ATTENTION, what="needs attention"
        )
        state = station.store.port(A1)
        assert state.step == "setup"
        assert state.error is not None
        assert state.error.code == "mdm_url_mismatch"
        assert "https://mdm.other.example/enroll" in state.error.message
        device = next(iter(station.world.devices.values())) if station.world else None
        assert device is not None
        assert device.started["setup"] == 1  # not retried: the configuration is on the device now
