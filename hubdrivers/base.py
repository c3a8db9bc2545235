"""The contract every hub family implements.

A driver knows bytes and hardware; it never imports the daemon. It reports what the hub can see
(`PortStatus` snapshots) and carries out what the hub can do (`set_mode`, `set_led`). Turning
snapshots into events, reconnecting, and deciding what a change means are the daemon's job.
"""

from __future__ import annotations

import abc
import enum
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
    OFF = "off"


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


@dataclass(frozen=True, slots=True)
class PortStatus:
    """One port as the hub sees it right now."""

    port: int
    attached: bool
    mode: PortMode = PortMode.SYNC
    current_ma: int = 0
    errors: frozenset[str] = frozenset()


class HubError(Exception):
    """The hub could not be reached or refused a command; the supervisor reconnects."""


class HubDriver(abc.ABC):
    """One physical hub. Instances are single-use: the supervisor opens, polls, closes, and on
    failure builds a fresh one, so a driver never needs to repair its own half-broken state."""

    kind: ClassVar[str]
    capabilities: ClassVar[frozenset[Capability]]

    @abc.abstractmethod
    async def open(self) -> HubInfo:
        """Connect to the hub; raise `HubError` if it is not there."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the hub; must be safe to call after a failed `open`."""

    @abc.abstractmethod
    async def poll(self) -> list[PortStatus]:
        """Return the status of every port; raise `HubError` when the link is gone."""

    async def set_mode(self, port: int, mode: PortMode) -> None:
        raise HubError(f"{self.kind} hubs cannot change port modes")

    async def set_led(self, port: int, pattern: LedPattern) -> None:
        raise HubError(f"{self.kind} hubs have no per-port LEDs")
