"""Home Assistant MQTT discovery for a station: which retained messages make its hubs and ports
appear in Home Assistant, built without I/O (the caller publishes them through the outbox).

Device-based discovery (Home Assistant 2024.11+), one message per HA *device*:

- topic `<discovery_prefix>/device/<object_id>/config`, retained;
- payload: `device` (abbreviated `dev`) and `origin` (`o`) at the root, both mandatory, and the
  entities under `components` (`cmps`), each keyed by a component id and carrying its `platform`
  (`p`) and a `unique_id` (required for entities in device-based discovery); `qos`, `state_topic`,
  `command_topic`, `encoding` and the availability options may also be shared at the root;
- removal: an empty retained payload on the same topic removes the device's components (and the
  device once nothing refers to it) and clears the retained config at the broker;
- Home Assistant publishes its birth message `online` to `homeassistant/status` when its MQTT
  integration (re)starts; until it sees discovery again its discovered entities are unavailable, so
  a publisher re-sends discovery then (docs recommend a small random delay against load spikes).

Sources (home-assistant.io, the "MQTT" integration page and the platform pages):
    https://www.home-assistant.io/integrations/mqtt/#device-discovery-payload
    https://www.home-assistant.io/integrations/mqtt/#discovery-messages
    https://www.home-assistant.io/integrations/mqtt/#use-the-birth-and-will-messages-to-trigger-discovery
    https://www.home-assistant.io/integrations/mqtt/#using-availability-topics
    https://www.home-assistant.io/integrations/sensor.mqtt/   (enum `options`, `platform`, `unique_id`)
    https://www.home-assistant.io/integrations/button.mqtt/   (`command_topic`, `payload_press`, `retain`)
    https://www.home-assistant.io/integrations/binary_sensor.mqtt/  (`payload_on`/`payload_off`)

Full option names are used wherever Home Assistant documents them (`device`, `origin`,
`components`, `platform`, ...): the abbreviations only save bytes for microcontrollers, and full
names keep the retained payload readable for whoever inspects the broker.

What appears, and why it is shaped this way (docs/homeassistant.md has the user's view):

- One device for the station (connectivity from `<station>/status`, the count of serials waiting
  for MDM assignment) and one per hub, linked to it with `via_device`, so HA's device page shows
  the bench topology.
- Per port, on the hub's device: the phase as an `enum` sensor reading the scalar
  `…/state/phase` mirror (no template, so the options are exactly `Phase`), the progress and the
  serial from the JSON state document, and buttons for the operator commands the station accepts.
- Every entity is unavailable when the station is offline (its last will), and a hub's port
  entities also when the station cannot talk to the hub (`availability_mode: all`), so a stale
  retained phase is never shown as current. On a hub's device that availability is shared at the
  root (it would otherwise be repeated on every port entity: a 16-port hub has ~100 components);
  the hub's `link` sensor overrides it with the station alone, since it reports the hub topic the
  others are gated on (HA inherits a shared option only where the component does not set it). The
  station's `status` sensor has no availability at all, so the station device states it per
  component instead of at the root.

Buttons and the command token: an HA MQTT button publishes a fixed `payload_press`. With
`[mqtt.commands] token_file` set, the station refuses commands without the token, so a working
button would have to carry the token in its payload, i.e. in a *retained* discovery message every
subscriber of the discovery prefix can read. That would publish the secret, so with a token no
buttons are announced at all (operators publish commands with the token themselves, e.g. from an
HA script that reads it from HA's secrets).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Final

from daemon.config import Config, HubConfig
from daemon.hubsetup import port_count
from daemon.models import OutboxMessage, PortRef
from daemon.mqtt.topics import Topics
from daemon.workflow.phases import Phase

DEFAULT_HA_STATUS_TOPIC: Final = "homeassistant/status"
"""Where Home Assistant publishes its birth (`online`) and last will (`offline`) by default. The
birth topic is a separate HA setting from the discovery prefix: it stays here unless changed."""

HA_ONLINE: Final = b"online"

BUTTON_ACTIONS: Final[tuple[tuple[str, str], ...]] = (
    ("retry", "retry"),
    ("abort", "abort"),
    ("power_cycle", "power cycle"),
)
"""Operator commands offered as HA buttons (action, label), in display order. `skip` and
`identify` are not offered: skipping a step is a decision to take with the device in hand, not
from a dashboard tile."""

_BUTTON_ICONS: Final = {"retry": "mdi:replay", "abort": "mdi:stop-circle-outline"}
_BUTTON_CLASSES: Final = {"power_cycle": "restart"}

_HUB_MANUFACTURERS: Final = {"cambrionix": "Cambrionix", "datamation": "Datamation"}


def discovery_topic(prefix: str, object_id: str) -> str:
    """`<prefix>/device/<object_id>/config`; `object_id` must match `[a-zA-Z0-9_-]` (HA rule),
    which station and hub ids (`[a-z0-9-]`) joined by `_` always do."""
    return f"{prefix}/device/{object_id}/config"


def station_object_id(station: str) -> str:
    """The station device's identifier and discovery object id: `benchhub_<station>`."""
    return f"benchhub_{station}"


