"""The restore worker: `python -m daemon.ios.restore_worker --ecid ECID --ipsw PATH [--erase] [--recovery]`.

One process restores one device with pymobiledevice3 (11.45) and reports as JSON lines on stdout
(`daemon.ios.restore_protocol`); `daemon.ios.restore.ProcessRestorer` starts it, reads it and kills
it. It is kept thin on purpose: pymobiledevice3's `Restore` does the work, the subclasses here only
report what it does, and the decisions that can be wrong (how a progress message reads, which
exception means what) are pure functions with unit tests.

The sequence (pymobiledevice3 `restore/restore.py` `Restore.update`, `restore/recovery.py`):

1. open the IPSW (reads BuildManifest.plist; a bad file fails here, `ipsw_invalid`);
2. check the host can restore at all: a libusb backend for pyusb (Recovery/DFU are driven over raw
   USB) and a reachable usbmuxd (restore mode is reached through it), else `usb_unavailable`;
3. find the device by ECID: in normal mode through usbmuxd + lockdown, in Recovery/DFU on USB by its
   iBoot serial string (one scan per second, never pyusb's busy-wait), else `no_device`; with
   `--recovery` (a device a failed restore left in Recovery) on USB only. From Recovery,
   pymobiledevice3's `Recovery.boot_ramdisk` skips EnterRecovery and sends the iBEC straight away;
   from DFU it first boots iBSS into Recovery;
4. ask Apple's signing server (TSS, gs.apple.com) for tickets: `tss_unreachable` / `tss_refused`;
5. `touch`, then EnterRecovery (from normal mode) or iBEC/iBSS (from Recovery/DFU), the ramdisk and
   kernel: the device reboots into restore mode;
6. talk to restored until its final status message; progress messages become progress events.

The device reboots into the new system on its own; the daemon sees it come back through its own
device watcher, so the worker does not wait for it.

UNTESTED without hardware and network (said plainly, because nothing here has restored a device):
steps 3 (the normal-mode and Recovery paths), 4, 5 and 6 have only been read against
pymobiledevice3's source, not run. What IS tested: argument handling, the event stream, the
exception mapping, progress wording, the IPSW check, and the clean `usb_unavailable`/`no_device`
error when the device is not there (tests/test_restorer.py runs this module as a real subprocess).
Unknowns worth checking on a bench: whether restored's final non-zero StatusMsg is really its last
message (we stop reading there), how long a device takes to reappear in restore mode on a deep hub
chain (`--restore-mode-timeout`), and whether the `touch` point is early enough for every path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import requests
import usb.core
from ipsw_parser.exceptions import IpswException  # type: ignore[import-untyped]
from ipsw_parser.ipsw import IPSW  # type: ignore[import-untyped]
from pymobiledevice3 import usbmux
from pymobiledevice3._version import __version__ as PMD3_VERSION
from pymobiledevice3.exceptions import (
    ConnectionFailedError,
    ConnectionFailedToUsbmuxdError,
    ConnectionTerminatedError,
    DeviceNotFoundError,
    IRecvNoDeviceConnectedError,
    NoDeviceConnectedError,
    PyMobileDevice3Exception,
    TSSError,
)
from pymobiledevice3.exceptions import NoSuchBuildIdentityError as Pmd3NoSuchBuildIdentityError
from pymobiledevice3.irecv import IRecv
from pymobiledevice3.lockdown import create_using_usbmux
from pymobiledevice3.restore.base_restore import Behavior
from pymobiledevice3.restore.consts import PROGRESS_BAR_OPERATIONS
from pymobiledevice3.restore.device import Device
from pymobiledevice3.restore.recovery import Recovery
from pymobiledevice3.restore.restore import Restore, known_errors

from daemon.ios.base import DeviceMode
from daemon.ios.restore_protocol import (
    LOG_LEVELS,
    EventWriter,
    LogEvent,
    ModeEvent,
    ProgressEvent,
    RestoreCode,
    RestoreEvent,
    ResultEvent,
    TouchEvent,
    claim_stdout,
    watch_parent,
)
from daemon.usb.apple import APPLE_VID, AppleUsbError, format_ecid, identify, parse_ecid

Emit = Callable[[RestoreEvent], None]


class WorkerFailure(Exception):
    """A failure this worker recognised itself, with its code."""

    def __init__(self, code: RestoreCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------- pure parts

# idevicerestore's wording for restored's operations (`restore.c` `restore_progress_string`), for the
# ones a bench shows for minutes; the rest are derived from pymobiledevice3's names.
STEP_NAMES: Final[Mapping[str, str]] = {
    "CREATE_PARTITION_MAP": "Creating partition map",
    "CREATE_FILESYSTEM": "Creating filesystem",
    "RESTORE_IMAGE": "Restoring image",
    "VERIFY_RESTORE": "Verifying restore",
    "CHECK_FILESYSTEMS": "Checking filesystems",
    "MOUNT_FILESYSTEMS": "Mounting filesystems",
    "FIXUP_VAR": "Fixing up /var",
    "FLASH_FIRMWARE": "Flashing firmware",
    "UPDATE_BASEBAND": "Updating baseband",
    "SET_BOOT_STAGE": "Setting boot stage",
    "REBOOT_DEVICE": "Rebooting device",
    "SHUTDOWN_DEVICE": "Shutting down device",
    "WAIT_FOR_NAND": "Waiting for NAND",
    "UNMOUNT_FILESYSTEMS": "Unmounting filesystems",
    "LOAD_FIRMWARE": "Loading firmware data to flash",
    "WIPE_STORAGE_DEVICE": "Wiping storage device",
    "SEND_APPLE_LOGO": "Sending Apple logo to device",
    "CHECK_BATTERY_VOLTAGE": "Checking battery voltage",
    "WAIT_BATTERY_CHARGE": "Waiting for battery to charge",
    "UPDATE_GAS_GAUGE": "Updating gas gauge software",
    "CREATE_SYSTEM_KEYBAG": "Creating system key bag",
    "SEALING_SYSTEM_VOLUME": "Sealing system volume",
}


def operation_name(operation: object) -> str:
    """restored sends `Operation` as a number (`PROGRESS_BAR_OPERATIONS` names the known ones);
    pymobiledevice3 may already have replaced it by the name."""
    if isinstance(operation, int) and not isinstance(operation, bool):
        return PROGRESS_BAR_OPERATIONS.get(operation, f"OPERATION_{operation}")
    return str(operation)


def step_name(operation: str) -> str:
    """`FLASH_FIRMWARE` -> "Flashing firmware"; unknown names read as words ("Update rose")."""
    if operation in STEP_NAMES:
        return STEP_NAMES[operation]
    words = operation.replace("_", " ").strip().lower()
    return words[:1].upper() + words[1:] if words else "Restoring"


def progress_from_restored(message: Mapping[str, Any]) -> ProgressEvent | None:
    """A restored `ProgressMsg` as an event. `Progress` outside 0-100 (restored sends -1 for steps
    without a percentage, as idevicerestore's `progress > 0 && progress <= 100` check shows) means
    "no percent"."""
    if "Operation" not in message:
        return None
    operation = operation_name(message["Operation"])
    raw = message.get("Progress")
    percent = raw if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw <= 100 else None
    return ProgressEvent(step_name(operation), operation, percent)


def status_failure(status: int) -> WorkerFailure:
    """restored's final `StatusMsg` with a non-zero status (0 is success), in pymobiledevice3's words."""
    text = known_errors.get(status, "unknown error")
    return WorkerFailure(RestoreCode.RESTORE_FAILED, f"restored reported status {status}: {text}")


def _classify_usb(exc: usb.core.USBError, text: str) -> tuple[RestoreCode, str]:
    code = getattr(exc, "errno", None)
    if not isinstance(code, int):
        # libusb's own numbers: LIBUSB_ERROR_ACCESS -3, LIBUSB_ERROR_NO_DEVICE -4
        backend = getattr(exc, "backend_error_code", None)
        code = {-3: errno.EACCES, -4: errno.ENODEV}.get(backend) if isinstance(backend, int) else None
    if code == errno.ENODEV:
        return RestoreCode.DEVICE_GONE, f"the device left USB: {text}"
    if code == errno.EACCES:
        return RestoreCode.USB_UNAVAILABLE, f"no permission to open the USB device (udev rule?): {text}"
    return RestoreCode.RESTORE_FAILED, f"USB error: {text}"


_EXCEPTION_CODES: Final[tuple[tuple[tuple[type[BaseException], ...], RestoreCode, str], ...]] = (
    ((KeyboardInterrupt,), RestoreCode.CANCELLED, "interrupted"),
    (
        (usb.core.NoBackendError,),
        RestoreCode.USB_UNAVAILABLE,
        "pyusb has no libusb backend, so Recovery/DFU devices cannot be driven (install libusb-1.0)",
    ),
    # usbmuxd missing is a ConnectionFailedError, which further down means "the device went away".
    ((ConnectionFailedToUsbmuxdError,), RestoreCode.USB_UNAVAILABLE, "usbmuxd is not reachable ({text})"),
    ((TSSError,), RestoreCode.TSS_REFUSED, "{text}"),
    # Before restore mode requests is only used for TSS; later failures (URL assets) are swallowed
    # inside pymobiledevice3's message loop and never reach us.
    (
        (requests.RequestException,),
        RestoreCode.TSS_UNREACHABLE,
        "Apple's signing server (TSS) is unreachable: {text}",
    ),
    (
        (IpswException, Pmd3NoSuchBuildIdentityError),
        RestoreCode.IPSW_INVALID,
        "the IPSW does not fit this device: {text}",
    ),
    (
        (
            IRecvNoDeviceConnectedError,
            NoDeviceConnectedError,
            DeviceNotFoundError,
            ConnectionTerminatedError,
            ConnectionFailedError,
            ConnectionResetError,
            ConnectionAbortedError,
            BrokenPipeError,
            asyncio.IncompleteReadError,
        ),
        RestoreCode.DEVICE_GONE,
        "lost the device: {text}",
    ),
)
"""First match wins, so subclasses come before their bases."""


def classify_exception(exc: BaseException) -> tuple[RestoreCode, str]:
    """Map whatever ended the restore to a code and a one-line message; anything unknown is a
    `restore_failed` with the exception's type and text (its traceback goes to stderr)."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, WorkerFailure):
        return exc.code, exc.message
    if isinstance(exc, usb.core.USBError):
        return _classify_usb(exc, text)
    for types, code, template in _EXCEPTION_CODES:
        if isinstance(exc, types):
            return code, template.format(text=text)
    return RestoreCode.RESTORE_FAILED, text


def match_recovery_device(candidates: Iterable[tuple[int, int, str | None]], ecid: int) -> DeviceMode | None:
    """Which Recovery/DFU mode the device with `ecid` is in, from (vendor, product, serial string)
    of the USB devices present; None if it is not among them. Normal-mode devices are not matched
    here: they are found through usbmuxd and lockdown."""
    for vid, pid, serial in candidates:
        identity = identify(vid, pid, serial)
        if identity is None or identity.mode is DeviceMode.NORMAL:
            continue
        if identity.ecid == ecid:
            return identity.mode
    return None


# ---------------------------------------------------------------------------------------- device I/O


def _usb_apple_devices() -> list[tuple[int, int, str | None]]:
    """(vid, pid, serial) of Apple USB devices; NoBackendError if pyusb has no libusb. Reading the
    serial string opens the device; one we may not open is listed without it."""
    found: list[tuple[int, int, str | None]] = []
    for dev in usb.core.find(find_all=True, idVendor=APPLE_VID):
        serial: str | None
        try:
            serial = dev.serial_number
        except (usb.core.USBError, ValueError, NotImplementedError):
            serial = None
        found.append((int(dev.idVendor), int(dev.idProduct), serial))
    return found


async def check_host() -> None:
    """Fail before touching anything if this host cannot finish a restore."""
    _usb_apple_devices()  # NoBackendError -> usb_unavailable
    await usbmux.list_devices()  # ConnectionFailedToUsbmuxdError -> usb_unavailable


async def _normal_mode_device(ecid: int, udid: str | None, pair_records: Path | None) -> Device | None:
    devices = [d for d in await usbmux.list_devices() if d.connection_type == "USB"]
    # Devices whose UDID names another ECID are left alone: one may be mid-restore in another worker.
    devices = [d for d in devices if d.ecid is None or d.ecid == ecid]
    devices.sort(key=lambda d: d.serial != udid)
    for mux_device in devices:
        try:
            # Pair only into the station's directory; without one, read what an unpaired host may
            # (the ECID is among it) rather than let pymobiledevice3 write to a home folder.
            lockdown = await create_using_usbmux(
                serial=mux_device.serial,
                connection_type="USB",
                autopair=pair_records is not None,
                pairing_records_cache_folder=pair_records,
            )
        except PyMobileDevice3Exception:
            continue  # restore mode (not lockdownd), pairing trouble, gone again
        if lockdown.ecid == ecid:
            return Device(lockdown=lockdown)
        await lockdown.close()
    return None


async def find_device(
    ecid: int,
    udid: str | None,
    patience: float,
    pair_records: Path | None = None,
    *,
    usb_only: bool = False,
) -> tuple[Device, DeviceMode]:
    """The device with this ECID in normal, Recovery or DFU mode, looking once a second for up to
    `patience` seconds (it may be between modes after an earlier, interrupted attempt).

    `usb_only` (`--recovery`: the daemon saw the device in Recovery, left there by a failed
    restore) skips usbmuxd: without a UDID the normal-mode search would open lockdown on every
    legacy device of the bench, and pair with it, only to learn that none is this one."""
    deadline = time.monotonic() + patience
    while True:
        device = None if usb_only else await _normal_mode_device(ecid, udid, pair_records)
        if device is not None:
            return device, DeviceMode.NORMAL
        mode = match_recovery_device(_usb_apple_devices(), ecid)
        if mode is not None:
            # It is there: IRecv's own search (a busy-wait) returns at once; 10 s if it just left.
            return Device(irecv=IRecv(ecid=ecid, timeout=10)), mode
        if time.monotonic() >= deadline:
            modes = "Recovery or DFU" if usb_only else "normal, Recovery or DFU"
            raise WorkerFailure(
                RestoreCode.NO_DEVICE, f"no device with ECID {format_ecid(ecid)} in {modes} mode"
            )
        await asyncio.sleep(1.0)


def open_ipsw(path: Path) -> Any:
    try:
        return IPSW.create_from_path(str(path))
    except Exception as exc:  # FileNotFoundError, BadZipFile, StopIteration (no manifest), plist errors
        raise WorkerFailure(
            RestoreCode.IPSW_INVALID, f"cannot read IPSW {path}: {type(exc).__name__}: {exc}"
        ) from exc


# ---------------------------------------------------------------------------------------- reporting


class ReportingRecovery(Recovery):
    """pymobiledevice3's Recovery, reporting the signing request, `touch` and the modes it sees."""

    def __init__(self, *args: Any, emit: Emit, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.emit = emit
        self._mode: DeviceMode | None = None

    def saw(self, mode: DeviceMode) -> None:
        if mode is not self._mode:
            self._mode = mode
            self.emit(ModeEvent(mode))

    async def boot_ramdisk(self) -> None:
        if self.tss is None:
            self.emit(ProgressEvent("Requesting signatures from Apple (TSS)", "tss"))
            await self.fetch_tss_record()
        # Everything before this line only read from the device; everything after changes it.
        self.emit(TouchEvent("enter_recovery" if self.device.lockdown is not None else "send_iboot"))
        self.emit(ProgressEvent("Entering Recovery mode", "enter_recovery"))
        await super().boot_ramdisk()  # TSS is fetched, so this goes straight to the device

    async def reconnect_irecv(self, is_recovery: bool | None = None) -> None:
        await super().reconnect_irecv(is_recovery=is_recovery)
        irecv = self.device.irecv
        if irecv is not None:
            self.saw(DeviceMode.RECOVERY if irecv.mode.is_recovery else DeviceMode.DFU)

    async def enter_restore(self) -> None:
        self.emit(ProgressEvent("Booting restore ramdisk", "boot_ramdisk"))
        await super().enter_restore()  # type: ignore[no-untyped-call]


class ReportingRestore(Restore):
    """pymobiledevice3's Restore, reporting restored's progress and treating a non-zero final status
    as a failure. pymobiledevice3 only logs such a status and keeps reading; we assume, untested, that
    nothing useful follows it (restored sends StatusMsg once, at the end) and stop there, rather than
    wait for the restorer's timeout."""

    def __init__(
        self, ipsw: Any, device: Device, *, behavior: Behavior, emit: Emit, restore_mode_timeout: float
    ) -> None:
        super().__init__(ipsw, device, tss=None, behavior=behavior)
        self.emit = emit
        self.restore_mode_timeout = restore_mode_timeout
        self.failure: WorkerFailure | None = None
        # Restore.__init__ made a plain Recovery; the reporting one replaces it before any use.
        self.reporting = ReportingRecovery(ipsw, device, tss=None, behavior=behavior, emit=emit)
        self.recovery = self.reporting

    async def _connect_to_restored_service(self) -> None:
        try:
            async with asyncio.timeout(self.restore_mode_timeout):
                await super()._connect_to_restored_service()  # type: ignore[no-untyped-call]
        except TimeoutError:
            raise WorkerFailure(
                RestoreCode.DEVICE_GONE,
                f"the device did not come up in restore mode within {self.restore_mode_timeout:g} s",
            ) from None
        self.emit(ModeEvent(DeviceMode.RESTORE))
        self.emit(ProgressEvent("Starting restore", "start_restore"))

    async def send_filesystem(self, message: dict[str, Any]) -> None:
        self.emit(ProgressEvent("Sending filesystem", "send_filesystem"))
        await super().send_filesystem(message)

    async def handle_progress_msg(self, message: dict[str, Any]) -> None:
        event = progress_from_restored(message)
        if event is not None:
            self.emit(event)
        await super().handle_progress_msg(message)

    async def handle_status_msg(self, message: dict[str, Any]) -> None:
        await super().handle_status_msg(message)
        status = message.get("Status")
        if status != 0:
            self.failure = status_failure(status if isinstance(status, int) else -1)
            self._restore_finished = True  # ends restore_device()'s message loop

    async def handle_restored_crash(self, message: dict[str, Any]) -> None:
        self.emit(LogEvent("error", "restored crashed: " + " | ".join(message.get("RestoredBacktrace", []))))
        await super().handle_restored_crash(message)


class ForwardLogs(logging.Handler):
    """pymobiledevice3's INFO and above as `log` events (its restore loggers are named after the
    asyncio task, `Task-1-pymobiledevice3.restore.restore`, so this sits on the root logger)."""

    def __init__(self, emit: Emit) -> None:
        super().__init__(logging.INFO)
        self.emit_event = emit

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname.lower()
        level = level if level in LOG_LEVELS else ("error" if record.levelno >= logging.ERROR else "info")
        with contextlib.suppress(Exception):
            self.emit_event(LogEvent(level, f"{record.name}: {record.getMessage()}"))


# ---------------------------------------------------------------------------------------- main


async def run(args: argparse.Namespace, emit: Emit) -> None:
    ecid = parse_ecid(args.ecid)
    ipsw = open_ipsw(Path(args.ipsw))
    manifest = ipsw.build_manifest
    emit(
        LogEvent(
            "info",
            f"pymobiledevice3 {PMD3_VERSION}; IPSW iOS {manifest.product_version} "
            f"({manifest.product_build_version}); {'erase install' if args.erase else 'update'}",
        )
    )
    await check_host()
    emit(ProgressEvent("Looking for the device", "find_device"))
    device, mode = await find_device(
        ecid, args.udid, args.find_timeout, args.pair_records, usb_only=args.recovery
    )
    emit(ModeEvent(mode))
    behavior = Behavior.Erase if args.erase else Behavior.Update
    restore = ReportingRestore(
        ipsw, device, behavior=behavior, emit=emit, restore_mode_timeout=args.restore_mode_timeout
    )
    restore.reporting.saw(mode)  # mode changes are reported from where we found it
    await restore.update()  # type: ignore[no-untyped-call]
    if restore.failure is not None:
        raise restore.failure
    emit(ProgressEvent("Restore finished, device rebooting", "finished", 100))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m daemon.ios.restore_worker", description=__doc__)
    parser.add_argument(
        "--ecid", required=True, help="the device, hex (001C604A3405801E or 0x1C604A3405801E)"
    )
    parser.add_argument("--ipsw", required=True, help="path to the IPSW (file or extracted directory)")
    parser.add_argument("--erase", action="store_true", help="Erase Install instead of Upgrade Install")
    parser.add_argument("--udid", help="normal-mode UDID, if known (saves probing legacy devices)")
    parser.add_argument("--find-timeout", type=float, default=30.0, help="seconds to look for the device")
    parser.add_argument("--pair-records", type=Path, help="the station's pair record directory")
    parser.add_argument(
        "--recovery",
        action="store_true",
        help="the device is in Recovery (or DFU): look for it on USB only, never through usbmuxd",
    )
    parser.add_argument("--restore-mode-timeout", type=float, default=300.0)
    parser.add_argument("--verbose", action="store_true", help="pymobiledevice3 debug logs on stderr")
    args = parser.parse_args(argv)
    try:
        parse_ecid(args.ecid)
    except AppleUsbError as exc:
        parser.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    out = EventWriter(claim_stdout())
    watch_parent()
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger().addHandler(ForwardLogs(out.emit))
    try:
        asyncio.run(run(args, out.emit))
    except (Exception, KeyboardInterrupt) as exc:
        code, message = classify_exception(exc)
        if not isinstance(exc, WorkerFailure):
            traceback.print_exc(file=sys.stderr)
        out.emit(ResultEvent(False, code, message))
        return 1
    out.emit(ResultEvent(True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
