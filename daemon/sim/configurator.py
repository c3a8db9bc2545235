"""The simulated bench's technician, at a Mac with Apple Configurator.

The daemon asks a person to add a device to Apple Business Manager (`daemon.technician`); on the
simulated bench this one answers. After `delay` simulated seconds (walking over, finding the
device in Configurator, Prepare > Add to Apple Business Manager) the device is added to the
simulated organisation, with Configurator's rules: the device must still be in Setup Assistant,
and it accepts one provisional enrollment. The daemon learns of it only the way it would on a real
bench, through the Apple Business API.
"""

from __future__ import annotations

import asyncio

import structlog

from daemon.ios.base import DeviceError
from daemon.models import PortRef
from daemon.sim.backend import SimOps
from daemon.sim.world import SimWorld
from daemon.technician import ADD_TO_ABM, HandsRequest, TechnicianDesk

log = structlog.get_logger(__name__)

TRIES = 10
"""How often the simulated technician looks again for a device that was not there (re-plugged,
rebooting) or that Configurator failed on, before leaving the request to time out."""


class SimConfigurator:
    """The technician at the Mac: carries out the desk's `add_to_abm` requests on the simulated bench."""

    def __init__(self, world: SimWorld, desk: TechnicianDesk, delay: float) -> None:
        self.world = world
        self.ops = SimOps(world)
        self.delay = delay
        self.desk = desk
        self._working: dict[PortRef, asyncio.Task[None]] = {}
        self._latest: dict[PortRef, HandsRequest] = {}
        desk.subscribe(self._on_request)

    def _on_request(self, request: HandsRequest) -> None:
        if request.action != ADD_TO_ABM:
            return
        self._latest[request.ref] = request  # a technician already on the way takes the newest
        if request.ref in self._working:
            return
        task = asyncio.get_running_loop().create_task(self._add_to_abm(request.ref))
        self._working[request.ref] = task
        task.add_done_callback(lambda _: self._working.pop(request.ref, None))

    async def _add_to_abm(self, ref: PortRef) -> None:
        """Like a person: try; when the device was not there or Configurator reported an error, look
        again a little later (up to `TRIES` times), unless the request has been answered meanwhile."""
        for _attempt in range(TRIES):
            await self.world.sleep(self.delay)
            request = self._latest.get(ref)
            if request is None or not self.desk.wanted(ref):
                return
            if await self._try_once(request):
                return

    async def _try_once(self, request: HandsRequest) -> bool:
        """True when done, or when trying again cannot help."""
        found = self.world.device_by_udid(request.udid)
        if found is None:
            log.info("sim_technician_device_gone", serial=request.serial)
            return False
        device, ref = found
        if not device.in_setup_assistant or self.world.in_organisation(device.serial):
            # Configurator refuses both; a real technician would erase the device, or ask.
            log.warning("sim_technician_refused", serial=device.serial)
            return True
        try:
            await self.ops.run("enroll", device, ref, ticks=2)
        except DeviceError as exc:
            log.info("sim_technician_failed", serial=device.serial, error=exc.message)
            return False
        self.world.apple.add_device(device.serial, product_type=device.product_type, via_configurator=True)
        device.completed["enroll"] += 1
        self.world.save()
        log.info("sim_technician_added_device", serial=device.serial)
        return True
