"""JSON payloads for port state and events, and the store's outbox renderer.

The state document is the one thing dashboards and status lights read, so it is complete on its own:
phase, step, progress, device identity, since, attempt, error, a per-port sequence number (consumers
can drop anything older than what they have) and a timestamp.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from daemon.config import DEFAULT_COLORS
from daemon.models import OutboxMessage, PortState, Transition, iso, utcnow
from daemon.mqtt.topics import Topics
from daemon.report import awaiting_assignment, waiting_document
from daemon.workflow.phases import Phase


def state_document(state: PortState) -> dict[str, Any]:
    device = state.device.as_dict() if state.device else {}
    return {
        "hub": state.ref.hub,
        "port": state.ref.port,
        "phase": state.phase.value,
        "step": state.step,
        "progress": state.progress,
        "udid": device.get("udid"),
        "ecid": device.get("ecid"),
        "serial": device.get("serial"),
        "model": device.get("product_type"),
        "ios": device.get("ios_version"),
        "since": iso(state.since),
        "attempt": state.attempt,
        "error": state.error.as_dict() if state.error else None,
        "detail": state.detail,
        "queue": state.queue.as_dict() if state.queue else None,
        "seq": state.seq,
        "ts": iso(state.updated),
    }


def event_document(state: PortState, transition: Transition, from_phase: Phase) -> dict[str, Any]:
    return {
        "event": "transition",
        "hub": state.ref.hub,
        "port": state.ref.port,
        "from": from_phase.value,
        "to": state.phase.value,
        "step": state.step,
        "attempt": state.attempt,
        "actor": transition.actor,
        "error": state.error.as_dict() if state.error else None,
        "detail": state.detail,
        "device": state.device.as_dict() if state.device else None,
        "seq": state.seq,
        "ts": iso(state.updated),
    }


def health_payload(failing: str | None, since: datetime | None) -> bytes:
    """`…/health` (docs/mqtt.md): whether the database takes writes, and if not why and since when."""
    return compact_json({"ok": failing is None, "database": failing, "since": iso(since) if since else None})


def compact_json(doc: dict[str, Any]) -> bytes:
    """Every JSON payload the station publishes: compact, keys sorted (stable bytes per content)."""
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


class PayloadRenderer:
    """Implements the store's `OutboxRenderer`: which messages one state change produces."""

    def __init__(self, topics: Topics, colors: Mapping[Phase, str] | None = None) -> None:
        self.topics = topics
        self.colors = colors if colors is not None else {Phase(k): v for k, v in DEFAULT_COLORS.items()}

    def _state(self, state: PortState) -> OutboxMessage:
        return OutboxMessage(
            self.topics.port_state(state.ref), compact_json(state_document(state)), retain=True
        )

    def _mirrors(self, state: PortState) -> list[OutboxMessage]:
        """The scalar mirrors of the phase: the word itself, and its colour (`[mqtt] colors`), so a
        status light needs no JSON parser, and the simplest one no phase table either."""
        messages = [OutboxMessage(self.topics.port_phase(state.ref), state.phase.value.encode(), retain=True)]
        color = self.colors.get(state.phase)
        if color is not None:
            messages.append(OutboxMessage(self.topics.port_color(state.ref), color.encode(), retain=True))
        return messages

    def port_messages(
        self, state: PortState, transition: Transition | None, from_phase: Phase | None
    ) -> list[OutboxMessage]:
        messages = [
            self._state(state),
        ]
        if transition is not None and from_phase is not None:
            messages += self._mirrors(state)
            messages.append(
                OutboxMessage(
                    self.topics.port_event(state.ref),
                    compact_json(event_document(state, transition, from_phase)),
                    retain=False,
                )
            )
        return messages

    def hub_messages(self, hub: str, online: bool) -> list[OutboxMessage]:
        payload = b"online" if online else b"offline"
        return [OutboxMessage(self.topics.hub_status(hub), payload, retain=True)]

    def waiting_messages(self, states: list[PortState]) -> list[OutboxMessage]:
        """The retained list of serials waiting for MDM assignment, for the administrator's
        dashboard (and anyone who pastes them into the portal)."""
        document = {"ts": iso(utcnow()), **waiting_document(awaiting_assignment(states))}
        return [OutboxMessage(self.topics.awaiting_assignment, compact_json(document), retain=True)]

    def response_messages(self, document: dict[str, Any]) -> list[OutboxMessage]:
        """The answer to one MQTT command (`daemon.mqtt.commands.response_document`), not retained."""
        return [OutboxMessage(self.topics.response, compact_json(document), retain=False)]

    def snapshot(self, state: PortState) -> list[OutboxMessage]:
        """Retained messages that restore a port's state on a broker that lost it."""
        return [
            self._state(state),
            *self._mirrors(state),
        ]
