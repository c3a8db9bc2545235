"""Simulated device operations with realistic durations, re-enumeration and injected faults.

It implements the same `DeviceBackend` protocol the pymobiledevice3 backend does; the devices'
comings and goings reach the station through the simulated USB host (`daemon.sim.usbbus`).
Durations are seconds of real life, run `speed` times faster.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal

from daemon.ios.base import (
    CloudConfig,
    DeviceError,
    DeviceGoneError,
    DeviceInfo,
    DeviceMode,
    ProgressFn,
    SetupPlan,
    UnexpectedReplyError,
    UpdateTarget,
    transfer_listener,
)
from daemon.models import PortRef
from daemon.sim.catalog import MODELS_BY_TYPE, RELEASES, major
from daemon.sim.devices import SimDevice
from daemon.sim.faults import Fault, FaultKind
from daemon.sim.usbbandwidth import OverloadError
from daemon.sim.world import SimWorld
from daemon.usb.apple import parse_ecid
from daemon.versions import parse_version
from daemon.workflow.scheduler import controller_of

DURATIONS: Final[dict[str, float]] = {
    "detect": 3.0,
    # A restore from a cached IPSW, on the device's side (ramdisk boot, verifying, flashing, the
    # baseband, the reboot); the filesystem image crossing USB comes on top, at the speed its
    # controller allows (`daemon.sim.usbbandwidth`): about 11 minutes in all, alone on a USB 2 bus.
    "update": 480.0,
    "erase": 150.0,
    "enroll": 25.0,
    "setup": 90.0,
}

MDM_URL: Final = "https://mdm.example.com/enroll"
ORGANIZATION: Final = "Example Corp"


def ade_profile() -> dict[str, Any]:
    """The cloud configuration Apple's device enrollment service hands a device assigned to an MDM
    server (MCInstall `CloudConfiguration` keys; every simulated MDM server is the example one)."""
    return {
        "ConfigurationURL": MDM_URL,
        "OrganizationName": ORGANIZATION,
        "IsMDMUnremovable": True,
        "IsSupervised": True,
        "IsMandatory": True,
        "AllowPairing": True,
        "SkipSetup": [],
    }


def stored_cloud_config(device: SimDevice) -> dict[str, Any] | None:
    """What the device reports as its cloud configuration (None: it has none). A device from a state
    file written before the details were kept gets the simulated portal's."""
    if not device.cloud_config_applied:
        return None
    return dict(device.cloud_config) if device.cloud_config is not None else ade_profile()


def ade_server(world: SimWorld, device: SimDevice) -> str | None:
    """Apple's rule for handing out a cloud configuration: only to a device the organisation has
    assigned to a real MDM server (not Apple Configurator's placeholder). None: nothing for it."""
    return world.assigned_mdm_server(device.serial)


class SimulatedFault(DeviceError):
    code = "simulated_fault"


