"""Simulated USB bandwidth: each host controller's bus, shared by the restores on it.

Most of a restore's time on the bus is its filesystem image crossing USB (gigabytes), and every
device on one host controller shares that controller's bus, whatever hubs sit in between. The
model is a fluid one (processor sharing): `n` transfers on a controller each move
`min(device_rate, controller_rate / n)` bytes a second, recomputed whenever a transfer starts or
ends. It is what makes the scheduler's choices visible in `bench/throughput.py`.

Field reports put the practical limit near 10 concurrent restores per controller, with failures
beyond it. The model plays that as: a transfer that starts while more than `reliable` transfers
run on its controller fails part-way with probability `overload_failure` (the device then sits in
Recovery, as after a real failed restore). Those two numbers are model parameters, not
measurements; `[sim]` sets them.

Time is simulated time: seconds of real life, run `speed` times faster (`daemon.sim.world`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

MB = 1_000_000


class OverloadError(Exception):
    """The transfer broke off, as restores do on an overloaded controller."""


@dataclass(frozen=True, slots=True)
class BusModel:
    controller_rate: float = 40 * MB
    """Bytes a second one controller carries in all (USB 2's 480 Mbit/s, in practice)."""
    device_rate: float = 35 * MB
    """Bytes a second one device takes at most (its own USB 2 link and restore pipeline)."""
    reliable: int = 10
    overload_failure: float = 0.3


@dataclass(eq=False)
class _Transfer:
    remaining: float
    fail_below: float | None
    """Remaining bytes at which it breaks off (None: it does not)."""
    done: asyncio.Future[None]


@dataclass
class Controller:
    """One host controller's bus."""

    name: str
    model: BusModel
    speed: float
    rng: random.Random
    _active: list[_Transfer] = field(default_factory=list)
    _stamp: float = 0.0
    _timer: asyncio.TimerHandle | None = None
    moved: float = 0.0
    """Bytes carried so far (for benchmarks: busy time = moved / controller_rate)."""

    def _rate(self) -> float:
        n = len(self._active)
        return min(self.model.device_rate, self.model.controller_rate / n) if n else 0.0

    async def transfer(self, nbytes: float, progress: Callable[[float], None], tick: float) -> None:
        """Move `nbytes`, calling `progress(fraction)` every `tick` simulated seconds; raises
        `OverloadError` if it breaks off."""
        loop = asyncio.get_running_loop()
        self._advance(loop.time())
        fail_below = None
        if len(self._active) >= self.model.reliable and self.rng.random() < self.model.overload_failure:
            fail_below = nbytes * self.rng.uniform(0.05, 0.95)
        transfer = _Transfer(float(nbytes), fail_below, loop.create_future())
        self._active.append(transfer)
        self._reschedule(loop)
        try:
            while True:
                done, _ = await asyncio.wait({transfer.done}, timeout=tick / self.speed)
                if done:
                    transfer.done.result()
                    return
                self._advance(loop.time())
                progress(1 - transfer.remaining / nbytes)
        finally:
            if transfer in self._active:  # cancelled (unplugged, shutdown): its share goes to the rest
                self._advance(loop.time())
                self._active.remove(transfer)
                self._reschedule(loop)

    def _advance(self, now: float) -> None:
        moved = (now - self._stamp) * self.speed * self._rate()
        for transfer in self._active:
            self.moved += max(0.0, min(moved, transfer.remaining))  # a late timer moves no extra bytes
            transfer.remaining -= moved
        self._stamp = now

    def _reschedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._active:
            return
        rate = self._rate()
        soonest = min(max(0.0, t.remaining - (t.fail_below or 0.0)) / rate for t in self._active)
        self._timer = loop.call_later(soonest / self.speed, self._settle)

    def _settle(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = None
        self._advance(loop.time())
        for transfer in list(self._active):
            if transfer.fail_below is not None and transfer.remaining <= transfer.fail_below + 1:
                self._active.remove(transfer)
                transfer.done.set_exception(OverloadError(f"USB transfer broke off on {self.name}"))
            elif transfer.remaining <= 1:
                self._active.remove(transfer)
                transfer.done.set_result(None)
        self._reschedule(loop)


@dataclass
class UsbBandwidth:
    """Every controller of the simulated bench, made on first use."""

    model: BusModel
    speed: float
    seed: int = 1
    controllers: dict[str, Controller] = field(default_factory=dict)

    def controller(self, name: str) -> Controller:
        if name not in self.controllers:
            rng = random.Random(f"{self.seed}:{name}")
            self.controllers[name] = Controller(name, self.model, self.speed, rng)
        return self.controllers[name]
