"""A simulated `com.apple.mobile.MCInstall` (the device's `mc_mobile_tunnel`), and the device behind it.

The wire is lockdownd service framing (`daemon.sim.services`), TLS when lockdownd says
`EnableServiceSSL`. Each request is a dictionary with `RequestType`; each reply has `Status`
(`Acknowledged` on success). An error reply is `Status: Error` plus `ErrorChain`, a list of
`{ErrorCode, ErrorDomain, LocalizedDescription, USEnglishDescription}` (the shape ManagedConfiguration
uses for MDM `ErrorChain`s; pymobiledevice3 reads only `ErrorChain[0]["ErrorCode"]`).

What each request does follows the decompiled iOS 26.1 `usr/libexec/mc_mobile_tunnel/
MTIPCUTunnelParser.mm` (repository EthanArbuckle/iPhone18-3_26.1_23B85_Restore; notes in
/work/shared/research/ios.md §1.5) and pymobiledevice3 11.45 `services/mobile_config.py`:

* `HelloHostIdentifier`, `Flush`: `Acknowledged`.
* `GetCloudConfiguration`: `Acknowledged` with `CloudConfiguration` only when the device has one.
* `SetCloudConfiguration`: error **14002** (`TUNNEL_ERROR_CLOUD_CONFIG_EXISTS`) if any cloud
  configuration exists; otherwise the device forces `ConfigurationSource`, `IsMandatory = true`,
  `IsMDMUnremovable = false`, and without `ConfigurationURL`/`ConfigurationWebURL` also
  `CloudConfigurationUIComplete` and `ConfigurationWasApplied`, then stores it. So it works once per
  erase.
* `DownloadAndApplyCloudConfiguration`: `Acknowledged` at once if an MDM profile is installed;
  otherwise the device fetches its ADE profile from Apple (`DeviceEffects.fetch_cloud_configuration`)
  and stores it. [INFERRED] With a cloud configuration already stored it answers 14002 too: the
  decompiled completion handler was not readable, and "once per erase" is the rule the simulated
  backend (`daemon.sim.backend`) already applies.
* `GetProfileList`, `InstallProfile` (`Payload`: profile data or a dictionary; missing or another
  type → error 14000), `RemoveProfile` (`ProfileIdentifier`: pymobiledevice3 sends plist data
  naming `PayloadIdentifier`, go-ios a plain string; both accepted). [INFERRED] A non-silent install
  is taken as installed, and removing a profile that is not there is acknowledged.
* `EraseDevice`: `PreserveDataPlan` / `DisallowProximitySetup` must be numbers/booleans if present
  (else `CommandFormatError`); the device answers `Acknowledged` **first**, then resets
  (`DDRResetService`, reason "mc_mobile_tunnel erase device command"): it drops off USB and comes
  back later in Setup Assistant, with no cloud configuration and no pairings.
* anything else, or no `RequestType`: `CommandFormatError`.

The device's state and its effects on the world are behind `DeviceEffects`, so the same service can
drive the simulated world (`daemon.sim.world`) or the in-memory `MemoryDeviceEffects` used by tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import plistlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog

from daemon.sim.activation import ActivationService
from daemon.sim.services import ServiceStream, encode_raw_frame
from daemon.sim.usbmuxd import FakeUsbmuxd, MuxDevice

log = structlog.get_logger("benchhub.usbmux")

SERVICE_NAME: Final = "com.apple.mobile.MCInstall"

ACKNOWLEDGED: Final = "Acknowledged"
COMMAND_FORMAT_ERROR: Final = "CommandFormatError"

TUNNEL_ERROR_DOMAIN: Final = "MCTunnelErrorDomain"
"""[INFERRED] The string behind the decompiled `DMCTunnelErrorDomain` symbol is not in the source read;
ManagedConfiguration's historical name is used. Clients key on the code, not the domain."""
ERROR_BAD_PAYLOAD: Final = 14000
ERROR_CLOUD_CONFIG_EXISTS: Final = 14002
PROFILE_ERROR_DOMAIN: Final = "MCProfileErrorDomain"
ERROR_MALFORMED_PROFILE: Final = 1000
"""[INFERRED] code for a profile that cannot be parsed."""
CLOUD_CONFIG_ERROR_DOMAIN: Final = "DEPCloudConfigErrorDomain"
ERROR_NO_CLOUD_CONFIG: Final = 33000
"""[INFERRED] placeholder for "Apple has no ADE profile for this device"; the real code is not verified
(mc_mobile_tunnel singles out 33005 for Configurator, meaning unknown)."""

