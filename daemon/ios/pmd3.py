"""`DeviceBackend` over pymobiledevice3: lockdownd and MCInstall, reached through usbmuxd.

pymobiledevice3 11.x is asyncio-native for usbmux, lockdown and services (commit 4f12a36c, v8.0.0:
"Make all usbmux and lockdown apis asyncio"; /work/shared/research/ios.md §1.0), so every call here
is awaited on the daemon's loop. Each operation opens its own lockdown connection (and MCInstall
service connection) and closes them before returning, whatever happens.

What each operation sends (pymobiledevice3 11.45 source; device behaviour from the decompiled
`mc_mobile_tunnel`, research §1.5):

* `info`: `create_using_usbmux(autopair=False)`, then pairing when needed, then lockdownd's values
  and Setup Assistant's `com.apple.purplebuddy` domain (see `in_setup_assistant`).
* `erase`: MCInstall `EraseDevice` (`MobileConfigService.erase_device`). The device acknowledges,
  then resets and leaves USB; pymobiledevice3 suppresses the `ConnectionTerminatedError` of a device
  that drops the connection right after the request, so that is success here too.
* `cloud_configuration`: MCInstall `GetCloudConfiguration`.
* `setup`: `GetCloudConfiguration` (refuse if one is already there: it applies once per erase),
  `DownloadAndApplyCloudConfiguration` (the device fetches its ADE profile from Apple over its own
  network), `GetCloudConfiguration` again to verify whom it names.
* `update`: reads the ECID (`info`), then hands the restore to the `Restorer`, which runs it in a
  worker process keyed by ECID (pymobiledevice3's Recovery/DFU layer is blocking libusb code,
  research §0.4; see docs/restores.md). Without a restorer, or without an IPSW to restore from:
  `RestoreUnavailableError`. A failed restore raises `RestoreError`, whose `touched` says whether
  the device may have changed (the update step's `check()` then decides, never a blind re-run).
* `restore_from_recovery`: the same, for a device a failed restore left in Recovery (no lockdownd,
  no UDID): the caller names it by ECID and the worker finds it on USB (`--recovery`).

Pairing. The pair record lives in the station's directory (`pair_records`), never in a home folder:
it is passed to pymobiledevice3 explicitly, so that directory is authoritative; without one there,
pymobiledevice3 looks in usbmuxd, then `/var/lib/lockdown`, then the directory. A record the device
no longer accepts (it forgets its pairings when erased) makes lockdownd answer `InvalidHostID`, and the
device is paired again. A new record is written to the directory and mirrored to usbmuxd, as
pymobiledevice3 does; but pymobiledevice3's own mirroring (`PlistUsbmuxLockdownClient
.save_pair_record`) ignores `usbmux_address` and always talks to the default usbmuxd, so this backend
replaces it on the client it pairs with one that uses the configured address. With a
`SupervisionIdentity`, pairing is pymobiledevice3's `pair_supervised` (challenge signed with the
supervisor key, no Trust dialog on devices whose cloud configuration lists that certificate);
devices that do not know it fall back to the ordinary Trust flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import plistlib
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, ParamSpec, TypeVar

import structlog
from cryptography.hazmat.primitives.asymmetric import rsa
from pymobiledevice3 import usbmux
from pymobiledevice3.ca import generate_pairing_cert_chain
from pymobiledevice3.exceptions import (
    BadDevError,
    CloudConfigurationAlreadyPresentError,
    ConnectionFailedError,
    ConnectionFailedToUsbmuxdError,
    ConnectionTerminatedError,
    DeviceNotFoundError,
    FatalPairingError,
    IncorrectModeError,
    InvalidConnectionError,
    InvalidServiceError,
    LockdownError,
    MCProtectedError,
    MuxException,
    NoDeviceConnectedError,
    PairingDialogResponsePendingError,
    PairingError,
    PasscodeRequiredError,
    PasswordRequiredError,
    ProfileError,
    ProtocolError,
    PyMobileDevice3Exception,
    StartServiceError,
    UserDeniedPairingError,
)
from pymobiledevice3.exceptions import NotPairedError as Pmd3LibNotPairedError
from pymobiledevice3.lockdown import LockdownClient, UsbmuxLockdownClient, create_using_usbmux
from pymobiledevice3.pair_records import get_local_pairing_record
from pymobiledevice3.services.mobile_config import MobileConfigService
from pymobiledevice3.usbmux import PlistMuxConnection

from daemon.ios.base import (
    CloudConfig,
    DeviceError,
    DeviceGoneError,
    DeviceInfo,
    NotPairedError,
    PairingRefusedError,
    ProgressFn,
    ServiceUnavailableError,
    SetupPlan,
    UnexpectedReplyError,
    UpdateTarget,
)
from daemon.ios.cloudconfig import cloud_config_from_details, verify_applied
from daemon.ios.restore import Restorer, RestoreRequest
from daemon.usb.apple import AppleUsbError, format_ecid

log = structlog.get_logger("benchhub.pmd3")

T = TypeVar("T")
P = ParamSpec("P")


def honour_cancel(operation: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Re-raise a cancellation the operation swallowed.

    On Python 3.11 `asyncio.wait_for` returns the inner result when it is cancelled in the same loop
    iteration as that result arrives (cpython gh-86296, fixed in 3.12), and pymobiledevice3 dials
    through `wait_for`: a step cancelled then (daemon stopping, device unplugged, step timeout) would
    carry on into the next step with its cancellation lost. The task's `cancelling()` count still
    says a cancellation is pending, so it is raised here."""

    @functools.wraps(operation)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
        task = asyncio.current_task()
        pending = task.cancelling() if task is not None else 0
        try:
            result = await operation(*args, **kwargs)
        except Exception:
            if task is not None and task.cancelling() > pending:
                raise asyncio.CancelledError from None
            raise
        if task is not None and task.cancelling() > pending:
            raise asyncio.CancelledError
        return result

    return guarded


