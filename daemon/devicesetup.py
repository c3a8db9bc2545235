"""From config to the device side of a station: the services steps use, and where devices come from.

Two benches, one shape:

* simulated (`[sim]`): the simulated world's backend, firmware and portal; devices found through the
  simulated USB host (`daemon.sim.usbbus`: sysfs tree, udev events, usbmuxd socket);
* real: pymobiledevice3 through the system's usbmuxd (`[devices]`), the IPSW cache (`[firmware]`),
  and devices found through usbmuxd, udev (or polling) and `/sys`.

Either way the station reads devices through the same `DeviceWatcher`; only its sources differ.
"""

from __future__ import annotations

from daemon.apple.base import AppleServiceError
from daemon.config import Config
from daemon.ios.base import DeviceInfo, ProgressFn, UpdateTarget
from daemon.ios.firmware import IpswCache
from daemon.ios.pmd3 import Pymobiledevice3Backend
from daemon.sim.backend import SimDeviceBackend, SimFirmware
from daemon.sim.portal import SimAssignmentSource, SimEnroller
from daemon.sim.world import SimWorld
from daemon.usb.hotplug import open_hotplug
from daemon.usb.sysfs import UsbSysfs
from daemon.usb.usbmux import UsbmuxClient
from daemon.usb.watcher import DeviceWatcher
from daemon.workflow.steps.base import Services


class AppleServicesNotConfigured(AppleServiceError):
    code = "apple_not_configured"
    retryable = False


class NoAppleServices:
    """`Enroller` and `AssignmentSource` of a bench without Apple Business Manager access. Config
    validation keeps `enroll` and `assign` out of such a bench's steps; this only makes a slip loud."""

    name = "none"

    async def is_enrolled(self, device: DeviceInfo) -> bool | None:
        return None

    async def enroll(self, device: DeviceInfo, progress: ProgressFn) -> None:
        raise AppleServicesNotConfigured("no Apple Business Manager access is configured")

    async def assigned_server(self, serial: str) -> str | None:
        raise AppleServicesNotConfigured("no Apple Business Manager access is configured")

    async def assign(self, serial: str, server: str) -> bool:
        return False


class NoFirmware:
    """The `FirmwareSource` of a bench that does not update (config validation requires an IPSW
    cache when `update` is a step)."""

    async def target_for(self, product_type: str, minimum: str) -> UpdateTarget | None:
        return None


def sim_services(world: SimWorld) -> Services:
    return Services(
        backend=SimDeviceBackend(world),
        firmware=SimFirmware(),
        enroller=SimEnroller(world),
        assignment=SimAssignmentSource(world),
    )


def real_services(config: Config) -> Services:
    devices, ipsw_dir = config.devices, config.firmware.ipsw_dir
    assert devices.pair_records is not None, "config loading defaults it next to the database"
    apple = NoAppleServices()
    return Services(
        backend=Pymobiledevice3Backend(devices.usbmuxd, devices.pair_records),
        firmware=IpswCache(ipsw_dir) if ipsw_dir is not None else NoFirmware(),
        enroller=apple,
        assignment=apple,
    )


def real_watcher(config: Config) -> DeviceWatcher:
    """Devices on the host's USB: the system's (or configured) usbmuxd, udev or polling, `/sys`."""
    return DeviceWatcher(
        UsbmuxClient(config.devices.usbmuxd),
        open_hotplug(prefer=config.devices.hotplug),
        UsbSysfs(),
    )
