"""The MQTT publisher: moves the store's outbox to the broker, and hands inbound messages on.

The store is the truth (DESIGN §2): every state change is committed to SQLite together with the
messages it produces, and this publisher only copies those messages to the broker, deleting each
from the outbox after the broker has confirmed it (PUBACK for QoS 1). A broker outage therefore
delays messages and loses none, and a crash between publish and ack repeats a message instead of
dropping it (QoS 1 is at-least-once anyway; state payloads carry `seq` so consumers can tell).

One connection at a time, reconnected with capped, jittered exponential backoff. On every
(re)connect the station announces itself `online`, drains the outbox, then republishes every port's
retained state, because a broker that restarted without persistence has forgotten it. The last will
says `offline` when the connection dies; a clean stop publishes `offline` itself, since a broker
sends the will only on unclean disconnects.

Inbound (commands, Home Assistant's `online`) arrives on the same connection: the topics in
`subscriptions` are subscribed on every connect and each message is handed, with its retain flag,
to `on_message`. Judging and answering them is the station's business; answers go through the
outbox like everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final

import aiomqtt
import structlog

from daemon.backoff import backoff_delay
from daemon.config import MqttConfig, TlsConfig, read_secret
from daemon.models import OutboxMessage
from daemon.mqtt.payloads import PayloadRenderer, health_payload
from daemon.mqtt.topics import Topics
from daemon.store import Store

log = structlog.get_logger("benchhub.mqtt")

BATCH: Final = 200
"""Outbox rows read (and acked) per round trip to SQLite."""
WINDOW_MAX: Final = 100
"""Most QoS 1 messages in flight at once (`mqtt.inflight`; paho queues beyond its own 20)."""
"""Seconds; min(1.8**tries, 30) like aioesphomeapi, so a broker back after a restart is found within
a second or two, and a long outage costs one attempt per half minute."""
STOP_DRAIN_SECONDS: Final = 2.0
"""On stop, how long the outbox may keep the daemon from exiting; whatever is left stays in the
store and goes out after the next start."""
CALL_TIMEOUT: Final = 10.0
"""Seconds to wait for CONNACK or a PUBACK before the connection is considered broken."""
OFFLINE_TIMEOUT: Final = 1.0

ONLINE: Final = b"online"
OFFLINE: Final = b"offline"


def tls_context(tls: TlsConfig | None) -> ssl.SSLContext:
    """Client TLS context: system CAs unless `ca_file`, optional client certificate, and `insecure`
    to accept any certificate (self-signed bench brokers; never on a network you do not own)."""
    cafile = str(tls.ca_file) if tls is not None and tls.ca_file is not None else None
    context = ssl.create_default_context(cafile=cafile)
    if tls is not None and tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls is not None and tls.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _ConnectionLost(aiomqtt.MqttError):
    """The broker connection dropped while we were waiting for it."""


class MqttPublisher:
    """Publishes the store's outbox and the station status to one broker; see the module docstring.

    The store must be used from the event loop thread that runs `run()`: its commit listener
    sets an `asyncio.Event`, which is not thread-safe.
    """

    def __init__(
        self,
        config: MqttConfig,
        topics: Topics,
        store: Store,
        renderer: PayloadRenderer,
        *,
        password: str | None = None,
        subscriptions: Sequence[str] = (),
        on_message: Callable[[str, bytes, bool], None] | None = None,
        announcements: Callable[[], list[OutboxMessage]] | None = None,
    ) -> None:
        self._config = config
        self._announcements = announcements
        self._subscriptions = list(subscriptions)
        self._on_message = on_message
        self._topics = topics
        self._store = store
        self._renderer = renderer
        if password is None and config.password_file is not None:
            password = read_secret(config.password_file)  # ConfigError now, not at the first connect
        self._password = password
        if config.embedded:
            if config.embedded_port == 0:
                raise ValueError(
                    "mqtt.url = 'embedded' with embedded_port = 0: pass a config whose url is the "
                    "address embedded_broker() yielded (mqtt://127.0.0.1:<port>)"
                )
            self._host, self._port = "127.0.0.1", config.embedded_port
        else:
            self._host, self._port = config.host_port()
        self._identifier = config.client_id or f"benchhub-{topics.station}"
        self._wakeup = asyncio.Event()
        self._connected = False
        self._published = 0
        self._last_error: str | None = None
        self._tls: ssl.SSLContext | None = None  # built once, off the event loop (it reads files)
        self._health_sent: bytes | None = None
        store.subscribe(self._wake)
        store.on_health_change(self._wake)

    # ------------------------------------------------------------ status

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def published(self) -> int:
        """Messages the broker has confirmed since start: status, outbox and snapshot messages."""
        return self._published

    @property
    def last_error(self) -> str | None:
        """Why the last connection attempt failed or the last connection ended, for status displays."""
        return self._last_error

    @property
    def broker(self) -> str:
        return f"{self._host}:{self._port}"

    def _wake(self) -> None:
        self._wakeup.set()

    # --------------------------------------------------------- connection

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until `stop` is set, reconnecting for as long as it takes; never raises for a
        broker outage. On stop: drain briefly, publish `offline`, disconnect cleanly, return."""
        tries = 0
        outage_logged = False  # WARNING once per outage, DEBUG for the retries that follow
        while not stop.is_set():
            was_connected = False
            try:
                async with contextlib.AsyncExitStack() as connection:
                    client = await self._connect(connection, stop)
                    if client is None:
                        return  # stopped before the broker answered
                    was_connected = True
                    log.info(
                        "mqtt_connected",
                        broker=self.broker,
                        client_id=self._identifier,
                        retries=tries,
                        pending=self._store.outbox_size(),
                    )
                    tries, outage_logged, self._last_error = 0, False, None
                    await self._session(client, stop)
                log.info(
                    "mqtt_stopped",
                    broker=self.broker,
                    published=self._published,
                    pending=self._store.outbox_size(),
                )
                return
            except (aiomqtt.MqttError, OSError) as exc:
                # OSError: aiomqtt lets some socket errors through on disconnect, and a TLS file
                # that cannot be loaded (ssl.SSLError is an OSError) is retried like an outage.
                self._last_error = _describe(exc)
                delay = backoff_delay(tries)
                tries += 1
                emit = log.debug if outage_logged else log.warning
                emit(
                    "mqtt_connection_lost" if was_connected else "mqtt_connect_failed",
                    broker=self.broker,
                    error=self._last_error,
                    retry_in=round(delay, 1),
                    pending=self._store.outbox_size(),
                )
                outage_logged = True
            finally:
                self._connected = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()

    async def _connect(
        self, connection: contextlib.AsyncExitStack, stop: asyncio.Event
    ) -> aiomqtt.Client | None:
        """Connect (raising MqttError on failure), or return None if `stop` is set meanwhile."""
        if self._config.use_tls and self._tls is None:
            self._tls = await asyncio.to_thread(tls_context, self._config.tls)
        client = self._client(self._tls)
        entering = asyncio.ensure_future(connection.enter_async_context(client))
        if not await self._unless_stopped(entering, stop):
            return None
        self._connected = True
        return client

    def _client(self, context: ssl.SSLContext | None) -> aiomqtt.Client:
        """A new client per attempt: paho keeps unacked messages of a dead connection and would
        resend them on its own, but the outbox is our only queue."""
        client = aiomqtt.Client(
            self._host,
            self._port,
            identifier=self._identifier,
            username=self._config.username or None,
            password=self._password,
            will=aiomqtt.Will(self._topics.status, OFFLINE, qos=1, retain=True),
            keepalive=self._config.keepalive,
            tls_context=context,
            timeout=CALL_TIMEOUT,
        )
        client.pending_calls_threshold = WINDOW_MAX + 10  # a full window in flight is normal
        return client

    async def _session(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        """Serve one connection until it drops (MqttError) or `stop` is set (clean goodbye)."""
        lost = asyncio.ensure_future(self._read(client))
        lost.add_done_callback(_retrieve)
        try:
            await self._until(self._serve(client), lost, stop)  # _serve runs until stop is set
            try:
                async with asyncio.timeout(STOP_DRAIN_SECONDS):
                    await self._until(self._drain(client), lost)
            except TimeoutError:
                log.warning("mqtt_stop_drain_incomplete", pending=self._store.outbox_size())
            await self._until(self._publish_status(client, OFFLINE, within=OFFLINE_TIMEOUT), lost)
        except asyncio.CancelledError:
            # Cancelled instead of stopped: the clean disconnect that follows suppresses the will,
            # so say `offline` ourselves, briefly, and let the cancellation through.
            if not lost.done():
                with contextlib.suppress(aiomqtt.MqttError, OSError):
                    await client.publish(
                        self._topics.status, OFFLINE, qos=1, retain=True, timeout=OFFLINE_TIMEOUT
                    )
            raise
        finally:
            lost.cancel()

    async def _serve(self, client: aiomqtt.Client) -> None:
        await self._publish_status(client, ONLINE)
        self._health_sent = None  # the broker may have forgotten it
        await self._publish_health(client)
        if self._subscriptions:
            await client.subscribe([(topic, 1) for topic in self._subscriptions], timeout=CALL_TIMEOUT)
        await self._publish_loop(client)

    async def _read(self, client: aiomqtt.Client) -> None:
        """Hand every inbound message on, until the connection drops (then it raises MqttError: in
        aiomqtt 2.x the message iterator is the public way to learn of a disconnect, so this is
        also the session's disconnect watch). A handler's bug is logged, never ends the connection."""
        async for message in client.messages:
            if self._on_message is None:
                continue
            raw = message.payload
            payload = bytes(raw) if isinstance(raw, bytes | bytearray) else str(raw or "").encode()
            try:
                self._on_message(str(message.topic), payload, bool(message.retain))
            except Exception:
                log.exception("mqtt_inbound_handler_failed", topic=str(message.topic))

    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        self._wakeup.clear()
        await self._drain(client)
        # The snapshot is read after the drain emptied the outbox (no await in between, so nothing
        # is recorded in between) and is therefore the newest state of every port. A transition
        # recorded while the snapshot is being sent lands in the outbox with a higher `seq` and is
        # published after it by the loop below, so the broker always ends on the newest state.
        # Draining first also keeps outage events in their original order, ahead of the snapshot.
        await self._republish(client)
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._publish_health(client)
            await self._drain(client)

    async def _publish_health(self, client: aiomqtt.Client) -> None:
        """The store's health (`…/health`), retained, when it changed. Straight to the broker, not
        through the outbox: the outbox lives in the database whose failure it reports, so the news
        would arrive only once it was over."""
        payload = health_payload(self._store.failing, self._store.failing_since)
        if payload != self._health_sent:
            await client.publish(self._topics.health, payload, qos=1, retain=True, timeout=CALL_TIMEOUT)
            self._health_sent = payload

    async def _drain(self, client: aiomqtt.Client) -> None:
        """Publish the outbox in id order, acking each batch's confirmed prefix, until it is empty.

        Up to `mqtt.inflight` messages are in flight at once (1 by default: see its docstring for
        when more pays). Order is kept, since each send hands its message to paho in the order the
        sends start, and the broker keeps one client's order; only the confirmed prefix is acked."""
        while rows := self._store.outbox(limit=BATCH):
            confirmed: list[int] = []
            try:
                window_size = self._config.inflight
                for start in range(0, len(rows), window_size):
                    window = rows[start : start + window_size]
                    sends = [asyncio.ensure_future(self._publish(client, row.message)) for row in window]
                    try:
                        await asyncio.gather(*sends)
                    finally:
                        confirmed += _confirmed_prefix([row.id for row in window], sends)
            finally:
                # Only what the broker confirmed, also when a publish failed or we were cancelled:
                # the rest stays in the outbox and goes out, in order, on the next connection.
                if confirmed:
                    self._store.ack(confirmed)

    async def _republish(self, client: aiomqtt.Client) -> None:
        """Restore every retained topic from the store: hub links first, then every port, then the
        station's announcements (Home Assistant discovery)."""
        ports = self._store.ports()
        messages = [
            m
            for hub, online in self._store.hub_statuses().items()
            for m in self._renderer.hub_messages(hub, online)
        ]
        messages += [m for state in ports for m in self._renderer.snapshot(state)]
        messages += self._renderer.waiting_messages(ports)
        messages += self._announcements() if self._announcements is not None else []
        for message in messages:
            await self._publish(client, message)
        log.debug("mqtt_republished", ports=len(ports))

    async def _publish(self, client: aiomqtt.Client, message: OutboxMessage) -> None:
        # aiomqtt returns once the broker has confirmed the message (PUBACK for QoS 1).
        await client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
        self._published += 1

    async def _publish_status(
        self, client: aiomqtt.Client, payload: bytes, within: float = CALL_TIMEOUT
    ) -> None:
        await client.publish(self._topics.status, payload, qos=1, retain=True, timeout=within)
        self._published += 1

    # ------------------------------------------------------------ racing

    @staticmethod
    async def _unless_stopped(work: asyncio.Future[Any], stop: asyncio.Event) -> bool:
        """Await `work` unless `stop` is set first (then cancel it and return False)."""
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            await cancel_and_wait(work)
        if work.cancelled():
            return False
        work.result()  # raises the connect error, if any
        return True

    @staticmethod
    async def _until(
        coro: Coroutine[Any, Any, None], lost: asyncio.Future[None], stop: asyncio.Event | None = None
    ) -> bool:
        """Run `coro` while the connection lasts.

        Returns True if `stop` was set first (the work is cancelled), False when the work is done;
        raises MqttError as soon as the connection drops, because a publish waiting for its PUBACK
        would otherwise sit out its whole timeout on a dead connection.
        """
        work = asyncio.ensure_future(coro)
        waiters: set[asyncio.Future[Any]] = {work, lost}
        stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
        if stopper is not None:
            waiters.add(stopper)
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if stopper is not None:
                stopper.cancel()
            await cancel_and_wait(work)  # the drain acks what was confirmed before it ends
        if not work.cancelled():
            work.result()  # re-raises a publish error
            return False
        if lost.done():
            error = None if lost.cancelled() else lost.exception()
            reason = error.__cause__ if error is not None and error.__cause__ is not None else error
            raise _ConnectionLost(f"connection lost ({reason})" if reason else "connection lost") from None
        return True


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel `task` and wait until it has really ended.

    Cancelling once is not enough on Python 3.11: `asyncio.wait_for`, which aiomqtt uses to wait
    for a PUBACK, returns the result and drops the cancellation when both arrive in the same loop
    iteration (fixed in 3.12), and the publishing task would then carry on and wait for the next
    outbox message forever. So cancel again until the task is done.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)


def _confirmed_prefix(ids: list[int], sends: Sequence[asyncio.Future[None]]) -> list[int]:
    """The ids whose sends all succeeded, up to the first that did not; the unfinished rest is
    cancelled (it goes out again on the next connection, where QoS 1 allows the duplicate)."""
    prefix: list[int] = []
    for row_id, send in zip(ids, sends, strict=True):
        if not send.done() or send.cancelled() or send.exception() is not None:
            break
        prefix.append(row_id)
    for send in sends:
        send.cancel()
        send.add_done_callback(_retrieve)
    return prefix


def _retrieve(task: asyncio.Future[None]) -> None:
    """Mark a watcher's exception as seen when nobody else needed it (no asyncio warning)."""
    if not task.cancelled():
        task.exception()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text
