"""A Cambrionix hub on a pseudo-terminal, speaking the CLI byte for byte (see `sim_engine.py`).

The driver under test opens a real tty with pyserial, exactly as it opens `/dev/ttyUSB0`, so nothing
about the serial layer is mocked. The simulator runs on the caller's asyncio loop (`add_reader` on
the pty master), which lets tests and the demo host many hubs in-process; `python -m
hubdrivers.cambrionix.simulator --model PP15S` runs one standalone and prints its path.

Stable path: the simulator publishes a symlink in its own temp directory (`path`) pointing at the
current pty slave. `disconnect()` closes the pty (the client's reads fail, as when a USB cable is
pulled) and removes the link; `reconnect()` opens a new pty and re-points the link, so a test keeps
one configured path the way a station keeps `/dev/serial/by-id/...`.

Pacing: a pty moves bytes instantly, so with `paced=True` output leaves at 115200 baud 8N1 (11520
bytes/s), which makes wire-time measurements meaningful. Host-to-hub bytes are not delayed, but the
hub echoes every one of them, so the echo carries the command's own wire time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
import tty
from collections.abc import Callable
from pathlib import Path

from hubdrivers.cambrionix.models import MODELS, ModelSpec, find_model
from hubdrivers.cambrionix.protocol import WIRE_BYTES_PER_SECOND, ErrorFlag, ModeChar
from hubdrivers.cambrionix.sim_engine import HubEngine, HubState, SimConfig
from hubdrivers.cambrionix.sim_ports import DeviceBehaviour

log = logging.getLogger("hubdrivers.cambrionix.simulator")

_CHUNK = 62
"""Paced output leaves in slices this big: the payload of one full-speed USB packet from an FTDI
FT230X (64 bytes minus 2 status bytes), which is how a real hub's bytes reach the host anyway."""


