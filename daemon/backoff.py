"""Reconnect pacing shared by everything that reconnects (hubs, the MQTT broker, the device watcher)."""

from __future__ import annotations

import random
from typing import Final

BASE: Final = 1.8
CAP: Final = 30.0


def backoff_delay(tries: int) -> float:
    """Seconds before reconnect attempt number `tries` (0-based): 1.8^n capped at 30 s (aioesphomeapi's
    curve), with ±20 % jitter so the stations of a room, or the hubs of a station, do not all
    reconnect in the same instant."""
    delay: float = min(BASE ** min(tries, 10), CAP)
    return delay * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not cryptography