CONFIGURATION_SOURCE: Final = 2
"""[INFERRED] the constant `SetCloudConfiguration` forces into `ConfigurationSource` is not readable in
the decompilation; 2 is what pymobiledevice3's `supervise()` sends."""


class McError(Exception):
    """A device-side failure, answered as `Status: Error` with a one-element `ErrorChain`."""

    def __init__(self, domain: str, code: int, description: str) -> None:
        super().__init__(f"{domain} {code}: {description}")
        self.domain = domain
        self.code = code
        self.description = description

    def reply(self) -> dict[str, Any]:
        return error_reply(self.domain, self.code, self.description)


def error_reply(domain: str, code: int, description: str) -> dict[str, Any]:
    return {
        "Status": "Error",
        "ErrorChain": [
            {
                "ErrorCode": code,
                "ErrorDomain": domain,
                "LocalizedDescription": description,
                "USEnglishDescription": description,
            }
        ],
    }


@dataclass(frozen=True, slots=True)
class InstalledProfile:
    """A configuration profile on the device, as `GetProfileList` describes it."""

    identifier: str
    uuid: str
    version: int
    display_name: str
    description: str = ""
    removal_disallowed: bool = False
    is_mdm: bool = False
    """It carries a `com.apple.mdm` payload (the device is enrolled in MDM)."""


def parse_profile(data: bytes) -> InstalledProfile:
    """What the device reads from an `InstallProfile` payload; `McError` if it is not a profile."""
    try:
        profile = plistlib.loads(data)
    except Exception as exc:  # plistlib raises several types for junk
        raise McError(PROFILE_ERROR_DOMAIN, ERROR_MALFORMED_PROFILE, "The profile cannot be read.") from exc
    if not isinstance(profile, dict) or not isinstance(profile.get("PayloadIdentifier"), str):
        raise McError(PROFILE_ERROR_DOMAIN, ERROR_MALFORMED_PROFILE, "The profile has no identifier.")
    content = profile.get("PayloadContent")
    payloads = content if isinstance(content, list) else []
    version = profile.get("PayloadVersion", 1)
    return InstalledProfile(
        identifier=profile["PayloadIdentifier"],
        uuid=str(profile.get("PayloadUUID", "")),
        version=version if isinstance(version, int) else 1,
        display_name=str(profile.get("PayloadDisplayName", profile["PayloadIdentifier"])),
        description=str(profile.get("PayloadDescription", "")),
        removal_disallowed=bool(profile.get("PayloadRemovalDisallowed", False)),
        is_mdm=any(isinstance(p, dict) and p.get("PayloadType") == "com.apple.mdm" for p in payloads),
    )


class DeviceEffects(Protocol):
    """The device behind MCInstall: its state, and what happens to it. The service applies Apple's
    rules (14002, ack-then-erase, ...); an implementation only keeps state and acts on its world."""

    @property
    def in_setup_assistant(self) -> bool: ...

    @property
    def activation_state(self) -> str: ...

    def cloud_configuration(self) -> dict[str, Any] | None:
        """The stored cloud configuration details, or None if there are none."""
        ...

    def apply_cloud_configuration(self, details: dict[str, Any]) -> None:
        """Store cloud configuration details (the service has already checked it may)."""
        ...

    async def fetch_cloud_configuration(self) -> dict[str, Any]:
        """What Apple's device enrollment service hands this device (over the device's own network);
        raise `McError` when there is nothing for it."""
        ...

    async def before(self, request: str) -> None:
        """Called before the device handles `request` (a `RequestType`): a device may refuse it
        here by raising `McError` (how the simulated world injects faults into EraseDevice, whose
        acknowledgement would otherwise go out before anything could fail)."""
        ...

    def profiles(self) -> list[InstalledProfile]:
        """Installed profiles, in installation order."""
        ...

    def install_profile(self, profile: InstalledProfile) -> None: ...

    def remove_profile(self, identifier: str) -> None: ...

    def erase(self, *, preserve_data_plan: bool, disallow_proximity_setup: bool) -> None:
        """Called once the `EraseDevice` acknowledgement is on the wire: the device resets, leaves USB
        and later comes back in Setup Assistant."""
        ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """A reply, and what the device does once it has been sent."""

    reply: dict[str, Any]
    after: Callable[[], None] | None = None


