"""Typed readings of the Cambrionix information replies: `id`, `system`, `health`, `limits`,
`host`, `sec`.

All are `key: value` lines split at the first colon only (`Compiled: Feb 14 2017 17:30:26`), read
tolerantly (extra spaces as in `bl: 0.12`, unknown keys from newer firmware kept or skipped) and
strictly where a value matters (numbers, flags). Like `parsing.py`, every parser returns a frozen
dataclass or raises `CambrionixParseError`, nothing else.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from hubdrivers.cambrionix.parsing import FirmwareFamily, parse_decimal, parse_int
from hubdrivers.cambrionix.protocol import CambrionixParseError

_int = parse_int
_decimal = parse_decimal


def _pairs(lines: Iterable[str]) -> list[tuple[str, str]]:
    """`key: value` lines split at the first colon only (`Compiled: Feb 14 2017 17:30:26`)."""
    pairs = []
    for line in lines:
        key, sep, value = line.partition(":")
        if not sep:
            raise CambrionixParseError(f"expected 'key: value', got {line!r}")
        pairs.append((" ".join(key.split()), value.strip()))
    return pairs


@dataclass(frozen=True, slots=True)
class IdInfo:
    """`id`: `mfr:…,mode:…,hw:…,hwid:…,fw:…,bl:…,sn:…,group:…,fc:…` on one line."""

    manufacturer: str
    hardware: str
    firmware: str
    mode: str = ""
    hwid: str = ""
    bootloader: str = ""
    serial: str = ""  # all zeros when unused: key hubs by their USB serial instead
    group: str = ""
    firmware_code: str = ""
    extra: tuple[tuple[str, str], ...] = ()

    @property
    def family(self) -> FirmwareFamily | None:
        try:
            return FirmwareFamily(self.firmware_code)
        except ValueError:
            return None

    @property
    def in_boot_mode(self) -> bool:
        return self.mode not in ("", "main")


_ID_KEYS = {
    "mfr": "manufacturer",
    "mode": "mode",
    "hw": "hardware",
    "hwid": "hwid",
    "fw": "firmware",
    "bl": "bootloader",
    "sn": "serial",
    "group": "group",
    "fc": "firmware_code",
}


def parse_id(lines: Sequence[str]) -> IdInfo:
    line = next((ln for ln in lines if "mfr" in ln), None)
    if line is None:
        raise CambrionixParseError(f"no id line in {list(lines)!r}")
    known: dict[str, str] = {}
    extra: list[tuple[str, str]] = []
    for key, value in _pairs(part for part in line.split(",") if part.strip()):
        if key in _ID_KEYS:
            known[_ID_KEYS[key]] = value
        else:
            extra.append((key, value))
    if not all(known.get(k) for k in ("manufacturer", "hardware", "firmware")):
        raise CambrionixParseError(f"id line lacks mfr/hw/fw: {line!r}")
    return IdInfo(**known, extra=tuple(extra))


@dataclass(frozen=True, slots=True)
class SystemInfo:
    title: str
    hardware: str
    firmware: str
    compiled: str = ""
    group: str = ""
    panel_id: int | None = None  # "Absent" on real units, "None" in the manual
    lcd: bool | None = None
    extra: tuple[tuple[str, str], ...] = ()


def parse_system(lines: Sequence[str]) -> SystemInfo:
    if not lines or ":" in lines[0]:
        raise CambrionixParseError(f"system reply must start with a title line: {list(lines)!r}")
    fields = dict(_pairs(lines[1:]))
    if not fields.get("Hardware") or not fields.get("Firmware"):
        raise CambrionixParseError(f"system reply lacks Hardware/Firmware: {list(lines)!r}")
    panel = fields.pop("Panel ID", "")
    lcd = fields.pop("LCD", "")
    known = {k: fields.pop(k, "") for k in ("Hardware", "Firmware", "Compiled", "Group")}
    return SystemInfo(
        title=lines[0],
        hardware=known["Hardware"],
        firmware=known["Firmware"],
        compiled=known["Compiled"],
        group=known["Group"],
        panel_id=_int(panel, "Panel ID") if panel not in ("", "Absent", "None") else None,
        lcd={"Present": True, "Absent": False}.get(lcd),
        extra=tuple(fields.items()),
    )


class RailFlag(enum.StrEnum):
    UNDER_VOLTAGE = "UV"
    OVER_VOLTAGE = "OV"


@dataclass(frozen=True, slots=True)
class Measurement:
    """A reading that may be clipped: the hub prints `>100` or `<0.1` at the ends of its range."""

    value: float
    bound: Literal["<", ">"] | None = None


_MEASUREMENT = re.compile(r"^([<>])?\s*(\d{1,6}(?:\.\d{1,4})?)\s*C?$")


def parse_measurement(text: str) -> Measurement:
    match = _MEASUREMENT.match(text.strip())
    if match is None:
        raise CambrionixParseError(f"expected a reading, got {text!r}")
    bound = match.group(1)
    return Measurement(float(match.group(2)), "<" if bound == "<" else ">" if bound == ">" else None)


@dataclass(frozen=True, slots=True)
class Rail:
    name: str  # "5V", "12V", "3V", "Input"
    now: float | None = None
    minimum: float | None = None
    maximum: float | None = None
    flags: frozenset[RailFlag] = frozenset()


@dataclass(frozen=True, slots=True)
class Health:
    rails: tuple[Rail, ...]
    uptime_s: int | None = None
    temperature_now: Measurement | None = None
    temperature_max: Measurement | None = None
    over_temperature: bool = False
    pwm_percent: float | None = None
    rebooted: bool = False

    @property
    def error_flags(self) -> frozenset[str]:
        """What a hub-wide `E` is about: e.g. {"5V UV", "OT"}."""
        flags = {f"{rail.name} {flag.value}" for rail in self.rails for flag in rail.flags}
        return frozenset(flags | ({"OT"} if self.over_temperature else set()))


_RAIL_KEY = re.compile(r"^(\d{1,2}V|Input) (Now|Min|Max|Flags)$")


def _flag_set(value: str, allowed: set[str], what: str) -> set[str]:
    tokens = set(value.split())
    if not tokens <= allowed:
        raise CambrionixParseError(f"{what}: unknown flags {sorted(tokens - allowed)!r}")
    return tokens


def _health_field(health: Health, key: str, value: str) -> Health:  # noqa: PLR0911 - one per key
    """Apply one non-rail `health` line; unknown keys (newer firmware) change nothing."""
    if key == "System up for":
        return replace(health, uptime_s=_int(value.removesuffix("seconds"), key))
    if key == "Temperature Now (C)":
        return replace(health, temperature_now=parse_measurement(value))
    if key == "Temperature Max (C)":
        return replace(health, temperature_max=parse_measurement(value))
    if key == "Temperature Flags":
        return replace(health, over_temperature="OT" in _flag_set(value, {"OT"}, key))
    if key == "PWM %":
        return replace(health, pwm_percent=_decimal(value, key))
    if key.lower() == "rebooted flag":
        return replace(health, rebooted="R" in _flag_set(value, {"R"}, key))
    return health


def _rail_field(rail: Rail, what: str, key: str, value: str) -> Rail:
    if what == "Flags":
        return replace(rail, flags=frozenset(RailFlag(f) for f in _flag_set(value, {"UV", "OV"}, key)))
    reading = _decimal(value, key)
    if what == "Now":
        return replace(rail, now=reading)
    return replace(rail, minimum=reading) if what == "Min" else replace(rail, maximum=reading)


def parse_health(lines: Sequence[str]) -> Health:
    rails: dict[str, Rail] = {}
    health = Health(rails=())
    for key, value in _pairs(lines):
        match = _RAIL_KEY.match(key)
        if match is not None:
            name, what = match.groups()
            rails[name] = _rail_field(rails.get(name, Rail(name)), what, key, value)
        else:
            health = _health_field(health, key, value)
    if not rails and health.uptime_s is None:
        raise CambrionixParseError(f"not a health reply: {list(lines)!r}")
    return replace(health, rails=tuple(rails.values()))


@dataclass(frozen=True, slots=True)
class RailLimit:
    name: str
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    rails: tuple[RailLimit, ...]
    temperature_max_c: float | None = None


_LIMIT_KEY = re.compile(r"^(\d{1,2}V|Input) (Min|Max)$")


def parse_limits(lines: Sequence[str]) -> Limits:
    rails: dict[str, dict[str, float]] = {}
    temperature: float | None = None
    for key, value in _pairs(lines):
        match = _LIMIT_KEY.match(key)
        if match is not None:
            rails.setdefault(match.group(1), {})["minimum" if match.group(2) == "Min" else "maximum"] = (
                _decimal(value, key)
            )
        elif key == "Temperature (C)":
            temperature = _decimal(value, key)
    if not rails and temperature is None:
        raise CambrionixParseError(f"not a limits reply: {list(lines)!r}")
    return Limits(tuple(RailLimit(name, **values) for name, values in rails.items()), temperature)


@dataclass(frozen=True, slots=True)
class HostInfo:
    present: bool
    mode: str  # auto | manual | off


_HOST = re.compile(r"Present:\s*(\S+)\s+Mode change:\s*(\S+)")


def parse_host(lines: Sequence[str]) -> HostInfo:
    match = _HOST.search(" ".join(lines))
    if match is None or match.group(1).lower() not in ("yes", "no", "1", "0"):
        raise CambrionixParseError(f"not a host reply: {list(lines)!r}")
    return HostInfo(match.group(1).lower() in ("yes", "1"), match.group(2))


def parse_sec(lines: Sequence[str]) -> bool:
    """`sec` without arguments: True when armed."""
    text = " ".join(lines).strip()
    if text not in ("armed", "disarmed"):
        raise CambrionixParseError(f"not a sec reply: {text!r}")
    return text == "armed"