PURPLEBUDDY_DOMAIN: Final = "com.apple.purplebuddy"
"""Setup Assistant's preferences, readable through lockdownd (libimobiledevice `ideviceinfo` lists the
domain). ManagedConfiguration writes `SetupDone = true` there when Buddy has finished (decompiled iOS
26.1: `CFPreferencesSetAppValue(@"com.apple.purplebuddy", kCFBooleanTrue, @"SetupDone")`); an erased
device has no such value until then. [INFERRED: not yet checked on hardware.]"""

DEFAULT_TIMEOUT: Final = 60.0
DEFAULT_SETUP_TIMEOUT: Final = 300.0
DEFAULT_PAIR_TIMEOUT: Final = 30.0


# -- typed errors specific to this backend (the codes are stable vocabulary) ---------------------------


@dataclass(frozen=True, slots=True)
class UnpairedInfo:
    """What lockdownd tells before a session (pymobiledevice3 `create_using_usbmux(autopair=False)`):
    enough to say which device refuses to pair. None where the device did not say."""

    udid: str | None = None
    ecid: str | None = None
    product_type: str | None = None
    ios_version: str | None = None
    build: str | None = None
    device_class: str | None = None
    hardware_model: str | None = None
    device_name: str | None = None

    def describe(self) -> str:
        model = " ".join(p for p in (self.device_class, self.product_type) if p) or "device"
        ios = f", iOS {self.ios_version}" if self.ios_version else ""
        ecid = f", ECID {self.ecid}" if self.ecid else ""
        return f"{model} {self.udid or '?'}{ecid}{ios}"


class Pmd3NotPairedError(NotPairedError):
    """Not paired, and pairing did not complete (Trust dialog unanswered, passcode lock, record
    rejected); `unpaired` is what the device said before a session."""

    def __init__(self, message: str, unpaired: UnpairedInfo | None = None) -> None:
        super().__init__(message)
        self.unpaired = unpaired


class Pmd3PairingRefusedError(PairingRefusedError):
    """Someone tapped "Don't Trust"; `unpaired` is what the device said before a session."""

    def __init__(self, message: str, unpaired: UnpairedInfo | None = None) -> None:
        super().__init__(message)
        self.unpaired = unpaired


class RestoreUnavailableError(DeviceError):
    """This backend does not restore: restores go through the Restorer (worker processes)."""

    code = "restore_unavailable"
    retryable = False