class McInstallResponder:
    """One MCInstall connection's request handling, transport-free: a request dictionary in, an
    `Outcome` out. Only the ADE fetch is awaited (the device talks to Apple meanwhile)."""

    def __init__(self, effects: DeviceEffects) -> None:
        self.effects = effects

    async def handle(self, request: object) -> Outcome:  # noqa: PLR0911 - one branch per request
        if not isinstance(request, dict) or not isinstance(request.get("RequestType"), str):
            return _status(COMMAND_FORMAT_ERROR)
        kind: str = request["RequestType"]
        try:
            await self.effects.before(kind)
            if kind in ("HelloHostIdentifier", "Flush"):
                return _status(ACKNOWLEDGED)
            if kind == "GetCloudConfiguration":
                return self._get_cloud_configuration()
            if kind == "SetCloudConfiguration":
                return self._set_cloud_configuration(request)
            if kind == "DownloadAndApplyCloudConfiguration":
                return await self._download_and_apply()
            if kind == "GetProfileList":
                return Outcome(self._profile_list())
            if kind == "InstallProfile":
                return self._install_profile(request)
            if kind == "RemoveProfile":
                return self._remove_profile(request)
            if kind == "EraseDevice":
                return self._erase(request)
        except McError as exc:
            return Outcome(exc.reply())
        return _status(COMMAND_FORMAT_ERROR)

    def _get_cloud_configuration(self) -> Outcome:
        reply: dict[str, Any] = {"Status": ACKNOWLEDGED}
        details = self.effects.cloud_configuration()
        if details is not None:
            reply["CloudConfiguration"] = details
        return Outcome(reply)

    def _set_cloud_configuration(self, request: Mapping[str, Any]) -> Outcome:
        if self.effects.cloud_configuration() is not None:
            raise _config_exists()
        given = request.get("CloudConfiguration")
        if not isinstance(given, dict):
            return _status(COMMAND_FORMAT_ERROR)
        details = dict(given)
        details["ConfigurationSource"] = CONFIGURATION_SOURCE
        if "ConfigurationURL" not in details and "ConfigurationWebURL" not in details:
            details["CloudConfigurationUIComplete"] = True
            details["ConfigurationWasApplied"] = True
        details["IsMandatory"] = True
        details["IsMDMUnremovable"] = False
        self.effects.apply_cloud_configuration(details)
        return _status(ACKNOWLEDGED)

    async def _download_and_apply(self) -> Outcome:
        if any(p.is_mdm for p in self.effects.profiles()):
            return _status(ACKNOWLEDGED)
        if self.effects.cloud_configuration() is not None:
            raise _config_exists()
        details = await self.effects.fetch_cloud_configuration()
        self.effects.apply_cloud_configuration(dict(details))
        return _status(ACKNOWLEDGED)

    def _profile_list(self) -> dict[str, Any]:
        profiles = self.effects.profiles()
        return {
            "Status": ACKNOWLEDGED,
            "OrderedIdentifiers": [p.identifier for p in profiles],
            "ProfileManifest": {
                p.identifier: {"Description": p.display_name, "IsActive": True} for p in profiles
            },
            "ProfileMetadata": {
                p.identifier: {
                    "PayloadDescription": p.description,
                    "PayloadDisplayName": p.display_name,
                    "PayloadRemovalDisallowed": p.removal_disallowed,
                    "PayloadUUID": p.uuid,
                    "PayloadVersion": p.version,
                }
                for p in profiles
            },
        }

    def _install_profile(self, request: Mapping[str, Any]) -> Outcome:
        payload = request.get("Payload")
        if isinstance(payload, dict):
            try:
                payload = plistlib.dumps(payload, fmt=plistlib.FMT_BINARY)
            except (TypeError, ValueError, OverflowError):
                payload = None
        if not isinstance(payload, bytes):
            raise McError(TUNNEL_ERROR_DOMAIN, ERROR_BAD_PAYLOAD, "The payload is missing or invalid.")
        self.effects.install_profile(parse_profile(payload))
        return _status(ACKNOWLEDGED)

    def _remove_profile(self, request: Mapping[str, Any]) -> Outcome:
        identifier = request.get("ProfileIdentifier")
        if isinstance(identifier, bytes):
            try:
                named = plistlib.loads(identifier)
            except Exception:
                return _status(COMMAND_FORMAT_ERROR)
            identifier = named.get("PayloadIdentifier") if isinstance(named, dict) else None
        if not isinstance(identifier, str):
            return _status(COMMAND_FORMAT_ERROR)
        self.effects.remove_profile(identifier)
        return _status(ACKNOWLEDGED)

    def _erase(self, request: Mapping[str, Any]) -> Outcome:
        preserve = request.get("PreserveDataPlan")
        disallow = request.get("DisallowProximitySetup")
        if not all(v is None or isinstance(v, bool | int) for v in (preserve, disallow)):
            return _status(COMMAND_FORMAT_ERROR)
        # Absent PreserveDataPlan means the data plan is erased (`setEraseDataPlan:1`).
        preserve_data_plan = bool(preserve) if preserve is not None else False
        disallow_proximity = bool(disallow)
        effects = self.effects

        def reset() -> None:
            effects.erase(preserve_data_plan=preserve_data_plan, disallow_proximity_setup=disallow_proximity)

        return Outcome({"Status": ACKNOWLEDGED}, after=reset)


