"""Find Cambrionix hubs on this machine: serial ports with a Cambrionix control-interface USB id,
each confirmed by asking it `id` through the real driver.

The USB id alone is not proof: 0403:6015 is a stock FTDI FT230X that plenty of other gadgets use,
so a port only counts as a hub when it answers `id` with `mfr:cambrionix`. Probing opens the port
exclusively, so it fails (and says so) on a hub the daemon is already using - which is what a
`benchhub doctor` run next to a live daemon should report rather than disturb.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from serial.tools import list_ports  # type: ignore[import-untyped]

from hubdrivers.base import HubError
from hubdrivers.cambrionix.driver import CambrionixDriver
from hubdrivers.cambrionix.models import CONTROL_USB_IDS


@dataclass(frozen=True, slots=True)
class SerialCandidate:
    """A serial port that may be a hub's control interface."""

    device: str
    vid: int | None = None
    pid: int | None = None
    usb_serial: str | None = None
    location: str | None = None  # sysfs name, e.g. `1-14.4.1` (FTDI) or `1-14.5:1.1` (ACM)
    description: str = ""


@dataclass(frozen=True, slots=True)
class DiscoveredHub:
    """Outcome of probing one candidate; `error` is set (and the rest empty) when it did not answer."""

    device: str
    usb_serial: str | None
    location: str | None
    model: str = ""
    hardware: str = ""
    firmware: str = ""
    port_count: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def candidate_ports() -> list[SerialCandidate]:
    """Serial ports whose USB VID:PID is a Cambrionix control interface (FTDI or USB3 CDC-ACM)."""
    found = []
    for info in list_ports.comports():
        if (info.vid, info.pid) in CONTROL_USB_IDS:
            found.append(
                SerialCandidate(
                    device=str(info.device),
                    vid=info.vid,
                    pid=info.pid,
                    usb_serial=info.serial_number,
                    location=info.location,
                    description=str(info.description or ""),
                )
            )
    return sorted(found, key=lambda c: c.device)


async def probe(candidate: SerialCandidate, *, command_timeout: float = 2.0) -> DiscoveredHub:
    """Open the port with the driver (resync, `id`, `system`, `bd`) and close it again."""
    driver = CambrionixDriver(
        candidate.device, usb_serial=candidate.usb_serial, command_timeout=command_timeout
    )
    try:
        info = await driver.open()
        identity = driver.identity
        if identity is None or identity.manufacturer.lower() != "cambrionix":
            raise HubError(f"not a Cambrionix hub (id says {identity!r})")
        return DiscoveredHub(
            device=candidate.device,
            usb_serial=candidate.usb_serial,
            location=candidate.location,
            model=info.model,
            hardware=identity.hardware,
            firmware=info.firmware,
            port_count=info.port_count,
        )
    except HubError as exc:
        return DiscoveredHub(candidate.device, candidate.usb_serial, candidate.location, error=str(exc))
    finally:
        await driver.close()


async def discover(
    candidates: Iterable[SerialCandidate] | None = None, *, command_timeout: float = 2.0
) -> list[DiscoveredHub]:
    """Probe every candidate (default: `candidate_ports()`) concurrently; one result per port."""
    ports = list(candidate_ports() if candidates is None else candidates)
    return list(await asyncio.gather(*(probe(c, command_timeout=command_timeout) for c in ports)))
