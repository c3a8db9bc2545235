"""The restore worker's event protocol: one JSON object per line on the worker's stdout.

A restore runs in a worker process (`daemon.ios.restore`, docs/restores.md says why); this module is
the language both sides speak. It is sans-IO: `encode` and `decode` turn events into bytes and back,
`EventDecoder` cuts a byte stream into lines, `TailBuffer` keeps the end of stderr. The process
transport (`daemon.ios.restore.ProcessRestorer`) and the workers (`daemon.ios.restore_worker`,
`daemon.sim.restore_worker`) only move bytes, so every parsing rule is tested without a process.

The wire format, version 1 (`"v": 1` in every line)::

    {"v":1,"event":"progress","step":"Flashing firmware","operation":"FLASH_FIRMWARE","percent":40}
    {"v":1,"event":"mode","mode":"recovery"}
    {"v":1,"event":"log","level":"info","message":"iBoot build-version=iBoot-11881.1.1"}
    {"v":1,"event":"touch","what":"enter_recovery"}
    {"v":1,"event":"result","ok":true}
    {"v":1,"event":"result","ok":false,"code":"tss_unreachable","message":"..."}

`touch` is the worker's promise "from here on the device is being changed": it is written *before*
the first command that changes the device (EnterRecovery, iBEC, iBSS). A restore that ends without
success before any `touch` failed cleanly; one that ends after it left the device in an unknown state
(still in Recovery, half-flashed, or fine) and the update step must look before it acts again.

A line that is not a valid event (a stray print from a library, a truncated line, an event type from
a newer worker) decodes to `Garbage`; the reader logs it and goes on. Nothing a worker writes can
crash the daemon.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import signal
import stat
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Final

from daemon.ios.base import DeviceMode

PROTOCOL_VERSION: Final = 1

MAX_LINE: Final = 64 * 1024
"""Longest line accepted (bytes, newline excluded). Longer ones are dropped as garbage, so a worker
that writes megabytes without a newline cannot make the daemon buffer them."""

MAX_TEXT: Final = 4000
"""Log messages and error messages are cut to this many characters on both sides of the wire."""


class RestoreCode(enum.StrEnum):
    """Why a restore did not succeed: stable vocabulary for the store, MQTT and the update step."""

    TSS_UNREACHABLE = "tss_unreachable"
    """Apple's signing server (gs.apple.com) could not be reached or answered nonsense."""
    TSS_REFUSED = "tss_refused"
    """TSS answered and refused: typically the firmware is no longer signed for this device."""
    NO_DEVICE = "no_device"
    """No device with this ECID was found in normal, Recovery or DFU mode."""
    DEVICE_GONE = "device_gone"
    """The device was found, then disappeared (unplugged, did not come back in the expected mode)."""
    USB_UNAVAILABLE = "usb_unavailable"
    """The host cannot do restores at all: no libusb backend for pyusb, no usbmuxd, no permission."""
    IPSW_INVALID = "ipsw_invalid"
    """The IPSW is missing, unreadable, or has no build identity for this device."""
    RESTORE_FAILED = "restore_failed"
    """The restore itself failed (restored reported an error status, a USB transfer failed, ...)."""
    WORKER_CRASHED = "worker_crashed"
    """The worker exited without a result (a crash, a kill from outside, an import error)."""
    TIMEOUT = "timeout"
    """The restorer's time limit ran out; the worker was killed."""
    CANCELLED = "cancelled"
    """The caller cancelled the restore; the worker was killed."""


WORKER_CODES: Final = frozenset(
    {
        RestoreCode.TSS_UNREACHABLE,
        RestoreCode.TSS_REFUSED,
        RestoreCode.NO_DEVICE,
        RestoreCode.DEVICE_GONE,
        RestoreCode.USB_UNAVAILABLE,
        RestoreCode.IPSW_INVALID,
        RestoreCode.RESTORE_FAILED,
        RestoreCode.CANCELLED,
    }
)
"""Codes a worker may put in its result; the rest are the restorer's own verdicts."""

RETRYABLE: Final = frozenset(
    {
        RestoreCode.TSS_UNREACHABLE,
        RestoreCode.NO_DEVICE,
        RestoreCode.DEVICE_GONE,
        RestoreCode.RESTORE_FAILED,
        RestoreCode.WORKER_CRASHED,
        RestoreCode.TIMEOUT,
    }
)
"""Worth another attempt. Field reports say most restore failures are USB trouble that a second try
on the same port survives; a refused signature, a bad IPSW or a host without libusb are not."""

LOG_LEVELS: Final = ("debug", "info", "warning", "error")


