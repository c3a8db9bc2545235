"""`benchhub watch`: the live board of one station, or of every station on a broker, from MQTT alone.

The board is built from what any dashboard sees, not from the station's database, so it works from
anywhere the broker's ACL lets a reader in (a laptop, a wall screen, another site), needs no login
on the station and cannot change anything: the watcher only subscribes.

Three things make a correct board from a broker:

- Retained messages give the current state of every port at once on connect, so `--once` just
  waits until they have stopped arriving (the broker sends them in one burst after SUBACK; later
  messages are live ones, which the broker delivers with the retain flag cleared).
- `seq` in the state document orders a port's states: the station republishes its snapshot on
  every reconnect and QoS 1 may deliver twice, so an older document arriving after a newer one is
  dropped instead of moving the board backwards.
- What arrives is untrusted: a malformed payload (someone's test publish, a future format) is
  skipped with a debug log line, never an exception, because one bad message must not blind the
  board to the good ones.

Only the three topics the board shows are subscribed (station status, hub status, port state
documents), not `…/#`: events and the scalar mirrors would triple the traffic over a slow link
and add nothing the state document does not say.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import ssl
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final, TextIO

import aiomqtt
import pydantic
import structlog

from daemon.backoff import backoff_delay
from daemon.board import redraw
from daemon.board import render as render_ports
from daemon.config import ConfigError, MqttConfig, TlsConfig, read_secret
from daemon.logs import configure_logging
from daemon.models import DeviceIdentity, ErrorInfo, PortRef, PortState, Queued, iso, utcnow
from daemon.mqtt.publisher import tls_context
from daemon.workflow.phases import Phase

log = structlog.get_logger("benchhub.watch")

SETTLE_SECONDS: Final = 0.5
"""`--once`: the retained burst is over when no retained message came for this long."""
ONCE_LIMIT_SECONDS: Final = 10.0
"""`--once`: print whatever arrived after this long, even if retained messages keep coming."""
CALL_TIMEOUT: Final = 10.0
"""Seconds to wait for CONNACK and SUBACK."""
REDRAW_MIN: Final = 0.25
"""Live board: at most this often after a change (a retained burst is one redraw, not hundreds)."""
REDRAW_TICK: Final = 1.0
"""Live board: redraw at least this often, so the TIME column keeps counting."""

UNCUT: Final = 1000
"""Row width when the board goes to a file or pipe: nothing is cut off a line a script reads."""

_STATION: Final = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_STATUSES: Final = frozenset({"online", "offline"})


# ------------------------------------------------------------------------------ the board


@dataclass(slots=True)
class StationView:
    """What the broker says about one station: its own status, its hubs' and its ports'."""

    status: str | None = None
    """`online` / `offline`, or None when the station never said (no retained status)."""
    hubs: dict[str, str] = field(default_factory=dict)
    ports: dict[PortRef, PortState] = field(default_factory=dict)


class Board:
    """The watcher's model, fed one MQTT message at a time; rendering reuses `daemon.board`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.stations: dict[str, StationView] = {}

    def apply(self, topic: str, payload: bytes) -> bool:
        """Take one message; True if the board changed. Topics the board does not show are
        ignored; malformed payloads and states older than the one shown are skipped."""
        if not topic.startswith(self.prefix + "/"):
            return False
        parts = topic[len(self.prefix) + 1 :].split("/")
        try:
            match parts:
                case [station, "status"]:
                    return self._station_status(station, _status_word(payload))
                case [station, "hub", hub, "status"]:
                    return self._hub_status(station, hub, _status_word(payload))
                case [station, "hub", hub, "port", number, "state"]:
                    ref = PortRef(hub, _port_number(number))
                    return self._port_state(station, parse_state(ref, payload))
                case _:
                    return False
        except ValueError as exc:
            log.debug("watch_payload_skipped", topic=topic, reason=str(exc), size=len(payload))
            return False

    def _view(self, station: str) -> StationView:
        return self.stations.setdefault(station, StationView())

    def _station_status(self, station: str, status: str) -> bool:
        view = self._view(station)
        changed = view.status != status
        view.status = status
        return changed

    def _hub_status(self, station: str, hub: str, status: str) -> bool:
        view = self._view(station)
        changed = view.hubs.get(hub) != status
        view.hubs[hub] = status
        return changed

    def _port_state(self, station: str, state: PortState) -> bool:
        view = self._view(station)
        shown = view.ports.get(state.ref)
        if shown is not None and state.seq <= shown.seq:
            # Equal: the snapshot repeating what we have (or a QoS 1 duplicate); lower: late.
            if state.seq < shown.seq:
                log.debug(
                    "watch_stale_state", station=station, port=str(state.ref), seq=state.seq, shown=shown.seq
                )
            return False
        view.ports[state.ref] = state
        return True

    def render(self, *, now: datetime | None = None, color: bool = False, width: int = 120) -> str:
        """One block per station: a status line, then the same table `benchhub status` prints
        (rows cut at `width`: the terminal's on screen, wider when printed to a file)."""
        if not self.stations:
            return f"no station has published under {self.prefix}/ (yet)"
        blocks = []
        for station, view in sorted(self.stations.items()):
            hubs = ", ".join(f"{hub} {status}" for hub, status in sorted(view.hubs.items()))
            line = f"station {station}: {view.status or 'status unknown'}   hubs: {hubs or 'none reported'}"
            states = [view.ports[ref] for ref in sorted(view.ports)]
            blocks.append(line + "\n\n" + render_ports(states, now=now, color=color, width=width))
        return "\n\n".join(blocks)