class CloudConfigAlreadyAppliedError(DeviceError):
    """The device already holds a cloud configuration; MCInstall error 14002
    (`TUNNEL_ERROR_CLOUD_CONFIG_EXISTS`). Only an erase clears it, so retrying cannot help."""

    code = "cloud_config_already_applied"
    retryable = False


class McInstallRejectedError(DeviceError):
    """MCInstall answered with an error status (e.g. no ADE profile for the device yet); the message
    carries the device's reply, `ErrorChain` included."""

    code = "mcinstall_rejected"


@dataclass(frozen=True, slots=True)
class SupervisionIdentity:
    """The supervising host's certificate and private key (PEM files; may be the same file)."""

    certificate: Path
    private_key: Path


# -- sans-IO interpretation of what the device says ----------------------------------------------------


def _text(values: Mapping[str, Any], key: str) -> str | None:
    value = values.get(key)
    return value if isinstance(value, str) else None


def _ecid(values: Mapping[str, Any]) -> str | None:
    value = values.get("UniqueChipID")
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    try:
        return format_ecid(value)
    except AppleUsbError:
        return None


def unpaired_info(values: Mapping[str, Any]) -> UnpairedInfo:
    return UnpairedInfo(
        udid=_text(values, "UniqueDeviceID"),
        ecid=_ecid(values),
        product_type=_text(values, "ProductType"),
        ios_version=_text(values, "ProductVersion"),
        build=_text(values, "BuildVersion"),
        device_class=_text(values, "DeviceClass"),
        hardware_model=_text(values, "HardwareModel"),
        device_name=_text(values, "DeviceName"),
    )


def in_setup_assistant(activation_state: str, buddy: Mapping[str, Any] | None) -> bool:
    """Whether the device is still in Setup Assistant ("Buddy").

    An `Unactivated` device is: activation is one of Buddy's steps. Otherwise Buddy has finished once
    `com.apple.purplebuddy` says `SetupDone` (see `PURPLEBUDDY_DOMAIN`); an activated device whose
    domain has no `SetupDone` is still in it (activation comes early in Buddy). If the domain cannot be
    read at all (`buddy` None), only activation can tell, and an activated device counts as set up.
    [INFERRED from the decompiled sources and the simulated backend's model; verify on hardware.]
    """
    if activation_state == "Unactivated":
        return True
    if buddy is None:
        return False
    return buddy.get("SetupDone") is not True


def device_info(values: Mapping[str, Any], buddy: Mapping[str, Any] | None) -> DeviceInfo:
    """`DeviceInfo` from lockdownd's values after a session; `UnexpectedReplyError` naming the first
    missing or mistyped value."""
    fields: dict[str, str] = {}
    for key in (
        "UniqueDeviceID",
        "SerialNumber",
        "ProductType",
        "ProductVersion",
        "BuildVersion",
        "DeviceClass",
        "ActivationState",
    ):
        value = _text(values, key)
        if value is None:
            raise UnexpectedReplyError(f"lockdownd did not report {key} as text: {values.get(key)!r}")
        fields[key] = value
    ecid = _ecid(values)
    if ecid is None:
        raise UnexpectedReplyError(
            f"lockdownd reported no usable UniqueChipID: {values.get('UniqueChipID')!r}"
        )
    return DeviceInfo(
        udid=fields["UniqueDeviceID"],
        ecid=ecid,
        serial=fields["SerialNumber"],
        product_type=fields["ProductType"],
        ios_version=fields["ProductVersion"],
        build=fields["BuildVersion"],
        device_class=fields["DeviceClass"],
        activation_state=fields["ActivationState"],
        in_setup_assistant=in_setup_assistant(fields["ActivationState"], buddy),
    )


