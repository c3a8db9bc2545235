"""`benchhub doctor`: what the station can reach, explained, with a fix for what it cannot.

It checks the hubs: every configured hub is opened with its real driver (simulated ones on their
simulators) and reported with model, firmware, serial, ports and capabilities; Cambrionix control
ports that are plugged in but not configured are found by USB id and probed. It checks Apple
access the way the daemon will use it: a token fetched with the configured key, the MDM servers
listed and the assignment target found (or a DEP session opened).

Around those it checks what a run needs from the machine (`check_station`): the state directory is
writable and the database opens; on a real bench with the update step, the free disk space and the
IPSW cache; usbmuxd answers `ListDevices`; the MQTT broker takes the configured credentials. Each
check prints `ok`, `info` or `FAIL` lines, every `FAIL` followed by a `fix:` line, and any `FAIL`
makes the exit code non-zero: the point is to learn at install time what would stop a run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

import aiomqtt

from daemon.apple.abm_client import AbmClient
from daemon.apple.base import AppleServiceError
from daemon.apple.tracker import UnknownMdmServerError, find_mdm_server
from daemon.applesetup import real_apple
from daemon.config import CambrionixHubConfig, Config, ConfigError, HubConfig, UsbHubConfig, read_secret
from daemon.hubsetup import HubFactory
from daemon.ios.firmware import IpswCache
from daemon.mqtt.publisher import tls_context
from daemon.sim.world import SimWorld
from daemon.store import Store, StoreError
from daemon.usb.hotplug import open_hotplug
from daemon.usb.usbmux import UsbmuxProtocolError, list_devices
from hubdrivers.base import HubError, HubInfo
from hubdrivers.cambrionix.discovery import DiscoveredHub, discover

OPEN_TIMEOUT = 15.0
CONNECT_TIMEOUT: Final = 5.0
"""usbmuxd and the broker answer in milliseconds when they work; 5 s tells a firewall that drops
packets from a slow link without making the doctor sit for a minute."""

GB: Final = 1_000_000_000
DISK_WARN_BELOW: Final = 20 * GB
"""Below this the doctor says so (info): a restore copies an IPSW (6-8 GB) and unpacks it next to
the state (several GB more), and a second model's firmware in the cache doubles that."""
DISK_FAIL_BELOW: Final = 8 * GB
"""Below this a single restore cannot unpack: the update step would fail at the device, an hour in,
with a less helpful message. So it blocks (FAIL)."""


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


# ------------------------------------------------------------------------------ the station's machine


@dataclass(frozen=True, slots=True)
class Check:
    """One area's output lines (`ok`/`info`/`FAIL` + `fix:`); `ok` False when it would block a run."""

    lines: list[str]
    ok: bool = True


class DiskUsage(NamedTuple):
    total: int
    used: int
    free: int


DiskUsageFn = Callable[[Path], DiskUsage]
"""`shutil.disk_usage`, or a fake in tests (a filled disk is not something a test can make)."""


def _real_disk_usage(path: Path) -> DiskUsage:
    return DiskUsage(*shutil.disk_usage(path))


def _fail(what: str, fix: str) -> list[str]:
    return [f"FAIL  {what}", f"      fix: {fix}"]


def _simulated(config: Config) -> bool:
    return config.sim is not None


def _restores(config: Config) -> bool:
    return "update" in config.workflow.steps and not _simulated(config)


def check_state(config: Config) -> Check:
    """The state directory takes a new file (the database, its WAL, pair records go there) and the
    database opens with this benchhub. A missing database is not created here: run as root, the
    doctor would leave a root-owned file the service user cannot write."""
    directory = config.storage.path.parent
    where = _existing(directory)  # the station creates missing directories; here nothing is made
    try:
        with tempfile.NamedTemporaryFile(dir=where, prefix=".benchhub-doctor-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return Check(
            _fail(
                f"state directory {directory}: cannot create a file there ({reason})",
                f"create it, writable by the service user (`install -d -o benchhub {directory}`),"
                " or point storage.path elsewhere",
            ),
            False,
        )
    made = "" if where == directory else f" (created at the first run, in {where})"
    lines = [f"ok    state directory {directory}: writable{made}"]
    path = config.storage.path
    if not path.exists():
        lines.append(f"info  database {path}: not created yet (the station creates it on its first run)")
        return Check(lines)
    try:
        Store(path).close()
    except StoreError as exc:
        lines += _fail(f"database: {exc}", "use the benchhub that wrote it, or move the file away")
        return Check(lines, False)
    lines.append(f"ok    database {path}: opens")
    return Check(lines)


