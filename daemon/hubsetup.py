"""From hub config to running drivers: one factory per hub kind, and the simulated Cambrionix hubs.

A `simulate = "PP15S"` hub runs the byte-faithful Cambrionix simulator on a pseudo-terminal and the
real `CambrionixDriver` talks to it over that tty, so the demo and the tests exercise the same
serial code path as a real bench. The simulated world (which device is in which port) is kept in
step with each simulator: plugging a device attaches it on the simulator's port, a `mode o` sent
by the driver powers the device off in the world, and an unplugged hub closes the simulator's tty.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from daemon.config import CambrionixHubConfig, Config, HubConfig, SimHubConfig, UsbHubConfig
from daemon.sim.world import SimWorld
from hubdrivers.base import HubDriver, PortMode
from hubdrivers.cambrionix.board import parse_bd
from hubdrivers.cambrionix.discovery import candidate_ports
from hubdrivers.cambrionix.driver import CambrionixDriver
from hubdrivers.cambrionix.models import ModelSpec, find_model
from hubdrivers.cambrionix.protocol import ModeChar
from hubdrivers.cambrionix.simulator import CambrionixSimulator
from hubdrivers.sim import SimHubDriver
from hubdrivers.usbhub import UsbHubDriver

DriverFactory = Callable[[], HubDriver]

_MODES = {
    ModeChar.CHARGE: PortMode.CHARGE,
    ModeChar.SYNC: PortMode.SYNC,
    ModeChar.BIASED: PortMode.BIASED,
    ModeChar.OFF: PortMode.OFF,
}

CHARGING_CURRENT_MA = 480
"""What a simulated iPhone draws from a port (a real one: 0.5 to 2 A, depending on battery)."""


def model_spec(hub: CambrionixHubConfig) -> ModelSpec:
    spec = find_model(hub.simulate or "")
    assert spec is not None, "config validation only admits known models"
    return spec


def port_count(hub: HubConfig) -> int:
    """Ports of a configured hub: as configured, or the simulated Cambrionix model's."""
    if hub.ports is not None:
        return hub.ports
    assert isinstance(hub, CambrionixHubConfig)
    return model_spec(hub).ports


def physical_port_paths(spec: ModelSpec) -> dict[int, str]:
    """How a model's physical ports hang off its internal USB hubs (port -> `2.1`): the model's
    board tree (what its `bd` prints), else the published per-model table."""
    mapping = parse_bd(spec.bd_lines()).port_map() or dict(spec.fallback_port_map)
    return {port: path for path, port in mapping.items()}


@dataclass
class SimulatedCambrionix:
    """A running simulator, wired to the world's view of one hub."""

    hub: str
    simulator: CambrionixSimulator
    world: SimWorld

    def attach(self, port: int) -> None:
        self.simulator.attach(port, current_ma=CHARGING_CURRENT_MA)

    def detach(self, port: int) -> None:
        self.simulator.detach(port)

    def set_online(self, online: bool) -> None:
        if online and not self.simulator.connected:
            self.simulator.reconnect()
        elif not online and self.simulator.connected:
            self.simulator.disconnect()

    def mode_changed(self, port: int, mode: ModeChar) -> None:
        self.world.apply_port_mode(self.hub, port, _MODES[mode])


def usb_serial_of(device: str | None) -> str | None:
    """The USB serial of a hub's control interface (its identity: `id` often says sn:000000)."""
    if device is None:
        return None
    real = os.path.realpath(device)
    for candidate in candidate_ports():
        if os.path.realpath(candidate.device) == real:
            return candidate.usb_serial
    return None


class HubFactory:
    """Builds drivers for every configured hub; owns the simulators of simulated hubs."""

    def __init__(self, config: Config, world: SimWorld | None) -> None:
        self.config = config
        self.world = world
        self.simulated: dict[str, SimulatedCambrionix] = {}

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[HubFactory]:
        """Start the simulators of simulated hubs for as long as the station runs."""
        async with contextlib.AsyncExitStack() as stack:
            for hub in self.config.hubs:
                if isinstance(hub, CambrionixHubConfig) and hub.simulate:
                    assert self.world is not None, "simulated hubs need the simulated world"
                    simulator = CambrionixSimulator(model_spec(hub))
                    await stack.enter_async_context(simulator)
                    wired = SimulatedCambrionix(hub.id, simulator, self.world)
                    simulator.on_mode_change = wired.mode_changed
                    self.world.wire(hub.id, wired)
                    self.simulated[hub.id] = wired
            yield self

    def factory(self, hub: HubConfig) -> DriverFactory:
        if isinstance(hub, SimHubConfig):
            world = self.world
            assert world is not None, "sim hubs need the simulated world"
            return lambda: SimHubDriver(hub.id, hub.ports, world, hub.model, attach_sense=hub.attach_sense)
        if isinstance(hub, CambrionixHubConfig):
            return lambda: CambrionixDriver(self._device(hub), usb_serial=usb_serial_of(hub.serial_port))
        if isinstance(hub, UsbHubConfig):
            return lambda: UsbHubDriver(hub.usb_path, hub.ports)
        raise AssertionError(f"no driver for hub kind {hub.kind}")

    def _device(self, hub: CambrionixHubConfig) -> str:
        if hub.serial_port is not None:
            return hub.serial_port
        return self.simulated[hub.id].simulator.path
