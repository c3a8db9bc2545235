"""From config to the device side of a station: the services steps use, and where devices come from.

Two benches, one shape:

* simulated (`[sim]`): pymobiledevice3 against the simulated devices through the simulated USB host's
  usbmuxd socket (`daemon.sim.usbbus`: sysfs tree, udev events, usbmuxd socket), restores and the
  firmware and portal world-level (`SimBackend`); devices found through that same USB host;
* real: pymobiledevice3 through the system's usbmuxd (`[devices]`), the IPSW cache (`[firmware]`),
  and devices found through usbmuxd, udev (or polling) and `/sys`.

Either way the station reads devices through the same `DeviceWatcher`; only its sources differ.
"""

from __future__ import annotations

from daemon.apple.tracker import OrgTracker
from daemon.config import Config
from daemon.ios.base import (
    CloudConfig,
    DeviceBackend,
    DeviceInfo,
    ProgressFn,
    ServiceUnavailableError,
    SetupPlan,
    UpdateTarget,
)
from daemon.ios.cfgutil import CfgutilBackend
from daemon.ios.firmware import IpswCache
from daemon.ios.pmd3 import Pymobiledevice3Backend
from daemon.ios.restore import ProcessRestorer
from daemon.sim.backend import SimDeviceBackend, SimFirmware
from daemon.sim.usbbus import SimUsbBus
from daemon.sim.world import SimWorld
from daemon.technician import Technician
from daemon.usb.hotplug import open_hotplug
from daemon.usb.sysfs import UsbSysfs
from daemon.usb.usbmux import UsbmuxClient
from daemon.usb.watcher import DeviceWatcher
from daemon.workflow.steps.base import Services


class NoFirmware:
    """The `FirmwareSource` of a bench that does not update (config validation requires an IPSW
    cache when `update` is a step)."""

    async def target_for(self, product_type: str, minimum: str) -> UpdateTarget | None:
        return None


class SimBackend:
    """The simulated bench's `DeviceBackend`: the production pymobiledevice3 backend against the
    simulated devices (through the bus's usbmuxd socket, lockdownd and MCInstall: `daemon.sim.effects`)
    for detect, erase, the cloud configuration and setup, so the simulation exercises the client code
    a real bench runs. Only `update` is world-level: in production a restore runs in a worker
    process, which could not change this process's simulated world.

    `info` first spends the detect step's simulated time and takes its injected faults (a `fail`
    raises `SimulatedFault`, an `unplug` pulls the device): lockdownd's answers have no single request
    that means "detect" to hang them on."""

    def __init__(self, world: SimWorld, bus: SimUsbBus) -> None:
        self.world = world
        self.bus = bus
        self.sim = SimDeviceBackend(world)
        self.pmd3 = Pymobiledevice3Backend(bus.socket_path, bus.pair_records)

    async def info(self, udid: str) -> DeviceInfo:
        device, ref = self.sim.ops.locate(udid)
        await self.sim.ops.run("detect", device, ref)
        return await self.pmd3.info(udid)

    async def update(self, udid: str, target: UpdateTarget, *, erase: bool, progress: ProgressFn) -> None:
        await self.sim.update(udid, target, erase=erase, progress=progress)

    async def restore_from_recovery(
        self, ecid: str, target: UpdateTarget, *, erase: bool, progress: ProgressFn
    ) -> None:
        await self.sim.restore_from_recovery(ecid, target, erase=erase, progress=progress)

    async def erase(self, udid: str) -> None:
        await self.pmd3.erase(udid)

    async def cloud_configuration(self, udid: str) -> CloudConfig | None:
        found = self.world.device_by_udid(udid)
        if found is not None and self.world.take_fault("setup-check", found[1]) is not None:
            # A check that cannot tell (tests of `needs_attention` for unverifiable steps).
            raise ServiceUnavailableError("simulated: MCInstall did not answer")
        return await self.pmd3.cloud_configuration(udid)

    async def setup(self, udid: str, plan: SetupPlan, progress: ProgressFn) -> None:
        await self.pmd3.setup(udid, plan, progress)


def sim_services(
    world: SimWorld, bus: SimUsbBus | None, apple: OrgTracker | None, technician: Technician
) -> Services:
    """The simulated bench's services; with its USB host (`bus`), device operations go through
    pymobiledevice3 (`SimBackend`), without one they are all world-level (`SimDeviceBackend`)."""
    backend: DeviceBackend = SimBackend(world, bus) if bus is not None else SimDeviceBackend(world)
    return Services(backend=backend, firmware=SimFirmware(), apple=apple, technician=technician)


def real_services(config: Config, apple: OrgTracker | None, technician: Technician) -> Services:
    ipsw_dir = config.firmware.ipsw_dir
    return Services(
        backend=real_backend(config),
        firmware=IpswCache(ipsw_dir) if ipsw_dir is not None else NoFirmware(),
        apple=apple,
        technician=technician,
    )


def real_backend(config: Config) -> DeviceBackend:
    devices = config.devices
    assert devices.pair_records is not None, "config loading defaults it next to the database"
    if devices.backend == "cfgutil":
        return CfgutilBackend(devices.cfgutil)
    # Restores run in worker processes (docs/restores.md); a worker ends itself with the daemon.
    return Pymobiledevice3Backend(devices.usbmuxd, devices.pair_records, restorer=ProcessRestorer())


def real_watcher(config: Config) -> DeviceWatcher:
    """Devices on the host's USB: the system's (or configured) usbmuxd, udev or polling, `/sys`."""
    return DeviceWatcher(
        UsbmuxClient(config.devices.usbmuxd),
        open_hotplug(prefer=config.devices.hotplug),
        UsbSysfs(),
    )
