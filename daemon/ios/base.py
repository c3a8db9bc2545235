"""The one protocol through which the workflow touches iPhones and iPads.

Implementations: the simulator (`daemon.sim.backend`), pymobiledevice3 and Apple Configurator's
cfgutil. Steps see only this protocol and typed errors, so the workflow is the same on every bench.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from daemon.models import DeviceIdentity


class DeviceMode(enum.StrEnum):
    NORMAL = "normal"
    RECOVERY = "recovery"
    DFU = "dfu"
    RESTORE = "restore"


@dataclass(frozen=True, slots=True)
class DeviceSeen:
    """A device appeared on a USB path (or changed mode there). Recovery/DFU devices have no UDID."""

    usb_path: str
    mode: DeviceMode
    udid: str | None = None
    ecid: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceGone:
    usb_path: str


DeviceEvent = DeviceSeen | DeviceGone


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    udid: str
    ecid: str
    serial: str
    product_type: str
    ios_version: str
    build: str
    device_class: str
    activation_state: str
    in_setup_assistant: bool

    def identity(self) -> DeviceIdentity:
        return DeviceIdentity(
            udid=self.udid,
            ecid=self.ecid,
            serial=self.serial,
            product_type=self.product_type,
            ios_version=self.ios_version,
        )


@dataclass(frozen=True, slots=True)
class UpdateTarget:
    """The firmware a device is restored to; `ipsw` is None where the backend fetches it itself."""

    version: str
    build: str
    ipsw: Path | None = None
    erase_install: bool | None = None
    """Whether the IPSW holds an "Erase Install" identity for this device. A restore with
    `erase=True` needs one (the restorer picks the identity by board and RestoreBehavior), so a
    caller can refuse early instead of failing mid-restore. None: unknown (no local IPSW)."""
    update_install: bool | None = None
    """Whether the IPSW holds an "Update" identity for this device (a restore that keeps user data,
    `erase=False`). None: unknown."""


@dataclass(frozen=True, slots=True)
class CloudConfig:
    """What `GetCloudConfiguration` reports: whether the ADE configuration is on the device and whom
    it names."""

    applied: bool
    configuration_url: str | None = None
    organization: str | None = None
    is_mdm_unremovable: bool = False


@dataclass(frozen=True, slots=True)
class SetupPlan:
    expected_mdm_url: str | None = None
    skip_panes: tuple[str, ...] = ()


ProgressFn = Callable[[int | None, str | None], None]
"""`progress(percent or None, detail or None)`: called by long operations; must not block."""

_transfer_done: ContextVar[Callable[[], None] | None] = ContextVar("benchhub_transfer_done", default=None)


@contextlib.contextmanager
def on_transfer_done(callback: Callable[[], None]) -> Iterator[None]:
    """While the body runs, a restore that reports the end of its bulk transfer calls `callback`
    (the scheduler's lease: the controller's bus is free for the next restore while this one
    verifies and flashes on the device)."""
    token = _transfer_done.set(callback)
    try:
        yield
    finally:
        _transfer_done.reset(token)


def transfer_listener() -> Callable[[], None]:
    """What a restore calls, once, when its filesystem image has crossed USB (a no-op where nobody
    listens). Backends take it when the restore starts: tasks they spawn inherit the context, but
    callbacks from elsewhere would not."""
    return _transfer_done.get() or (lambda: None)


class DeviceError(Exception):
    """A device operation failed; `code` is stable vocabulary for MQTT and the store."""

    code = "device_error"
    retryable = True

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DeviceGoneError(DeviceError):
    code = "device_gone"


class NotPairedError(DeviceError):
    code = "not_paired"


class PairingRefusedError(DeviceError):
    code = "pairing_refused"
    retryable = False


class ServiceUnavailableError(DeviceError):
    code = "service_unavailable"


class UnexpectedReplyError(DeviceError):
    code = "unexpected_reply"


class UnsupportedDeviceError(DeviceError):
    code = "unsupported_device"
    retryable = False


class DeviceBackend(Protocol):
    """Operations on one device, named by UDID. Which device is where is not the backend's business:
    the station learns it from USB itself (`daemon.usb.watcher.DeviceWatcher`), the same way for
    every backend."""

    async def info(self, udid: str) -> DeviceInfo: ...

    async def update(self, udid: str, target: UpdateTarget, *, erase: bool, progress: ProgressFn) -> None:
        """Restore to `target`; returns once the device is back in normal mode on the new version."""
        ...

    async def restore_from_recovery(
        self, ecid: str, target: UpdateTarget, *, erase: bool, progress: ProgressFn
    ) -> None:
        """Restore the device with this ECID, now in Recovery mode, to `target`; returns once it is
        back in normal mode on the new version. Like `update`, a failure may leave it in Recovery.

        A restore that fails part-way leaves the device in Recovery: a libusb device with only its
        ECID (iBoot's serial string), no UDID, nothing on usbmuxd. Its system is unusable, so the
        only way forward is another restore, which has to find the device by ECID (`update` names
        it by UDID and reads the ECID from lockdownd, which a Recovery device does not run). A
        backend that cannot restore at all (cfgutil) refuses with a `DeviceError`."""
        ...

    async def erase(self, udid: str) -> None:
        """Ask the device to erase itself; returns when the device has acknowledged (it then leaves USB
        and comes back in Setup Assistant)."""
        ...

    async def cloud_configuration(self, udid: str) -> CloudConfig | None: ...

    async def setup(self, udid: str, plan: SetupPlan, progress: ProgressFn) -> None: ...


class FirmwareSource(Protocol):
    async def target_for(self, product_type: str, minimum: str) -> UpdateTarget | None:
        """The newest firmware for this model that satisfies `minimum`, or None if none does."""
        ...
