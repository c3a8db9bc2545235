"""Cambrionix CLI framing and commands, without I/O.

The hub speaks a terminal protocol meant for humans (CLI-MAN §2): it echoes what it receives,
answers with CRLF-terminated lines, and ends every reply with the prompt `>> ` (`boot>> ` in boot
mode) rather than with a length or a terminator byte. Nothing in a reply says which command it
answers, so a client must keep exactly one command in flight and must recognise the prompt to know a
reply is complete. This module does both halves of that without touching a file descriptor:
`encode_command` turns a command into wire bytes, and `ResponseReader` turns whatever bytes arrive,
in whatever chunks, into complete `Response`s. Reply *contents* are parsed in `parsing.py`.

Everything here is deliberately forgiving about the hub's output (ANSI escapes at boot, a blank line
before the prompt on old firmware, `\n` instead of `\r\n`, line noise) and strict about what it
sends (always `\r\n`; a bare `\r` is reported to wedge real hubs).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

ETX = b"\x03"
"""Ctrl-C: cancels a partial command line and makes the hub print a fresh prompt (CLI-MAN §2.4)."""

EOL = b"\r\n"
"""Commands must end with CR LF; replies use it too."""

BAUD = 115200
WIRE_BYTES_PER_SECOND = BAUD / 10
"""8N1 sends 10 bits per byte, so 115200 baud moves at most 11520 bytes per second each way."""

MAX_LINE = 4096
"""A reply line longer than this is noise (the longest real line, `id`, is under 100 characters)."""


class CambrionixParseError(ValueError):
    """The one exception reply parsing raises: the hub's text does not have the documented shape.

    Parsers never let anything else escape (no IndexError, no bare ValueError), which the hypothesis
    tests check with arbitrary bytes and mutated real lines; callers catch exactly this."""


class CambrionixError(Exception):
    """The hub refused a command: `*Ennn: text` or, for fatal errors, `*FATAL ERROR Ennn: text`.

    A fatal error means the hub will only accept ETX or CR next and then drops into boot mode, so a
    driver must treat it differently from an ordinary refusal (CLI-MAN §6.1)."""

    def __init__(self, code: int, text: str, *, fatal: bool = False) -> None:
        self.code = code
        self.text = text
        self.fatal = fatal
        prefix = "FATAL ERROR " if fatal else ""
        super().__init__(f"*{prefix}E{code:03d}: {text}")


class ErrorCode(enum.IntEnum):
    """Error numbers from CLI-MAN §6 (the manual prefixes every name with `ERR_`)."""

    COMMAND_NOT_RECOGNISED = 400
    EXTRANEOUS_PARAMETER = 401
    INVALID_PARAMETER = 402
    WRONG_PASSWORD = 403
    MISSING_PARAMETER = 404
    SMBUS_READ_ERR = 405
    SMBUS_WRITE_ERR = 406
    UNKNOWN_PROFILE_ID = 407
    PROFILE_LIST_TOO_LONG = 408
    MISSING_PROFILE_ID = 409
    INVALID_PORT_NUMBER = 410
    MALFORMED_HEXADECIMAL = 411
    BAD_HEX_DIGIT = 412
    MALFORMED_BINARY = 413
    BAD_BINARY_DIGIT = 414
    BAD_DECIMAL_DIGIT = 415
    OUT_OF_RANGE = 416
    ADDRESS_TOO_LONG = 417
    MISSING_PASSWORD = 418
    MISSING_PORT_NUMBER = 419
    MISSING_MODE_CHAR = 420
    INVALID_MODE_CHAR = 421
    MODE_CHANGE_SYS_ERR_FLAG = 422
    CONSOLE_MODE_NOT_REMOTE = 423
    PARAMETER_TOO_LONG = 424
    BAD_LED_PATTERN = 425
    BAD_ERROR_FLAG = 426
    INVALID_BOOTLOADER_COMMAND = 900


_ERROR_LINE = re.compile(r"^\*(FATAL ERROR\s+)?E(\d{3})\s*:\s*(.*)$")


def parse_error_line(line: str) -> CambrionixError | None:
    """The error a reply line reports, or None if the line is not an error line."""
    match = _ERROR_LINE.match(line.strip())
    if match is None:
        return None
    return CambrionixError(int(match.group(2)), match.group(3).strip(), fatal=match.group(1) is not None)


class Prompt(enum.StrEnum):
    """How a reply ended, which tells the driver which mode the hub is in."""

    MAIN = ">> "
    BOOT = "boot>> "


@dataclass(frozen=True, slots=True)
class Response:
    """One complete reply: its text lines (echo, blank lines and escapes removed) and its prompt."""

    lines: tuple[str, ...]
    prompt: Prompt

    @property
    def error(self) -> CambrionixError | None:
        """The first error line in the reply, if any (a refusal is never mixed with data)."""
        for line in self.lines:
            error = parse_error_line(line)
            if error is not None:
                return error
        return None

    def raise_for_error(self) -> Response:
        """Raise the reply's `CambrionixError`, else return the reply for chaining."""
        error = self.error
        if error is not None:
            raise error
        return self


