"""Operator actions and the phases in which each one makes sense.

Actions arrive from the CLI or MQTT; the runner checks them here, and every phase change an action
causes is validated again by the transition table when the store records it.
"""

from __future__ import annotations

import enum
from typing import Final

from daemon.workflow.phases import RUNNING, Phase


class Action(enum.StrEnum):
    RETRY = "retry"  # run the failed/stuck step again
    SKIP = "skip"  # mark the current step as done by hand and continue with the next
    ABORT = "abort"  # stop the running step; the port fails with code `aborted`
    POWER_CYCLE = "power_cycle"  # switch the port off and on (the device re-enumerates)


ALLOWED_IN: Final[dict[Action, frozenset[Phase]]] = {
    Action.RETRY: frozenset({Phase.FAILED, Phase.NEEDS_ATTENTION}),
    Action.SKIP: frozenset({*RUNNING - {Phase.DETECTED}, Phase.FAILED, Phase.NEEDS_ATTENTION}),
    Action.ABORT: RUNNING,
    # Never in the middle of a restore: cutting power there can leave the device in Recovery.
    Action.POWER_CYCLE: frozenset(set(Phase) - {Phase.UPDATING}),
}


class ActionRejected(Exception):
    """The action does not apply to the port right now; the message says why, for the operator."""
