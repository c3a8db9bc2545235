"""The embedded broker: amqtt in-process on 127.0.0.1, for `benchhub demo` and single-box stations.

Production stations should run Mosquitto (it persists retained messages, speaks MQTT 5 and is what
Home Assistant recommends); `mqtt.url = "embedded"` exists so that a station works out of the box.
It is optional (`pip install 'benchhub[broker]'`) because amqtt pins `websockets` exactly.

The listener is bound to loopback only and never to 0.0.0.0: it accepts anonymous clients, which
is safe only when every client is a process on this machine. `$SYS` topics are off, and amqtt's
per-connection INFO chatter is turned down to WARNING.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

HOST: Final = "127.0.0.1"

INSTALL_HINT: Final = (
    "mqtt.url = \"embedded\" needs the optional broker: pip install 'benchhub[broker]' "
    "(or point mqtt.url at Mosquitto)"
)

_NOISY_LOGGERS: Final = ("amqtt", "transitions")
"""amqtt logs every connection and every state-machine step (via `transitions`) at INFO."""


class BrokerUnavailable(RuntimeError):
    """The embedded broker cannot run here; the message says what to do about it."""


def _in_use(port: int) -> BrokerUnavailable:
    return BrokerUnavailable(
        f"cannot start the embedded MQTT broker: {HOST}:{port} is already in use (another broker?); "
        "set mqtt.embedded_port to a free port, or 0 to pick one"
    )


def _reserve_check(port: int) -> int:
    """Return a usable port: a free one for 0, else `port` after checking nobody listens on it.

    Checking first turns the common mistake (Mosquitto already on 1883) into a one-line message
    instead of amqtt's ERROR traceback. SO_REUSEADDR, as asyncio's server uses, so that a port in
    TIME_WAIT from the previous run does not count as taken.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise _in_use(port) from None
            raise BrokerUnavailable(
                f"cannot start the embedded MQTT broker on {HOST}:{port}: {exc.strerror} "
                "(check mqtt.embedded_port)"
            ) from None
        bound: int = sock.getsockname()[1]
        return bound


def _config(port: int) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{HOST}:{port}"}},
        # Only the plugins we want: anonymous auth (loopback only, see above); no $SYS publisher,
        # no packet/event loggers.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


def _quiet() -> None:
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:  # an explicit level set by the operator wins
            logger.setLevel(logging.WARNING)


@asynccontextmanager
async def embedded_broker(port: int = 1883) -> AsyncIterator[tuple[str, int]]:
    """Run amqtt on 127.0.0.1:`port` (0 picks a free port) and yield `(host, port)`.

    Raises `BrokerUnavailable` when amqtt is not installed or the port cannot be bound.
    """
    try:
        from amqtt.broker import Broker  # noqa: PLC0415 - optional dependency
        from amqtt.errors import BrokerError  # noqa: PLC0415
    except ImportError:
        raise BrokerUnavailable(INSTALL_HINT) from None
    _quiet()
    port = _reserve_check(port)
    broker = Broker(_config(port))
    try:
        await broker.start()
    except BrokerError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
            raise _in_use(port) from None  # taken between our check and amqtt's bind
        raise BrokerUnavailable(f"cannot start the embedded MQTT broker: {exc}") from None
    try:
        yield HOST, port
    finally:
        await broker.shutdown()