class SimOps:
    """Shared plumbing for simulated operations: find the device, apply faults, pace progress."""

    def __init__(self, world: SimWorld) -> None:
        self.world = world

    def locate(self, udid: str) -> tuple[SimDevice, PortRef]:
        found = self.world.device_by_udid(udid)
        if found is None or found[0].mode is not DeviceMode.NORMAL:
            raise DeviceGoneError(f"device {udid} is not connected")
        return found

    async def run(
        self,
        op: str,
        device: SimDevice,
        ref: PortRef,
        progress: ProgressFn | None = None,
        *,
        ticks: int = 1,
        fault: Fault | Literal["take"] | None = "take",
        prelude: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Spend the operation's simulated time, raising where a fault says so (the fault for this
        operation and port, unless the caller took it already). `prelude` runs first, once the
        operation counts as started (a restore's transfer)."""
        if fault == "take":
            fault = self.world.take_fault(op, ref)
        device.started[op] += 1
        self.world.save()
        if prelude is not None:
            await prelude()
        duration = DURATIONS[op]
        if fault is not None and fault.kind is FaultKind.SLOW:
            duration *= fault.factor
        for tick in range(ticks):
            if fault is not None and self._strikes(fault, tick, ticks):
                await self._apply(fault, device, ref)
            await self.world.sleep(duration / ticks)
            if self.world.port_of(device.ecid) != ref:
                raise DeviceGoneError(f"device {device.serial} was disconnected during {op}")
            if progress is not None:
                progress(int(100 * (tick + 1) / ticks), None)
        if fault is not None and fault.kind is FaultKind.FAIL:
            raise SimulatedFault(f"{op}: {fault.message}")

    @staticmethod
    def _strikes(fault: Fault, tick: int, ticks: int) -> bool:
        return fault.kind is FaultKind.UNPLUG and tick == min(ticks - 1, int(fault.at * ticks))

    async def _apply(self, fault: Fault, device: SimDevice, ref: PortRef) -> None:
        self.pull(fault, device, ref)
        raise DeviceGoneError(f"device {device.serial} was disconnected")

    def wipe(self, device: SimDevice, ref: PortRef | None, fault: Fault | None) -> None:
        """What an erase does once the device has acknowledged it: it leaves USB, wipes itself and
        reboots into Setup Assistant (later, honouring a SLOW or UNPLUG `fault`; not at all when it
        is no longer in a port, `ref` None); a provisional enrollment survives an erase, a cloud
        configuration does not."""
        device.started["erase"] += 1
        device.completed["erase"] += 1
        device.in_setup_assistant = True
        device.clear_cloud_config()
        self.world.erased(device)
        self.world.save()
        self.world.vanish(device)
        if ref is None:
            return
        reboot = DURATIONS["erase"] / self.world.speed
        if fault is not None and fault.kind is FaultKind.SLOW:
            reboot *= fault.factor
        if fault is not None and fault.kind is FaultKind.UNPLUG:
            self.world.later(reboot * fault.at, lambda: self.pull(fault, device, ref))
        self.world.later(reboot, lambda: self._reboot(device, ref))

    def _reboot(self, device: SimDevice, ref: PortRef) -> None:
        if self.world.port_of(device.ecid) == ref:
            self.world.reappear(device)

    def pull(self, fault: Fault, device: SimDevice, ref: PortRef) -> None:
        """The technician pulls the device out (and plugs it back later if the fault says so)."""
        self.world.unplug(ref)
        if fault.replug_after is not None:
            self.world.schedule_replug(ref, device, fault.replug_after)


class SimDeviceBackend:
    """`DeviceBackend` over the simulated world."""

    def __init__(self, world: SimWorld) -> None:
        self.world = world
        self.ops = SimOps(world)

    async def info(self, udid: str) -> DeviceInfo:
        device, ref = self.ops.locate(udid)
        await self.ops.run("detect", device, ref)
        return device.info()

    async def update(self, udid: str, target: UpdateTarget, *, erase: bool, progress: ProgressFn) -> None:
        device, ref = self.ops.locate(udid)
        await self._restore(device, ref, target, erase=erase, progress=progress)

    async def restore_from_recovery(
        self, ecid: str, target: UpdateTarget, *, erase: bool, progress: ProgressFn
    ) -> None:
        """The device is found by ECID, as a real restorer finds it on USB
        (it has no UDID in Recovery); one that is not in a port, or not in Recovery, is not there."""
        device = self.world.devices.get(parse_ecid(ecid))
        ref = self.world.port_of(device.ecid) if device is not None else None
        if device is None or ref is None or device.mode is not DeviceMode.RECOVERY:
            raise DeviceGoneError(f"no device with ECID {ecid} in Recovery mode")
        await self._restore(device, ref, target, erase=erase, progress=progress)

    async def _restore(
        self, device: SimDevice, ref: PortRef, target: UpdateTarget, *, erase: bool, progress: ProgressFn
    ) -> None:
        """A restore, from normal mode (EnterRecovery first) or from Recovery (where a failed one
        left the device)."""
        if major(target.version) > device.model.max_major:
            raise UnexpectedReplyError(f"{device.product_type} does not support iOS {target.version}")
        from_recovery = device.mode is DeviceMode.RECOVERY
        fault = self.world.take_fault("update", ref)
        if fault is not None and fault.kind is FaultKind.FAIL and fault.at == 0:
            # Failed before touching the device (the signing server unreachable, say): it is as it was.
            device.started["update"] += 1
            raise SimulatedFault(f"update: {fault.message}")
        if not from_recovery:
            progress(0, "entering recovery mode")
            self.world.reenumerate(device, DeviceMode.RECOVERY)

        moves = self.world.usb is not None and self.world.restore_bytes > 0
        base = 50 if moves else 0  # the share of the progress bar the transfer takes

        def ramdisk_booted() -> None:
            if device.mode is DeviceMode.RECOVERY and self.world.port_of(device.ecid) == ref:
                # iBoot has booted the restore ramdisk: back on usbmuxd as `restored`, new DeviceID.
                self.world.reenumerate(device, DeviceMode.RESTORE)

        def restoring(percent: int | None, _detail: str | None) -> None:
            ramdisk_booted()
            progress(None if percent is None else base + percent * (100 - base) // 100, "restoring")

        def sending(fraction: float) -> None:
            ramdisk_booted()
            progress(int(base * fraction), "sending filesystem")

        async def transfer() -> None:
            await self._transfer(device, ref, sending)

        try:
            await self.ops.run(
                "update", device, ref, restoring, ticks=20, fault=fault, prelude=transfer if moves else None
            )
        except SimulatedFault:
            # A restore that fails part-way leaves the device in Recovery, as real ones do: it needs
            # a person (or another restore, found by ECID), and cannot say what version it has.
            self.world.reenumerate(device, DeviceMode.RECOVERY)
            raise
        except BaseException:
            if from_recovery:
                # Cut off while restoring a device that had no working system: it has none now.
                if self.world.port_of(device.ecid) == ref:
                    self.world.reenumerate(device, DeviceMode.RECOVERY)
                else:
                    device.mode = DeviceMode.RECOVERY
                raise
            # Cut off (cancelled, unplugged): the old system is intact until the final reboot, so the
            # device boots back into it (if it is still in its port).
            device.mode = DeviceMode.NORMAL
            if self.world.port_of(device.ecid) == ref:
                self.world.reappear(device)
            raise
        await self._restored(device, target, erase=erase)

    async def _restored(self, device: SimDevice, target: UpdateTarget, *, erase: bool) -> None:
        """The restore completed: the new system boots, back on the host at Setup Assistant."""
        device.mode = DeviceMode.NORMAL
        device.ios_version, device.build = target.version, target.build
        if erase:  # an erase-install: the erase's effect took place too
            device.in_setup_assistant = True
            device.clear_cloud_config()
            device.started["erase"] += 1
            device.completed["erase"] += 1
            self.world.erased(device)  # and, as after any erase, it has forgotten its pairings
        device.completed["update"] += 1
        self.world.save()
        self.world.reappear(device)
        try:
            await self.world.until_on_host(device)
        except TimeoutError:
            raise DeviceGoneError(f"device {device.serial} did not come back after the restore") from None

    async def _transfer(self, device: SimDevice, ref: PortRef, progress: Callable[[float], None]) -> None:
        """The filesystem image crossing the port's USB controller, shared with every other restore
        on it; breaking off there fails the restore part-way (the device stays in Recovery)."""
        assert self.world.usb is not None
        controller = self.world.usb.controller(controller_of(self.world.usb_path(ref)))

        def moved(fraction: float) -> None:
            if self.world.port_of(device.ecid) != ref:
                raise DeviceGoneError(f"device {device.serial} was disconnected during update")
            progress(fraction)

        done = transfer_listener()
        await self.world.sleep(30.0)  # the restore ramdisk boots
        moved(0.0)
        try:
            await controller.transfer(self.world.restore_bytes, moved, tick=10.0)
        except OverloadError as exc:
            raise SimulatedFault(f"update: {exc}") from None
        done()

    async def erase(self, udid: str) -> None:
        device, ref = self.ops.locate(udid)
        fault = self.world.take_fault("erase", ref)
        if fault is not None and fault.kind is FaultKind.FAIL:
            raise SimulatedFault(f"erase: {fault.message}")
        self.ops.wipe(device, ref, fault)

    async def cloud_configuration(self, udid: str) -> CloudConfig | None:
        device, _ref = self.ops.locate(udid)
        details = stored_cloud_config(device)
        if details is None:
            return CloudConfig(applied=False)
        return CloudConfig(
            applied=True,
            configuration_url=details.get("ConfigurationURL"),
            organization=details.get("OrganizationName"),
            is_mdm_unremovable=bool(details.get("IsMDMUnremovable")),
        )

    async def setup(self, udid: str, plan: SetupPlan, progress: ProgressFn) -> None:
        device, ref = self.ops.locate(udid)
        if device.cloud_config_applied:
            raise UnexpectedReplyError("cloud configuration already applied (MCInstall error 14002)")
        server = ade_server(self.world, device)
        if server is None:
            raise UnexpectedReplyError(f"no Automated Device Enrollment profile for {device.serial} yet")
        await self.ops.run("setup", device, ref, progress, ticks=5)
        device.store_cloud_config(ade_profile())
        device.in_setup_assistant = False
        device.completed["setup"] += 1
        self.world.save()


class SimFirmware:
    """The IPSW cache of a simulated bench: every release in the catalogue is 'downloaded'."""

    async def target_for(self, product_type: str, minimum: str) -> UpdateTarget | None:
        model = MODELS_BY_TYPE.get(product_type)
        if model is None:
            return None
        fitting = [
            r
            for r in RELEASES
            if major(r.version) <= model.max_major and parse_version(r.version) >= parse_version(minimum)
        ]
        if not fitting:
            return None
        best = max(fitting, key=lambda r: parse_version(r.version))
        # Apple's IPSWs carry Erase and Update identities for every device they support.
        return UpdateTarget(best.version, best.build, erase_install=True, update_install=True)
