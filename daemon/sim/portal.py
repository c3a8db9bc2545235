"""The simulated Apple side: provisional enrollment (what Apple Configurator does) and a portal whose
administrator assigns new serials to the MDM server after a while."""

from __future__ import annotations

import time

from daemon.apple.base import APPLE_CONFIGURATOR_SERVER, AppleServiceError, EnrollmentRejectedError
from daemon.ios.base import DeviceGoneError, DeviceInfo, ProgressFn
from daemon.sim.backend import SimOps
from daemon.sim.faults import FaultKind
from daemon.sim.world import PortalRecord, SimWorld


class SimEnroller:
    """Adds devices to the simulated organisation, with Configurator's rules: the device must still be
    in Setup Assistant, and a device accepts one provisional enrollment."""

    name = "sim"

    def __init__(self, world: SimWorld) -> None:
        self.world = world
        self.ops = SimOps(world)

    async def is_enrolled(self, device: DeviceInfo) -> bool | None:
        found = self.world.device_by_udid(device.udid)
        if found is not None and self.world.take_fault("enroll-check", found[1]) is not None:
            return None
        return device.serial in self.world.portal

    async def enroll(self, device: DeviceInfo, progress: ProgressFn) -> None:
        found = self.world.device_by_udid(device.udid)
        if found is None:
            raise DeviceGoneError(f"device {device.udid} is not connected")
        sim, ref = found
        if not sim.in_setup_assistant:
            raise EnrollmentRejectedError("the device has left Setup Assistant; erase it and try again")
        if sim.serial in self.world.portal:
            raise EnrollmentRejectedError("the device is already enrolled (a second nonce is refused)")
        await self.ops.run("enroll", sim, ref, progress, ticks=2)
        self.world.portal[sim.serial] = PortalRecord(APPLE_CONFIGURATOR_SERVER, time.time())
        sim.completed["enroll"] += 1
        self.world.save()


class SimAssignmentSource:
    """Observes the simulated portal; with `can_assign` it behaves like the Business Manager API."""

    name = "sim"

    def __init__(self, world: SimWorld, *, can_assign: bool = False) -> None:
        self.world = world
        self.can_assign = can_assign

    async def assigned_server(self, serial: str) -> str | None:
        for fault in self.world.faults:
            if fault.op == "assign" and fault.kind is FaultKind.FAIL and fault.times > 0:
                fault.times -= 1
                raise AppleServiceError("simulated portal outage")
        return self.world.admin_assigned(serial)

    async def assign(self, serial: str, server: str) -> bool:
        if not self.can_assign:
            return False
        record = self.world.portal.get(serial)
        if record is None:
            raise AppleServiceError(f"{serial} is not in the organisation")
        record.server = server
        self.world.save()
        return True
