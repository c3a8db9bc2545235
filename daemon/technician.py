"""Work only a person can do, asked for where the bench's people look: the port light, the log,
the port's state on MQTT and the board.

Adding a device to Apple Business Manager needs Apple Configurator on a Mac after an interactive
Apple Business Manager sign-in (or an entitled iOS app): Apple offers no host API for it. So the
enrolling step does not pretend. It asks the technician, exactly ("port hub-a/3, serial F2LX…:
Add to Apple Business Manager"), and watches the result arrive through Apple's API by itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from daemon.models import PortRef

log = structlog.get_logger(__name__)

ADD_TO_ABM = "add_to_abm"


@dataclass(frozen=True, slots=True)
class HandsRequest:
    ref: PortRef
    action: str
    """What is asked, as a stable code (`add_to_abm`): dashboards and the simulation key on it."""
    instruction: str
    """The same for people: one line, naming the port and the serial."""
    serial: str
    udid: str
    since: float = field(default_factory=time.time)


class Technician(Protocol):
    """Whoever carries out hands-on work on the bench."""

    def ask(self, request: HandsRequest) -> None: ...

    def withdraw(self, ref: PortRef) -> None:
        """The request for this port is answered or void (done, unplugged, timed out)."""
        ...


class TechnicianDesk:
    """The bench's list of open requests. Logs each one at warning level (operators tail the log
    for those), and tells `on_change` so the station can light the port's "needs hands" pattern."""

    def __init__(self, on_change: Callable[[PortRef, HandsRequest | None], None] | None = None) -> None:
        self._open: dict[PortRef, HandsRequest] = {}
        self._on_change = on_change
        self._listeners: list[Callable[[HandsRequest], None]] = []

    def subscribe(self, listener: Callable[[HandsRequest], None]) -> None:
        """Called for every new request (the simulated bench's technician listens here)."""
        self._listeners.append(listener)

    def ask(self, request: HandsRequest) -> None:
        if self._open.get(request.ref) == request:
            return
        self._open[request.ref] = request
        log.warning(
            "technician_needed",
            hub=request.ref.hub,
            port=request.ref.port,
            action=request.action,
            serial=request.serial,
            instruction=request.instruction,
        )
        if self._on_change is not None:
            self._on_change(request.ref, request)
        for listener in self._listeners:
            listener(request)

    def withdraw(self, ref: PortRef) -> None:
        request = self._open.pop(ref, None)
        if request is None:
            return
        log.info("technician_request_closed", hub=ref.hub, port=ref.port, action=request.action)
        if self._on_change is not None:
            self._on_change(ref, None)

    def wanted(self, ref: PortRef) -> bool:
        return ref in self._open

    def open_requests(self) -> list[HandsRequest]:
        return sorted(self._open.values(), key=lambda r: (r.since, r.ref))
