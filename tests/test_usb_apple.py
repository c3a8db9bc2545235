"""Apple USB identity: PID -> mode, iBoot serial strings, UDID <-> USB serial <-> ECID; plus fuzzing
that only `AppleUsbError` ever escapes a parser and that `identify` never raises."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.ios.base import DeviceMode
from daemon.usb.apple import (
    APPLE_VID,
    AppleUsbError,
    classify_pid,
    ecid_from_udid,
    format_ecid,
    identify,
    parse_ecid,
    parse_iboot_serial,
    udid_from_usb_serial,
)

RECOVERY_SERIAL = (
    "CPID:8030 CPRV:11 CPFM:03 SCEP:01 BDID:0C ECID:001A2C3E0E12802E IBFL:3C SRNM:[F2LXK3ABHG7F]"
)
# From a public issue log quoted in research/ios.md §1.3 (SDOM first, 16-digit ECID).
DFU_SERIAL = (
    "SDOM:01 CPID:FE01 CPRV:00 CPFM:03 SCEP:01 BDID:90 ECID:49C215FA0BFE19CC IBFL:3C SRNM:[ZQLDW7419W]"
)


@pytest.mark.parametrize(
    ("pid", "mode"),
    [
        (0x12A8, DeviceMode.NORMAL),
        (0x1290, DeviceMode.NORMAL),
        (0x12AF, DeviceMode.NORMAL),
        (0x12AB, DeviceMode.NORMAL),
        (0x1280, DeviceMode.RECOVERY),
        (0x1281, DeviceMode.RECOVERY),
        (0x1283, DeviceMode.RECOVERY),
        (0x1227, DeviceMode.DFU),
        (0x1222, DeviceMode.DFU),  # WTF
        (0xF014, DeviceMode.DFU),  # Port DFU
        (0x12B0, None),
        (0x128F, None),
        (0x1284, None),
        (0x8600, None),  # T2
        (0x1902, None),  # Apple-silicon Mac restore
        (0x024F, None),  # a keyboard
    ],
)
def test_classify_pid(pid: int, mode: DeviceMode | None) -> None:
    assert classify_pid(APPLE_VID, pid) is mode


def test_classify_needs_apple_vendor() -> None:
    assert classify_pid(0x0403, 0x12A8) is None
    assert classify_pid(0x05AD, 0x1281) is None


def test_restore_mode_reads_as_normal() -> None:
    # The restore ramdisk is on usbmuxd, so its PID is in the normal range; USB cannot tell.
    assert DeviceMode.RESTORE not in {classify_pid(APPLE_VID, pid) for pid in range(0x10000)}


def test_parse_recovery_string() -> None:
    info = parse_iboot_serial(RECOVERY_SERIAL)
    assert info.cpid == 0x8030
    assert info.cprv == 0x11
    assert info.cpfm == 0x03
    assert info.scep == 0x01
    assert info.bdid == 0x0C
    assert info.ecid == 0x001A2C3E0E12802E
    assert info.ibfl == 0x3C
    assert info.srnm == "F2LXK3ABHG7F"
    assert info.imei is None
    assert info.srtg is None
    assert info.raw == RECOVERY_SERIAL
    assert not info.pwned


def test_parse_dfu_string_with_extra_fields() -> None:
    info = parse_iboot_serial(DFU_SERIAL + " SRTG:[iBoot-1704.10] PWND:[checkm8]")
    assert info.sdom == 1
    assert info.cpid == 0xFE01
    assert info.ecid == 0x49C215FA0BFE19CC
    assert info.srnm == "ZQLDW7419W"
    assert info.srtg == "iBoot-1704.10"
    assert info.pwned
    assert info.fields["PWND"] == "checkm8"


def test_parse_wtf_string_without_ecid() -> None:
    info = parse_iboot_serial("CPID:8900 CPRV:00 CPFM:03 SCEP:01 BDID:00 IBFL:00 SRTG:[iBoot-359.3]")
    assert info.ecid is None
    assert info.cpid == 0x8900


def test_parse_udev_mangled_string() -> None:
    # udev's ID_SERIAL_SHORT turns whitespace and brackets into `_`: the hex fields survive.
    info = parse_iboot_serial(RECOVERY_SERIAL.replace(" ", "_").replace("[", "_").replace("]", "_"))
    assert info.ecid == 0x001A2C3E0E12802E
    assert info.cpid == 0x8030
    assert info.srnm is None


def test_parse_keeps_ecid_strict_and_others_lenient() -> None:
    with pytest.raises(AppleUsbError, match="ECID"):
        parse_iboot_serial("CPID:8030 ECID:0x1ZZ")
    with pytest.raises(AppleUsbError, match="ECID"):
        parse_iboot_serial("CPID:8030 ECID:00000000000000001")  # 17 digits: over 64 bits
    info = parse_iboot_serial("CPID:zz80 ECID:1")
    assert info.cpid is None
    assert info.fields["CPID"] == "zz80"
    assert info.ecid == 1


@pytest.mark.parametrize("text", ["", "00008030001A2C3E0E12802E", "hello world", "cpid:8030 ecid:12"])
def test_not_an_iboot_string(text: str) -> None:
    with pytest.raises(AppleUsbError):
        parse_iboot_serial(text)


@pytest.mark.parametrize(
    ("serial", "udid"),
    [
        ("00008030001A2C3E0E12802E", "00008030-001A2C3E0E12802E"),
        (" 00008110001C604A3405801E\n", "00008110-001C604A3405801E"),
        ("00008030-001A2C3E0E12802E", "00008030-001A2C3E0E12802E"),
        ("a1b2c3d4e5f60718293a4b5c6d7e8f9012345678", "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"),
    ],
)
def test_udid_from_usb_serial(serial: str, udid: str) -> None:
    assert udid_from_usb_serial(serial) == udid


@pytest.mark.parametrize(
    "serial",
    ["", "0000803001A2C3E0E12802E", "00008030001A2C3E0E12802G", "0000-8030001A2C3E0E12802E", RECOVERY_SERIAL],
)
def test_udid_rejects(serial: str) -> None:
    with pytest.raises(AppleUsbError):
        udid_from_usb_serial(serial)


def test_ecid_from_udid() -> None:
    assert ecid_from_udid("00008110-001C604A3405801E") == 0x1C604A3405801E
    assert ecid_from_udid("00008110001C604A3405801E") == 0x1C604A3405801E
    assert ecid_from_udid("a1b2c3d4e5f60718293a4b5c6d7e8f9012345678") is None
    with pytest.raises(AppleUsbError):
        ecid_from_udid("not-a-udid")


def test_ecid_text_round_trip() -> None:
    assert format_ecid(0x1C604A3405801E) == "001C604A3405801E"
    assert parse_ecid("0x1C604A3405801E") == 0x1C604A3405801E
    assert parse_ecid("001c604a3405801e") == 0x1C604A3405801E
    with pytest.raises(AppleUsbError):
        format_ecid(-1)
    with pytest.raises(AppleUsbError):
        parse_ecid("0x")


def test_identify() -> None:
    normal = identify(APPLE_VID, 0x12A8, "00008030001A2C3E0E12802E")
    assert normal is not None
    assert normal.mode is DeviceMode.NORMAL
    assert normal.udid == "00008030-001A2C3E0E12802E"
    assert normal.ecid == 0x001A2C3E0E12802E

    recovery = identify(APPLE_VID, 0x1281, RECOVERY_SERIAL)
    assert recovery is not None
    assert recovery.mode is DeviceMode.RECOVERY
    assert recovery.udid is None
    assert recovery.ecid == normal.ecid  # the same phone, rebooted into Recovery
    assert recovery.iboot is not None
    assert recovery.iboot.srnm == "F2LXK3ABHG7F"

    assert identify(0x0403, 0x6015, "DN0123") is None
    unreadable = identify(APPLE_VID, 0x1227, None)
    assert unreadable is not None
    assert (unreadable.mode, unreadable.ecid, unreadable.problem) == (DeviceMode.DFU, None, None)
    odd = identify(APPLE_VID, 0x12A8, "not a udid")
    assert odd is not None
    assert odd.udid is None
    assert odd.problem


# ------------------------------------------------------------------------------------------ fuzzing

_iboot_alphabet = st.sampled_from(
    [*"0123456789ABCDEFabcdefxX :[]_-", "CPID:", "ECID:", "SRNM:[", "BDID:", "SRTG:[", "\u0661", "\x00"]
)
iboot_like = st.lists(_iboot_alphabet, max_size=40).map("".join)


@given(st.one_of(st.text(), iboot_like))
def test_parsers_only_raise_documented_error(text: str) -> None:
    for parse in (parse_iboot_serial, udid_from_usb_serial, ecid_from_udid, parse_ecid):
        with contextlib.suppress(AppleUsbError):
            parse(text)


@given(st.one_of(st.text(), iboot_like))
def test_iboot_numbers_are_in_range(text: str) -> None:
    try:
        info = parse_iboot_serial(text)
    except AppleUsbError:
        return
    assert info.ecid is None or 0 <= info.ecid < 1 << 64


@given(
    vid=st.sampled_from([APPLE_VID, 0, 0xFFFF]),
    pid=st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0x12A8, 0x1281, 0x1227])),
    serial=st.one_of(st.none(), st.text(), iboot_like),
)
def test_identify_never_raises(vid: int, pid: int, serial: str | None) -> None:
    identity = identify(vid, pid, serial)
    if identity is not None:
        assert identity.ecid is None or 0 <= identity.ecid < 1 << 64
        assert identity.udid is None or identity.mode is DeviceMode.NORMAL


@given(st.integers(0, (1 << 64) - 1), st.integers(0, 0xFFFFFFFF))
def test_udid_ecid_round_trip(ecid: int, cpid: int) -> None:
    udid = udid_from_usb_serial(f"{cpid:08X}{ecid:016X}")
    assert ecid_from_udid(udid) == ecid
    assert parse_iboot_serial(f"CPID:{cpid:X} ECID:{format_ecid(ecid)}").ecid == ecid
