"""Who an Apple USB device is, from what USB alone tells: vendor/product ID and the serial string.

Sans-IO: plain functions over ints and strings, so every source (udev, sysfs, pyusb) shares them.

Product IDs (vendor 0x05AC):

* Normal mode: 0x1290-0x12AF, the range usbmuxd claims (libimobiledevice usbmuxd `src/usb.h`
  `PID_RANGE_LOW`/`PID_RANGE_MAX`), e.g. 0x12A8 for an iPhone. The USB serial is the UDID without
  its hyphen on A12 and later (24 hex digits: `<CPID:08X><ECID:016X>`), or the legacy 40-hex UDID.
* Restore mode (the restore ramdisk) is on usbmuxd too, so its PID is in the same range
  (research/ios.md §4, inferred, not verified on hardware). USB cannot tell it from normal mode:
  `classify_pid` reports NORMAL and only lockdown (`QueryType` -> `com.apple.mobile.restored`) can
  tell. Old devices show a placeholder serial there, which then yields no UDID/ECID here.
* Recovery (iBoot): 0x1280-0x1283; DFU: 0x1227, WTF 0x1222, Port DFU 0xF014 (libirecovery
  `enum irecv_mode` `IRECV_K_*_MODE`; pymobiledevice3 `irecv.Mode`). Their USB serial is the iBoot
  string, e.g. `CPID:8030 CPRV:11 CPFM:03 SCEP:01 BDID:0C ECID:001A2C3E0E12802E IBFL:3C
  SRNM:[F2LXK3ABHG7F]`, parsed by `parse_iboot_serial`.
* Other Apple PIDs (keyboards, adapters, T2 0x8600, Apple-silicon Mac restore 0x1901-0x1905) are
  not iOS devices: `classify_pid` returns None.

Everything that parses raises only `AppleUsbError` (a ValueError); `identify` never raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from daemon.ios.base import DeviceMode

APPLE_VID: Final = 0x05AC

NORMAL_PIDS: Final = range(0x1290, 0x12B0)
RECOVERY_PIDS: Final = range(0x1280, 0x1284)
DFU_PID: Final = 0x1227
WTF_PID: Final = 0x1222
PORT_DFU_PID: Final = 0xF014
DFU_PIDS: Final = frozenset({DFU_PID, WTF_PID, PORT_DFU_PID})

ECID_MAX: Final = (1 << 64) - 1


class AppleUsbError(ValueError):
    """A string is not what it was supposed to be (UDID, USB serial, iBoot string, ECID)."""


def classify_pid(vid: int, pid: int) -> DeviceMode | None:
    """The mode an Apple phone/tablet is in, from its USB IDs; None if it is not one.

    Restore mode is indistinguishable from normal mode at the USB level and reads as NORMAL."""
    if vid != APPLE_VID:
        return None
    if pid in NORMAL_PIDS:
        return DeviceMode.NORMAL
    if pid in RECOVERY_PIDS:
        return DeviceMode.RECOVERY
    if pid in DFU_PIDS:
        return DeviceMode.DFU
    return None


# ---------------------------------------------------------------------------------------- UDID / ECID

_HEX = r"[0-9A-Fa-f]"
_NEW_SERIAL = re.compile(rf"({_HEX}{{8}})-?({_HEX}{{16}})")
_LEGACY_SERIAL = re.compile(rf"{_HEX}{{40}}")
_ECID_TEXT = re.compile(rf"(?:0[xX])?({_HEX}{{1,16}})")


def udid_from_usb_serial(serial: str) -> str:
    """The UDID usbmuxd reports for a normal-mode USB serial.

    usbmuxd `src/usb.c`: a 24-character serial gets a hyphen after the 8th ("new style UDID: add
    hyphen between first 8 and following 16 digits"); 40-hex serials are the UDID as they are. Case
    is kept, as usbmuxd keeps it. An already hyphenated UDID is returned unchanged."""
    text = serial.strip()
    if match := _NEW_SERIAL.fullmatch(text):
        return f"{match[1]}-{match[2]}"
    if _LEGACY_SERIAL.fullmatch(text):
        return text
    raise AppleUsbError(f"not a UDID-style USB serial: {serial!r}")


def ecid_from_udid(udid: str) -> int | None:
    """The ECID inside a new-style UDID (`<CPID:08X>-<ECID:016X>`, hyphen optional, as
    pymobiledevice3 `MuxDevice.ecid`); None for a legacy 40-hex UDID, which carries none."""
    text = udid.strip()
    if match := _NEW_SERIAL.fullmatch(text):
        return int(match[2], 16)
    if _LEGACY_SERIAL.fullmatch(text):
        return None
    raise AppleUsbError(f"not a UDID: {udid!r}")


def format_ecid(ecid: int) -> str:
    """The ECID as the rest of the daemon spells it (`DeviceIdentity.ecid`): 16 upper-case hex digits."""
    if not 0 <= ecid <= ECID_MAX:
        raise AppleUsbError(f"ECID out of range: {ecid}")
    return f"{ecid:016X}"


def parse_ecid(text: str) -> int:
    """An ECID as hex text (`001A2C3E0E12802E`, `0x1C604A3405801E`)."""
    match = _ECID_TEXT.fullmatch(text.strip())
    if match is None:
        raise AppleUsbError(f"not an ECID: {text!r}")
    return int(match[1], 16)


# ---------------------------------------------------------------------------------------- iBoot string

# The format, as libirecovery parses it (libimobiledevice/libirecovery `src/libirecovery.c`,
# `irecv_load_device_info_from_iboot_string`): each field is found with `strstr(tag)` and read with
# `sscanf`: `CPID:%x`, `CPRV:%x`, `CPFM:%x`, `SCEP:%x`, `BDID:%x`, `ECID:%llx` (64-bit), `IBFL:%x`,
# and the bracketed strings `SRNM:[%s]`, `IMEI:[%s]`, `SRTG:[%s]` (trailing `]` stripped). Fields are
# separated by single spaces (pymobiledevice3 `IRecv._populate_device_info` splits on " " and ":").
# Other tags seen in the wild (`SDOM:01`, `PWND:[checkm8]`) are kept in `IbootInfo.fields`.
# libirecovery's Windows path turns `_` back into spaces because the OS mangles the string; udev's
# `ID_SERIAL_SHORT` mangles it the same way (whitespace and `[`/`]` become `_`) [inferred from
# systemd's usb_id builtin], so `_` is accepted as a separator too. Bracketed values do not survive
# that mangling; ECID and the hex fields do.

_TAG = re.compile(r"(?<![A-Za-z0-9])([A-Z]{4}):(\[[^\]\s]*\]?|[^\s_]*)")
_HEX_FIELD = re.compile(rf"{_HEX}{{1,16}}")
_HEX_TAGS: Final = ("CPID", "CPRV", "CPFM", "SCEP", "BDID", "ECID", "IBFL", "SDOM")
_IBOOT_TAGS: Final = frozenset({"CPID", "ECID", "SRTG", "SRNM", "BDID"})


@dataclass(frozen=True, slots=True)
class IbootInfo:
    """The fields of a Recovery/DFU USB serial string; None where the string lacks the field (WTF
    mode has no ECID)."""

    raw: str
    cpid: int | None = None
    cprv: int | None = None
    cpfm: int | None = None
    scep: int | None = None
    bdid: int | None = None
    ecid: int | None = None
    ibfl: int | None = None
    sdom: int | None = None
    srnm: str | None = None
    """The device serial number (e.g. `F2LXK3ABHG7F`), as iBoot reports it."""
    imei: str | None = None
    srtg: str | None = None
    """The boot-stage tag, e.g. `iBoot-1704.10`."""
    fields: dict[str, str] = field(default_factory=dict)
    """Every `TAG:value` found, brackets stripped, including the ones above."""

    @property
    def pwned(self) -> bool:
        return "PWND" in self.fields


def parse_iboot_serial(text: str) -> IbootInfo:
    """Parse the iBoot/SecureROM USB serial string of a Recovery or DFU device.

    Raises `AppleUsbError` if the string has none of CPID/ECID/BDID/SRTG/SRNM (it is not an iBoot
    string) or if ECID is present but not 1-16 hex digits (a wrong ECID is worse than none). Another
    malformed hex field (CPID, BDID, ...) reads as None; its text stays in `fields`."""
    fields: dict[str, str] = {}
    for match in _TAG.finditer(text):
        tag, value = match[1], match[2]
        if value.startswith("["):
            value = value[1:].removesuffix("]")
        fields.setdefault(tag, value)
    if not _IBOOT_TAGS & fields.keys():
        raise AppleUsbError(f"not an iBoot serial string: {text[:120]!r}")
    numbers: dict[str, int | None] = {}
    for tag in _HEX_TAGS:
        value = fields.get(tag)
        if value is None:
            numbers[tag] = None
        elif _HEX_FIELD.fullmatch(value):
            numbers[tag] = int(value, 16)
        elif tag == "ECID":
            raise AppleUsbError(f"malformed ECID in iBoot serial string: {value[:40]!r}")
        else:
            numbers[tag] = None
    return IbootInfo(
        raw=text,
        cpid=numbers["CPID"],
        cprv=numbers["CPRV"],
        cpfm=numbers["CPFM"],
        scep=numbers["SCEP"],
        bdid=numbers["BDID"],
        ecid=numbers["ECID"],
        ibfl=numbers["IBFL"],
        sdom=numbers["SDOM"],
        srnm=fields.get("SRNM") or None,
        imei=fields.get("IMEI") or None,
        srtg=fields.get("SRTG") or None,
        fields=fields,
    )


# ---------------------------------------------------------------------------------------- all together


@dataclass(frozen=True, slots=True)
class AppleIdentity:
    """What USB says about an iOS device: its mode and whatever identity its serial string yields."""

    mode: DeviceMode
    udid: str | None = None
    ecid: int | None = None
    iboot: IbootInfo | None = None
    problem: str | None = None
    """Why udid/ecid are missing when the serial was there but unusable (for logs); else None."""


def identify(vid: int, pid: int, serial: str | None) -> AppleIdentity | None:
    """Mode plus UDID/ECID for an iOS device; None if (vid, pid) is not one. Never raises: a missing
    or odd serial gives an identity without UDID/ECID and says why in `problem`."""
    mode = classify_pid(vid, pid)
    if mode is None:
        return None
    if not serial:
        return AppleIdentity(mode, problem="no serial string" if serial is not None else None)
    if mode is DeviceMode.NORMAL:
        try:
            udid = udid_from_usb_serial(serial)
            return AppleIdentity(mode, udid=udid, ecid=ecid_from_udid(udid))
        except AppleUsbError as exc:
            return AppleIdentity(mode, problem=str(exc))
    try:
        info = parse_iboot_serial(serial)
    except AppleUsbError as exc:
        return AppleIdentity(mode, problem=str(exc))
    return AppleIdentity(mode, ecid=info.ecid, iboot=info)
