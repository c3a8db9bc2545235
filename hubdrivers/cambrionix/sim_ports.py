"""Simulated port physics for the Cambrionix simulator: modes, the charge state machine, counters.

Kept apart from the command interpreter so both stay small. A port's state is not stepped by
timers: it is *derived* from when the current session started, so a hub that nobody polls costs no
CPU, and a poll at any moment sees exactly what the clock implies (I -> P -> C -> F, `x` until
charged, energy integrated in Wh). Times are in simulator seconds, which the simulator may run
faster than wall time.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hubdrivers.cambrionix.protocol import ModeChar

RAIL_VOLTS = 5.0  # energy = V * I * t; the hub integrates at its 5 V rail


@dataclass(frozen=True, slots=True)
class DeviceBehaviour:
    """How a simulated phone loads a port."""

    charge_ma: int = 1000  # draw while charging, and in sync mode
    profile_id: int = 1  # the charge profile the hub settles on (1..6)
    profiling_s: float = 2.0  # time in P before C
    charge_s: float | None = None  # time in C before F; None = never finishes
    finished_ma: int = 20  # trickle once finished
    profiling_ma: int = 70
    pd_contract: bool = False  # PDSync: column 1 shows P instead of A


@dataclass(frozen=True, slots=True)
class PortReading:
    """What `state` shows for one port at one instant (shared by both row formats)."""

    port: int
    attached: bool
    mode: ModeChar
    phase: str  # I P C F for charge mode, "" otherwise
    current_ma: int
    profile_id: int
    time_charging_s: int
    time_charged_s: int | None
    energy_wh: float
    resetting: bool
    port_error: bool
    theft: bool
    pd_contract: bool


@dataclass(slots=True)
class SimPort:
    number: int
    mode: ModeChar = ModeChar.SYNC
    device: DeviceBehaviour | None = None
    session_start: float = 0.0  # attach or last mode change: where the charge state machine starts
    reset_until: float = 0.0  # VBUS is off (flag r) until then
    energy_wh: float = 0.0
    energy_at: float = 0.0  # energy is integrated up to this instant
    port_error: bool = False
    theft: bool = False
    leds: dict[int, int] = field(default_factory=dict)  # row -> 8-bit pattern

    def _powered(self, now: float) -> bool:
        return self.mode is not ModeChar.OFF and now >= self.reset_until and not self.port_error

    def _attached(self) -> bool:
        return self.device is not None and self.mode is not ModeChar.OFF

    def _charge_phase(self, now: float) -> tuple[str, float]:
        """(phase letter, seconds into the session counted from the end of the VBUS reset)."""
        device = self.device
        if device is None or not self._powered(now):
            return "I", 0.0
        elapsed = now - max(self.session_start, self.reset_until)
        if elapsed < device.profiling_s:
            return "P", elapsed
        if device.charge_s is None or elapsed < device.profiling_s + device.charge_s:
            return "C", elapsed
        return "F", elapsed

    def _current(self, now: float) -> int:
        device = self.device
        if device is None or not self._powered(now):
            return 0
        if self.mode is ModeChar.SYNC:
            return device.charge_ma
        if self.mode is ModeChar.CHARGE:
            phase, _ = self._charge_phase(now)
            return {"P": device.profiling_ma, "C": device.charge_ma, "F": device.finished_ma}.get(phase, 0)
        return 0  # biased: detected, neither charged nor synced

    def advance(self, now: float) -> None:
        """Integrate energy up to `now`, piecewise between the instants where the draw changes
        (end of the VBUS reset, of profiling, of charging), so a rare poll still sees exact Wh."""
        start = self.energy_at
        if now <= start:
            return
        base = max(self.session_start, self.reset_until)
        edges = [self.reset_until]
        if self.device is not None:
            edges.append(base + self.device.profiling_s)
            if self.device.charge_s is not None:
                edges.append(base + self.device.profiling_s + self.device.charge_s)
        points = [start, *sorted(t for t in edges if start < t < now), now]
        for t0, t1 in itertools.pairwise(points):
            watts = RAIL_VOLTS * self._current((t0 + t1) / 2) / 1000
            self.energy_wh += watts * (t1 - t0) / 3600
        self.energy_at = now

    def set_mode(self, mode: ModeChar, now: float, reset_s: float) -> None:
        if mode is self.mode:
            return
        self.advance(now)
        self.mode = mode
        self.reset_until = now + reset_s
        self.session_start = now

    def attach(self, device: DeviceBehaviour, now: float) -> None:
        self.advance(now)
        self.device = device
        self.session_start = now
        self.energy_wh = 0.0

    def detach(self, now: float, armed: bool) -> None:
        self.advance(now)
        if self.device is not None and armed:
            self.theft = True
        self.device = None
        self.session_start = now
        self.energy_wh = 0.0  # the counter is per device ("energy the device has consumed")

    def reading(self, now: float) -> PortReading:
        self.advance(now)
        device = self.device
        phase, elapsed = self._charge_phase(now)
        charging = self.mode is ModeChar.CHARGE and device is not None
        time_charging = time_charged = 0.0
        if charging and device is not None and phase in "CF":
            time_charging = elapsed - device.profiling_s
            if phase == "F" and device.charge_s is not None:
                time_charging = device.charge_s
                time_charged = elapsed - device.profiling_s - device.charge_s
        return PortReading(
            port=self.number,
            attached=self._attached(),
            mode=self.mode,
            phase=(phase if device is not None else "I") if self.mode is ModeChar.CHARGE else "",
            current_ma=min(self._current(now), 9999),
            profile_id=(device.profile_id if phase in "CF" else 1 + int(elapsed) % 6)
            if charging and device is not None and self._powered(now)
            else 0,
            time_charging_s=int(time_charging),
            time_charged_s=int(time_charged) if charging and phase == "F" else None,
            energy_wh=self.energy_wh,
            resetting=now < self.reset_until,
            port_error=self.port_error,
            theft=self.theft,
            pd_contract=device is not None and device.pd_contract,
        )


def universal_row(r: PortReading, hub_error: bool, rebooted: bool) -> str:
    """`p, current_mA, flags, profile_id, time_charging, time_charged, energy`; flags in the order the
    manual's and GAZOO's examples print them (`e E D O`, `R A S`)."""
    flags = [
        letter
        for letter, on in (("e", r.port_error), ("E", hub_error), ("R", rebooted), ("T", r.theft))
        if on
    ]
    if r.resetting:
        flags.append("r")
    flags.append("A" if r.attached else "D")
    flags.append(r.phase if r.mode is ModeChar.CHARGE else r.mode.value.upper())
    charged = "x" if r.time_charged_s is None else str(r.time_charged_s)
    return (
        f"{r.port}, {r.current_ma:04d}, {' '.join(flags)}, {r.profile_id}, "
        f"{r.time_charging_s}, {charged}, {r.energy_wh:.2f}"
    )


def pd_row(r: PortReading) -> str:
    """`p, voltage_10mV, current_mA, <attach> <power> <qc>, time_charging, time_charged, energy`."""
    on = r.mode is not ModeChar.OFF and not r.resetting
    attach = ("P" if r.pd_contract else "A") if r.attached and on else "D"
    if not on:
        power = "O"
    elif not r.attached:
        power = "c"
    else:
        power = {"C": "C", "F": "F"}.get(r.phase, "C" if r.current_ma else "I")
    volts = (900 if r.pd_contract else 500) if on else 0
    charged = "x" if r.time_charged_s is None else str(r.time_charged_s)
    return (
        f"{r.port}, {volts:04d}, {r.current_ma:04d}, {attach} {power} -, "
        f"{r.time_charging_s}, {charged}, {r.energy_wh:.2f}"
    )


def pd_host_row(host_present: bool) -> str:
    return f"0, 0500, 0000, {'A' if host_present else 'D'} S -, 0, x, 0.00"