class CambrionixSimulator:
    """One simulated hub. Create, `start()` inside a running loop, point a driver at `path`."""

    def __init__(
        self,
        model: str | ModelSpec = "PP15S",
        *,
        config: SimConfig | None = None,
        paced: bool = False,
        speed: float = 1.0,
        strict: bool = False,
        reply_delay: float = 0.0,
        link_dir: str | Path | None = None,
    ) -> None:
        spec = model if isinstance(model, ModelSpec) else find_model(model)
        if spec is None:
            raise ValueError(f"unknown Cambrionix model {model!r}; known: {', '.join(MODELS)}")
        self.model = spec
        self.paced = paced
        self.speed = speed
        self.strict = strict
        self.reply_delay = reply_delay
        self._t0 = time.monotonic()
        self.engine = HubEngine(spec, config, now=0.0)
        self._own_dir = link_dir is None
        self._dir = Path(link_dir) if link_dir is not None else Path(tempfile.mkdtemp(prefix="cbrx-sim-"))
        self.path = str(self._dir / f"cambrionix-{spec.part}")
        self.tty_path: str | None = None
        self._master: int | None = None
        self._slave: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out = bytearray()
        self._burst_start = 0.0
        self._burst_sent = 0
        self._pump_handle: asyncio.TimerHandle | None = None
        self._deadline_handle: asyncio.TimerHandle | None = None
        self._delayed: set[asyncio.TimerHandle] = set()
        self._reply_pending = False
        self.bytes_in = 0
        self.bytes_out = 0

    # --- lifecycle -------------------------------------------------------------------------------

    def now(self) -> float:
        """Simulator time in seconds (wall time times `speed`)."""
        return (time.monotonic() - self._t0) * self.speed

    def start(self) -> str:
        """Open the pty and publish `path`; must be called with a running event loop."""
        self._loop = asyncio.get_running_loop()
        self._open_pty()
        return self.path

    async def __aenter__(self) -> CambrionixSimulator:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.disconnect()
        if self._own_dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _open_pty(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo or CR/LF translation by the line discipline: the hub does echo
        os.set_blocking(master, False)
        self._master, self._slave = master, slave  # we hold the slave open so the master never EIOs
        self.tty_path = os.ttyname(slave)
        tmp = f"{self.path}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(self.tty_path, tmp)
        os.replace(tmp, self.path)
        assert self._loop is not None
        self._loop.add_reader(master, self._on_readable)

    def disconnect(self) -> None:
        """The hub vanishes: its pty closes (client reads fail) and `path` stops existing."""
        for handle in (self._pump_handle, self._deadline_handle, *self._delayed):
            if handle is not None:
                handle.cancel()
        self._pump_handle = self._deadline_handle = None
        self._delayed.clear()
        self._out.clear()
        self._reply_pending = False
        if self._master is not None and self._loop is not None:
            self._loop.remove_reader(self._master)
            self._loop.remove_writer(self._master)
        for fd in (self._master, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def reconnect(self, *, reboot: bool = False) -> str:
        """The hub comes back on a new pty behind the same `path`; `reboot` also power-cycles it."""
        self.disconnect()
        self._open_pty()
        if reboot:
            self.engine._power_on(self.now())
        return self.path

    @property
    def connected(self) -> bool:
        return self._master is not None

    # --- world and fault API ---------------------------------------------------------------------

    def attach(self, port: int, device: DeviceBehaviour | None = None, **behaviour: object) -> None:
        """Plug a device in; `behaviour` are `DeviceBehaviour` fields (e.g. `current_ma=500`)."""
        if device is None:
            if "current_ma" in behaviour:
                behaviour["charge_ma"] = behaviour.pop("current_ma")
            device = DeviceBehaviour(**behaviour)  # type: ignore[arg-type]
        self.engine.attach(port, device, self.now())

    def detach(self, port: int) -> None:
        self.engine.detach(port, self.now())

    def set_port_error(self, port: int, on: bool = True) -> None:
        """Flag `e`: the port will not detect or charge (a hardware fault, not a detach)."""
        self.engine.set_port_error(port, on)

    def set_error_flags(self, *flags: ErrorFlag) -> None:
        """What `sef` does: raise UV/OV/OT, so every row shows `E` until `cef`."""
        self.engine.error_flags |= set(flags)

    def fatal(self, code: int = 500, text: str = "Internal error") -> None:
        """A fatal error: printed at once, then only ETX/CR are read and lead to boot mode."""
        self._emit(self.engine.fatal(code, text), reply=False)

    def inject_bytes(self, data: bytes) -> None:
        """Put raw bytes on the wire (line noise, a garbled partial line) as if the hub sent them."""
        self._emit(data, reply=False)

    def wedge(self, on: bool = True) -> None:
        """Stop answering entirely (and drop whatever was still being sent)."""
        self.engine.wedge(on)
        if on:
            self._out.clear()

    @property
    def state(self) -> HubState:
        return self.engine.state

    @property
    def violations(self) -> list[str]:
        return self.engine.violations

    @property
    def on_mode_change(self) -> Callable[[int, ModeChar], None] | None:
        """Hook for a world model: called with (port, new mode) when a client changes a mode."""
        return self.engine.on_mode_change

    @on_mode_change.setter
    def on_mode_change(self, hook: Callable[[int, ModeChar], None] | None) -> None:
        self.engine.on_mode_change = hook

    # --- bytes -----------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        assert self._master is not None
        try:
            data = os.read(self._master, 4096)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO: cannot happen while we hold the slave, but never spin on it
            log.warning("simulator pty read failed: %s", exc)
            return
        self.bytes_in += len(data)
        if self.strict and self._reply_pending and data.strip(b"\x03"):
            self.engine.violations.append(f"{data!r} arrived before the previous prompt was sent")
            log.error("client sent %r before the previous prompt", data)
        result = self.engine.receive(data, self.now())
        if result.commands:
            self._reply_pending = True
        self._emit(result.output, reply=result.commands > 0)
        self._schedule_deadline()

    def _schedule_deadline(self) -> None:
        deadline = self.engine.next_deadline()
        if deadline is None or self._loop is None or self._deadline_handle is not None:
            return
        delay = max(0.0, (deadline - self.now()) / self.speed)
        self._deadline_handle = self._loop.call_later(delay, self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline_handle = None
        self._emit(self.engine.due_output(self.now()), reply=True)
        self._schedule_deadline()

    def _emit(self, data: bytes, *, reply: bool) -> None:
        if not data or self._loop is None:
            return
        if reply and self.reply_delay > 0:
            handle = self._loop.call_later(self.reply_delay, self._emit_now, data)
            self._delayed.add(handle)
            return
        self._emit_now(data)

    def _emit_now(self, data: bytes) -> None:
        self._delayed = {h for h in self._delayed if not h.cancelled() and h.when() > time.monotonic()}
        if self._master is None:
            return
        if not self._out:
            self._burst_start = max(time.monotonic(), self._burst_start)
            self._burst_sent = 0
        self._out += data
        self._pump()

    def _pump(self) -> None:
        self._pump_handle = None
        if self._master is None or self._loop is None:
            return
        now = time.monotonic()
        due = len(self._out)
        if self.paced:
            due = min(due, int((now - self._burst_start) * WIRE_BYTES_PER_SECOND) - self._burst_sent)
        if due > 0:
            try:
                written = os.write(self._master, bytes(self._out[:due]))
            except BlockingIOError:
                written = 0
            except OSError as exc:
                log.warning("simulator pty write failed: %s", exc)
                written = 0
            del self._out[:written]
            self._burst_sent += written
            self.bytes_out += written
        if not self._out:
            if self.paced:  # the line stays busy until the last byte has left
                self._burst_start += self._burst_sent / WIRE_BYTES_PER_SECOND
                self._burst_sent = 0
            if not self._delayed:
                self._reply_pending = False
            return
        if self.paced:
            next_slice = self._burst_sent + min(_CHUNK, len(self._out))
            target = self._burst_start + next_slice / WIRE_BYTES_PER_SECOND
            self._pump_handle = self._loop.call_later(max(0.0, target - now), self._pump)
        else:  # pty buffer full: the client is not reading; try again shortly
            self._pump_handle = self._loop.call_later(0.005, self._pump)


async def _serve(args: argparse.Namespace) -> None:
    sim = CambrionixSimulator(args.model, paced=args.paced, speed=args.speed, strict=args.strict)
    sim.start()
    for port in args.attach:
        sim.attach(port, charge_s=args.charge_s)
    print(sim.path, flush=True)  # noqa: T201 - the path is this command's output
    print(f"# {sim.model.title} on {sim.tty_path}", file=sys.stderr, flush=True)  # noqa: T201
    try:
        await asyncio.Event().wait()
    finally:
        sim.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Simulated Cambrionix hub on a pseudo-terminal")
    parser.add_argument("--model", default="PP15S", help=f"one of {', '.join(MODELS)}")
    parser.add_argument("--paced", action="store_true", help="send at 115200 baud instead of pty speed")
    parser.add_argument("--speed", type=float, default=1.0, help="simulated seconds per wall second")
    parser.add_argument("--strict", action="store_true", help="log clients that overlap commands")
    parser.add_argument("--charge-s", type=float, default=60.0, help="charge time of attached devices")
    parser.add_argument(
        "--attach", type=lambda s: [int(p) for p in s.split(",") if p], default=[], help="e.g. 1,3,5"
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
