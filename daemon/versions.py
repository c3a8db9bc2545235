"""iOS version numbers compared as numbers, so that 17.10 is newer than 17.9."""

from __future__ import annotations

import re

_VERSION = re.compile(r"^\d{1,3}(\.\d{1,3}){0,2}$")


def parse_version(text: str) -> tuple[int, int, int]:
    """`"17.4"` -> `(17, 4, 0)`; raises ValueError with a message fit for a config error line."""
    if not _VERSION.match(text):
        raise ValueError("must be an iOS version like 17.4 or 18.0.1")
    parts = [int(p) for p in text.split(".")]
    major, minor, patch = [*parts, 0, 0][:3]
    return major, minor, patch


def at_least(version: str, minimum: str) -> bool:
    return parse_version(version) >= parse_version(minimum)