# ESC [ params intermediates final (CSI), or ESC followed by one byte (e.g. ESC c = full reset).
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_a-z]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_line(raw: str) -> str:
    """A received line without ANSI escapes, control characters and surrounding whitespace."""
    return _CONTROL.sub("", _ANSI.sub("", raw)).strip()


class ResponseReader:
    """Incremental reply splitter: `feed` it bytes as they arrive, get complete `Response`s back.

    Tell it the command just sent (`expect`) so the first echoed copy can be dropped; the hub echoes
    every character it receives, CR and LF included. A reply is complete when the text after the
    last newline ends in `>> ` - the prompt is never followed by a newline, because the hub waits for
    the next command on that same line. Overlong lines are dropped and counted in `discarded` so the
    driver can log line noise without the reader growing without bound.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._echo: str | None = None
        self.discarded: list[str] = []

    def expect(self, command: str | None) -> list[str]:
        """Start a new reply; `command` is the line about to be written (its echo is not reply
        text). Returns complete lines that arrived since the last reply without a prompt (e.g. a
        spontaneous `*FATAL ERROR`), so the caller can log them rather than lose them."""
        stale = list(self._lines)
        self._lines.clear()
        self._echo = command.strip() if command else None
        return stale

    def reset(self) -> None:
        """Forget everything buffered (after a resync the old bytes mean nothing)."""
        self._buffer.clear()
        self._lines.clear()
        self._echo = None

    def feed(self, data: bytes) -> list[Response]:
        """Consume `data`; return every reply it completed (normally zero or one)."""
        self._buffer.extend(data)
        responses: list[Response] = []
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                break
            raw = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
            self._add_line(raw)
        prompt = self._tail_prompt()
        if prompt is not None:
            responses.append(Response(tuple(self._lines), prompt))
            self._lines.clear()
            self._echo = None
        elif len(self._buffer) > MAX_LINE:
            self.discarded.append(_decode(bytes(self._buffer[:80])) + "...")
            self._buffer.clear()
        return responses

    def _add_line(self, raw: bytes) -> None:
        if len(raw) > MAX_LINE:
            self.discarded.append(_decode(raw[:80]) + "...")
            return
        line = clean_line(_decode(raw))
        if not line:
            return
        if self._echo is not None and line == self._echo:
            self._echo = None  # only the first copy is the echo; later identical lines are data
            return
        self._lines.append(line)

    def _tail_prompt(self) -> Prompt | None:
        """The prompt that ends the unterminated tail of the buffer, consuming it, if there is one."""
        if not self._buffer.endswith(b">> "):
            return None
        tail = _CONTROL.sub("", _ANSI.sub("", _decode(bytes(self._buffer))))
        self._buffer.clear()
        before, _, _ = tail.rpartition(">> ")
        before = before.strip()
        if before.endswith("boot"):
            before = before[: -len("boot")].strip()
            prompt = Prompt.BOOT
        else:
            prompt = Prompt.MAIN
        if before:  # text glued to the prompt: noise (or an echo after ETX); keep it visible
            self._lines.append(before)
        return prompt


def _decode(raw: bytes) -> str:
    return raw.decode("ascii", errors="replace")


# --- commands -----------------------------------------------------------------------------------


class ModeChar(enum.StrEnum):
    """`mode` letters (CLI-MAN §3.15). PDSync/TS3-C10 firmware only knows `c` (on: sync and charge)
    and `o`."""

    CHARGE = "c"
    SYNC = "s"
    BIASED = "b"
    OFF = "o"


class HostMode(enum.StrEnum):
    AUTO = "auto"
    MANUAL = "manual"  # Universal firmware
    OFF = "off"  # PDSync / TS3-C10 firmware


class ErrorFlag(enum.StrEnum):
    """`sef` flags: under/over-voltage per rail and over-temperature (CLI-MAN §3.18)."""

    UV3 = "3UV"
    OV3 = "3OV"
    UV5 = "5UV"
    OV5 = "5OV"
    UV12 = "12UV"
    OV12 = "12OV"
    OT = "OT"


class LedControl(enum.StrEnum):
    """`ledb` suffix: H takes the LED over from the firmware, R hands it back."""

    HOLD = "H"
    RELEASE = "R"


def _port(port: int) -> str:
    if port < 0:
        raise ValueError(f"port must be >= 0, got {port}")
    return str(port)


def state(port: int | None = None) -> str:
    return "state" if port is None else f"state {_port(port)}"


def mode(char: ModeChar, port: int | None = None, profile: int | None = None) -> str:
    """`mode m [p] [cp]`; a profile is only valid for one port in charge mode (CLI-MAN §3.15)."""
    if profile is not None and (port is None or char is not ModeChar.CHARGE):
        raise ValueError("a charge profile needs a single port in charge mode")
    if profile is not None and not 0 <= profile <= 6:
        raise ValueError(f"charge profile must be 0..6, got {profile}")
    parts = ["mode", char.value]
    if port is not None:
        parts.append(_port(port))
    if profile is not None:
        parts.append(str(profile))
    return " ".join(parts)


def sef(flags: tuple[ErrorFlag, ...] = ()) -> str:
    return " ".join(["sef", *(f.value for f in flags)])


def reboot(watchdog: bool = False) -> str:
    return "reboot watchdog" if watchdog else "reboot"


def host(new_mode: HostMode | None = None) -> str:
    return "host" if new_mode is None else f"host {new_mode.value}"


def ledb(port: int, row: int, pattern: int, control: LedControl | None = None) -> str:
    """`ledb port row ptn [H|R]`: `pattern` is 8 bits, one per eighth of the flash cycle."""
    if not 0 <= pattern <= 255:
        raise ValueError(f"LED pattern must be one byte, got {pattern}")
    parts = ["ledb", _port(port), str(row), str(pattern)]
    if control is not None:
        parts.append(control.value)
    return " ".join(parts)


def leds(row: int, patterns: str) -> str:
    """`leds row ptnstr`: one pattern character per port (0 1 f m s p d x; x leaves a port alone)."""
    if not patterns or any(c not in "01fmspdxOCFMSPD" for c in patterns):
        raise ValueError(f"bad LED pattern string {patterns!r}")
    return f"leds {row} {patterns}"


ID = "id"
SYSTEM = "system"
HEALTH = "health"
LIMITS = "limits"
BD = "bd"
CRF = "crf"
CEF = "cef"
CLS = "cls"
REMOTE = "remote"
REMOTE_EXIT = "remote exit"


def encode_command(command: str) -> bytes:
    """Wire bytes for one command line: ASCII plus CR LF. Control characters are refused because a
    stray CR, LF or ETX inside a command would split it or cancel it on the hub."""
    if any(ch in command for ch in "\r\n\x03") or not command.isascii() or not command.strip():
        raise ValueError(f"not a single command line: {command!r}")
    return command.encode("ascii") + EOL
