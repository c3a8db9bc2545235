"""Unmanaged USB hubs (Datamation and other hubs without a control protocol): presence from sysfs,
optional uhubctl-style per-port power switching. See `hubdrivers.usbhub.driver` for what is
claimed and why."""

from hubdrivers.usbhub.descriptors import (
    DeviceDescriptor,
    HubDescriptor,
    OverCurrentProtection,
    PortSpeed,
    PortStatusWord,
    PowerSwitching,
    RawDescriptors,
    UsbParseError,
    parse_device_descriptor,
    parse_hub_descriptor,
    parse_port_status,
    parse_sysfs_descriptors,
)
from hubdrivers.usbhub.driver import HalfProbe, HubProbe, PowerMechanism, UsbHubDriver, decide_port_power
from hubdrivers.usbhub.sysfs import SYSFS_USB_DEVICES, PortRef, SysfsUsb, UsbDevice, valid_usb_path

__all__ = [
    "SYSFS_USB_DEVICES",
    "DeviceDescriptor",
    "HalfProbe",
    "HubDescriptor",
    "HubProbe",
    "OverCurrentProtection",
    "PortRef",
    "PortSpeed",
    "PortStatusWord",
    "PowerMechanism",
    "PowerSwitching",
    "RawDescriptors",
    "SysfsUsb",
    "UsbDevice",
    "UsbHubDriver",
    "UsbParseError",
    "decide_port_power",
    "parse_device_descriptor",
    "parse_hub_descriptor",
    "parse_port_status",
    "parse_sysfs_descriptors",
    "valid_usb_path",
]
