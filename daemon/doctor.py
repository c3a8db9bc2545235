"""`benchhub doctor`: what the station can reach, explained, with a fix for what it cannot.

It checks the hubs: every configured hub is opened with its real driver (simulated ones on their
simulators) and reported with model, firmware, serial, ports and capabilities; Cambrionix control
ports that are plugged in but not configured are found by USB id and probed. It checks Apple
access the way the daemon will use it: a token fetched with the configured key, the MDM servers
listed and the assignment target found (or a DEP session opened). More checks (usbmuxd, broker,
disk) join as those parts land.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from daemon.apple.abm_client import AbmClient
from daemon.apple.base import AppleServiceError
from daemon.apple.tracker import UnknownMdmServerError, find_mdm_server
from daemon.applesetup import real_apple
from daemon.config import CambrionixHubConfig, Config, ConfigError, HubConfig, UsbHubConfig
from daemon.hubsetup import HubFactory
from daemon.sim.world import SimWorld
from daemon.usb.hotplug import open_hotplug
from hubdrivers.base import HubError, HubInfo
from hubdrivers.cambrionix.discovery import DiscoveredHub, discover

OPEN_TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class HubCheck:
    id: str
    kind: str
    link: str
    info: HubInfo | None = None
    error: str | None = None
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _link(hub: HubConfig) -> str:
    if isinstance(hub, CambrionixHubConfig):
        return hub.serial_port or f"simulated {hub.simulate}"
    if isinstance(hub, UsbHubConfig):
        return f"usb {hub.usb_path}"
    return "simulated"


def _fix(hub: HubConfig, error: str) -> str:
    if isinstance(hub, CambrionixHubConfig):
        if "ermission" in error:
            return "add the service user to the dialout group and install systemd/70-benchhub.rules"
        if "busy" in error.lower() or "exclusive" in error.lower():
            return "another program holds the port (Cambrionix Connect, ModemManager?); stop it"
        return "check the cable and serial_port; `ls -l /dev/serial/by-id/` lists the hubs' control ports"
    if isinstance(hub, UsbHubConfig):
        return "check usb_path against `ls /sys/bus/usb/devices` (the hub device itself, e.g. 1-2)"
    return "check the [sim] table"


async def check_hub(factory: HubFactory, hub: HubConfig) -> HubCheck:
    driver = factory.factory(hub)()
    try:
        async with asyncio.timeout(OPEN_TIMEOUT):
            info = await driver.open()
        return HubCheck(hub.id, hub.kind, _link(hub), info=info)
    except (HubError, OSError, TimeoutError, ValueError) as exc:
        error = str(exc) or type(exc).__name__
        return HubCheck(hub.id, hub.kind, _link(hub), error=error, fix=_fix(hub, error))
    finally:
        await driver.close()


async def check_hubs(
    config: Config | None, world: SimWorld | None
) -> tuple[list[HubCheck], list[DiscoveredHub]]:
    """Configured hubs, then Cambrionix hubs that are plugged in but not configured."""
    checks: list[HubCheck] = []
    if config is not None:
        factory = HubFactory(config, world)
        async with factory.running():
            checks = [await check_hub(factory, hub) for hub in config.hubs]
    configured = {
        h.serial_port
        for h in (config.hubs if config else [])
        if isinstance(h, CambrionixHubConfig) and h.serial_port
    }
    found = [d for d in await discover() if d.device not in configured]
    return checks, found


def usb_hotplug_line() -> str:
    """Which USB hotplug source the daemon would use here, and why not udev if not."""
    source = open_hotplug()
    why = f" ({source.description})" if source.name != "udev" and source.description else ""
    return f"info  USB hotplug: {source.name}{why}"


def render(checks: list[HubCheck], found: list[DiscoveredHub]) -> str:
    lines = [usb_hotplug_line()]
    for c in checks:
        if c.info is not None:
            caps = ", ".join(sorted(c.info.capabilities)) or "none"
            lines.append(
                f"ok    hub {c.id} ({c.kind}, {c.link}): {c.info.model} firmware {c.info.firmware},"
                f" serial {c.info.serial}, {c.info.port_count} ports; can: {caps}"
            )
        else:
            lines.append(f"FAIL  hub {c.id} ({c.kind}, {c.link}): {c.error}")
            lines.append(f"      fix: {c.fix}")
    for d in found:
        if d.ok:
            lines.append(
                f"found {d.device}: Cambrionix {d.model} firmware {d.firmware}, {d.port_count} ports,"
                f" USB serial {d.usb_serial or '?'} (not in the config: add a [[hubs]] with"
                f' kind = "cambrionix", serial_port = "{d.device}")'
            )
        else:
            lines.append(f"found {d.device}: a Cambrionix USB id that did not answer ({d.error})")
    if not checks and not found:
        lines.append("no hubs configured and no Cambrionix control ports found")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class AppleCheck:
    lines: list[str]
    ok: bool


async def check_apple(config: Config | None) -> AppleCheck:
    """Use the Apple credentials once, as the daemon will: a wrong key id or a key from another
    account shows here as `invalid_client`, not an hour into a run."""
    if config is None or config.sim is not None:
        return AppleCheck([], True)
    if not (config.apple.has_api or config.apple.has_dep):
        return AppleCheck(["info  Apple: no [apple] access configured (enroll and assign unavailable)"], True)
    try:
        access = real_apple(config)
    except ConfigError as exc:
        return AppleCheck([f"FAIL  Apple: {line}" for line in exc.lines], False)
    try:
        if access.abm is not None:
            return await _check_api(config, access.abm)
        assert access.dep is not None
        await access.dep.session()
        return AppleCheck(["ok    Apple DEP token: session opened with mdmenrollment.apple.com"], True)
    except AppleServiceError as exc:
        return AppleCheck(
            [f"FAIL  Apple: {exc.message}", f"      fix: {_apple_fix(exc)}"],
            False,
        )
    finally:
        for client in (access.abm, access.dep):
            if client is not None:
                await client.close()


async def _check_api(config: Config, abm: AbmClient) -> AppleCheck:
    servers = await abm.mdm_servers()
    names = [s.name for s in servers if s.server_type == "MDM"]
    lines = [
        f"ok    Apple Business API: token fetched for {config.apple.client_id[:20]}…;"
        f" MDM servers: {', '.join(repr(n) for n in names) or 'none'}"
    ]
    target = config.assignment_target
    if not target:
        return AppleCheck(lines, True)
    try:
        found = find_mdm_server(servers, target)
    except UnknownMdmServerError as exc:
        lines.append(f"FAIL  Apple: {exc.message}")
        lines.append("      fix: set workflow.mdm_server (or apple.auto_assign) to one of the names above")
        return AppleCheck(lines, False)
    lines.append(f"ok    Apple: devices will be assigned to {found.name!r} ({found.id})")
    return AppleCheck(lines, True)


def _apple_fix(exc: AppleServiceError) -> str:
    if exc.retryable:
        return "check the network path to Apple (proxy, firewall: api-business.apple.com, account.apple.com)"
    return (
        "check apple.client_id, apple.key_id and apple.private_key_file against Apple Business Manager >"
        " Preferences > API (the key id belongs to the uploaded key)"
    )