def hub_object_id(station: str, hub: str) -> str:
    """A hub device's identifier and discovery object id: `benchhub_<station>_<hub>`. `_` cannot
    occur in ids, so no station/hub pair can collide with another."""
    return f"benchhub_{station}_{hub}"


def ha_status_topics(prefix: str) -> tuple[str, ...]:
    """Topics to subscribe to for HA's birth message: `<prefix>/status` (people who change the
    discovery prefix usually move the birth topic with it) and HA's default."""
    own = f"{prefix}/status"
    return (own,) if own == DEFAULT_HA_STATUS_TOPIC else (own, DEFAULT_HA_STATUS_TOPIC)


def is_ha_online(topic: str, payload: bytes, prefix: str) -> bool:
    """True for Home Assistant's birth message: the caller then re-sends `discovery_messages`
    (HA forgets discovered entities on restart until it sees their config again)."""
    return topic in ha_status_topics(prefix) and payload.strip() == HA_ONLINE


def discovery_messages(config: Config, topics: Topics, version: str) -> list[OutboxMessage]:
    """The retained QoS 1 discovery configs for the station device, then one per hub (station
    first, so the hubs' `via_device` finds it); nothing when `[mqtt.homeassistant]` is disabled.

    The bytes are deterministic for a given config and version, so re-sending them (on reconnect,
    on HA's birth message) is a no-op for Home Assistant unless something really changed."""
    ha = config.mqtt.homeassistant
    if not ha.enabled:
        return []
    station = topics.station
    label = config.station.name or config.station.id
    origin = {"name": "benchhub", "sw_version": version}
    messages = [
        _message(ha.prefix, station_object_id(station), _station_payload(topics, label, version, origin))
    ]
    actions = _button_actions(config)
    for hub in config.hubs:
        payload = _hub_payload(topics, hub, label=label, version=version, origin=origin, actions=actions)
        messages.append(_message(ha.prefix, hub_object_id(station, hub.id), payload))
    return messages


def removal_messages(
    prefix: str, station: str, hub_ids: Iterable[str], *, include_station: bool = False
) -> list[OutboxMessage]:
    """Empty retained payloads that remove the HA devices of hubs that left the config (the caller
    remembers which hubs it announced), and with `include_station` the station's own device (HA
    integration switched off, station decommissioned). Retained, so the broker also drops the old
    config and a Home Assistant that was offline does not resurrect the device from it."""
    objects = [hub_object_id(station, hub) for hub in hub_ids]
    if include_station:
        objects.append(station_object_id(station))
    return [OutboxMessage(discovery_topic(prefix, obj), b"", retain=True, qos=1) for obj in objects]


def _message(prefix: str, object_id: str, payload: dict[str, Any]) -> OutboxMessage:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return OutboxMessage(discovery_topic(prefix, object_id), body, retain=True, qos=1)


def _button_actions(config: Config) -> list[tuple[str, str]]:
    """The buttons every port gets: none when commands are off or need a token (module docstring),
    else the allowed subset of `BUTTON_ACTIONS`."""
    commands = config.mqtt.commands
    if not commands.enabled or commands.token_file is not None:
        return []
    return [(action, label) for action, label in BUTTON_ACTIONS if action in commands.actions]


def _availability(*topics: str) -> dict[str, Any]:
    """Available only while every topic says `online` (HA: `availability_mode: all`)."""
    return {
        "availability": [
            {"topic": t, "payload_available": "online", "payload_not_available": "offline"} for t in topics
        ],
        "availability_mode": "all",
    }


def _connectivity(unique_id: str, name: str, state_topic: str, **extra: Any) -> dict[str, Any]:
    return {
        "platform": "binary_sensor",
        "unique_id": unique_id,
        "name": name,
        "device_class": "connectivity",
        "entity_category": "diagnostic",
        "state_topic": state_topic,
        "payload_on": "online",
        "payload_off": "offline",
        **extra,
    }


