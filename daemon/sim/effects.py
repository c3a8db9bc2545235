"""The simulated world behind MCInstall: `DeviceEffects` over a `SimDevice` of a `SimWorld`.

With these, the simulated bench's usbmuxd (`daemon.sim.usbbus`) serves lockdownd and MCInstall for
the world's devices, so the station runs pymobiledevice3's own client code for detect, erase, the
cloud configuration and setup; the device's state and Apple's rules stay in one place (the world),
shared with the world-level `SimDeviceBackend`:

* the cloud configuration is the `SimDevice`'s (persisted with the world); applying one counts as
  the setup that took effect (`completed["setup"]`) and ends Setup Assistant, as the world-level
  setup does;
* `DownloadAndApplyCloudConfiguration` is where a real device spends its time (it talks to Apple over
  its own network), so the setup step's simulated duration and its injected faults (`fail`, `slow`,
  `unplug`) apply while the device fetches;
* `EraseDevice` faults are taken before the acknowledgement (`before`): a failing erase answers with
  an MCInstall error; otherwise the device wipes itself exactly as `SimOps.wipe` says (leaves USB,
  reboots later, a `slow` or `unplug` fault honoured) and forgets its pairings, as a real one does.

lockdownd's values (`LockdownState.info`) are refreshed from the `SimDevice` on every attach and
whenever these effects change it, so what pymobiledevice3 reads is the world's truth.
"""

from __future__ import annotations

from typing import Any, Final

from daemon.ios.base import DeviceError, DeviceGoneError
from daemon.models import PortRef
from daemon.sim.backend import SimOps, ade_profile, ade_server, stored_cloud_config
from daemon.sim.devices import SimDevice
from daemon.sim.faults import Fault, FaultKind
from daemon.sim.lockdownd import LockdownState
from daemon.sim.mcinstall import (
    CLOUD_CONFIG_ERROR_DOMAIN,
    ERROR_NO_CLOUD_CONFIG,
    TUNNEL_ERROR_DOMAIN,
    InstalledProfile,
    McError,
)
from daemon.sim.usbmuxd import MuxDevice
from daemon.sim.world import SimWorld

ERROR_SIMULATED_FAULT: Final = 14099
"""[INFERRED] MCInstall error code for an injected fault (an arbitrary code in the tunnel's domain;
clients key on 14002 only, every other code is a rejection)."""


class WorldEffects:
    """One MCInstall connection's view of a world device (made per connection by `WorldDevices`)."""

    def __init__(self, devices: WorldDevices, device: SimDevice, lockdown: LockdownState) -> None:
        self.devices = devices
        self.world = devices.world
        self.ops = devices.ops
        self.device = device
        self.lockdown = lockdown
        self._erase_fault: Fault | None = None

    # -- state -------------------------------------------------------------------------------------

    @property
    def in_setup_assistant(self) -> bool:
        return self.device.in_setup_assistant

    @property
    def activation_state(self) -> str:
        return self.device.info().activation_state

    def cloud_configuration(self) -> dict[str, Any] | None:
        return stored_cloud_config(self.device)

    def apply_cloud_configuration(self, details: dict[str, Any]) -> None:
        device = self.device
        device.store_cloud_config(details)
        device.in_setup_assistant = False
        device.completed["setup"] += 1
        self.world.save()
        certificates = details.get("SupervisorHostCertificates")
        if isinstance(certificates, list):
            self.lockdown.supervisor_certificates = {c for c in certificates if isinstance(c, bytes)}
        self._refresh()

    async def fetch_cloud_configuration(self) -> dict[str, Any]:
        device, ref = self.device, self._port()
        if ade_server(self.world, device) is None:
            raise McError(
                CLOUD_CONFIG_ERROR_DOMAIN,
                ERROR_NO_CLOUD_CONFIG,
                f"No Automated Device Enrollment configuration for {device.serial} yet.",
            )
        try:
            await self.ops.run("setup", device, ref, ticks=5)
        except DeviceGoneError as exc:
            # Pulled mid-download: the connection dies with the device (usbmuxd closes it).
            raise ConnectionError(str(exc)) from exc
        except DeviceError as exc:  # an injected failure (SimulatedFault)
            raise McError(TUNNEL_ERROR_DOMAIN, ERROR_SIMULATED_FAULT, exc.message) from exc
        return ade_profile()

    # -- profiles (kept while the bench runs; an erase removes them) -------------------------------

    def profiles(self) -> list[InstalledProfile]:
        return list(self.devices.installed.get(self.device.udid, []))

    def install_profile(self, profile: InstalledProfile) -> None:
        kept = [p for p in self.profiles() if p.identifier != profile.identifier]
        self.devices.installed[self.device.udid] = [*kept, profile]

    def remove_profile(self, identifier: str) -> None:
        self.devices.installed[self.device.udid] = [p for p in self.profiles() if p.identifier != identifier]

    # -- erase -------------------------------------------------------------------------------------

    async def before(self, request: str) -> None:
        if request != "EraseDevice":
            return
        fault = self.world.take_fault("erase", self._port())
        if fault is not None and fault.kind is FaultKind.FAIL:
            raise McError(TUNNEL_ERROR_DOMAIN, ERROR_SIMULATED_FAULT, f"erase: {fault.message}")
        self._erase_fault = fault

    def erase(self, *, preserve_data_plan: bool, disallow_proximity_setup: bool) -> None:
        del preserve_data_plan, disallow_proximity_setup  # no cellular plan or proximity setup here
        self.devices.installed.pop(self.device.udid, None)
        self.lockdown.paired_hosts.clear()
        self.lockdown.supervisor_certificates.clear()
        self.ops.wipe(self.device, self.world.port_of(self.device.ecid), self._erase_fault)
        self._refresh()

    # -- plumbing ----------------------------------------------------------------------------------

    def _port(self) -> PortRef:
        ref = self.world.port_of(self.device.ecid)
        if ref is None:
            raise ConnectionError(f"device {self.device.serial} is not in a port")
        return ref

    def _refresh(self) -> None:
        """lockdownd reports what the device now is (Setup Assistant, activation)."""
        self.lockdown.info = self.device.info()


class WorldDevices:
    """`effects_for` of the simulated bench's usbmuxd: each attached device's `WorldEffects`."""

    def __init__(self, world: SimWorld) -> None:
        self.world = world
        self.ops = SimOps(world)
        self.installed: dict[str, list[InstalledProfile]] = {}

    def device(self, udid: str) -> SimDevice | None:
        return next((d for d in self.world.devices.values() if d.udid == udid), None)

    def effects_for(self, mux_device: MuxDevice) -> WorldEffects:
        device = self.device(mux_device.udid)
        if device is None:  # not the world's: nothing serves it (the client sees the connection end)
            raise ConnectionError(f"no simulated device {mux_device.udid}")
        return WorldEffects(self, device, mux_device.lockdown)
