"""Sans-IO parsing of the USB descriptors and hub class words an unmanaged hub driver needs.

Everything here works on `bytes` and returns frozen dataclasses; nothing touches sysfs or libusb.
Every parse function raises only `UsbParseError` (a `ValueError`) for malformed input, whatever
the bytes are.

Sources: USB 2.0 spec §9.6 (standard descriptors), §11.23.2.1 (hub descriptor, Table 11-13),
§11.24.2.7 (port status, Table 11-21); USB 3.x spec §10.15.2.1 (SuperSpeed hub descriptor) and
Table 10-10 (SuperSpeed wPortStatus). The values match uhubctl's and Linux's `ch11.h` constants.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace

# ------------------------------------------------------------------------------ constants

USB_CLASS_HUB = 0x09
USB_HUB_PR_SS = 3  # bDeviceProtocol of a SuperSpeed hub (the kernel's hub_is_superspeed())

DT_DEVICE = 0x01
DT_CONFIG = 0x02
DT_INTERFACE = 0x04
DT_ENDPOINT = 0x05
DT_HUB = 0x29  # USB 2.0 hub descriptor
DT_SS_HUB = 0x2A  # SuperSpeed hub descriptor

DEVICE_DESCRIPTOR_SIZE = 18
CONFIG_DESCRIPTOR_SIZE = 9
INTERFACE_DESCRIPTOR_SIZE = 9
ENDPOINT_DESCRIPTOR_SIZE = 7
HUB_DESCRIPTOR_MIN_SIZE = 7  # USB2: fixed part; DeviceRemovable and PortPwrCtrlMask follow
SS_HUB_DESCRIPTOR_SIZE = 12
HUB_DESCRIPTOR_MAX_SIZE = 71  # USB2 hub with 255 ports: 7 + 2 * 32

# Hub class requests (USB 2.0 Table 11-15/11-16) as bmRequestType, bRequest, wValue.
REQ_GET_STATUS = 0x00
REQ_CLEAR_FEATURE = 0x01
REQ_SET_FEATURE = 0x03
REQ_GET_DESCRIPTOR = 0x06
RT_CLASS_DEVICE_IN = 0xA0  # device-to-host | class | device (the hub itself)
RT_CLASS_OTHER_IN = 0xA3  # device-to-host | class | other (a port)
RT_CLASS_OTHER_OUT = 0x23  # host-to-device | class | other (a port)
PORT_FEAT_POWER = 8

# wHubCharacteristics (USB 2.0 Table 11-13; USB 3 Table 10-3 keeps bits 0..4)
HUB_CHAR_LPSM = 0x0003
HUB_CHAR_COMPOUND = 0x0004
HUB_CHAR_OCPM = 0x0018
HUB_CHAR_TTTT = 0x0060  # USB2 only
HUB_CHAR_PORTIND = 0x0080  # USB2 only

# wPortStatus (USB 2.0 Table 11-21; USB 3 Table 10-10)
PORT_STAT_CONNECTION = 0x0001
PORT_STAT_ENABLE = 0x0002
PORT_STAT_SUSPEND = 0x0004  # USB2 only (USB3 reports U3 in the link state)
PORT_STAT_OVERCURRENT = 0x0008
PORT_STAT_RESET = 0x0010
PORT_STAT_L1 = 0x0020  # USB2 LPM
PORT_STAT_POWER = 0x0100  # USB2
PORT_STAT_LOW_SPEED = 0x0200  # USB2
PORT_STAT_HIGH_SPEED = 0x0400  # USB2
PORT_STAT_TEST = 0x0800  # USB2
PORT_STAT_INDICATOR = 0x1000  # USB2
SS_PORT_STAT_LINK_STATE = 0x01E0  # USB3, bits 5..8
SS_PORT_STAT_POWER = 0x0200  # USB3
SS_PORT_STAT_SPEED = 0x1C00  # USB3, bits 10..12; 0 = 5 Gbps


class UsbParseError(ValueError):
    """Bytes that are not the descriptor or status word they were supposed to be."""


# ---------------------------------------------------------------------- hub descriptor


class PowerSwitching(enum.Enum):
    """Logical Power Switching Mode, wHubCharacteristics D1..D0."""

    GANGED = 0b00  # all ports switch together
    INDIVIDUAL = 0b01  # per-port power switching ("ppps")
    NONE = 0b10  # 1X: no power switching (USB 1.0-compliant hubs); 0b11 parses to NONE too


class OverCurrentProtection(enum.Enum):
    """Over-current Protection Mode, wHubCharacteristics D4..D3."""

    GLOBAL = 0b00
    INDIVIDUAL = 0b01
    NONE = 0b10  # 1X


@dataclass(frozen=True, slots=True)
class HubDescriptor:
    superspeed: bool  # 0x2A descriptor (the SuperSpeed half of a USB3 hub)
    ports: int  # bNbrPorts
    characteristics: int  # raw wHubCharacteristics
    power_switching: PowerSwitching
    compound: bool
    over_current: OverCurrentProtection
    power_on_to_good_ms: int  # bPwrOn2PwrGood is in 2 ms units
    controller_current: int  # bHubContrCurrent (mA for USB2; USB3 uses a different unit)
    non_removable: frozenset[int]  # ports whose DeviceRemovable bit is set (built-in devices)
    port_indicators: bool  # USB2 only; always False for SuperSpeed hubs

    @property
    def per_port_power(self) -> bool:
        """True when each port can be powered on and off on its own.

        Ganged switching on a one-port hub is per-port switching in effect (uhubctl treats it so).
        """
        if self.power_switching is PowerSwitching.INDIVIDUAL:
            return True
        return self.power_switching is PowerSwitching.GANGED and self.ports == 1


def parse_hub_descriptor(data: bytes) -> HubDescriptor:
    """Parse a GET_DESCRIPTOR(0x29 or 0x2A) answer.

    Rules: at least the fixed part (7 bytes for 0x29, 12 for 0x2A) must be present and
    `bDescLength` must cover it; `bDescriptorType` must be 0x29 or 0x2A; `bNbrPorts` must not be 0
    (SuperSpeed hubs: at most 15, the width of DeviceRemovable). Bytes past `bDescLength` are
    ignored. A USB2 DeviceRemovable bitmap cut short by `bDescLength` or by the data counts only the
    bits that are there (the rest are taken as removable).
    """
    data = bytes(data)
    if len(data) < 2:
        raise UsbParseError(f"hub descriptor too short ({len(data)} bytes)")
    length, dtype = data[0], data[1]
    if dtype not in (DT_HUB, DT_SS_HUB):
        raise UsbParseError(f"not a hub descriptor (bDescriptorType 0x{dtype:02x})")
    superspeed = dtype == DT_SS_HUB
    fixed = SS_HUB_DESCRIPTOR_SIZE if superspeed else HUB_DESCRIPTOR_MIN_SIZE
    if length < fixed:
        raise UsbParseError(f"hub descriptor bDescLength {length} < {fixed}")
    if len(data) < fixed:
        raise UsbParseError(f"hub descriptor truncated: {len(data)} of {fixed} bytes")
    body = data[: min(length, len(data))]
    ports = body[2]
    if ports == 0:
        raise UsbParseError("hub descriptor reports no ports")
    if superspeed and ports > 15:
        raise UsbParseError(f"SuperSpeed hub descriptor reports {ports} ports (max 15)")
    (characteristics,) = struct.unpack_from("<H", body, 3)
    lpsm = characteristics & HUB_CHAR_LPSM
    ocpm = (characteristics & HUB_CHAR_OCPM) >> 3
    if superspeed:
        (removable_bits,) = struct.unpack_from("<H", body, 10)
    else:
        bitmap = body[HUB_DESCRIPTOR_MIN_SIZE : HUB_DESCRIPTOR_MIN_SIZE + ports // 8 + 1]
        removable_bits = int.from_bytes(bitmap, "little")
    non_removable = frozenset(p for p in range(1, ports + 1) if removable_bits >> p & 1)
    return HubDescriptor(
        superspeed=superspeed,
        ports=ports,
        characteristics=characteristics,
        power_switching=PowerSwitching(lpsm) if lpsm < 2 else PowerSwitching.NONE,
        compound=bool(characteristics & HUB_CHAR_COMPOUND),
        over_current=OverCurrentProtection(ocpm) if ocpm < 2 else OverCurrentProtection.NONE,
        power_on_to_good_ms=body[5] * 2,
        controller_current=body[6],
        non_removable=non_removable,
        port_indicators=not superspeed and bool(characteristics & HUB_CHAR_PORTIND),
    )


# --------------------------------------------------------------------- port status word


class PortSpeed(enum.Enum):
    LOW = "low"  # 1.5 Mbit/s
    FULL = "full"  # 12 Mbit/s
    HIGH = "high"  # 480 Mbit/s
    SUPER = "super"  # 5 Gbit/s or faster (SuperSpeed hub port)


@dataclass(frozen=True, slots=True)
class PortStatusWord:
    """A hub port's GET_STATUS answer: wPortStatus and wPortChange."""

    status: int
    change: int
    superspeed: bool

    @property
    def connected(self) -> bool:
        return bool(self.status & PORT_STAT_CONNECTION)

    @property
    def enabled(self) -> bool:
        return bool(self.status & PORT_STAT_ENABLE)

    @property
    def suspended(self) -> bool:
        """USB2: the SUSPEND bit. USB3: link state U3."""
        if self.superspeed:
            return self.link_state == 3
        return bool(self.status & PORT_STAT_SUSPEND)

    @property
    def over_current(self) -> bool:
        return bool(self.status & PORT_STAT_OVERCURRENT)

    @property
    def resetting(self) -> bool:
        return bool(self.status & PORT_STAT_RESET)

    @property
    def powered(self) -> bool:
        """PORT_POWER: 0x0100 on USB2 hubs, 0x0200 on SuperSpeed hubs."""
        return bool(self.status & (SS_PORT_STAT_POWER if self.superspeed else PORT_STAT_POWER))

    @property
    def link_state(self) -> int | None:
        """USB3 PORT_LINK_STATE (0 = U0 ... 3 = U3, 4 = SS.Disabled, 5 = Rx.Detect, ...)."""
        return (self.status & SS_PORT_STAT_LINK_STATE) >> 5 if self.superspeed else None

    @property
    def speed(self) -> PortSpeed | None:
        """Speed of the attached device; None when nothing is connected."""
        if not self.connected:
            return None
        if self.superspeed:
            return PortSpeed.SUPER
        if self.status & PORT_STAT_LOW_SPEED:
            return PortSpeed.LOW
        if self.status & PORT_STAT_HIGH_SPEED:
            return PortSpeed.HIGH
        return PortSpeed.FULL


