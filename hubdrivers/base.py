"""The contract every hub family implements.

A driver knows bytes and hardware; it never imports the daemon. It reports what the hub can see
(`PortStatus` snapshots) and carries out what the hub can do (`set_mode`, `set_led`). `diff_ports`
turns two snapshots into `PortEvent`s, the same way for every family. Reconnecting and deciding what
a change means for a workflow are the daemon's job.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar


class Capability(enum.StrEnum):
    """What a hub can do; the daemon only offers actions the hub really has."""

    ATTACH_SENSE = "attach_sense"  # the hub itself reports whether something is plugged into a port
    PORT_POWER = "port_power"  # ports can be switched off and on (power-cycle)
    PORT_MODE = "port_mode"  # charge-only / sync / off modes
    PORT_LED = "port_led"  # per-port LEDs usable as status lights
    CURRENT_SENSE = "current_sense"  # per-port current draw


class PortMode(enum.StrEnum):
    CHARGE = "charge"
    SYNC = "sync"
    BIASED = "biased"  # Cambrionix: powered with all charge profiles disabled
    OFF = "off"


class ChargeState(enum.StrEnum):
    """Where a port in charge mode is (Cambrionix flags I, P, C, F)."""

    IDLE = "idle"
    PROFILING = "profiling"
    CHARGING = "charging"
    FINISHED = "finished"


class PortAlarm(enum.StrEnum):
    """Conditions a hub flags on a port. None of them means the device left."""

    PORT_ERROR = "port_error"  # Cambrionix `e`: the port will not detect or charge a device
    HUB_ERROR = "hub_error"  # Cambrionix `E`: under/over-voltage or over-temperature (see health)
    THEFT = "theft"  # Cambrionix `T`: a device was removed while the security system was armed
    REBOOTED = "rebooted"  # Cambrionix `R`: the hub rebooted and lost volatile settings (until crf)
    RESETTING = "resetting"  # Cambrionix `r`: VBUS is being reset during a mode change


class LedPattern(enum.StrEnum):
    """Status-light patterns; hubs map them onto whatever their LEDs can show."""

    OFF = "off"
    SOLID = "solid"
    SLOW_BLINK = "slow_blink"
    FAST_BLINK = "fast_blink"


@dataclass(frozen=True, slots=True)
class HubInfo:
    model: str
    firmware: str
    serial: str
    port_count: int
    capabilities: frozenset[Capability] = frozenset()


@dataclass(frozen=True, slots=True)
class PortStatus:
    """One port as the hub sees it right now."""

    port: int
    attached: bool
    mode: PortMode = PortMode.SYNC
    current_ma: int = 0
    charge: ChargeState | None = None
    alarms: frozenset[PortAlarm] = frozenset()
    voltage_mv: int | None = None
    energy_wh: float | None = None


class PortEventKind(enum.StrEnum):
    ATTACHED = "attached"
    DETACHED = "detached"
    MODE = "mode"
    CURRENT = "current"
    ALARMS = "alarms"


@dataclass(frozen=True, slots=True)
class PortEvent:
    port: int
    kind: PortEventKind
    status: PortStatus
    previous: PortStatus | None


CURRENT_STEP_MA = 100
"""A current change smaller than this is noise, not an event (charging currents wander constantly)."""


def diff_ports(
    before: Mapping[int, PortStatus], after: Iterable[PortStatus], current_step_ma: int = CURRENT_STEP_MA
) -> list[PortEvent]:
    """Events that take a hub from snapshot `before` to snapshot `after`.

    A port seen for the first time yields ATTACHED or DETACHED, so a freshly opened hub tells the
    daemon the truth about every port. Alarms are reported on their own and never as a detach.
    """
    events = []
    for status in after:
        old = before.get(status.port)
        if old is None or old.attached != status.attached:
            kind = PortEventKind.ATTACHED if status.attached else PortEventKind.DETACHED
            events.append(PortEvent(status.port, kind, status, old))
            if old is None:
                continue
        if old.mode != status.mode:
            events.append(PortEvent(status.port, PortEventKind.MODE, status, old))
        if old.alarms != status.alarms:
            events.append(PortEvent(status.port, PortEventKind.ALARMS, status, old))
        if abs(old.current_ma - status.current_ma) >= current_step_ma:
            events.append(PortEvent(status.port, PortEventKind.CURRENT, status, old))
    return events


class HubError(Exception):
    """The hub could not be reached or refused a command; the supervisor reconnects."""


class HubDriver(abc.ABC):
    """One physical hub. Instances are single-use: the supervisor opens, polls, closes, and on
    failure builds a fresh one, so a driver never needs to repair its own half-broken state."""

    kind: ClassVar[str]

    @property
    @abc.abstractmethod
    def capabilities(self) -> frozenset[Capability]:
        """What this hub can do; may depend on the model found by `open`."""

    @abc.abstractmethod
    async def open(self) -> HubInfo:
        """Connect to the hub; raise `HubError` if it is not there."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the hub; must be safe to call after a failed `open`."""

    @abc.abstractmethod
    async def poll(self) -> list[PortStatus]:
        """Return the status of every port; raise `HubError` when the link is gone."""

    async def port_paths(self) -> dict[int, str]:
        """Physical port number -> USB path below the hub's upstream port (e.g. `{15: "2.1"}`).

        The default suits hubs whose ports are numbered as the USB hub numbers them; drivers that
        know their internal topology (Cambrionix `bd`) override it."""
        return {}

    async def acknowledge_reboot(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """The daemon has seen `PortAlarm.REBOOTED` and restored what it needs; clear the flag.
        Hubs without such a flag need nothing."""

    async def set_mode(self, port: int, mode: PortMode) -> None:
        raise HubError(f"{self.kind} hubs cannot change port modes")

    async def set_led(self, port: int, pattern: LedPattern) -> None:
        raise HubError(f"{self.kind} hubs have no per-port LEDs")
