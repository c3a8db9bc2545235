"""What arrives over MQTT: operators' commands and Home Assistant's birth message.

The publisher hands every inbound message here (topic, payload, retain flag) on the event loop.
Commands are judged by `daemon.mqtt.commands` (sans-IO), carried out through the same operator
actions the CLI uses, and answered on `<station>/response`, echoing the `transaction`; nothing a
client sends can raise out of here. Home Assistant publishes `online` on `<prefix>/status` when it
(re)starts and has then forgotten every discovered device, so discovery is sent again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from daemon.models import PortRef
from daemon.mqtt.commands import (
    Command,
    CommandRejected,
    CommandRules,
    command_topics,
    is_command_topic,
    parse_command,
    rejection_document,
    response_document,
)
from daemon.mqtt.topics import Topics
from daemon.workflow.actions import Action, ActionRejected

log = structlog.get_logger("benchhub.mqtt")

IDENTIFY = "identify"


class Inbound:
    """Routes inbound messages; `subscriptions` is what the publisher subscribes to."""

    def __init__(
        self,
        topics: Topics,
        *,
        rules: CommandRules | None,
        act: Callable[[PortRef, Action], Awaitable[str]],
        identify: Callable[[PortRef], str],
        respond: Callable[[dict[str, Any]], None],
        ha_status_topics: tuple[str, ...],
        on_ha_online: Callable[[], None],
    ) -> None:
        self.topics = topics
        self.rules = rules
        self._act = act
        self._identify = identify
        self._respond = respond
        self._ha_status = ha_status_topics
        self._on_ha_online = on_ha_online
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def subscriptions(self) -> list[str]:
        topics = command_topics(self.topics) if self.rules is not None else []
        return [*topics, *self._ha_status]

    def __call__(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic in self._ha_status:
            if payload.strip() == b"online":
                log.info("home_assistant_online", topic=topic)
                self._on_ha_online()
            return
        if self.rules is None or not is_command_topic(self.topics, topic):
            return
        if retained:
            # A retained command is stale: the broker replays it to every new subscriber.
            log.warning("mqtt_command_ignored", topic=topic, reason="retained")
            return
        try:
            command = parse_command(self.topics, topic, payload, self.rules)
        except CommandRejected as exc:
            log.warning("mqtt_command_rejected", topic=topic, code=exc.code, error=exc.message)
            self._respond(rejection_document(exc))
            return
        task = asyncio.get_running_loop().create_task(self._carry_out(command))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _carry_out(self, command: Command) -> None:
        log.info(
            "mqtt_command",
            hub=command.ref.hub,
            port=command.ref.port,
            action=command.action,
            transaction=command.transaction,
        )
        try:
            if command.action == IDENTIFY:
                result = self._identify(command.ref)
            else:
                result = await self._act(command.ref, Action(command.action))
        except (ActionRejected, CommandRejected) as exc:
            code = exc.code if isinstance(exc, CommandRejected) else "rejected"
            self._respond(self._answer(command, ok=False, code=code, message=str(exc)))
            return
        except Exception as exc:  # a bug must be answered, not lost
            log.exception("mqtt_command_failed", action=command.action)
            self._respond(self._answer(command, ok=False, code="internal_error", message=repr(exc)))
            return
        self._respond(self._answer(command, ok=True, result=result))

    @staticmethod
    def _answer(command: Command, *, ok: bool, **fields: str) -> dict[str, Any]:
        return response_document(
            transaction=command.transaction, ok=ok, ref=command.ref, action=command.action, **fields
        )
