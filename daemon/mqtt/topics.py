"""The topic schema (docs/mqtt.md): physical location in the topic, device identity in the payload."""

from __future__ import annotations

from dataclasses import dataclass

from daemon.models import PortRef


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str
    station: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.station}"

    @property
    def status(self) -> str:
        """Retained `online`/`offline`; also the last will."""
        return f"{self.base}/status"

    @property
    def health(self) -> str:
        """Retained JSON: whether the station's database takes writes (sent around the outbox)."""
        return f"{self.base}/health"

    @property
    def awaiting_assignment(self) -> str:
        """Retained list of serials waiting for MDM assignment in Apple Business Manager."""
        return f"{self.base}/apple/awaiting_assignment"

    @property
    def station_set(self) -> str:
        """Commands for the station, naming the port in the payload."""
        return f"{self.base}/set"

    @property
    def response(self) -> str:
        """One response per answered command, echoing its `transaction`."""
        return f"{self.base}/response"

    def hub_status(self, hub: str) -> str:
        return f"{self.base}/hub/{hub}/status"

    def port(self, ref: PortRef) -> str:
        return f"{self.base}/hub/{ref.hub}/port/{ref.port}"

    def port_state(self, ref: PortRef) -> str:
        return f"{self.port(ref)}/state"

    def port_phase(self, ref: PortRef) -> str:
        """Scalar mirror of the phase for consumers that cannot parse JSON (status lights)."""
        return f"{self.port(ref)}/state/phase"

    def port_color(self, ref: PortRef) -> str:
        """Scalar mirror of the phase as a colour word (`[mqtt] colors`), for the simplest lights."""
        return f"{self.port(ref)}/state/color"

    def port_set(self, ref: PortRef) -> str:
        """Commands for one port (JSON, docs/mqtt.md)."""
        return f"{self.port(ref)}/set"

    def port_event(self, ref: PortRef) -> str:
        return f"{self.port(ref)}/event"