def _status_word(payload: bytes) -> str:
    word = payload.decode("utf-8").strip()  # UnicodeDecodeError is a ValueError
    if word not in _STATUSES:
        raise ValueError(f"status {word[:20]!r} is neither online nor offline")
    return word


def _port_number(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"port {text[:20]!r} is not a number")
    return int(text)


def parse_state(ref: PortRef, payload: bytes) -> PortState:
    """The state document (docs/mqtt.md) back into a `PortState`; ValueError if it is not one.

    The location comes from the topic (the schema's rule); a document naming another port is
    refused rather than shown on the wrong row.
    """
    doc = json.loads(payload)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if (doc.get("hub", ref.hub), doc.get("port", ref.port)) != (ref.hub, ref.port):
        raise ValueError(f"document for {doc.get('hub')}/{doc.get('port')} on the topic of {ref}")
    seq = _integer(doc, "seq", required=True)
    error = doc.get("error")
    if error is not None and not (
        isinstance(error, dict)
        and isinstance(error.get("code"), str)
        and isinstance(error.get("message"), str)
    ):
        raise ValueError("error is not {code, message}")
    device_fields = {key: _text(doc, key) for key in ("udid", "ecid", "serial", "model", "ios")}
    device = (
        DeviceIdentity(
            udid=device_fields["udid"],
            ecid=device_fields["ecid"],
            serial=device_fields["serial"],
            product_type=device_fields["model"],
            ios_version=device_fields["ios"],
        )
        if any(device_fields.values())
        else None
    )
    updated = _timestamp(doc, "ts") or utcnow()
    return PortState(
        ref=ref,
        phase=Phase(_text(doc, "phase") or ""),  # ValueError for a missing or unknown phase
        step=_text(doc, "step"),
        progress=_integer(doc, "progress"),
        device=device,
        attempt=_integer(doc, "attempt") or 0,
        error=ErrorInfo(error["code"], error["message"]) if error is not None else None,
        since=_timestamp(doc, "since") or updated,
        seq=seq if seq is not None else 0,
        updated=updated,
        detail=_text(doc, "detail"),
        queue=_queue(doc),
    )


def _queue(doc: dict[str, Any]) -> Queued | None:
    value = doc.get("queue")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("queue is not an object")
    position, busy, capacity = (
        _integer(value, key, required=True) for key in ("position", "busy", "capacity")
    )
    resource = _text(value, "resource")
    if position is None or busy is None or capacity is None or resource is None:
        raise ValueError("queue lacks position, resource, busy or capacity")
    return Queued(position, resource, busy, capacity)


