"""Commands over MQTT, parsed and judged without I/O.

Operators (and Home Assistant's buttons) publish JSON to a port's `…/port/<n>/set`, or to the
station's `<station>/set` naming the port:

    {"action": "retry", "transaction": "a1b2"}                      # on …/hub/hub-a/port/3/set
    {"action": "abort", "port": "hub-a/3", "transaction": "a1b2"}   # on benchhub/<station>/set

Every command that is answered gets one response document on `<station>/response`, echoing its
`transaction`. What arrives is untrusted: a retained command is stale by definition (a broker hands
it to every new subscriber) and is ignored without a response; anything malformed, unknown, not
allowed by `[mqtt.commands]` or without the configured token is refused with a response and a log
line, never an exception. Who may publish to `…/set` at all is the broker's ACL (docs/mqtt.md).
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from daemon.models import PortRef, iso, utcnow
from daemon.mqtt.topics import Topics

MAX_PAYLOAD = 4096
MAX_TRANSACTION = 128
_PORT = re.compile(r"^(?P<hub>[a-z0-9][a-z0-9-]{0,31})/(?P<port>[1-9]\d{0,2})$")


@dataclass(frozen=True, slots=True)
class Command:
    ref: PortRef
    action: str
    transaction: str | None


class CommandRejected(Exception):
    """Refused before anything happened; `code` is stable for machines, `message` for people."""

    def __init__(self, code: str, message: str, transaction: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.transaction = transaction


@dataclass(frozen=True, slots=True)
class CommandRules:
    """What this station accepts: the actions allowed, the token (if any), the ports it has."""

    actions: Collection[str]
    token: str | None
    has_port: Callable[[PortRef], bool]


def command_topics(topics: Topics) -> list[str]:
    """What the station subscribes to: its own set topic and every port's."""
    return [topics.station_set, f"{topics.base}/hub/+/port/+/set"]


def is_command_topic(topics: Topics, topic: str) -> bool:
    return topic == topics.station_set or _port_from_topic(topics, topic) is not None


def parse_command(topics: Topics, topic: str, payload: bytes, rules: CommandRules) -> Command:
    """The command in a message, or `CommandRejected` saying why not."""
    doc = _document(payload)
    transaction = _transaction(doc)
    action = doc.get("action")
    if not isinstance(action, str) or not action:
        raise CommandRejected("malformed", 'a command needs "action" (a string)', transaction)
    if action not in rules.actions:
        allowed = ", ".join(sorted(rules.actions)) or "none"
        raise CommandRejected(
            "not_allowed", f"{action!r} is not allowed here (allowed: {allowed})", transaction
        )
    if rules.token is not None:
        given = doc.get("token")
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), rules.token.encode()):
            raise CommandRejected("unauthorised", "missing or wrong token", transaction)
    ref = _port_from_topic(topics, topic) or _port_from_document(doc, transaction)
    if not rules.has_port(ref):
        raise CommandRejected("unknown_port", f"this station has no port {ref}", transaction)
    return Command(ref, action, transaction)


def response_document(
    *,
    transaction: str | None,
    ok: bool,
    ref: PortRef | None,
    action: str | None,
    result: str | None = None,
    code: str | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    return {
        "transaction": transaction,
        "ok": ok,
        "port": str(ref) if ref is not None else None,
        "action": action,
        "result": result,
        "error": None if ok else {"code": code, "message": message},
        "ts": iso(utcnow()),
    }


def rejection_document(exc: CommandRejected) -> dict[str, Any]:
    return response_document(
        transaction=exc.transaction, ok=False, ref=None, action=None, code=exc.code, message=exc.message
    )


def _document(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD:
        raise CommandRejected("malformed", f"a command is at most {MAX_PAYLOAD} bytes")
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise CommandRejected("malformed", "a command is a JSON object") from None
    if not isinstance(doc, dict):
        raise CommandRejected("malformed", "a command is a JSON object")
    return doc


def _transaction(doc: dict[str, Any]) -> str | None:
    value = doc.get("transaction")
    if value is None:
        return None
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise CommandRejected("malformed", '"transaction" is a string')
    text = str(value)
    if len(text) > MAX_TRANSACTION:
        raise CommandRejected("malformed", f'"transaction" is at most {MAX_TRANSACTION} characters')
    return text


def _port_from_topic(topics: Topics, topic: str) -> PortRef | None:
    prefix = f"{topics.base}/hub/"
    if not topic.startswith(prefix) or not topic.endswith("/set"):
        return None
    parts = topic[len(prefix) : -len("/set")].split("/")
    if len(parts) != 3 or parts[1] != "port" or not parts[2].isdigit():
        return None
    return PortRef(parts[0], int(parts[2]))


def _port_from_document(doc: dict[str, Any], transaction: str | None) -> PortRef:
    value = doc.get("port")
    match = _PORT.match(value) if isinstance(value, str) else None
    if match is None:
        raise CommandRejected(
            "malformed", 'a station command names its port, e.g. "port": "hub-a/3"', transaction
        )
    return PortRef(match["hub"], int(match["port"]))
