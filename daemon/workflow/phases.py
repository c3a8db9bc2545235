"""The public vocabulary of a port's life and the one table of moves between phases.

`Phase` values are what operators and machines see: the MQTT `phase` field, the Home Assistant
enum options, the `phase` log field and the database column. Every change of phase, whether the
workflow, an operator or crash recovery causes it, is checked against `ALLOWED` by the store before
it is written, so an impossible history cannot be recorded.
"""

from __future__ import annotations

import enum
from typing import Final


class Phase(enum.StrEnum):
    EMPTY = "empty"  # nothing on the port
    DETECTED = "detected"  # a device is present; identity being read
    UPDATING = "updating"  # iOS update / restore to the configured minimum
    ERASING = "erasing"  # erase all content and settings
    ENROLLING = "enrolling"  # provisional enrollment into Apple Business Manager
    AWAITING_ASSIGNMENT = "awaiting_assignment"  # waiting for the serial to be assigned to the MDM server
    SETTING_UP = "setting_up"  # streamlined, MDM-managed setup
    DONE = "done"
    FAILED = "failed"  # a step failed after its retries
    NEEDS_ATTENTION = "needs_attention"  # a person must decide (state unknown, unsupported device, ...)
    INTERRUPTED = "interrupted"  # the device left (or the daemon stopped) while a step was running


WORK: Final[tuple[Phase, ...]] = (
    Phase.DETECTED,
    Phase.UPDATING,
    Phase.ERASING,
    Phase.ENROLLING,
    Phase.AWAITING_ASSIGNMENT,
    Phase.SETTING_UP,
)
"""Phases in which a step runs, in workflow order."""

RUNNING: Final[frozenset[Phase]] = frozenset(WORK)
SETTLED: Final[frozenset[Phase]] = frozenset({Phase.DONE, Phase.FAILED, Phase.NEEDS_ATTENTION})
"""Outcomes that stay with the device until an operator acts or it is replugged."""

_STOPS = frozenset({Phase.FAILED, Phase.NEEDS_ATTENTION, Phase.INTERRUPTED, Phase.EMPTY})
_D, _U, _E, _N, _A, _S = WORK

ALLOWED: Final[dict[Phase, frozenset[Phase]]] = {
    # A device appears.
    Phase.EMPTY: frozenset({Phase.DETECTED}),
    # Detection leads to any later step (earlier ones may be done or not configured), or straight to an
    # outcome the device already has (a provisioned device plugged again stays done).
    Phase.DETECTED: frozenset({_D, _U, _E, _N, _A, _S, Phase.DONE, *_STOPS}),
    # Each step moves forward (skipping steps that are already done) or to a stop. The self-edge is a
    # retry: same phase, next attempt.
    Phase.UPDATING: frozenset({_U, _E, _N, _A, _S, Phase.DONE, *_STOPS}),
    Phase.ERASING: frozenset({_E, _N, _A, _S, Phase.DONE, *_STOPS}),
    Phase.ENROLLING: frozenset({_N, _A, _S, Phase.DONE, *_STOPS}),
    Phase.AWAITING_ASSIGNMENT: frozenset({_A, _S, Phase.DONE, *_STOPS}),
    Phase.SETTING_UP: frozenset({_S, Phase.DONE, *_STOPS}),
    # Outcomes: the device is unplugged (empty), or an operator retries or skips a step.
    Phase.DONE: frozenset({Phase.EMPTY}),
    Phase.FAILED: frozenset({*WORK, Phase.DONE, Phase.NEEDS_ATTENTION, Phase.EMPTY}),
    Phase.NEEDS_ATTENTION: frozenset({*WORK, Phase.DONE, Phase.FAILED, Phase.EMPTY}),
    # An interrupted port waits for a device (detected), or is cleared by an operator (empty).
    Phase.INTERRUPTED: frozenset({Phase.DETECTED, Phase.EMPTY}),
}


class IllegalTransition(ValueError):
    """A move the table does not allow; it is a bug in the caller, never written to the store."""


def check_transition(current: Phase, new: Phase) -> None:
    if new not in ALLOWED[current]:
        raise IllegalTransition(f"{current} -> {new} is not an allowed transition")