def _existing(path: Path) -> Path:
    """The path, or its nearest existing parent (free space is a property of the file system)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(config: Config, disk_usage: DiskUsageFn = _real_disk_usage) -> Check:
    """Free space where restores unpack and where their firmware is kept (only with the update step
    on a real bench: nothing else the station does needs more than a few MB)."""
    if not _restores(config):
        return Check([])
    places = {"IPSW cache": config.firmware.ipsw_dir} if config.firmware.ipsw_dir is not None else {}
    places["state directory"] = config.storage.path.parent
    by_disk: dict[int | Path, list[tuple[str, Path]]] = {}
    for name, path in places.items():
        where = _existing(path)
        try:
            disk: int | Path = os.stat(where).st_dev  # one line per file system, not per directory
        except OSError:
            disk = where
        by_disk.setdefault(disk, []).append((name, path))
    lines: list[str] = []
    ok = True
    for named in by_disk.values():
        what = " and the ".join(f"{name} ({path})" for name, path in named)
        try:
            free = disk_usage(_existing(named[0][1])).free
        except OSError as exc:
            lines.append(f"info  disk for the {what}: cannot be measured ({exc.strerror or exc})")
            continue
        text = f"disk for the {what}: {free / GB:.1f} GB free"
        if free < DISK_FAIL_BELOW:
            ok = False
            lines += _fail(
                f"{text}; a restore needs at least {DISK_FAIL_BELOW // GB} GB",
                "free space (old IPSWs in the cache, logs) or move the directory to a larger disk",
            )
        elif free < DISK_WARN_BELOW:
            lines.append(f"info  {text}; below {DISK_WARN_BELOW // GB} GB, restores may run short")
        else:
            lines.append(f"ok    {text}")
    return Check(lines, ok)


async def check_ipsw(config: Config) -> Check:
    """What the update step can restore: the cache is read as the daemon reads it."""
    ipsw_dir = config.firmware.ipsw_dir
    if not _restores(config) or ipsw_dir is None:
        return Check([])
    inventory = await IpswCache(ipsw_dir).inventory()
    if inventory.error is not None:
        return Check(
            _fail(
                f"IPSW cache {ipsw_dir}: {inventory.error}",
                "create firmware.ipsw_dir, readable by the service user, and download IPSWs into it"
                " (docs/devices.md)",
            ),
            False,
        )
    lines = []
    if not inventory.firmware:
        lines.append(
            f"info  IPSW cache {ipsw_dir}: no usable .ipsw files; devices below"
            f" {config.workflow.minimum_ios} will fail the update step"
        )
    else:
        products = sorted({p for m in inventory.firmware for p in m.product_types})
        lines.append(
            f"ok    IPSW cache {ipsw_dir}: {len(inventory.firmware)} IPSW(s) for {', '.join(products)}"
        )
    lines += [f"info  IPSW cache: skipped {s.path.name}: {s.reason}" for s in inventory.skipped]
    return Check(lines)


async def check_usbmuxd(config: Config, within: float = CONNECT_TIMEOUT) -> Check:
    """usbmuxd answers `ListDevices` on the socket the station will use."""
    where = config.devices.usbmuxd or os.environ.get("USBMUXD_SOCKET_ADDRESS") or "/var/run/usbmuxd"
    try:
        async with asyncio.timeout(within):
            devices = await list_devices(config.devices.usbmuxd, reply_timeout=within)
    except (OSError, TimeoutError, UsbmuxProtocolError, ValueError) as exc:
        reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
        return Check(
            _fail(
                f"usbmuxd ({where}): {reason}",
                "install usbmuxd (apt install usbmuxd) and start it (systemctl start usbmuxd.service),"
                " or check [devices] usbmuxd",
            ),
            False,
        )
    usb = sum(1 for d in devices if d.connection_type == "USB")
    return Check([f"ok    usbmuxd ({where}): answers; {usb} device(s) connected over USB"])


def _mqtt_fix(reason: str) -> str:
    low = reason.lower()
    if "authori" in low or "password" in low or "code:4" in low or "code:5" in low:
        return "check mqtt.username and mqtt.password_file against the broker's password file"
    if "ssl" in low or "certificate" in low or "tls" in low:
        return "check mqtt.tls.ca_file (the CA that signed the broker's certificate) and the host name"
    if "refused" in low:
        return "is Mosquitto running and listening there? (systemctl status mosquitto; check mqtt.url)"
    return "check mqtt.url, the network path to the broker and a firewall in between"


async def check_mqtt(config: Config, within: float = CONNECT_TIMEOUT) -> Check:
    """Connect with the station's credentials and TLS settings and leave again (the password is
    read as the daemon reads it and never printed)."""
    mqtt = config.mqtt
    if mqtt.embedded:
        return Check(["info  MQTT: embedded broker (started by the station itself)"])
    where = mqtt.url + (f" as {mqtt.username}" if mqtt.username else "")
    try:
        password = read_secret(mqtt.password_file) if mqtt.password_file is not None else None
    except ConfigError as exc:
        return Check(_fail(f"MQTT {where}: {exc.lines[0]}", "check mqtt.password_file"), False)
    host, port = mqtt.host_port()
    try:
        context = tls_context(mqtt.tls) if mqtt.use_tls else None
        client = aiomqtt.Client(
            host,
            port,
            username=mqtt.username or None,
            password=password,
            tls_context=context,
            timeout=within,
        )
        async with asyncio.timeout(within), client:
            pass
    except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {within:g} s"
        if password:
            reason = reason.replace(password, "***")  # no broker echoes it; this makes sure
        return Check(_fail(f"MQTT {where}: {reason}", _mqtt_fix(reason)), False)
    return Check([f"ok    MQTT {where}: connected"])


async def check_station(config: Config, *, disk_usage: DiskUsageFn = _real_disk_usage) -> list[Check]:
    """Everything but the hubs and Apple, in the order a run meets them."""
    checks = [check_state(config)]
    if _simulated(config):
        checks.append(Check(["info  simulated bench: usbmuxd, IPSW cache and disk space not checked"]))
    else:
        checks += [check_disk(config, disk_usage), await check_ipsw(config), await check_usbmuxd(config)]
    checks.append(await check_mqtt(config))
    return checks