def _integer(doc: dict[str, Any], key: str, *, required: bool = False) -> int | None:
    value = doc.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key} is not an integer")
    return value


def _text(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key} is not a string")
    return value


def _timestamp(doc: dict[str, Any], key: str) -> datetime | None:
    value = _text(doc, key)
    if value is None:
        return None
    ts = datetime.fromisoformat(value)
    if ts.tzinfo is None:
        raise ValueError(f"{key} has no time zone")
    return ts


# ------------------------------------------------------------------------------ the connection


@dataclass(frozen=True, slots=True)
class WatchTarget:
    """Where to watch and as whom; the password is read from its file before we get here."""

    config: MqttConfig
    station: str = "+"
    password: str | None = field(default=None, repr=False)

    @property
    def filters(self) -> list[str]:
        base = f"{self.config.prefix}/{self.station}"
        return [f"{base}/status", f"{base}/hub/+/status", f"{base}/hub/+/port/+/state"]

    @property
    def description(self) -> str:
        host, port = self.config.host_port()
        scheme = "mqtts" if self.config.use_tls else "mqtt"
        which = "every station" if self.station == "+" else f"station {self.station}"
        return f"{which} on {scheme}://{host}:{port} ({self.config.prefix}/)"


def watch_target(
    url: str,
    *,
    station: str = "+",
    prefix: str = "benchhub",
    username: str | None = None,
    password_file: Path | None = None,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> WatchTarget:
    """Validate the command line the way the station validates its config (same URL rules, same
    secret files: a path or `credential:NAME`); ConfigError with one line per problem."""
    problems = []
    if station != "+" and not _STATION.match(station):
        problems.append(f"--station {station!r}: a station id ([a-z0-9-]) or + for every station")
    if password_file is not None and not username:
        problems.append("--password-file needs --username")
    if (cert_file is None) != (key_file is None):
        problems.append("--cert-file and --key-file go together")
    config: MqttConfig | None = None
    try:
        tls = (
            TlsConfig(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
            if (ca_file or cert_file)
            else None
        )
        config = MqttConfig(url=url, prefix=prefix, username=username or "", tls=tls)
    except pydantic.ValidationError as exc:
        flags = {"url": "--mqtt", "prefix": "--prefix"}
        for error in exc.errors():
            where = str(error["loc"][0]) if error["loc"] else ""
            message = str(error["msg"]).removeprefix("Value error, ")
            if where in flags:
                problems.append(f"{flags[where]}: {message}")
            elif not problems:
                problems.append(message)
    if config is not None and config.embedded:
        problems.append("--mqtt: the broker's address, mqtt://host[:port] or mqtts://host[:port]")
    if problems or config is None:
        raise ConfigError(problems)
    password = read_secret(password_file) if password_file is not None else None
    return WatchTarget(config, station, password)


def _client(target: WatchTarget, context: ssl.SSLContext | None) -> aiomqtt.Client:
    host, port = target.config.host_port()
    return aiomqtt.Client(
        host,
        port,
        identifier=f"benchhub-watch-{uuid.uuid4().hex[:12]}",  # many watchers may run at once
        username=target.config.username or None,
        password=target.password,
        tls_context=context,
        clean_session=True,  # a watcher has nothing to resume; retained messages are the state
        timeout=CALL_TIMEOUT,
    )


async def _tls(target: WatchTarget) -> ssl.SSLContext | None:
    if not target.config.use_tls:
        return None
    return await asyncio.to_thread(tls_context, target.config.tls)  # reads files: off the loop


async def snapshot(target: WatchTarget, *, settle: float = SETTLE_SECONDS) -> Board:
    """Connect, collect the retained messages until they settle, disconnect (`--once`).

    Raises aiomqtt.MqttError (or OSError/ssl.SSLError) if the broker cannot be reached or refuses.
    """
    board = Board(target.config.prefix)
    loop = asyncio.get_running_loop()
    async with _client(target, await _tls(target)) as client:
        await client.subscribe([(f, 1) for f in target.filters])
        started = last_retained = loop.time()
        messages = client.messages
        while True:
            now = loop.time()
            wait = min(last_retained + settle, started + ONCE_LIMIT_SECONDS) - now
            if wait <= 0:
                break
            try:
                async with asyncio.timeout(wait):
                    message = await anext(messages)
            except TimeoutError:
                break
            if isinstance(message.payload, bytes):
                board.apply(message.topic.value, message.payload)
            if message.retain:
                last_retained = loop.time()
    return board


async def watch_live(target: WatchTarget, out: TextIO, *, terminal: bool) -> None:
    """Show the board until cancelled, redrawn in place on a terminal (appended otherwise),
    reconnecting with backoff; what was known stays on screen, marked, while disconnected."""
    board = Board(target.config.prefix)
    context = await _tls(target)
    tries = 0
    connection = "connecting"

    def draw() -> None:
        header = f"benchhub watch: {target.description}, {connection}    {iso(utcnow())}"
        if terminal:
            width = shutil.get_terminal_size().columns
            redraw(out, header + "    Ctrl-C to stop\n\n" + board.render(color=True, width=width))
        else:
            out.write(header + "\n\n" + board.render(width=UNCUT) + "\n\n")
            out.flush()

    while True:
        try:
            async with _client(target, context) as client:
                await client.subscribe([(f, 1) for f in target.filters])
                tries, connection = 0, "connected"
                await _follow(
                    client,
                    board,
                    draw,
                    throttle=REDRAW_MIN if terminal else REDRAW_TICK,
                    tick=REDRAW_TICK if terminal else None,
                )
        except (aiomqtt.MqttError, OSError) as exc:  # ssl.SSLError is an OSError
            delay = backoff_delay(tries)
            tries += 1
            connection = f"disconnected ({exc}), retrying in {delay:.0f} s"
            log.debug("watch_connection_lost", error=str(exc), retry_in=round(delay, 1))
            draw()
            await asyncio.sleep(delay)


async def _follow(
    client: aiomqtt.Client, board: Board, draw: Callable[[], None], *, throttle: float, tick: float | None
) -> None:
    """Apply messages and redraw: `throttle` s after a change at the earliest (a retained burst is
    one redraw, not hundreds), and every `tick` s even without one (None: only on changes)."""
    loop = asyncio.get_running_loop()
    draw()
    last_draw, dirty = loop.time(), False
    messages = client.messages
    while True:
        if dirty:
            due: float | None = last_draw + throttle
        else:
            due = last_draw + tick if tick is not None else None
        try:
            async with asyncio.timeout(None if due is None else max(0.0, due - loop.time())):
                message = await anext(messages)
            if isinstance(message.payload, bytes):
                dirty = board.apply(message.topic.value, message.payload) or dirty
        except TimeoutError:
            pass
        if due is not None and loop.time() >= due:
            draw()
            last_draw, dirty = loop.time(), False


# ------------------------------------------------------------------------------ the command


def watch_command(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`benchhub watch`: 0 after `--once` printed the board (or on Ctrl-C), 1 if the broker could
    not be reached with `--once` or a TLS file cannot be loaded; a bad command line raises
    ConfigError (exit 2 in cli.main)."""
    out, err = out or sys.stdout, err or sys.stderr
    configure_logging("debug" if args.verbose else "warning", "console")
    target = watch_target(
        args.mqtt,
        station=args.station,
        prefix=args.prefix,
        username=args.username,
        password_file=args.password_file,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
    )
    try:
        if not args.once:
            asyncio.run(watch_live(target, out, terminal=out.isatty()))  # until Ctrl-C
            return 0
        board = asyncio.run(snapshot(target))
    except (aiomqtt.MqttError, OSError) as exc:
        # --once: the broker's refusal or absence. Live mode retries those; what reaches here is a
        # TLS file that cannot be loaded, which no retry mends.
        err.write(f"benchhub: cannot watch {target.description}: {exc}\n")
        return 1
    out.write(board.render(width=UNCUT if not out.isatty() else shutil.get_terminal_size().columns) + "\n")
    return 0