def parse_port_status(data: bytes, superspeed: bool) -> PortStatusWord:
    """Parse the 4-byte GET_STATUS(port) answer (wPortStatus, wPortChange, little-endian)."""
    data = bytes(data)
    if len(data) != 4:
        raise UsbParseError(f"port status must be 4 bytes, got {len(data)}")
    status, change = struct.unpack("<HH", data)
    return PortStatusWord(status, change, superspeed)


# -------------------------------------------------------- device + configuration (sysfs)


@dataclass(frozen=True, slots=True)
class DeviceDescriptor:
    bcd_usb: int
    device_class: int
    device_subclass: int
    device_protocol: int
    max_packet_size0: int
    vendor_id: int
    product_id: int
    bcd_device: int
    num_configurations: int

    @property
    def is_hub(self) -> bool:
        return self.device_class == USB_CLASS_HUB

    @property
    def superspeed_hub(self) -> bool:
        """The SuperSpeed half of a USB3 hub, by the rule the Linux hub driver uses."""
        return self.is_hub and self.device_protocol == USB_HUB_PR_SS


@dataclass(frozen=True, slots=True)
class EndpointDescriptor:
    address: int
    attributes: int
    max_packet_size: int
    interval: int


@dataclass(frozen=True, slots=True)
class InterfaceDescriptor:
    number: int
    alternate: int
    interface_class: int
    interface_subclass: int
    interface_protocol: int
    endpoints: tuple[EndpointDescriptor, ...]