def _station_payload(topics: Topics, label: str, version: str, origin: dict[str, str]) -> dict[str, Any]:
    uid = station_object_id(topics.station)
    return {
        "device": {
            "identifiers": [uid],
            "name": label,
            "manufacturer": "benchhub",
            "model": "provisioning station",
            "sw_version": version,
        },
        "origin": origin,
        "qos": 1,
        "components": {
            # No availability: it *is* the station's availability (last will `offline`).
            "status": _connectivity(f"{uid}_status", "Status", topics.status),
            "awaiting_assignment": {
                "platform": "sensor",
                "unique_id": f"{uid}_awaiting_assignment",
                "name": "Awaiting assignment",
                "icon": "mdi:clipboard-clock-outline",
                "state_topic": topics.awaiting_assignment,
                "value_template": "{{ value_json.count }}",
                "unit_of_measurement": "devices",
                "state_class": "measurement",
                **_availability(topics.status),
            },
        },
    }


def _hub_payload(
    topics: Topics,
    hub: HubConfig,
    *,
    label: str,
    version: str,
    origin: dict[str, str],
    actions: list[tuple[str, str]],
) -> dict[str, Any]:
    uid = hub_object_id(topics.station, hub.id)
    device: dict[str, Any] = {
        "identifiers": [uid],
        "name": f"{label} {hub.id}",
        "model": f"{hub.kind} hub, {port_count(hub)} ports",
        "sw_version": version,
        "via_device": station_object_id(topics.station),
    }
    if hub.kind in _HUB_MANUFACTURERS:
        device["manufacturer"] = _HUB_MANUFACTURERS[hub.kind]
    # The hub link overrides the shared availability: gated on the station only, it reports the
    # hub's own status instead of disappearing with it.
    components: dict[str, Any] = {
        "link": _connectivity(
            f"{uid}_link", "Link", topics.hub_status(hub.id), **_availability(topics.status)
        ),
    }
    for n in range(1, port_count(hub) + 1):
        components.update(_port_components(topics, PortRef(hub.id, n), f"{uid}_p{n}", actions))
    return {
        "device": device,
        "origin": origin,
        "qos": 1,
        # Shared by every component that does not set its own (only `link` does).
        **_availability(topics.status, topics.hub_status(hub.id)),
        "components": components,
    }


def _port_components(
    topics: Topics, ref: PortRef, uid: str, actions: list[tuple[str, str]]
) -> dict[str, Any]:
    """One port's entities, keyed `p<n>_<what>` inside its hub's device; their availability is
    the hub device's shared one."""
    n = ref.port
    state = topics.port_state(ref)
    components: dict[str, Any] = {
        f"p{n}_phase": {
            "platform": "sensor",
            "unique_id": f"{uid}_phase",
            "name": f"Port {n} phase",
            "icon": "mdi:cellphone-cog",
            "device_class": "enum",
            "options": [phase.value for phase in Phase],
            # The scalar mirror: the plain phase word, so no template and no JSON parsing.
            "state_topic": topics.port_phase(ref),
        },
        f"p{n}_progress": {
            "platform": "sensor",
            "unique_id": f"{uid}_progress",
            "name": f"Port {n} progress",
            "icon": "mdi:progress-clock",
            "unit_of_measurement": "%",
            "state_topic": state,
            # `progress` is null when the step cannot tell: Jinja renders it `None`, which HA's
            # MQTT sensor maps to `unknown` (PAYLOAD_NONE) instead of a misleading 0.
            "value_template": "{{ value_json.progress | default(none) }}",
        },
        f"p{n}_serial": {
            "platform": "sensor",
            "unique_id": f"{uid}_serial",
            "name": f"Port {n} serial",
            "icon": "mdi:barcode",
            "state_topic": state,
            "value_template": "{{ value_json.serial | default(none) }}",
        },
    }
    command_topic = topics.port_set(ref)
    for action, label in actions:
        button: dict[str, Any] = {
            "platform": "button",
            "unique_id": f"{uid}_{action}",
            "name": f"Port {n} {label}",
            "command_topic": command_topic,
            "payload_press": json.dumps({"action": action}, separators=(",", ":")),
            # The station ignores retained commands (stale by definition); HA's default, made explicit.
            "retain": False,
        }
        if action in _BUTTON_ICONS:
            button["icon"] = _BUTTON_ICONS[action]
        if action in _BUTTON_CLASSES:
            button["device_class"] = _BUTTON_CLASSES[action]
        components[f"p{n}_{action}"] = button
    return components