def translate(exc: Exception, udid: str, operation: str) -> DeviceError:  # noqa: PLR0911, PLR0912 - a table
    """The typed error for a pymobiledevice3 (or socket) failure during `operation` on `udid`."""
    where = f"{operation} on {udid}"
    if isinstance(exc, UserDeniedPairingError):
        return PairingRefusedError(f"{where}: the device refused to trust this host")
    if isinstance(exc, PairingDialogResponsePendingError):
        return NotPairedError(f"{where}: the Trust dialog on the device is waiting for an answer")
    if isinstance(exc, PasswordRequiredError):
        return NotPairedError(f"{where}: the device is locked with a passcode; unlock it to pair")
    if isinstance(exc, PairingError | FatalPairingError | Pmd3LibNotPairedError):
        return NotPairedError(f"{where}: not paired ({type(exc).__name__}: {exc})")
    if isinstance(exc, CloudConfigurationAlreadyPresentError):
        return CloudConfigAlreadyAppliedError(
            f"{where}: the device already has a cloud configuration (MCInstall error 14002); erase it first"
        )
    if isinstance(exc, ProfileError):
        return McInstallRejectedError(f"{where}: {exc}")
    if isinstance(exc, ConnectionFailedToUsbmuxdError):
        return ServiceUnavailableError(f"{where}: usbmuxd is not reachable ({exc})")
    if isinstance(exc, NoDeviceConnectedError | DeviceNotFoundError | BadDevError):
        return DeviceGoneError(f"{where}: the device is not on usbmuxd")
    if isinstance(exc, ConnectionFailedError):
        return ServiceUnavailableError(f"{where}: the device refused the connection ({exc})")
    if isinstance(exc, MuxException):
        return ServiceUnavailableError(f"{where}: usbmuxd failed: {exc}")
    if isinstance(exc, ConnectionTerminatedError | ConnectionError | asyncio.IncompleteReadError):
        return DeviceGoneError(f"{where}: the connection to the device dropped")
    if isinstance(
        exc,
        InvalidServiceError
        | StartServiceError
        | InvalidConnectionError
        | IncorrectModeError
        | PasscodeRequiredError
        | MCProtectedError,
    ):
        return ServiceUnavailableError(f"{where}: {type(exc).__name__}: {exc}")
    if isinstance(exc, ProtocolError | LockdownError):
        return UnexpectedReplyError(f"{where}: {type(exc).__name__}: {exc}")
    if isinstance(exc, OSError):
        return ServiceUnavailableError(f"{where}: {type(exc).__name__}: {exc}")
    return DeviceError(f"{where}: {type(exc).__name__}: {exc}")


async def _reply(request: str, call: Awaitable[T]) -> T:
    """Await one MCInstall exchange. pymobiledevice3 indexes the device's reply without checking its
    shape (`response.get(...)`, `ErrorChain[0]["ErrorCode"]`), so a malformed reply surfaces as a
    lookup or type error; it is the device's fault, reported as `UnexpectedReplyError`."""
    try:
        return await call
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise UnexpectedReplyError(
            f"MCInstall {request}: malformed reply ({type(exc).__name__}: {exc})"
        ) from exc


# -- the backend -----------------------------------------------------------------------------------------


