"""Typed readings of Cambrionix replies (the text between echo and prompt), without I/O.

Formats follow CLI-MAN §3 and the real captures quoted in research/hubs.md §1.5; the fixtures in
tests/cambrionix_fixtures pin them; `info.py` reads the other replies. Every parser either returns
a frozen dataclass or raises `CambrionixParseError` - nothing else escapes, whatever the bytes
(hypothesis checks this). `state` is lenient per row: one garbled row is set aside in
`StateReport.ignored` for the driver to log, because losing one port for one poll is better than
losing the whole hub.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from hubdrivers.base import ChargeState, PortAlarm, PortMode, PortStatus
from hubdrivers.cambrionix.protocol import CambrionixParseError

_INT = re.compile(r"^\d{1,10}$")  # bounded: int() of a 5000-digit string raises a bare ValueError
_DECIMAL = re.compile(r"^\d{1,9}(?:\.\d{1,6})?$")


def parse_int(text: str, what: str) -> int:
    """A bounded non-negative integer field, or CambrionixParseError."""
    text = text.strip()
    if not _INT.match(text):
        raise CambrionixParseError(f"{what}: expected an integer, got {text!r}")
    return int(text)


def parse_decimal(text: str, what: str) -> float:
    """A bounded non-negative decimal field, or CambrionixParseError."""
    text = text.strip()
    if not _DECIMAL.match(text):
        raise CambrionixParseError(f"{what}: expected a decimal, got {text!r}")
    return float(text)


_int = parse_int
_decimal = parse_decimal


class FirmwareFamily(enum.StrEnum):
    """`id` field `fc`: which firmware (and so which `state` row format) the hub runs.

    `un` is documented; `ps` (PDSync) and `sm` (SMART, TS3-C10) come from community code."""

    UNIVERSAL = "un"
    PDSYNC = "ps"
    SMART = "sm"

    @property
    def three_column_flags(self) -> bool:
        return self is not FirmwareFamily.UNIVERSAL


# --- state ----------------------------------------------------------------------------------------


class UniversalFlag(enum.StrEnum):
    """Universal-firmware `state` flags; case matters (`E` hub error vs `e` port error)."""

    OFF = "O"
    SYNC = "S"
    BIASED = "B"
    IDLE = "I"
    PROFILING = "P"
    CHARGING = "C"
    FINISHED = "F"
    ATTACHED = "A"
    DETACHED = "D"
    THEFT = "T"
    HUB_ERROR = "E"
    REBOOTED = "R"
    RESETTING = "r"
    PORT_ERROR = "e"


_MODE_FLAGS: dict[UniversalFlag, tuple[PortMode, ChargeState | None]] = {
    UniversalFlag.OFF: (PortMode.OFF, None),
    UniversalFlag.SYNC: (PortMode.SYNC, None),
    UniversalFlag.BIASED: (PortMode.BIASED, None),
    UniversalFlag.IDLE: (PortMode.CHARGE, ChargeState.IDLE),
    UniversalFlag.PROFILING: (PortMode.CHARGE, ChargeState.PROFILING),
    UniversalFlag.CHARGING: (PortMode.CHARGE, ChargeState.CHARGING),
    UniversalFlag.FINISHED: (PortMode.CHARGE, ChargeState.FINISHED),
}
_ALARM_FLAGS: dict[UniversalFlag, PortAlarm] = {
    UniversalFlag.PORT_ERROR: PortAlarm.PORT_ERROR,
    UniversalFlag.HUB_ERROR: PortAlarm.HUB_ERROR,
    UniversalFlag.THEFT: PortAlarm.THEFT,
    UniversalFlag.REBOOTED: PortAlarm.REBOOTED,
    UniversalFlag.RESETTING: PortAlarm.RESETTING,
}
_UNIVERSAL_LETTERS = {flag.value: flag for flag in UniversalFlag}


class PdAttach(enum.StrEnum):
    """PDSync/TS3-C10 flag column 1."""

    ATTACHED = "A"
    DETACHED = "D"
    PD_CONTRACT = "P"  # a PD contract with a device: attached
    CABLE_ONLY = "C"  # a Type-C cable without a device: not attached


class PdPower(enum.StrEnum):
    """PDSync/TS3-C10 flag column 2 (the same letters mean other things in column 1)."""

    IDLE = "I"
    HOST = "S"  # row 0: the host port is connected
    CHARGING = "C"
    FINISHED = "F"
    OFF = "O"
    POWERED = "c"  # power on, no device detected


class QuickCharge(enum.StrEnum):
    """PDSync/TS3-C10 flag column 3."""

    DISALLOWED = "_"
    ALLOWED = "+"
    ENABLED = "q"
    IN_USE = "Q"
    UNREPORTED = "-"  # printed by the manual's own PDSync example; meaning undocumented


@dataclass(frozen=True, slots=True)
class UniversalPortRow:
    """`p, current_mA, flags, profile_id, time_charging, time_charged, energy`."""

    port: int
    current_ma: int
    flags: frozenset[UniversalFlag]
    profile_id: int
    time_charging_s: int
    time_charged_s: int | None  # `x`: not charged yet
    energy_wh: float

    def to_status(self) -> PortStatus:
        attached, port_mode, charge, alarms = _flag_meaning(self.flags)
        return PortStatus(
            port=self.port,
            attached=attached,
            mode=port_mode,
            current_ma=self.current_ma,
            charge=charge,
            alarms=alarms,
            energy_wh=self.energy_wh,
        )


@functools.lru_cache(maxsize=256)
def _flag_meaning(
    flags: frozenset[UniversalFlag],
) -> tuple[bool, PortMode, ChargeState | None, frozenset[PortAlarm]]:
    mode_flag = next(f for f in flags if f in _MODE_FLAGS)  # parse_universal_row checked there is one
    port_mode, charge = _MODE_FLAGS[mode_flag]
    alarms = frozenset(_ALARM_FLAGS[f] for f in flags if f in _ALARM_FLAGS)
    return UniversalFlag.ATTACHED in flags, port_mode, charge, alarms


@dataclass(frozen=True, slots=True)
class PdPortRow:
    """`p, voltage_10mV, current_mA, <attach> <power> <qc>, time_charging, time_charged, energy`."""

    port: int
    voltage_mv: int
    current_ma: int
    attach: PdAttach
    power: PdPower
    quick_charge: QuickCharge
    time_charging_s: int
    time_charged_s: int | None
    energy_wh: float

    @property
    def is_host_port(self) -> bool:
        return self.port == 0

    def to_status(self) -> PortStatus:
        """PD ports have no separate charge mode: `mode c` means sync *and* charge, so an enabled
        port reports SYNC and its charge progress alongside."""
        charge = {
            PdPower.IDLE: ChargeState.IDLE,
            PdPower.CHARGING: ChargeState.CHARGING,
            PdPower.FINISHED: ChargeState.FINISHED,
        }.get(self.power)
        return PortStatus(
            port=self.port,
            attached=self.attach in (PdAttach.ATTACHED, PdAttach.PD_CONTRACT),
            mode=PortMode.OFF if self.power is PdPower.OFF else PortMode.SYNC,
            current_ma=self.current_ma,
            charge=charge,
            voltage_mv=self.voltage_mv,
            energy_wh=self.energy_wh,
        )


PortRow = UniversalPortRow | PdPortRow


@dataclass(frozen=True, slots=True)
class StateReport:
    rows: tuple[PortRow, ...]
    ignored: tuple[str, ...] = ()  # lines that were not rows: log them, they are hub noise

    def statuses(self) -> list[PortStatus]:
        """Downstream ports as `PortStatus`, without the PDSync host row."""
        return [r.to_status() for r in self.rows if not (isinstance(r, PdPortRow) and r.is_host_port)]


def _time_charged(text: str) -> int | None:
    return None if text.strip() == "x" else _int(text, "time_charged")


def _split_row(line: str) -> list[str]:
    fields = [f.strip() for f in line.split(",")]
    if len(fields) != 7:
        raise CambrionixParseError(f"state row needs 7 fields, got {len(fields)}: {line!r}")
    return fields


_UNIVERSAL_ROW = re.compile(
    r"^\s*(\d{1,10}),\s*(\d{1,10}),([A-Za-z ]*),\s*(\d{1,10}),\s*(\d{1,10}),\s*(x|\d{1,10}),"
    r"\s*(\d{1,9}(?:\.\d{1,6})?)\s*$"
)


@functools.lru_cache(maxsize=256)
def _universal_flags(text: str) -> frozenset[UniversalFlag]:
    """The flag set of one row's flag field; cached because a hub repeats a handful of them."""
    flags: set[UniversalFlag] = set()
    for token in text.split():
        flag = _UNIVERSAL_LETTERS.get(token)
        if flag is None:
            raise CambrionixParseError(f"unknown state flag {token!r}")
        flags.add(flag)
    modes = [f for f in flags if f in _MODE_FLAGS]
    presence = flags & {UniversalFlag.ATTACHED, UniversalFlag.DETACHED}
    if len(modes) != 1 or len(presence) != 1:
        raise CambrionixParseError(f"state flags need one mode and one of A/D: {text!r}")
    return frozenset(flags)


