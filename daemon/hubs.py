"""HubSupervisor: keeps one hub's driver alive and turns its snapshots into port events.

Drivers are single-use; when a link fails the supervisor closes it, reports the hub offline, waits
with capped exponential backoff and builds a fresh one. Logging follows aioesphomeapi: WARNING on
the first failure of an outage, DEBUG for the repeats, INFO when the hub is back, so a flapping hub
does not flood the operator's log.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from daemon.backoff import backoff_delay
from hubdrivers.base import (
    Capability,
    HubDriver,
    HubError,
    HubInfo,
    LedPattern,
    PortAlarm,
    PortEvent,
    PortEventKind,
    PortMode,
    PortStatus,
    diff_ports,
)

POLL_TIMEOUT = 10.0
POWER_OFF_SECONDS = 2.0


class HubSupervisor:
    def __init__(
        self,
        hub_id: str,
        make_driver: Callable[[], HubDriver],
        poll_interval: float,
        on_port: Callable[[str, PortEvent], None],
        on_link: Callable[[str, bool], None],
    ) -> None:
        self.hub_id = hub_id
        self._make_driver = make_driver
        self._poll_interval = poll_interval
        self._on_port = on_port
        self._on_link = on_link
        self._driver: HubDriver | None = None
        self._known: dict[int, PortStatus] = {}
        self.info: HubInfo | None = None
        self.port_paths: dict[int, str] = {}
        self.online = False
        self.log = structlog.get_logger("benchhub.hub").bind(hub=hub_id)

    @property
    def capabilities(self) -> frozenset[Capability]:
        return self._driver.capabilities if self._driver else frozenset()

    def senses_unplug(self) -> bool:
        """Whether this hub reports a device leaving its port right now (it is online and measures
        attachment); if not, the port runner decides from how long the device stays off USB."""
        return self.online and Capability.ATTACH_SENSE in self.capabilities

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                driver = self._make_driver()
            except Exception as exc:  # a config the driver rejects: say so, keep trying (it may be fixed)
                failures += 1
                self.log.error("hub_driver_unusable", error=str(exc), failures=failures)
                await asyncio.sleep(backoff_delay(failures))
                continue
            try:
                self.info = await driver.open()
                self.port_paths = await driver.port_paths()
                self._driver = driver
                self._set_online(True)
                if failures:
                    self.log.info("hub_reconnected", after_failures=failures)
                else:
                    self.log.info(
                        "hub_opened",
                        model=self.info.model,
                        firmware=self.info.firmware,
                        serial=self.info.serial,
                        ports=self.info.port_count,
                        capabilities=sorted(self.info.capabilities),
                    )
                failures = 0
                await self._poll_forever(driver)
            except (HubError, OSError, TimeoutError) as exc:
                failures += 1
                log = self.log.warning if failures == 1 else self.log.debug
                log("hub_link_failed", error=str(exc), failures=failures)
            except Exception:  # a driver bug or unforeseen garbage: never take the station down
                failures += 1
                self.log.exception("hub_driver_crashed", failures=failures)
            finally:
                self._driver = None
                self._set_online(False)
                with contextlib.suppress(Exception):
                    await driver.close()
            await asyncio.sleep(backoff_delay(failures))

    async def _poll_forever(self, driver: HubDriver) -> None:
        while True:
            async with asyncio.timeout(POLL_TIMEOUT):
                statuses = await driver.poll()
                await self._acknowledge_reboot(driver, statuses)
            self._diff(statuses)
            await asyncio.sleep(self._poll_interval)

    def _diff(self, statuses: list[PortStatus]) -> None:
        for event in diff_ports(self._known, statuses):
            if event.kind is PortEventKind.ALARMS:
                alarms = event.status.alarms - {PortAlarm.REBOOTED}
                before = event.previous.alarms - {PortAlarm.REBOOTED} if event.previous else frozenset()
                if alarms != before:
                    self.log.warning("port_alarms", port=event.port, alarms=sorted(alarms) or "cleared")
            self._on_port(self.hub_id, event)
        self._known = {status.port: status for status in statuses}

    async def _acknowledge_reboot(self, driver: HubDriver, statuses: list[PortStatus]) -> None:
        """A hub that rebooted has forgotten volatile settings. The station keeps none on the hub
        yet (modes are only changed transiently, for power cycles), so acknowledging is all."""
        if any(PortAlarm.REBOOTED in s.alarms for s in statuses):
            self.log.info("hub_rebooted")
            await driver.acknowledge_reboot()

    def _set_online(self, online: bool) -> None:
        if online != self.online:
            self.online = online
            self._on_link(self.hub_id, online)

    async def set_mode(self, port: int, mode: PortMode) -> None:
        if self._driver is None:
            raise HubError(f"hub {self.hub_id} is offline")
        await self._driver.set_mode(port, mode)

    async def set_led(self, port: int, pattern: LedPattern) -> None:
        if self._driver is None:
            raise HubError(f"hub {self.hub_id} is offline")
        await self._driver.set_led(port, pattern)

    async def power_cycle(self, port: int) -> None:
        """Off, wait, back to sync: the device sees a real unplug and re-enumerates."""
        self.log.info("power_cycle", port=port)
        await self.set_mode(port, PortMode.OFF)
        await asyncio.sleep(POWER_OFF_SECONDS)
        await self.set_mode(port, PortMode.SYNC)