# ---------------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """The worker is at `step` (human words, shown on the board); `operation` is the machine name
    (pymobiledevice3's `PROGRESS_BAR_OPERATIONS` name such as `FLASH_FIRMWARE`, or the worker's own
    such as `tss`). `percent` is the progress *of this step*, None where the step reports none."""

    step: str
    operation: str | None = None
    percent: int | None = None


@dataclass(frozen=True, slots=True)
class ModeEvent:
    """The worker saw the device in this USB mode (normal, recovery, dfu, restore)."""

    mode: DeviceMode


@dataclass(frozen=True, slots=True)
class LogEvent:
    level: str
    message: str


@dataclass(frozen=True, slots=True)
class TouchEvent:
    """Sent before the first command that changes the device; `what` names that command."""

    what: str


@dataclass(frozen=True, slots=True)
class ResultEvent:
    """The worker's final word. `code` is None exactly when `ok`."""

    ok: bool
    code: RestoreCode | None = None
    message: str = ""

    def __post_init__(self) -> None:
        if self.ok != (self.code is None):
            raise ValueError("a result has a code exactly when it is not ok")


RestoreEvent = ProgressEvent | ModeEvent | LogEvent | TouchEvent | ResultEvent


@dataclass(frozen=True, slots=True)
class Garbage:
    """A line that is not an event: kept (shortened) for the log, with the reason."""

    line: str
    reason: str


class ProtocolError(ValueError):
    """A line is not a valid event."""


# ---------------------------------------------------------------------------------------- encode


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def encode(event: RestoreEvent) -> bytes:
    """One event as one line (UTF-8 JSON, ASCII-escaped, newline-terminated)."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION}
    match event:
        case ProgressEvent(step, operation, percent):
            body |= {"event": "progress", "step": step, "operation": operation, "percent": percent}
        case ModeEvent(mode):
            body |= {"event": "mode", "mode": mode.value}
        case LogEvent(level, message):
            body |= {"event": "log", "level": level, "message": _clip(message)}
        case TouchEvent(what):
            body |= {"event": "touch", "what": what}
        case ResultEvent(ok, code, message):
            body |= {"event": "result", "ok": ok}
            if code is not None:
                body |= {"code": code.value, "message": _clip(message)}
            elif message:
                body["message"] = _clip(message)
    return json.dumps(body, separators=(",", ":")).encode("ascii") + b"\n"


# ---------------------------------------------------------------------------------------- decode


def _str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{key!r} must be a string")
    return value


def _opt_str(body: dict[str, Any], key: str) -> str | None:
    return None if body.get(key) is None else _str(body, key)


def _percent(body: dict[str, Any]) -> int | None:
    value = body.get("percent")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise ProtocolError(f"percent must be an integer 0-100, not {value!r}")
    return value


def _reject_constant(name: str) -> float:
    raise ProtocolError(f"{name} is not JSON")


def _decode_progress(body: dict[str, Any]) -> RestoreEvent:
    return ProgressEvent(_str(body, "step"), _opt_str(body, "operation"), _percent(body))


def _decode_mode(body: dict[str, Any]) -> RestoreEvent:
    mode = _str(body, "mode")
    try:
        return ModeEvent(DeviceMode(mode))
    except ValueError:
        raise ProtocolError(f"unknown mode {mode!r}") from None


def _decode_log(body: dict[str, Any]) -> RestoreEvent:
    level = _str(body, "level")
    if level not in LOG_LEVELS:
        raise ProtocolError(f"unknown log level {level!r}")
    return LogEvent(level, _clip(_str(body, "message")))


def _decode_touch(body: dict[str, Any]) -> RestoreEvent:
    return TouchEvent(_str(body, "what"))


def _decode_result(body: dict[str, Any]) -> RestoreEvent:
    ok = body.get("ok")
    if not isinstance(ok, bool):
        raise ProtocolError("'ok' must be a boolean")
    message = _clip(_opt_str(body, "message") or "")
    if ok:
        return ResultEvent(True, None, message)
    raw = _str(body, "code")
    try:
        code = RestoreCode(raw)
    except ValueError:
        # A newer worker's code: still a failure, reported in our vocabulary, nothing lost.
        return ResultEvent(False, RestoreCode.RESTORE_FAILED, _clip(f"[{raw}] {message}"))
    if code not in WORKER_CODES:
        raise ProtocolError(f"a worker cannot report {code.value!r}")
    return ResultEvent(False, code, message)


_DECODERS: Final[dict[str, Callable[[dict[str, Any]], RestoreEvent]]] = {
    "progress": _decode_progress,
    "mode": _decode_mode,
    "log": _decode_log,
    "touch": _decode_touch,
    "result": _decode_result,
}


def decode(line: bytes | str) -> RestoreEvent:
    """One line (with or without its newline) to an event; `ProtocolError` if it is not one."""
    try:
        body = json.loads(line, parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("not a JSON object")
    if body.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"unknown protocol version {body.get('v')!r}")
    kind = body.get("event")
    decoder = _DECODERS.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise ProtocolError(f"unknown event {kind!r}")
    return decoder(body)


def _shown(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace")
    return text if len(text) <= 200 else text[:199] + "…"


class EventDecoder:
    """Bytes in (any chunking), events and `Garbage` out, in order. Bounded memory: a line longer
    than `max_line` is reported once as garbage and skipped up to its newline."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._max_line = max_line
        self._buffer = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[RestoreEvent | Garbage]:
        out: list[RestoreEvent | Garbage] = []
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if not self._skipping and len(self._buffer) > self._max_line:
                    out.append(Garbage(_shown(bytes(self._buffer[:200])), "line too long"))
                    self._skipping = True
                if self._skipping:
                    self._buffer.clear()
                return out
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._skipping:
                self._skipping = False
                continue
            out.extend(self._line(line))

    def finish(self) -> list[RestoreEvent | Garbage]:
        """End of stream: a last line without a newline still counts (a worker killed mid-write
        leaves a truncated line, which then decodes to garbage)."""
        line, skipping = bytes(self._buffer), self._skipping
        self._buffer.clear()
        self._skipping = False
        return [] if skipping else self._line(line)

    def _line(self, line: bytes) -> list[RestoreEvent | Garbage]:
        line = line.rstrip(b"\r")
        if not line.strip():
            return []
        if len(line) > self._max_line:
            return [Garbage(_shown(line[:200]), "line too long")]
        try:
            return [decode(line)]
        except ProtocolError as exc:
            return [Garbage(_shown(line), str(exc))]