@dataclass(frozen=True, slots=True)
class ConfigDescriptor:
    value: int  # bConfigurationValue
    attributes: int  # bmAttributes (0x40 = self-powered)
    max_power: int  # bMaxPower, raw (2 mA units USB2, 8 mA units SuperSpeed)
    interfaces: tuple[InterfaceDescriptor, ...]


@dataclass(frozen=True, slots=True)
class RawDescriptors:
    """What the kernel's sysfs `descriptors` file holds: the device descriptor, then the raw
    configuration bundle(s) (configuration + interface + endpoint + class/vendor descriptors).
    A hub's class descriptor (0x29/0x2A) is NOT among them: it is only read with a class
    GET_DESCRIPTOR request."""

    device: DeviceDescriptor
    configurations: tuple[ConfigDescriptor, ...]

    @property
    def has_hub_interface(self) -> bool:
        return any(i.interface_class == USB_CLASS_HUB for c in self.configurations for i in c.interfaces)


def parse_device_descriptor(data: bytes) -> DeviceDescriptor:
    data = bytes(data)
    if len(data) < DEVICE_DESCRIPTOR_SIZE:
        raise UsbParseError(f"device descriptor too short ({len(data)} bytes)")
    if data[0] != DEVICE_DESCRIPTOR_SIZE or data[1] != DT_DEVICE:
        raise UsbParseError(f"not a device descriptor (bLength {data[0]}, type 0x{data[1]:02x})")
    (bcd_usb, cls, sub, proto, mps0, vid, pid, bcd_dev, _im, _ip, _isn, ncfg) = struct.unpack_from(
        "<HBBBBHHHBBBB", data, 2
    )
    return DeviceDescriptor(bcd_usb, cls, sub, proto, mps0, vid, pid, bcd_dev, ncfg)


