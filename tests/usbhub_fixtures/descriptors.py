"""Real-format USB descriptor bytes (USB 2.0 §9.6, §11.23.2.1; USB 3.x §10.15.2.1)."""

from __future__ import annotations

import struct
from collections.abc import Iterable

# wHubCharacteristics values
LPSM_GANGED = 0b00
LPSM_INDIVIDUAL = 0b01
LPSM_NONE = 0b10
OCPM_INDIVIDUAL = 0b01 << 3


def device_descriptor(
    vid: int,
    pid: int,
    *,
    bcd_usb: int = 0x0200,
    device_class: int = 0,
    protocol: int = 0,
    bcd_device: int = 0x0100,
    mps0: int = 64,
    configurations: int = 1,
) -> bytes:
    return struct.pack(
        "<BBHBBBBHHHBBBB",
        18,
        0x01,
        bcd_usb,
        device_class,
        0,
        protocol,
        mps0,
        vid,
        pid,
        bcd_device,
        1,
        2,
        0,
        configurations,
    )


def hub_config_bundle(*, superspeed: bool = False) -> bytes:
    """Configuration 1 of a hub as the kernel stores it: config, interface (class 09), the status
    change interrupt endpoint and, on SuperSpeed, its endpoint companion."""
    interface = struct.pack("<BBBBBBBBB", 9, 0x04, 0, 0, 1, 0x09, 0, 0, 0)
    endpoint = struct.pack(
        "<BBBBHB", 7, 0x05, 0x81, 0x03, 2 if superspeed else 1, 0x0C if not superspeed else 0x08
    )
    companion = struct.pack("<BBBBH", 6, 0x30, 0, 0, 2) if superspeed else b""
    body = interface + endpoint + companion
    config = struct.pack("<BBHBBBBB", 9, 0x02, 9 + len(body), 1, 1, 0, 0xE0, 0)
    return config + body


def hub_sysfs_descriptors(vid: int, pid: int, *, superspeed: bool = False) -> bytes:
    """The `descriptors` file of a hub: device descriptor + configuration bundle, no hub descriptor."""
    device = device_descriptor(
        vid,
        pid,
        bcd_usb=0x0320 if superspeed else 0x0210,
        device_class=0x09,
        protocol=3 if superspeed else 1,
        mps0=9 if superspeed else 64,
        bcd_device=0x0660,
    )
    return device + hub_config_bundle(superspeed=superspeed)


def hub_descriptor(
    ports: int,
    lpsm: int = LPSM_INDIVIDUAL,
    *,
    superspeed: bool = False,
    non_removable: Iterable[int] = (),
    extra_characteristics: int = OCPM_INDIVIDUAL,
) -> bytes:
    """GET_DESCRIPTOR(0x29 / 0x2A) answer of a hub."""
    characteristics = lpsm | extra_characteristics
    removable = 0
    for port in non_removable:
        removable |= 1 << port
    if superspeed:
        return struct.pack("<BBBHBBBHH", 12, 0x2A, ports, characteristics, 50, 0, 0, 0, removable)
    nbytes = ports // 8 + 1
    variable = removable.to_bytes(nbytes, "little") + b"\xff" * nbytes  # + PortPwrCtrlMask
    fixed = struct.pack("<BBBHBB", 7 + len(variable), 0x29, ports, characteristics, 50, 100)
    return fixed + variable