def parse_universal_row(line: str) -> UniversalPortRow:
    """One Universal row. The single anchored regex is the hot path of every poll (15 rows twice a
    second per hub), hence one match instead of a split and a regex per field."""
    match = _UNIVERSAL_ROW.match(line)
    if match is None:
        raise CambrionixParseError(f"not a state row: {line!r}")
    port, current, flags, profile, charging, charged, energy = match.groups()
    return UniversalPortRow(
        port=int(port),
        current_ma=int(current),
        flags=_universal_flags(flags),
        profile_id=int(profile),
        time_charging_s=int(charging),
        time_charged_s=None if charged == "x" else int(charged),
        energy_wh=float(energy),
    )


def parse_pd_row(line: str) -> PdPortRow:
    fields = _split_row(line)
    tokens = fields[3].split()
    if len(tokens) != 3:
        raise CambrionixParseError(f"PD state row needs 3 flag columns: {line!r}")
    try:
        attach, power, quick = PdAttach(tokens[0]), PdPower(tokens[1]), QuickCharge(tokens[2])
    except ValueError as exc:
        raise CambrionixParseError(f"bad PD state flags in {line!r}") from exc
    return PdPortRow(
        port=_int(fields[0], "port"),
        voltage_mv=_int(fields[1], "voltage") * 10,
        current_ma=_int(fields[2], "current"),
        attach=attach,
        power=power,
        quick_charge=quick,
        time_charging_s=_int(fields[4], "time_charging"),
        time_charged_s=_time_charged(fields[5]),
        energy_wh=_decimal(fields[6], "energy"),
    )


def parse_state_row(line: str, family: FirmwareFamily | None = None) -> PortRow:
    """One row; without a known family the layout is recognised by field 3 (digits = PD voltage)."""
    if family is None:
        fields = line.split(",")
        pd = len(fields) > 2 and fields[2].strip().isdigit()
    else:
        pd = family.three_column_flags
    return parse_pd_row(line) if pd else parse_universal_row(line)


def parse_state(lines: Iterable[str], family: FirmwareFamily | None = None) -> StateReport:
    rows: list[PortRow] = []
    ignored: list[str] = []
    for line in lines:
        try:
            rows.append(parse_state_row(line, family))
        except CambrionixParseError:
            ignored.append(line)
    return StateReport(tuple(rows), tuple(ignored))
