"""Real device models and iOS releases, so simulated devices look like the ones on a real bench.

UDID formats follow the hardware: devices with an A12 chip or newer use `CCCCCCCC-EEEEEEEEEEEEEEEE`
(chip id, hyphen, ECID in hex); older ones use 40 lowercase hex digits (a SHA-1). Each model lists the
newest major iOS it can run, so an old phone cannot be "updated" past what Apple ships for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Model:
    product_type: str
    name: str
    chip_id: int  # the CPID in the new-style UDID
    new_udid: bool
    device_class: str
    max_major: int


MODELS: Final[tuple[Model, ...]] = (
    Model("iPhone10,4", "iPhone 8", 0x8015, False, "iPhone", 16),
    Model("iPhone11,8", "iPhone XR", 0x8020, True, "iPhone", 18),
    Model("iPhone12,1", "iPhone 11", 0x8030, True, "iPhone", 26),
    Model("iPhone12,8", "iPhone SE (2nd generation)", 0x8030, True, "iPhone", 26),
    Model("iPhone13,2", "iPhone 12", 0x8101, True, "iPhone", 26),
    Model("iPhone14,5", "iPhone 13", 0x8110, True, "iPhone", 26),
    Model("iPhone14,7", "iPhone 14", 0x8110, True, "iPhone", 26),
    Model("iPhone15,4", "iPhone 15", 0x8120, True, "iPhone", 26),
    Model("iPhone16,1", "iPhone 15 Pro", 0x8130, True, "iPhone", 26),
    Model("iPad7,11", "iPad (7th generation)", 0x8010, False, "iPad", 18),
    Model("iPad12,1", "iPad (9th generation)", 0x8030, True, "iPad", 26),
    Model("iPad13,18", "iPad (10th generation)", 0x8101, True, "iPad", 26),
)

MODELS_BY_TYPE: Final[dict[str, Model]] = {m.product_type: m for m in MODELS}


@dataclass(frozen=True, slots=True)
class Release:
    version: str
    build: str


RELEASES: Final[tuple[Release, ...]] = (
    Release("16.7.10", "20H350"),
    Release("16.7.12", "20H364"),
    Release("17.5.1", "21F90"),
    Release("17.6.1", "21G93"),
    Release("18.1", "22B83"),
    Release("18.6.2", "22G100"),
    Release("26.0", "23A341"),
    Release("26.1", "23B85"),
)


def major(version: str) -> int:
    return int(version.split(".", 1)[0])


def releases_for(model: Model) -> list[Release]:
    return [r for r in RELEASES if major(r.version) <= model.max_major]
