"""CambrionixDriver: one hub on its serial CLI, for the daemon's HubSupervisor.

Rules the hub imposes (CLI-MAN §2; hubs.md §1.4) and how this driver keeps them:

* One command at a time: the manual warns that overlapping commands can wedge the hub until a power
  cycle. Every exchange runs under one `asyncio.Lock`, and nothing is written until the previous
  reply's prompt has been read - concurrent callers simply queue.
* Replies have no framing besides the prompt, so after anything that leaves the conversation out of
  step (a timeout, a cancelled caller, a garbled line, opening a port someone else used) the driver
  *resyncs*: ETX cancels any partial line, then it reads until a prompt has arrived and the line has
  gone quiet, discarding late replies instead of mistaking them for the next command's.
* Boot mode (`boot>> `, e.g. after a fatal error) answers every command with *E900; the driver sends
  `reboot`, waits for the hub to come back, resyncs and retries the command once.
* `crf` is never sent on its own: the `R` flag (surfaced as PortAlarm.REBOOTED) is how the daemon
  learns that the hub rebooted and forgot port modes; clearing it here would hide that. The daemon
  calls `clear_rebooted_flag()` once it has re-applied its settings.

Link loss (EOF, EIO, port gone) becomes `HubError`; the driver is single-use and the supervisor
builds a new one. Garbage from the hub is logged on `hubdrivers.cambrionix` and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import ClassVar, TypeVar

import serial_asyncio_fast

from hubdrivers.base import Capability, HubDriver, HubError, HubInfo, LedPattern, PortMode, PortStatus
from hubdrivers.cambrionix import protocol
from hubdrivers.cambrionix.board import BoardDescription, parse_bd
from hubdrivers.cambrionix.info import (
    Health,
    HostInfo,
    IdInfo,
    SystemInfo,
    parse_health,
    parse_host,
    parse_id,
    parse_system,
)
from hubdrivers.cambrionix.models import ModelSpec, find_model
from hubdrivers.cambrionix.parsing import FirmwareFamily, parse_state
from hubdrivers.cambrionix.protocol import (
    BAUD,
    CambrionixError,
    CambrionixParseError,
    ModeChar,
    Prompt,
    Response,
    ResponseReader,
)

log = logging.getLogger("hubdrivers.cambrionix")

QUIET_S = 0.05
"""A resync is done when a prompt has arrived and then nothing for this long."""
ETX_RETRY_S = 1.0
LED_ROW = 1
"""`ledb` row used as the status light (1 = the "charged" LED; rows 2/3 keep their firmware meaning)."""
LED_PATTERNS = {
    LedPattern.OFF: 0b00000000,
    LedPattern.SOLID: 0b11111111,
    LedPattern.SLOW_BLINK: 0b11110000,
    LedPattern.FAST_BLINK: 0b10101010,
}
_UNIVERSAL_MODES = {
    PortMode.CHARGE: ModeChar.CHARGE,
    PortMode.SYNC: ModeChar.SYNC,
    PortMode.BIASED: ModeChar.BIASED,
    PortMode.OFF: ModeChar.OFF,
}
_PD_MODES = {PortMode.SYNC: ModeChar.CHARGE, PortMode.OFF: ModeChar.OFF}  # PD `c` = on: sync+charge


class CambrionixRefused(HubError):
    """The hub answered a command with `*Ennn`; `error.code` says why (e.g. 422: error flag set)."""

    def __init__(self, command: str, error: CambrionixError) -> None:
        self.command = command
        self.error = error
        super().__init__(f"hub refused {command!r}: {error}")


class _Link(asyncio.Protocol):
    """Glue between the serial transport and the driver: bytes in, loss reported once."""

    def __init__(self, driver: CambrionixDriver) -> None:
        self._driver = driver

    def data_received(self, data: bytes) -> None:
        self._driver._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._driver._on_lost(exc)


class CambrionixDriver(HubDriver):
    kind: ClassVar[str] = "cambrionix"

    def __init__(
        self,
        device: str,
        *,
        usb_serial: str | None = None,
        command_timeout: float = 2.0,
        reboot_timeout: float = 10.0,
        baudrate: int = BAUD,
    ) -> None:
        """`device`: the tty (prefer `/dev/serial/by-id/...`); `usb_serial`: the control interface's
        USB serial, used as the hub's identity because `id`'s `sn` is often all zeros."""
        self.device = device
        self.usb_serial = usb_serial
        self.command_timeout = command_timeout
        self.reboot_timeout = reboot_timeout
        self.baudrate = baudrate
        self.identity: IdInfo | None = None
        self.system_info: SystemInfo | None = None
        self.board: BoardDescription | None = None
        self.spec: ModelSpec | None = None
        self._transport: asyncio.Transport | None = None
        self._lock = asyncio.Lock()
        self._reader = ResponseReader()
        self._pending: asyncio.Future[Response] | None = None
        self._unsolicited: list[Response] = []
        self._rx = asyncio.Event()
        self._lost: HubError | None = None
        self._closed = asyncio.Event()
        self._needs_resync = True
        self.bytes_received = 0  # wire accounting, for diagnostics and the poll benchmark
        self.bytes_sent = 0

    # --- HubDriver -------------------------------------------------------------------------------

    @property
    def capabilities(self) -> frozenset[Capability]:
        if self.identity is None:
            return frozenset()
        caps = {
            Capability.ATTACH_SENSE,
            Capability.PORT_POWER,
            Capability.PORT_MODE,
            Capability.CURRENT_SENSE,
        }
        if self.spec is not None and self.spec.has_leds:
            caps.add(Capability.PORT_LED)
        return frozenset(caps)

    @property
    def family(self) -> FirmwareFamily:
        if self.identity is not None and self.identity.family is not None:
            return self.identity.family
        return self.spec.family if self.spec is not None else FirmwareFamily.UNIVERSAL

    @property
    def port_count(self) -> int:
        if self.board is not None:
            return self.board.ports
        return self.spec.ports if self.spec is not None else 0

    async def open(self) -> HubInfo:
        loop = asyncio.get_running_loop()
        try:
            self._transport, _ = await serial_asyncio_fast.create_serial_connection(
                loop,
                lambda: _Link(self),
                self.device,
                baudrate=self.baudrate,
                bytesize=8,
                parity="N",
                stopbits=1,
                exclusive=True,
            )
        except (OSError, ValueError) as exc:  # serial.SerialException is an OSError
            raise HubError(f"cannot open {self.device}: {exc}") from exc
        async with self._lock:
            await self._resync()
        self.identity = parse_or_raise(parse_id, await self.command(protocol.ID))
        self.system_info = parse_or_raise(parse_system, await self.command(protocol.SYSTEM))
        self.spec = find_model(self.identity.hardware) or find_model(self.system_info.hardware)
        if self.spec is None:
            log.warning("unknown Cambrionix model %r on %s", self.identity.hardware, self.device)
        try:
            self.board = parse_bd((await self.command(protocol.BD)).lines)
        except (CambrionixParseError, CambrionixRefused) as exc:
            log.warning("bd unreadable on %s (%s); using the built-in port map", self.device, exc)
        serial = self.usb_serial or (self.identity.serial if self.identity.serial.strip("0") else self.device)
        return HubInfo(
            model=self.spec.part if self.spec else self.identity.hardware,
            firmware=self.identity.firmware,
            serial=serial,
            port_count=self.port_count,
            capabilities=self.capabilities,
        )

    async def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is None:
            return
        transport.close()
        with contextlib.suppress(TimeoutError):  # the fd is released when connection_lost runs
            await asyncio.wait_for(self._closed.wait(), 2.0)

    async def poll(self) -> list[PortStatus]:
        report = parse_state((await self.command(protocol.state())).lines, self.family)
        for line in report.ignored:
            log.warning("unparsable state row from %s: %r", self.device, line)
        count = self.port_count
        return [s for s in report.statuses() if count == 0 or 1 <= s.port <= count]

    async def port_paths(self) -> dict[int, str]:
        mapping = self.board.port_map() if self.board is not None else {}
        if not mapping and self.spec is not None:
            mapping = dict(self.spec.fallback_port_map)
        return {port: path for path, port in mapping.items()}

    async def set_mode(self, port: int, mode: PortMode) -> None:
        self._check_port(port)
        table = _PD_MODES if self.family.three_column_flags else _UNIVERSAL_MODES
        char = table.get(mode)
        if char is None:
            raise HubError(f"{self.device}: {self.family.name} firmware has no {mode.value} mode")
        await self.command(protocol.mode(char, port))

    async def set_led(self, port: int, pattern: LedPattern) -> None:
        self._check_port(port)
        if self.spec is None or not self.spec.has_leds:
            raise HubError(f"{self.spec.part if self.spec else 'this hub'} has no controllable port LEDs")
        await self.command(protocol.ledb(port, LED_ROW, LED_PATTERNS[pattern], protocol.LedControl.HOLD))

    # --- more of the CLI -------------------------------------------------------------------------

    async def health(self) -> Health:
        return parse_or_raise(parse_health, await self.command(protocol.HEALTH))

    async def host(self) -> HostInfo:
        return parse_or_raise(parse_host, await self.command(protocol.host()))

    async def acknowledge_reboot(self) -> None:
        await self.clear_rebooted_flag()

    async def clear_rebooted_flag(self) -> None:
        """`crf`: acknowledge the R flag once the caller has re-applied its port settings."""
        await self.command(protocol.CRF)

    async def clear_error_flags(self) -> None:
        """`cef`: ports stay off until their mode is set again (CLI-MAN §3.3)."""
        await self.command(protocol.CEF)

    async def command(self, command: str, limit_s: float | None = None) -> Response:
        """Send one command line and return its reply; `CambrionixRefused` for `*Ennn` replies."""
        wire = protocol.encode_command(command)
        async with self._lock:
            response = await self._exchange(command, wire, limit_s)
            if response.prompt is Prompt.BOOT:
                await self._recover_from_boot()
                response = await self._exchange(command, wire, limit_s)
        error = response.error
        if error is not None:
            raise CambrionixRefused(command, error)
        return response

    # --- exchange machinery ----------------------------------------------------------------------

    def _check_port(self, port: int) -> None:
        if not 1 <= port <= self.port_count:
            raise HubError(f"{self.device}: port {port} does not exist (1..{self.port_count})")

    def _alive(self) -> asyncio.Transport:
        if self._lost is not None:
            raise self._lost
        if self._transport is None:
            raise HubError(f"{self.device} is not open")
        return self._transport

    async def _exchange(self, command: str, wire: bytes, limit_s: float | None) -> Response:
        transport = self._alive()
        if self._needs_resync:
            await self._resync()
        for line in self._reader.expect(command):
            log.warning("unsolicited text from %s: %r", self.device, line)
        self._unsolicited.clear()
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending = future
        self._needs_resync = True  # until the reply is in: a timeout or cancellation leaves us out of step
        transport.write(wire)
        self.bytes_sent += len(wire)
        try:
            async with asyncio.timeout(limit_s or self.command_timeout):  # cheaper than wait_for
                response = await future
        except TimeoutError:
            raise HubError(f"{self.device}: no reply to {command!r}") from None
        finally:
            self._pending = None
        self._needs_resync = False
        if response.error is not None and response.error.fatal:
            self._needs_resync = True  # after a fatal error only ETX/CR get through
        return response

    async def _resync(self, limit_s: float | None = None, *, recover: bool = True) -> Prompt:
        """ETX, then read until a prompt arrived and the line went quiet; returns the last prompt.
        A boot prompt triggers recovery (reboot) unless this resync is itself part of one."""
        transport = self._alive()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (limit_s or self.command_timeout)
        self._reader.reset()
        self._unsolicited.clear()
        transport.write(protocol.ETX)
        last_etx = loop.time()
        while True:
            self._rx.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise HubError(f"{self.device}: no prompt after ETX")
            try:
                await asyncio.wait_for(self._rx.wait(), min(QUIET_S, remaining))
            except TimeoutError:
                if self._unsolicited:
                    break
                if loop.time() - last_etx > ETX_RETRY_S:
                    transport.write(protocol.ETX)
                    last_etx = loop.time()
            if self._lost is not None:
                raise self._lost
        prompt = self._unsolicited[-1].prompt
        self._unsolicited.clear()
        self._needs_resync = False
        if prompt is Prompt.BOOT and recover:
            await self._recover_from_boot()
            return Prompt.MAIN
        return prompt

    async def _recover_from_boot(self) -> None:
        log.warning("%s is in boot mode; sending reboot", self.device)
        self._reader.expect(protocol.reboot())
        self._alive().write(protocol.encode_command(protocol.reboot()))
        if await self._resync(self.reboot_timeout, recover=False) is not Prompt.MAIN:
            raise HubError(f"{self.device}: still in boot mode after reboot")
        log.info("%s left boot mode", self.device)

    def _on_data(self, data: bytes) -> None:
        self.bytes_received += len(data)
        self._rx.set()
        for response in self._reader.feed(data):
            if self._pending is not None and not self._pending.done():
                self._pending.set_result(response)
            else:
                self._unsolicited.append(response)
        for junk in self._reader.discarded:
            log.warning("discarded line noise from %s: %r", self.device, junk)
        self._reader.discarded.clear()

    def _on_lost(self, exc: Exception | None) -> None:
        self._lost = HubError(f"{self.device}: link lost ({exc or 'closed'})")
        self._rx.set()
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(self._lost)
        self._closed.set()


_T = TypeVar("_T")


def parse_or_raise(parser: Callable[[Sequence[str]], _T], response: Response) -> _T:
    """Parse a reply; a reply of the wrong shape is a hub fault, reported as HubError."""
    try:
        return parser(response.lines)
    except CambrionixParseError as exc:
        raise HubError(f"unexpected reply: {exc}") from exc
