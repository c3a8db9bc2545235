"""Value objects shared by the workflow, the store, the publishers and the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from daemon.workflow.phases import Phase


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime) -> str:
    """Timestamps everywhere are UTC ISO 8601 with milliseconds and a `Z`."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True, slots=True, order=True)
class PortRef:
    """A physical port: the key of everything a bench does."""

    hub: str
    port: int

    def __str__(self) -> str:
        return f"{self.hub}/{self.port}"


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """Who the device is. The ECID survives every mode (normal, Recovery, DFU, restore), so it is the
    key when known; the UDID is the fallback before the device has been read."""

    udid: str | None = None
    ecid: str | None = None
    serial: str | None = None
    product_type: str | None = None
    ios_version: str | None = None

    @property
    def key(self) -> str | None:
        if self.ecid:
            return f"ecid:{self.ecid}"
        if self.udid:
            return f"udid:{self.udid}"
        return None

    def merged(self, newer: DeviceIdentity) -> DeviceIdentity:
        """Fields from `newer` win where it knows them."""
        return DeviceIdentity(
            udid=newer.udid or self.udid,
            ecid=newer.ecid or self.ecid,
            serial=newer.serial or self.serial,
            product_type=newer.product_type or self.product_type,
            ios_version=newer.ios_version or self.ios_version,
        )

    def as_dict(self) -> dict[str, str | None]:
        return {
            "udid": self.udid,
            "ecid": self.ecid,
            "serial": self.serial,
            "product_type": self.product_type,
            "ios_version": self.ios_version,
        }


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


@dataclass(frozen=True, slots=True)
class Queued:
    """A waiting port's place in line for the resource that holds it up (`daemon.workflow.scheduler`):
    part of the port's state, so a dashboard tells a port waiting its turn from one at work without
    parsing `detail`."""

    position: int
    """1: next to be served."""
    resource: str
    """What it waits for: a restore slot on a bandwidth domain (`usb3`), that domain's bus
    (`bus:usb3`), or a step's station-wide slots (`step:update`)."""
    busy: int
    capacity: int

    def describe(self) -> str:
        if self.resource.startswith("step:"):
            what = f"the station's {self.resource.removeprefix('step:')} slots"
        elif self.resource.startswith("bus:"):
            what = f"the USB bus of {self.resource.removeprefix('bus:')}"
        else:
            what = f"a restore slot on {self.resource}"
        return f"queued: {ordinal(self.position)} in line for {what} ({self.busy}/{self.capacity} busy)"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class PortState:
    """The current state of one port, as stored, published and shown."""

    ref: PortRef
    phase: Phase = Phase.EMPTY
    step: str | None = None
    progress: int | None = None
    device: DeviceIdentity | None = None
    attempt: int = 0
    error: ErrorInfo | None = None
    since: datetime = field(default_factory=utcnow)
    seq: int = 0
    updated: datetime = field(default_factory=utcnow)
    detail: str | None = None
    queue: Queued | None = None
    """Set while the step waits for the scheduler; cleared when it starts or the phase changes."""


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """What the station remembers about a device across ports, unplugs and restarts."""

    key: str
    identity: DeviceIdentity
    phase: Phase
    step: str | None
    attempt: int
    error: ErrorInfo | None
    port: PortRef | None
    first_seen: datetime
    updated: datetime


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of a port's phase, as the workflow, an operator or recovery asks for it."""

    ref: PortRef
    to: Phase
    step: str | None = None
    attempt: int = 0
    device: DeviceIdentity | None = None
    error: ErrorInfo | None = None
    detail: str | None = None
    actor: str = "workflow"  # workflow | operator | recovery
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HistoryRow:
    id: int
    ts: datetime
    ref: PortRef
    device_key: str | None
    from_phase: Phase
    phase: Phase
    step: str | None
    attempt: int
    error: ErrorInfo | None
    actor: str
    detail: str | None
    extra: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    topic: str
    payload: bytes
    retain: bool
    qos: int = 1


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    message: OutboxMessage
