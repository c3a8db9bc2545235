"""The Cambrionix CLI as a state machine: bytes in, bytes out, no I/O and no clock of its own.

`simulator.py` wires this to a pseudo-terminal; tests can also drive it directly. Every input byte is
handled the way the hub's terminal does (CLI-MAN §2, hubs.md §1.4/§5): echoed (CR and LF included),
collected into a line, and executed on LF - a bare CR is not enough, which is how real hubs wedge
clients that send only `\r`. Replies are CRLF lines followed by `>> `. ETX drops the partial line.
A fatal error leaves only ETX/CR working, and those drop the hub into boot mode (`boot>> `) until
`reboot`. Things that take time (a reboot) are reported through `next_deadline`/`due_output`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from hubdrivers.cambrionix.models import ModelSpec
from hubdrivers.cambrionix.protocol import ErrorFlag, ModeChar
from hubdrivers.cambrionix.sim_ports import DeviceBehaviour, SimPort, pd_host_row, pd_row, universal_row

ANSI_RESET = "\x1bc\x1b[0m\x1b[2J\x1b[H"
"""What the simulator sends at boot and on `cls`; the real bytes are undocumented (hubs.md §6)."""

MODE_WORDS = {"c": "c", "charge": "c", "s": "s", "sync": "s", "b": "b", "biased": "b", "o": "o", "off": "o"}
E421_TEXT = "Invalid mode. Expected: c (charge), s (sync), b (biassed), or o (off)"
_LED_PATTERN = re.compile(r"^(?:(\d{1,3})|([0-9a-fA-F]{1,2})h|([01]{1,8})b)$")


class HubState(enum.StrEnum):
    MAIN = "main"
    BOOT = "boot"  # bootloader prompt; only `reboot` works
    FATAL = "fatal"  # after a fatal error: only ETX and CR are read
    REBOOTING = "rebooting"  # silent until the deadline
    WEDGED = "wedged"  # test fault: reads nothing, says nothing


@dataclass(slots=True)
class SimConfig:
    blank_line_before_prompt: bool = False  # old firmware printed `\r\n\r\n>> ` (MBED capture)
    port_reset_s: float = 0.4  # `set_delays` default port_reset_delay_ms
    reboot_s: float = 0.5  # real hubs take ~3-6 s; tests want less
    latch_uv: bool = False  # PJAAKO: `cef` clears OV but not UV on a U16S
    serial: str = "000000"
    compiled: str = "Feb 14 2017 17:30:26"
    rail_volts: dict[str, float] = field(default_factory=lambda: {"5V": 5.23, "12V": 12.10, "3V": 3.30})
    temperature_c: float = 37.4


@dataclass(slots=True)
class Executed:
    """Result of `receive`: output bytes and how many command lines ran (for overlap checks)."""

    output: bytes
    commands: int


class HubEngine:
    """One simulated hub. Call `receive` with client bytes and the current simulator time."""

    def __init__(self, model: ModelSpec, config: SimConfig | None = None, now: float = 0.0) -> None:
        self.model = model
        self.config = config or SimConfig()
        self.ports = [SimPort(n) for n in range(1, model.ports + 1)]
        self.state = HubState.MAIN
        self.error_flags: set[ErrorFlag] = set()
        self.rebooted = True
        self.armed = False
        self.host_present = True
        self.host_mode = "auto"
        self.remote = False
        self.boot_time = now
        self.on_mode_change: Callable[[int, ModeChar], None] | None = None
        self.violations: list[str] = []
        self._line = bytearray()
        self._deadline: float | None = None
        self._swallow_lf = False
        self._power_on(now)

    # --- world and fault API ---------------------------------------------------------------------

    def attach(self, port: int, device: DeviceBehaviour, now: float) -> None:
        self.ports[port - 1].attach(device, now)

    def detach(self, port: int, now: float) -> None:
        self.ports[port - 1].detach(now, armed=self.armed)

    def set_port_error(self, port: int, on: bool) -> None:
        self.ports[port - 1].port_error = on

    def fatal(self, code: int = 500, text: str = "Internal error") -> bytes:
        self.state = HubState.FATAL
        self._line.clear()
        return f"\r\n*FATAL ERROR E{code:03d}: {text}\r\n".encode()

    def wedge(self, on: bool = True) -> None:
        self.state = HubState.WEDGED if on else HubState.MAIN

    # --- time ------------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._deadline

    def due_output(self, now: float) -> bytes:
        if self._deadline is None or now < self._deadline:
            return b""
        self._deadline = None
        self._power_on(now)
        return self._banner() + self._prompt()

    def _power_on(self, now: float) -> None:
        self.state = HubState.MAIN
        self.rebooted = True
        self.error_flags.clear()
        self.boot_time = now
        default = ModeChar.CHARGE if self.model.family.three_column_flags else ModeChar.SYNC
        for port in self.ports:
            port.set_mode(default, now, 0.0)
            port.theft = False
            port.leds.clear()
            port.energy_wh = 0.0
            port.session_start = now

    # --- bytes -----------------------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> Executed:
        out = bytearray()
        commands = 0
        for byte in data:
            state = self.state
            if state in (HubState.WEDGED, HubState.REBOOTING):
                continue
            if state is HubState.FATAL:
                if byte in (0x03, 0x0D):
                    self.state = HubState.BOOT
                    self._swallow_lf = byte == 0x0D
                    out += b"\r\n" + self._prompt()
                continue
            if byte == 0x0A and self._swallow_lf:
                self._swallow_lf = False
                continue
            self._swallow_lf = False
            if byte == 0x03:  # ETX: cancel the partial line, fresh prompt
                self._line.clear()
                out += b"\r\n" + self._prompt()
            elif byte == 0x0D:
                out += b"\r"
            elif byte == 0x0A:
                out += b"\n"
                commands += 1
                if commands == 2:
                    self.violations.append("second command arrived before the prompt of the first")
                line = self._line.decode("ascii", errors="replace")
                self._line.clear()
                out += self._run(line, now)
            elif 0x20 <= byte < 0x7F:
                out.append(byte)
                if len(self._line) < 256:
                    self._line.append(byte)
        return Executed(bytes(out), commands)

    def _prompt(self) -> bytes:
        return b"boot>> " if self.state is HubState.BOOT else b">> "

    def _banner(self) -> bytes:
        return f"{ANSI_RESET}\r\n{self.model.title}\r\n\r\n".encode()

    def _run(self, line: str, now: float) -> bytes:
        reply = self._execute(line.split(), now)
        if reply is None:  # rebooting: silence until the deadline
            return b""
        if isinstance(reply, bytes):
            return reply + self._prompt()
        text = "".join(f"{ln}\r\n" for ln in reply)
        if self.config.blank_line_before_prompt and self.state is HubState.MAIN:
            text += "\r\n"
        return text.encode() + self._prompt()

    # --- commands --------------------------------------------------------------------------------

    def _execute(self, argv: list[str], now: float) -> list[str] | bytes | None:
        if not argv:
            return []
        name, args = argv[0], argv[1:]
        if self.state is HubState.BOOT:
            if name == "reboot":
                return self._reboot(now, args)
            return ["*E900: Invalid bootloader command"]
        if name not in self.model.commands:
            return ["*E400: Command not recognised"]
        handler = getattr(self, f"_cmd_{name}", None)
        if handler is None:
            return ["*E400: Command not supported by the simulator"]
        result: list[str] | bytes | None = handler(args, now)
        return result

    def _reboot(self, now: float, args: list[str]) -> bytes | None:
        """Go silent; `due_output` prints the banner once the reboot time has passed."""
        self.state = HubState.REBOOTING
        self._deadline = now + self.config.reboot_s * (3 if args[:1] == ["watchdog"] else 1)
        return None

    def _cmd_reboot(self, args: list[str], now: float) -> bytes | None:
        return self._reboot(now, args)

    def _cmd_boot(self, args: list[str], now: float) -> list[str]:
        self.state = HubState.BOOT
        return []

    def _cmd_cls(self, args: list[str], now: float) -> bytes:
        return self._banner()

    def _cmd_beep(self, args: list[str], now: float) -> list[str]:
        return []

    def _cmd_help(self, args: list[str], now: float) -> list[str]:
        return [" ".join(sorted(self.model.commands))]

    def _port_arg(self, text: str) -> int | None:
        if text.isdigit() and 1 <= int(text) <= len(self.ports):
            return int(text)
        return None

    def _bad_port(self) -> list[str]:
        return [f"*E410: Port number must be 1..{len(self.ports)}"]

    def _cmd_state(self, args: list[str], now: float) -> list[str]:
        if len(args) > 1:
            return ["*E401: Extraneous parameter"]
        selected = self.ports
        if args:
            port = self._port_arg(args[0])
            if port is None:
                return self._bad_port()
            selected = [self.ports[port - 1]]
        readings = [p.reading(now) for p in selected]
        if self.model.family.three_column_flags:
            return ([pd_host_row(self.host_present)] if not args else []) + [pd_row(r) for r in readings]
        hub_error = bool(self.error_flags)
        return [universal_row(r, hub_error, self.rebooted) for r in readings]

    def _cmd_mode(self, args: list[str], now: float) -> list[str]:  # noqa: PLR0911 - one per error
        if not args:
            return ["*E420: Mode character expected"]
        letter = MODE_WORDS.get(args[0])
        if letter is None or letter not in self.model.mode_letters:
            return [f"*E421: {E421_TEXT}"]
        if len(args) > 3 or (len(args) == 3 and letter != "c"):
            return ["*E401: Extraneous parameter"]
        selected = self.ports
        if len(args) >= 2:
            number = self._port_arg(args[1])
            if number is None:
                return self._bad_port()
            selected = [self.ports[number - 1]]
        if len(args) == 3 and not (args[2].isdigit() and int(args[2]) <= 6):
            return ["*E407: Unknown profile ID"]
        if self.error_flags:
            return ["*E422: Refused: an error flag is set"]
        for port in selected:
            changed = port.mode is not ModeChar(letter)
            port.set_mode(ModeChar(letter), now, self.config.port_reset_s)
            if changed and self.on_mode_change is not None:
                self.on_mode_change(port.number, port.mode)
        return []

    def _cmd_id(self, args: list[str], now: float) -> list[str]:
        m = self.model
        return [
            f"mfr:cambrionix,mode:main,hw:{m.hardware},hwid:{m.hwid},fw:{m.firmware},bl:0.15,"
            f"sn:{self.config.serial},group:-,fc:{m.family.value}"
        ]

    def _cmd_system(self, args: list[str], now: float) -> list[str]:
        m = self.model
        return [
            m.title,
            f"Hardware: {m.hardware}",
            f"Firmware: {m.firmware}",
            f"Compiled: {self.config.compiled}",
            "Group: -",
            "Panel ID: Absent",
        ]

    def _cmd_bd(self, args: list[str], now: float) -> list[str]:
        return list(self.model.bd_lines())

    def _rail_flags(self, rail: str) -> str:
        prefix = rail.removesuffix("V")
        return " ".join(kind for kind in ("UV", "OV") if ErrorFlag(prefix + kind) in self.error_flags)

    def _cmd_health(self, args: list[str], now: float) -> list[str]:
        lines = [f"System up for:{int(now - self.boot_time):>10} seconds"]
        for rail in self.model.rails:
            volts = self.config.rail_volts.get(rail, 5.0)
            width = 8 if len(rail) == 2 else 6
            for what in ("Now", "Min", "Max"):
                lines.append(f"{rail} {what}:{volts:>{width}.2f}")
            lines.append(f"{rail} Flags: {self._rail_flags(rail)}".rstrip())
        if self.model.temperature:
            t = self.config.temperature_c
            shown = ">100" if t >= 100 else "<0.1" if t < 0.1 else f"{t:.1f}"
            lines += [f"Temperature Now (C): {shown}", f"Temperature Max (C): {shown}"]
            lines.append(f"Temperature Flags: {'OT' if ErrorFlag.OT in self.error_flags else ''}".rstrip())
            lines.append("PWM %: 0.0")
        lines.append(f"Rebooted flag: {'R' if self.rebooted else ''}".rstrip())
        return lines

    def _cmd_limits(self, args: list[str], now: float) -> list[str]:
        if self.model.limits_lines:
            return list(self.model.limits_lines)
        lines = [
            f"{rail} {what}:{value:>7.2f}"
            for rail in self.model.rails
            for what, value in (("Min", 4.50), ("Max", 5.58))
        ]
        return lines + (["Temperature (C): 75.0"] if self.model.temperature else [])

    def _cmd_crf(self, args: list[str], now: float) -> list[str]:
        self.rebooted = False
        return []

    def _cmd_cef(self, args: list[str], now: float) -> list[str]:
        keep = {f for f in self.error_flags if self.config.latch_uv and f.value.endswith("UV")}
        self.error_flags = keep
        return []

    def _cmd_sef(self, args: list[str], now: float) -> list[str]:
        flags: set[ErrorFlag] = set()
        for arg in args:
            try:
                flag = ErrorFlag(arg)
            except ValueError:
                return ["*E426: Bad error flag"]
            rail = arg.removesuffix("UV").removesuffix("OV") + "V"
            if flag is not ErrorFlag.OT and rail not in self.model.rails:
                return ["*E426: Bad error flag"]
            flags.add(flag)
        self.error_flags |= flags
        return []

    def _cmd_host(self, args: list[str], now: float) -> list[str]:
        if not args:
            return [f"Present: {'yes' if self.host_present else 'no'} Mode change: {self.host_mode}"]
        allowed = ("auto", "off") if self.model.family.three_column_flags else ("auto", "manual")
        if len(args) > 1 or args[0] not in allowed:
            return ["*E402: Invalid parameter"]
        self.host_mode = args[0]
        return []

    def _cmd_sec(self, args: list[str], now: float) -> list[str]:
        if not args:
            return ["armed" if self.armed else "disarmed"]
        if args not in (["arm"], ["disarm"]):
            return ["*E402: Invalid parameter"]
        self.armed = args[0] == "arm"
        if not self.armed:
            for port in self.ports:
                port.theft = False
        return []

    def _cmd_remote(self, args: list[str], now: float) -> list[str]:
        if args and args[0] not in ("exit", "kexit"):
            return ["*E402: Invalid parameter"]
        self.remote = not args
        return []

    def _cmd_ledb(self, args: list[str], now: float) -> list[str]:
        if len(args) not in (3, 4):
            return ["*E404: Missing parameter"] if len(args) < 3 else ["*E401: Extraneous parameter"]
        port = self._port_arg(args[0])
        if port is None:
            return self._bad_port()
        if args[1] not in ("1", "2", "3"):
            return ["*E416: Out of range"]
        match = _LED_PATTERN.match(args[2])
        if match is None or (match.group(1) is not None and int(match.group(1)) > 255):
            return ["*E425: Bad LED pattern"]
        if len(args) == 4 and args[3] not in ("H", "R"):
            return ["*E402: Invalid parameter"]
        dec, hexa, binary = match.groups()
        value = int(dec) if dec is not None else int(hexa, 16) if hexa is not None else int(binary, 2)
        leds = self.ports[port - 1].leds
        if args[3:] == ["R"]:
            leds.pop(int(args[1]), None)
        else:
            leds[int(args[1])] = value
        return []

    def _cmd_leds(self, args: list[str], now: float) -> list[str]:
        if len(args) != 2 or args[0] not in ("1", "2", "3"):
            return ["*E402: Invalid parameter"]
        codes = {"0": 0x00, "1": 0xFF, "f": 0xAA, "m": 0xCC, "s": 0xF0, "p": 0x3C, "d": 0xA0}
        if len(args[1]) > len(self.ports) or any(c.lower() not in codes and c != "x" for c in args[1]):
            return ["*E425: Bad LED pattern"]
        for port, char in zip(self.ports, args[1], strict=False):
            if char != "x":
                port.leds[int(args[0])] = codes[char.lower()]
        return []
