"""Faults a test or the demo can inject into the simulated bench."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from daemon.models import PortRef


class FaultKind(enum.StrEnum):
    FAIL = "fail"  # the operation fails with a transient error
    UNPLUG = "unplug"  # the device is pulled out part-way through the operation
    SLOW = "slow"  # the operation takes `factor` times longer (to hit step timeouts)
    UNKNOWN = "unknown"  # the device cannot say whether the operation took effect


@dataclass
class Fault:
    """Applies to operation `op` ("detect", "update", "erase", "enroll", "setup") on `port` (any port
    when None), for the next `times` operations that match."""

    op: str
    kind: FaultKind
    port: PortRef | None = None
    times: int = 1
    at: float = 0.5
    """For UNPLUG: how far through the operation (0..1) the device is pulled. For a FAIL of `update`:
    0 fails before the device is touched (it stays as it was), anything else part-way through (the
    device is left in Recovery)."""
    factor: float = 10.0
    """For SLOW: how much longer the operation takes."""
    replug_after: float | None = None
    """For UNPLUG: seconds (real time) until the same device is plugged back, or None to leave it out."""
    message: str = "simulated failure"

    def matches(self, op: str, port: PortRef) -> bool:
        return self.times > 0 and self.op == op and (self.port is None or self.port == port)