class Pymobiledevice3Backend:
    """`DeviceBackend` for devices in normal mode on usbmuxd.

    `usbmux_address`: usbmuxd's socket (a path, or HOST:PORT) or None for the system default
    (`USBMUXD_SOCKET_ADDRESS`, else `/var/run/usbmuxd`). `pair_records`: the station's directory for
    pair records (created if missing). `supervision`: pair supervised devices without the Trust dialog.
    `timeout` bounds each operation, `setup_timeout` the setup (the device downloads from Apple),
    `pair_timeout` how long a Trust dialog may stay unanswered (0: fail at once).
    """

    def __init__(
        self,
        usbmux_address: str | None,
        pair_records: Path,
        *,
        supervision: SupervisionIdentity | None = None,
        restorer: Restorer | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        setup_timeout: float = DEFAULT_SETUP_TIMEOUT,
        pair_timeout: float = DEFAULT_PAIR_TIMEOUT,
        preserve_data_plan: bool = True,
    ) -> None:
        self.usbmux_address = usbmux_address
        self.pair_records = Path(pair_records)
        self.supervision = supervision
        self.restorer = restorer
        self._rsa_host_key: rsa.RSAPrivateKey | None = None
        self.timeout = timeout
        self.setup_timeout = setup_timeout
        self.pair_timeout = pair_timeout
        self.preserve_data_plan = preserve_data_plan
        """`EraseDevice` `PreserveDataPlan` (keep eSIM plans; pymobiledevice3's CLI default)."""

    # -- DeviceBackend -----------------------------------------------------------------------------------

    @honour_cancel
    async def info(self, udid: str) -> DeviceInfo:
        with self._errors(udid, "info"):
            async with asyncio.timeout(self.timeout), self._lockdown(udid) as ld:
                values = dict(ld.all_values)
                buddy = await self._buddy(ld)
        return device_info(values, buddy)

    async def update(self, udid: str, target: UpdateTarget, *, erase: bool, progress: ProgressFn) -> None:
        if self.restorer is None or target.ipsw is None:
            raise RestoreUnavailableError(
                f"update of {udid} to iOS {target.version}: no restorer or no IPSW file to restore from"
            )
        device = await self.info(udid)
        request = RestoreRequest(
            device.ecid, target.ipsw, erase=erase, udid=udid, pair_records=self.pair_records
        )
        outcome = await self.restorer.restore(request, progress)
        outcome.raise_for_error()

    async def restore_from_recovery(
        self, ecid: str, target: UpdateTarget, *, erase: bool, progress: ProgressFn
    ) -> None:
        """The same restore as `update`, for a device that a failed restore
        left in Recovery. There is no lockdownd to read the ECID from, so the caller names it; the
        worker looks for it on USB only (`RestoreRequest.recovery`)."""
        if self.restorer is None or target.ipsw is None:
            raise RestoreUnavailableError(
                f"restore of ECID {ecid} (in Recovery) to iOS {target.version}:"
                " no restorer or no IPSW file to restore from"
            )
        request = RestoreRequest(
            ecid, target.ipsw, erase=erase, pair_records=self.pair_records, recovery=True
        )
        outcome = await self.restorer.restore(request, progress)
        outcome.raise_for_error()

    @honour_cancel
    async def erase(self, udid: str) -> None:
        with self._errors(udid, "erase"):
            async with asyncio.timeout(self.timeout), self._mcinstall(udid) as mc:
                await _reply(
                    "EraseDevice",
                    mc.erase_device(
                        preserve_data_plan=self.preserve_data_plan, disallow_proximity_setup=False
                    ),
                )
        log.info("erase_acknowledged", udid=udid)

    @honour_cancel
    async def cloud_configuration(self, udid: str) -> CloudConfig | None:
        with self._errors(udid, "cloud_configuration"):
            async with asyncio.timeout(self.timeout), self._mcinstall(udid) as mc:
                details = await _reply("GetCloudConfiguration", mc.get_cloud_configuration())
        return cloud_config_from_details(details)

    @honour_cancel
    async def setup(self, udid: str, plan: SetupPlan, progress: ProgressFn) -> None:
        if plan.skip_panes:
            # Which panes are skipped is part of the ADE profile on Apple's side; MCInstall's
            # DownloadAndApplyCloudConfiguration takes no such option.
            log.warning("setup_skip_panes_ignored", udid=udid, panes=list(plan.skip_panes))
        with self._errors(udid, "setup"):
            async with asyncio.timeout(self.setup_timeout), self._mcinstall(udid) as mc:
                progress(None, "reading the cloud configuration")
                before = cloud_config_from_details(
                    await _reply("GetCloudConfiguration", mc.get_cloud_configuration())
                )
                if before.applied:
                    raise CloudConfigAlreadyAppliedError(
                        f"setup on {udid}: the device already has a cloud configuration"
                        f" ({before.organization or '?'}, {before.configuration_url or 'no MDM URL'});"
                        " it applies once per erase"
                    )
                progress(None, "the device is downloading its cloud configuration")
                await _reply(
                    "DownloadAndApplyCloudConfiguration", mc.download_and_apply_cloud_configuration()
                )
                after = cloud_config_from_details(
                    await _reply("GetCloudConfiguration", mc.get_cloud_configuration())
                )
        verify_applied(
            after, plan, f"setup on {udid}", "the device acknowledged DownloadAndApplyCloudConfiguration"
        )
        progress(100, f"managed by {after.organization or '?'} ({after.configuration_url})")
        log.info("cloud_configuration_applied", udid=udid, url=after.configuration_url)

    # -- beyond DeviceBackend ----------------------------------------------------------------------------

    async def set_cloud_configuration(self, udid: str, details: Mapping[str, Any]) -> None:
        """MCInstall `SetCloudConfiguration` (a host-made configuration, e.g. supervision without
        ADE). Works once per erase: afterwards `CloudConfigAlreadyAppliedError` (error 14002)."""
        with self._errors(udid, "set_cloud_configuration"):
            async with asyncio.timeout(self.timeout), self._mcinstall(udid) as mc:
                await _reply("SetCloudConfiguration", mc.set_cloud_configuration(dict(details)))

    # -- plumbing ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, udid: str, operation: str) -> Iterator[None]:
        """Turn whatever pymobiledevice3 or the sockets raise into the daemon's typed errors."""
        try:
            yield
        except DeviceError:
            raise
        except TimeoutError as exc:
            raise ServiceUnavailableError(
                f"{operation} on {udid}: no answer from the device in time"
            ) from exc
        except (PyMobileDevice3Exception, OSError, asyncio.IncompleteReadError) as exc:
            error = translate(exc, udid, operation)
            log.info("device_operation_failed", udid=udid, op=operation, code=error.code, error=repr(exc))
            raise error from exc

    @contextlib.asynccontextmanager
    async def _lockdown(self, udid: str) -> AsyncIterator[UsbmuxLockdownClient]:
        """A paired lockdown client for `udid` (pairing first if needed), closed on exit."""
        self.pair_records.mkdir(parents=True, exist_ok=True)
        ld = await create_using_usbmux(
            serial=udid,
            autopair=False,
            connection_type="USB",
            pair_record=self._stored_record(udid),
            pairing_records_cache_folder=self.pair_records,
            usbmux_address=self.usbmux_address,
        )
        try:
            if not ld.paired:
                await self._pair(ld, udid)
            yield ld
        finally:
            await ld.close()

    @contextlib.asynccontextmanager
    async def _mcinstall(self, udid: str) -> AsyncIterator[MobileConfigService]:
        async with self._lockdown(udid) as ld, MobileConfigService(ld) as mc:
            yield mc

    def _stored_record(self, udid: str) -> dict[str, Any] | None:
        try:
            record = get_local_pairing_record(udid, self.pair_records)
        except (OSError, ValueError, plistlib.InvalidFileException) as exc:
            log.warning("pair_record_unreadable", udid=udid, error=repr(exc))
            return None
        return record if isinstance(record, dict) else None

    async def _pair(self, ld: UsbmuxLockdownClient, udid: str) -> None:
        seen = unpaired_info(ld.all_values)
        # pymobiledevice3 would mirror the new record to the *default* usbmuxd; use ours instead.
        ld.save_pair_record = self._record_saver(ld)  # type: ignore[method-assign]
        try:
            if self.supervision is not None:
                with self._keybag(self.supervision) as keybag:
                    await ld.pair_supervised(keybag, timeout=self.pair_timeout)
            else:
                await self._pair_off_loop(ld)
        except UserDeniedPairingError as exc:
            raise Pmd3PairingRefusedError(f"{seen.describe()} refused to trust this host", seen) from exc
        except PairingDialogResponsePendingError as exc:
            raise Pmd3NotPairedError(
                f"{seen.describe()}: the Trust dialog is waiting for an answer on the device", seen
            ) from exc
        except PasswordRequiredError as exc:
            raise Pmd3NotPairedError(
                f"{seen.describe()} is locked with a passcode: unlock it to pair", seen
            ) from exc
        except PairingError as exc:
            raise Pmd3NotPairedError(f"{seen.describe()}: pairing failed ({exc})", seen) from exc
        if not await ld.validate_pairing():
            raise Pmd3NotPairedError(f"{seen.describe()} did not accept the new pair record", seen)
        log.info("paired", udid=udid, supervised=self.supervision is not None)

    async def _pair_off_loop(self, ld: UsbmuxLockdownClient) -> None:
        """`LockdownClient.pair`, with the certificates made in a thread.

        pymobiledevice3 makes two 2048-bit RSA keys per pairing on the event loop (~55 ms of CPU
        each, measured; every device pairs again after its erase), which stalls every other port,
        the watcher and the publisher meanwhile. This is the same exchange (11.45 `pair`): the
        device's public key, `generate_pairing_cert_chain` with this station's host key, the `Pair`
        request, the record saved. It leans on `_request_pair`; should a pymobiledevice3 release drop
        it, pairing falls back to `pair` itself."""
        request_pair = getattr(ld, "_request_pair", None)
        host_key = await self._host_key()
        if request_pair is None:
            await ld.pair(timeout=self.pair_timeout, private_key=host_key)
            return
        device_key = await ld.get_value("", "DevicePublicKey")
        if not device_key:
            raise PairingError()
        host_cert, host_key_pem, device_cert, root_cert, root_key = await asyncio.to_thread(
            generate_pairing_cert_chain, device_key, private_key=host_key
        )
        record: dict[str, Any] = {
            "DeviceCertificate": device_cert,
            "HostCertificate": host_cert,
            "HostID": ld.host_id,
            "RootCertificate": root_cert,
            "RootPrivateKey": root_key,
            "WiFiMACAddress": ld.wifi_mac_address,
            "SystemBUID": ld.system_buid,
        }
        options = {
            "HostName": socket.gethostname(),
            "PairRecord": record,
            "ProtocolVersion": "2",
            "PairingOptions": {"ExtendedPairingErrors": True},
        }
        reply = await request_pair(options, timeout=self.pair_timeout)
        record["HostPrivateKey"] = host_key_pem
        if isinstance(reply, dict) and reply.get("EscrowBag") is not None:
            record["EscrowBag"] = reply["EscrowBag"]
        ld.pair_record = record
        await ld.save_pair_record()
        ld.paired = True

    async def _host_key(self) -> rsa.RSAPrivateKey:
        """This station's host key, made once, in a thread (see `_pair_off_loop`)."""
        if self._rsa_host_key is None:
            self._rsa_host_key = await asyncio.to_thread(rsa.generate_private_key, 65537, 2048)
        return self._rsa_host_key

    def _record_saver(self, ld: UsbmuxLockdownClient) -> Any:
        async def save_pair_record() -> None:
            await LockdownClient.save_pair_record(ld)  # <udid>.plist in the station's directory
            device = ld.service.mux_device
            if device is None or ld.pair_record is None or ld.identifier is None:
                return
            try:
                mux = await usbmux.create_mux(usbmux_address=self.usbmux_address)
                try:
                    if isinstance(mux, PlistMuxConnection):
                        await mux.save_pair_record(
                            ld.identifier, device.devid, plistlib.dumps(ld.pair_record)
                        )
                finally:
                    await mux.close()  # type: ignore[no-untyped-call]  # unannotated in pymobiledevice3
            except (MuxException, OSError) as exc:
                # The directory's copy is the one this backend uses; usbmuxd's is a courtesy.
                log.warning("usbmuxd_pair_record_not_saved", udid=ld.identifier, error=repr(exc))

        return save_pair_record

    @contextlib.contextmanager
    def _keybag(self, identity: SupervisionIdentity) -> Iterator[Path]:
        """pymobiledevice3 wants certificate and key in one PEM file: use it if it is one, else
        join them in a private temporary file next to the pair records, removed afterwards."""
        if identity.certificate == identity.private_key:
            yield identity.certificate
            return
        data = identity.certificate.read_bytes().rstrip(b"\n") + b"\n" + identity.private_key.read_bytes()
        fd, name = tempfile.mkstemp(prefix=".keybag-", suffix=".pem", dir=self.pair_records)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            yield Path(name)
        finally:
            Path(name).unlink(missing_ok=True)

    @staticmethod
    async def _buddy(ld: UsbmuxLockdownClient) -> dict[str, Any] | None:
        """Setup Assistant's domain, or None if lockdownd will not say (see `in_setup_assistant`)."""
        try:
            value = await ld.get_value(domain=PURPLEBUDDY_DOMAIN)
        except LockdownError as exc:
            log.debug("purplebuddy_unreadable", udid=ld.identifier, error=repr(exc))
            return None
        return value if isinstance(value, dict) else {}
