"""The transition table: its shape, and that the store refuses anything it does not allow."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.models import PortRef, Transition
from daemon.store import Store
from daemon.workflow.phases import ALLOWED, RUNNING, WORK, IllegalTransition, Phase, check_transition


def test_every_phase_has_a_row() -> None:
    assert set(ALLOWED) == set(Phase)


def test_a_port_only_starts_by_detecting_and_done_only_ends_by_unplugging() -> None:
    assert ALLOWED[Phase.EMPTY] == {Phase.DETECTED}
    assert ALLOWED[Phase.DONE] == {Phase.EMPTY}
    assert ALLOWED[Phase.INTERRUPTED] == {Phase.DETECTED, Phase.EMPTY}


@pytest.mark.parametrize("phase", sorted(RUNNING))
def test_running_phases_can_stop_every_way(phase: Phase) -> None:
    for stop in (Phase.FAILED, Phase.NEEDS_ATTENTION, Phase.INTERRUPTED, Phase.EMPTY):
        check_transition(phase, stop)


def test_work_only_moves_forward_or_retries() -> None:
    for i, phase in enumerate(WORK):
        for earlier in WORK[:i]:
            with pytest.raises(IllegalTransition):
                check_transition(phase, earlier)
        check_transition(phase, phase)  # a retry is the same phase, next attempt


@given(st.lists(st.sampled_from(list(Phase)), min_size=1, max_size=30))
def test_store_history_only_holds_allowed_moves(
    tmp_path_factory: pytest.TempPathFactory, moves: list[Phase]
) -> None:
    store = Store(tmp_path_factory.mktemp("db") / "s.sqlite3")
    ref = PortRef("hub-a", 1)
    store.ensure_ports([ref])
    current = Phase.EMPTY
    for move in moves:
        try:
            store.record(Transition(ref=ref, to=move))
        except IllegalTransition:
            assert move not in ALLOWED[current]
            assert store.port(ref).phase is current  # nothing was written
        else:
            assert move in ALLOWED[current]
            current = move
    history = store.history(ref=ref)
    for row in history:
        assert row.phase in ALLOWED[row.from_phase]
    assert [r.phase for r in history][-1:] == ([current] if history else [])
    store.close()


def test_store_is_wal(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