def _status(status: str) -> Outcome:
    return Outcome({"Status": status})


def _config_exists() -> McError:
    return McError(
        TUNNEL_ERROR_DOMAIN, ERROR_CLOUD_CONFIG_EXISTS, "The device already has a cloud configuration."
    )


def request_type(request: object) -> str:
    """`RequestType` of a request, for logs and faults ("" if there is none)."""
    if isinstance(request, dict) and isinstance(request.get("RequestType"), str):
        return str(request["RequestType"])
    return ""


@dataclass
class McInstallService:
    """MCInstall as a lockdown service of the simulated usbmuxd (`FakeUsbmuxd.services`).

    `faults` makes the device misbehave for tests, by `RequestType`: bytes are sent verbatim as the
    reply's frame payload (a malformed reply); None drops the connection without replying.
    """

    effects_for: Callable[[MuxDevice], DeviceEffects]
    ssl: bool = True
    """[INFERRED] real devices answer `EnableServiceSSL: true` for MCInstall (the research prototype
    passed pymobiledevice3 with TLS service connections); both modes work here."""
    name: str = SERVICE_NAME
    faults: dict[str, bytes | None] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    """Every `RequestType` received, in order (for tests)."""

    async def serve(self, device: MuxDevice, stream: ServiceStream) -> None:
        responder = McInstallResponder(self.effects_for(device))
        while (request := await stream.receive()) is not None:
            kind = request_type(request)
            self.requests.append(kind)
            if kind in self.faults:
                fault = self.faults[kind]
                if fault is None:
                    return
                await stream.send_raw(encode_raw_frame(fault))
                continue
            outcome = await responder.handle(request)
            await stream.send(outcome.reply)
            if outcome.after is not None:
                log.debug("mcinstall_after_reply", udid=device.udid, request=kind)
                outcome.after()
                return