class TailBuffer:
    """The last `limit` bytes of a stream (a worker's stderr: the traceback that explains a crash is
    at its end, and a chatty library must not fill the daemon's memory)."""

    def __init__(self, limit: int = 16 * 1024) -> None:
        self.limit = limit
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self.dropped = 0

    def append(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        while self._size > self.limit and self._chunks:
            excess = self._size - self.limit
            first = self._chunks[0]
            if len(first) <= excess:
                self._chunks.popleft()
                self._size -= len(first)
                self.dropped += len(first)
            else:
                self._chunks[0] = first[excess:]
                self._size -= excess
                self.dropped += excess

    def text(self) -> str:
        return b"".join(self._chunks).decode("utf-8", errors="replace")

    def last_lines(self, count: int = 3) -> str:
        lines = [line for line in self.text().splitlines() if line.strip()]
        return " | ".join(line.strip() for line in lines[-count:])


# ---------------------------------------------------------------------------------------- worker side


class EventWriter:
    """A worker's end: writes events to the stream it was given (normally the real stdout, see
    `claim_stdout`), one flushed line each, from any thread. If the daemon has gone away the writes
    fail; the writer then falls silent rather than raise into library callbacks (the parent watch
    in `watch_parent` ends the worker)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.broken = False

    def emit(self, event: RestoreEvent) -> None:
        self.write_raw(encode(event))

    def write_raw(self, data: bytes) -> None:
        with self._lock:
            if self.broken:
                return
            try:
                self._stream.write(data)
                self._stream.flush()
            except (OSError, ValueError):
                self.broken = True


def claim_stdout() -> BinaryIO:
    """Keep the real stdout for events and point file descriptor 1 (and `sys.stdout`) at stderr, so
    a stray `print`, a progress bar or a C library writing to stdout cannot corrupt the event
    stream: everything else ends up in the stderr tail the daemon keeps."""
    events_fd = os.dup(1)
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(events_fd, "wb", buffering=0)


def watch_parent() -> None:
    """End this worker and its process group when the daemon goes away.

    The daemon starts each worker in a session of its own (so that a kill reaches pyusb's threads
    and any children), which also means the worker does not die with the daemon. The daemon holds
    the write end of our stdin; when it exits, however abruptly, the kernel closes it and we read
    EOF. A restore nobody supervises must not go on: the restarted daemon would start another on the
    same device. Only armed when stdin is a pipe (not when a person runs the worker by hand)."""
    try:
        if not stat.S_ISFIFO(os.fstat(0).st_mode):
            return
    except OSError:
        return

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