def _parse_config(bundle: bytes) -> ConfigDescriptor:
    """One configuration bundle of exactly wTotalLength bytes."""
    value, attributes, max_power = bundle[5], bundle[7], bundle[8]
    interfaces: list[InterfaceDescriptor] = []
    endpoints: list[EndpointDescriptor] = []
    offset = bundle[0]
    while offset < len(bundle):
        if len(bundle) - offset < 2:
            raise UsbParseError(f"stray byte at offset {offset} of a configuration bundle")
        length, dtype = bundle[offset], bundle[offset + 1]
        if length < 2 or offset + length > len(bundle):
            raise UsbParseError(f"descriptor at offset {offset} has bad bLength {length}")
        if dtype == DT_INTERFACE:
            if length < INTERFACE_DESCRIPTOR_SIZE:
                raise UsbParseError(f"interface descriptor with bLength {length}")
            if interfaces:
                interfaces[-1] = replace(interfaces[-1], endpoints=tuple(endpoints))
            endpoints = []
            number, alternate, _n, cls, sub, proto = bundle[offset + 2 : offset + 8]
            interfaces.append(InterfaceDescriptor(number, alternate, cls, sub, proto, ()))
        elif dtype == DT_ENDPOINT and interfaces:
            if length < ENDPOINT_DESCRIPTOR_SIZE:
                raise UsbParseError(f"endpoint descriptor with bLength {length}")
            (mps,) = struct.unpack_from("<H", bundle, offset + 4)
            endpoints.append(
                EndpointDescriptor(bundle[offset + 2], bundle[offset + 3], mps, bundle[offset + 6])
            )
        offset += length  # other descriptors (SS endpoint companion, class-specific) are skipped
    if interfaces:
        interfaces[-1] = replace(interfaces[-1], endpoints=tuple(endpoints))
    return ConfigDescriptor(value, attributes, max_power, tuple(interfaces))


def parse_sysfs_descriptors(data: bytes) -> RawDescriptors:
    """Parse the contents of `/sys/bus/usb/devices/<dev>/descriptors`.

    The device descriptor must be complete; each configuration must start with a configuration
    descriptor whose wTotalLength fits the remaining data, and every descriptor inside it must have
    bLength >= 2 and fit. Trailing bytes that do not start a configuration are an error.
    """
    data = bytes(data)
    device = parse_device_descriptor(data)
    configs: list[ConfigDescriptor] = []
    offset = DEVICE_DESCRIPTOR_SIZE
    while offset < len(data):
        rest = data[offset:]
        if len(rest) < CONFIG_DESCRIPTOR_SIZE or rest[1] != DT_CONFIG or rest[0] < CONFIG_DESCRIPTOR_SIZE:
            raise UsbParseError(f"expected a configuration descriptor at offset {offset}")
        (total,) = struct.unpack_from("<H", rest, 2)
        if total < rest[0] or total > len(rest):
            raise UsbParseError(f"configuration at offset {offset} has bad wTotalLength {total}")
        configs.append(_parse_config(rest[:total]))
        offset += total
    return RawDescriptors(device, tuple(configs))


# ------------------------------------------------------------------------ request helpers


def hub_descriptor_request(superspeed: bool) -> tuple[int, int, int, int, int]:
    """(bmRequestType, bRequest, wValue, wIndex, wLength) of GET_DESCRIPTOR for the hub descriptor."""
    if superspeed:
        return RT_CLASS_DEVICE_IN, REQ_GET_DESCRIPTOR, DT_SS_HUB << 8, 0, SS_HUB_DESCRIPTOR_SIZE
    return RT_CLASS_DEVICE_IN, REQ_GET_DESCRIPTOR, DT_HUB << 8, 0, HUB_DESCRIPTOR_MAX_SIZE


def port_status_request(port: int) -> tuple[int, int, int, int, int]:
    return RT_CLASS_OTHER_IN, REQ_GET_STATUS, 0, port, 4


def port_power_request(port: int, on: bool) -> tuple[int, int, int, int]:
    """(bmRequestType, bRequest, wValue, wIndex) of SET_FEATURE / CLEAR_FEATURE(PORT_POWER)."""
    return RT_CLASS_OTHER_OUT, REQ_SET_FEATURE if on else REQ_CLEAR_FEATURE, PORT_FEAT_POWER, port