@dataclass
class MemoryDeviceEffects:
    """A device kept in memory, on a `FakeUsbmuxd`: the default `DeviceEffects` for tests.

    Identity and activation live in the usbmuxd's `LockdownState` (what lockdownd reports), so an
    erase is visible there too: the device forgets its pairings and supervisor certificates, becomes
    `Unactivated` and in Setup Assistant, leaves usbmuxd and comes back on the same USB path after
    `reboot_after` seconds (never, if None). Applying a cloud configuration leaves Setup Assistant
    running, as on a real device (it goes on with the panes the configuration does not skip).
    """

    mux: FakeUsbmuxd
    udid: str
    assigned: dict[str, Any] | None = None
    """The ADE profile Apple would hand this device (None: not assigned to an MDM server)."""
    reboot_after: float | None = 0.2
    details: dict[str, Any] | None = None
    installed: list[InstalledProfile] = field(default_factory=list)
    erased: int = 0
    fetched: int = 0

    @property
    def in_setup_assistant(self) -> bool:
        return self.mux.lockdown[self.udid].info.in_setup_assistant

    @property
    def activation_state(self) -> str:
        return self.mux.lockdown[self.udid].info.activation_state

    def cloud_configuration(self) -> dict[str, Any] | None:
        return None if self.details is None else dict(self.details)

    def apply_cloud_configuration(self, details: dict[str, Any]) -> None:
        self.details = dict(details)
        certificates = details.get("SupervisorHostCertificates")
        state = self.mux.lockdown.get(self.udid)
        if isinstance(certificates, list) and state is not None:
            state.supervisor_certificates = {c for c in certificates if isinstance(c, bytes)}

    async def fetch_cloud_configuration(self) -> dict[str, Any]:
        self.fetched += 1
        if self.assigned is None:
            raise McError(
                CLOUD_CONFIG_ERROR_DOMAIN,
                ERROR_NO_CLOUD_CONFIG,
                "This device has no Automated Device Enrollment configuration.",
            )
        return dict(self.assigned)

    async def before(self, request: str) -> None:
        del request  # an in-memory device refuses nothing up front

    def profiles(self) -> list[InstalledProfile]:
        return list(self.installed)

    def install_profile(self, profile: InstalledProfile) -> None:
        self.installed = [p for p in self.installed if p.identifier != profile.identifier] + [profile]

    def remove_profile(self, identifier: str) -> None:
        self.installed = [p for p in self.installed if p.identifier != identifier]

    def erase(self, *, preserve_data_plan: bool, disallow_proximity_setup: bool) -> None:
        del preserve_data_plan, disallow_proximity_setup  # no cellular plan or proximity setup here
        self.erased += 1
        self.details = None
        self.installed = []
        state = self.mux.lockdown[self.udid]
        state.paired_hosts.clear()
        state.supervisor_certificates.clear()
        state.info = dataclasses.replace(state.info, activation_state="Unactivated", in_setup_assistant=True)
        entry = next((d for d in self.mux.devices.values() if d.udid == self.udid), None)
        self.mux.detach(udid=self.udid)
        if entry is not None and self.reboot_after is not None:
            path = entry.usb_path
            asyncio.get_running_loop().call_later(self.reboot_after, self._come_back, path)

    def _come_back(self, usb_path: str) -> None:
        if self.mux.device_at(usb_path) is None and all(
            d.udid != self.udid for d in self.mux.devices.values()
        ):
            self.mux.attach(self.mux.lockdown[self.udid].info, usb_path)


class MemoryDevices:
    """`MemoryDeviceEffects` per UDID, made on first use: the `effects_for` of the test bench."""

    def __init__(self, mux: FakeUsbmuxd, *, reboot_after: float | None = 0.2) -> None:
        self.mux = mux
        self.reboot_after = reboot_after
        self.devices: dict[str, MemoryDeviceEffects] = {}

    def __getitem__(self, udid: str) -> MemoryDeviceEffects:
        effects = self.devices.get(udid)
        if effects is None:
            effects = self.devices[udid] = MemoryDeviceEffects(self.mux, udid, reboot_after=self.reboot_after)
        return effects

    def effects_for(self, device: MuxDevice) -> MemoryDeviceEffects:
        return self[device.udid]


def install_services(
    mux: FakeUsbmuxd, effects_for: Callable[[MuxDevice], DeviceEffects], *, ssl: bool = True
) -> tuple[McInstallService, ActivationService]:
    """Offer MCInstall and mobileactivationd on every device of `mux`, backed by `effects_for`."""
    mcinstall = McInstallService(effects_for, ssl=ssl)
    activation = ActivationService(lambda device: effects_for(device).activation_state, ssl=ssl)
    mux.services[mcinstall.name] = mcinstall
    mux.services[activation.name] = activation
    return mcinstall, activation
