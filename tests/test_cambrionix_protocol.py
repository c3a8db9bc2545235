"""Cambrionix sans-IO layer: framing, commands and reply parsing against the pinned transcripts,
plus hypothesis fuzzing that only `CambrionixParseError` ever escapes a parser."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hubdrivers.base import ChargeState, PortAlarm, PortMode
from hubdrivers.cambrionix import protocol
from hubdrivers.cambrionix.board import TargetKind, parse_bd
from hubdrivers.cambrionix.info import (
    RailFlag,
    parse_health,
    parse_host,
    parse_id,
    parse_limits,
    parse_sec,
    parse_system,
)
from hubdrivers.cambrionix.models import MODELS, SS15_MAP, find_model
from hubdrivers.cambrionix.parsing import (
    FirmwareFamily,
    PdAttach,
    PdPortRow,
    PdPower,
    QuickCharge,
    UniversalFlag,
    parse_state,
    parse_state_row,
)
from hubdrivers.cambrionix.protocol import (
    CambrionixError,
    CambrionixParseError,
    ModeChar,
    Prompt,
    ResponseReader,
    parse_error_line,
)
from tests.cambrionix_fixtures import all_transcripts, load, load_wire

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- framing ----------------------------------------------------------------------------------------


def test_mbed_capture_with_echo_and_blank_line_before_prompt() -> None:
    reader = ResponseReader()
    reader.expect("state 12")
    [response] = reader.feed(load_wire("mbed_state12"))
    assert response.prompt is Prompt.MAIN
    assert response.lines == ("12, 0000, R D O, 0, 0, x, 0.00",)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_reply_split_into_arbitrary_chunks(size: int) -> None:
    wire = b"\x1bc\x1b[2J\x1b[Hstate 5\r\n5, 1044, A C, 1, 5, x, 0.01\r\n>> "
    reader = ResponseReader()
    reader.expect("state 5")
    responses = [r for i in range(0, len(wire), size) for r in reader.feed(wire[i : i + size])]
    assert [r.lines for r in responses] == [("5, 1044, A C, 1, 5, x, 0.01",)]


def test_bare_lf_boot_prompt_and_ansi() -> None:
    reader = ResponseReader()
    reader.expect("state")
    [response] = reader.feed(b"state\n\x1b[1m*E900: Invalid bootloader command\x1b[0m\nboot>> ")
    assert response.prompt is Prompt.BOOT
    assert response.lines == ("*E900: Invalid bootloader command",)
    error = response.error
    assert error is not None
    assert (error.code, error.fatal) == (900, False)


def test_prompt_needs_its_space_and_only_first_echo_is_dropped() -> None:
    reader = ResponseReader()
    reader.expect("id")
    assert reader.feed(b"id\r\nid\r\n>>") == []  # no trailing space yet: not complete
    [response] = reader.feed(b" ")
    assert response.lines == ("id",)


def test_stale_lines_are_handed_back_not_lost() -> None:
    reader = ResponseReader()
    reader.feed(b"\r\n*FATAL ERROR E500: Internal error\r\n")
    assert reader.expect("state") == ["*FATAL ERROR E500: Internal error"]


def test_overlong_line_is_discarded_and_reported() -> None:
    reader = ResponseReader()
    reader.expect(None)
    assert reader.feed(b"x" * (protocol.MAX_LINE + 10)) == []
    assert reader.discarded
    [response] = reader.feed(b"\r\n>> ")
    assert response.lines == ()


def test_error_lines() -> None:
    error = parse_error_line("*FATAL ERROR E123: Watchdog")
    assert error is not None
    assert (error.code, error.text, error.fatal) == (123, "Watchdog", True)
    assert str(CambrionixError(410, "Port number must be 1..8")) == "*E410: Port number must be 1..8"
    assert parse_error_line("5, 0000, R D O, 0, 0, x, 0.00") is None


# --- commands ---------------------------------------------------------------------------------------


def test_command_formatting() -> None:
    assert protocol.state() == "state"
    assert protocol.state(3) == "state 3"
    assert protocol.mode(ModeChar.CHARGE, 4, 1) == "mode c 4 1"
    assert protocol.mode(ModeChar.OFF) == "mode o"
    assert protocol.sef((protocol.ErrorFlag.UV5, protocol.ErrorFlag.OT)) == "sef 5UV OT"
    assert protocol.host(protocol.HostMode.AUTO) == "host auto"
    assert protocol.ledb(8, 2, 0b11110000, protocol.LedControl.HOLD) == "ledb 8 2 240 H"
    assert protocol.leds(1, "x1fp011") == "leds 1 x1fp011"
    assert protocol.reboot(watchdog=True) == "reboot watchdog"
    assert protocol.encode_command("state") == b"state\r\n"
    with pytest.raises(ValueError, match="profile"):
        protocol.mode(ModeChar.SYNC, 1, 2)
    with pytest.raises(ValueError, match="single command"):
        protocol.encode_command("state\r\nmode o")


# --- transcripts ------------------------------------------------------------------------------------


def test_bd_ss15_port_map_matches_gazoo() -> None:
    board = parse_bd(load("ss15_bd").lines)
    assert board.ports == 15
    assert [n.type for n in board.nodes][:2] == ["USB3 Hub 1", "Turbo Hub 2"]
    assert board.links[4].target.kind is TargetKind.CONTROL
    assert board.port_map() == dict(SS15_MAP)


@pytest.mark.parametrize("part", sorted(MODELS))
def test_every_models_bd_reproduces_its_gazoo_map(part: str) -> None:
    spec = MODELS[part]
    board = parse_bd(spec.bd_lines())
    assert board.ports == spec.ports
    assert sorted(board.port_map().values()) == list(range(1, spec.ports + 1))
    if spec.fallback_port_map:
        assert board.port_map() == dict(spec.fallback_port_map)


def test_health_ss15() -> None:
    health = parse_health(load("ss15_health").lines)
    assert health.uptime_s == 69928
    assert [(r.name, r.now, r.minimum, r.maximum) for r in health.rails] == [
        ("5V", 5.23, 5.22, 5.23),
        ("12V", 12.10, 12.06, 12.16),
    ]
    assert health.temperature_now is not None
    assert health.temperature_now.value == 37.4
    assert health.rebooted
    assert health.error_flags == frozenset()


def test_health_u16s_under_voltage_and_clipped_temperature() -> None:
    health = parse_health(load("u16s_health").lines)
    assert health.rails[0].flags == {RailFlag.UNDER_VOLTAGE}
    assert health.temperature_now is not None
    assert (health.temperature_now.value, health.temperature_now.bound) == (0.1, "<")
    assert health.error_flags == {"5V UV"}


def test_limits() -> None:
    ss15 = parse_limits(load("ss15_limits").lines)
    assert [(r.name, r.minimum, r.maximum) for r in ss15.rails] == [("5V", 4.5, 5.58), ("Input", 9.59, 20.0)]
    assert ss15.temperature_max_c == 75.0
    assert parse_limits(load("pp15s_limits").lines).rails[1].maximum == 14.5


@pytest.mark.parametrize("name", ["pp15s_id", "pp15s_id_api"])
def test_id(name: str) -> None:
    info = parse_id(load(name).lines)
    assert (info.manufacturer, info.hardware, info.hwid, info.family) == (
        "cambrionix",
        "PP15S",
        "0x13",
        FirmwareFamily.UNIVERSAL,
    )
    assert info.bootloader in ("0.15", "0.12")
    assert not info.in_boot_mode


@pytest.mark.parametrize("name", ["pp8s_system", "pp15s_system"])
def test_system(name: str) -> None:
    info = parse_system(load(name).lines)
    assert info.title.startswith("cambrionix ")
    assert info.compiled == "Feb 14 2017 17:30:26"  # split at the first colon only
    assert info.panel_id is None
    assert find_model(info.hardware) is not None


def test_host_and_sec() -> None:
    assert parse_host(load("pp15s_host").lines).present
    assert parse_sec(["armed"]) is True
    with pytest.raises(CambrionixParseError):
        parse_sec(["maybe"])


def test_universal_rows_map_onto_port_status() -> None:
    report = parse_state(load("ss15_loge_rows").lines, FirmwareFamily.UNIVERSAL)
    assert len(report.rows) == 15
    assert not report.ignored
    port7 = report.statuses()[6]
    assert (port7.attached, port7.mode, port7.charge, port7.current_ma) == (
        True,
        PortMode.CHARGE,
        ChargeState.PROFILING,
        78,
    )
    assert port7.alarms == {PortAlarm.REBOOTED}

    charging = parse_state(load("pp15s_state5").lines).statuses()[0]
    assert (charging.charge, charging.current_ma, charging.energy_wh) == (ChargeState.CHARGING, 1044, 0.01)


def test_port_error_is_an_alarm_not_a_detach() -> None:
    [status] = parse_state(load("pp15s_state4_port_error").lines).statuses()
    assert status.attached
    assert status.mode is PortMode.SYNC
    assert status.alarms == {PortAlarm.PORT_ERROR}


def test_every_flag_letter() -> None:
    row = parse_state_row("3, 0000, e E R T r D O, 0, 0, x, 0.00", FirmwareFamily.UNIVERSAL)
    assert not isinstance(row, PdPortRow)
    assert UniversalFlag.THEFT in row.flags
    status = row.to_status()
    assert status.alarms == set(PortAlarm)
    assert (status.attached, status.mode) == (False, PortMode.OFF)
    assert parse_state_row("1, 0000, A B, 0, 0, x, 0.00").to_status().mode is PortMode.BIASED
    finished = parse_state_row("1, 0012, A F, 1, 3600, 120, 4.51")
    assert finished.time_charged_s == 120
    assert finished.to_status().charge is ChargeState.FINISHED


@pytest.mark.parametrize(
    "line",
    [
        "1, 0000, A D S, 0, 0, x, 0.00",  # A and D are exclusive
        "1, 0000, A S C, 0, 0, x, 0.00",  # two modes
        "1, 0000, A, 0, 0, x, 0.00",  # no mode
        "1, 0000, A S Z, 0, 0, x, 0.00",  # unknown flag
        "1, 0000, A S, 0, 0, x",  # six fields
        "1, -5, A S, 0, 0, x, 0.00",
    ],
)
def test_bad_rows_are_set_aside(line: str) -> None:
    report = parse_state([line, "2, 0000, D S, 0, 0, x, 0.00"])
    assert report.ignored == (line,)
    assert [r.port for r in report.rows] == [2]


def test_pdsync_rows_positional_columns() -> None:
    report = parse_state(load("pdsync_state").lines)  # layout recognised without the family
    rows = report.rows
    assert all(isinstance(r, PdPortRow) for r in rows)
    host, charging, cable = rows[0], rows[1], rows[2]
    assert isinstance(host, PdPortRow)
    assert isinstance(charging, PdPortRow)
    assert isinstance(cable, PdPortRow)
    assert host.is_host_port
    assert (host.attach, host.power) == (PdAttach.ATTACHED, PdPower.HOST)
    assert host.quick_charge is QuickCharge.UNREPORTED
    assert (charging.voltage_mv, charging.current_ma, charging.time_charging_s) == (5000, 1543, 1603)
    statuses = report.statuses()
    assert [s.port for s in statuses] == [1, 2, 3, 4]  # the host row is not a downstream port
    assert statuses[0].charge is ChargeState.CHARGING
    assert statuses[0].mode is PortMode.SYNC
    assert statuses[2].mode is PortMode.OFF
    # `C c -`: a Type-C cable without a device is not an attached device
    cable_only = parse_state_row("2, 0500, 0000, C c -, 0, x, 0.00", FirmwareFamily.PDSYNC)
    assert not cable_only.to_status().attached


# --- fuzzing ----------------------------------------------------------------------------------------

PARSERS: list[Callable[[Sequence[str]], object]] = [
    parse_id,
    parse_system,
    parse_health,
    parse_limits,
    parse_host,
    parse_sec,
    parse_bd,
    parse_state,
    lambda lines: parse_state(lines, FirmwareFamily.PDSYNC),
]
REAL_LINES = sorted({line for t in all_transcripts() for line in t.lines})


def _parse_everything(lines: Sequence[str]) -> None:
    for parser in PARSERS:
        with contextlib.suppress(CambrionixParseError):
            parser(lines)


@FUZZ
@given(st.lists(st.binary(max_size=80), max_size=12))
def test_reader_survives_arbitrary_bytes(chunks: list[bytes]) -> None:
    reader = ResponseReader()
    reader.expect("state")
    for chunk in chunks:
        for response in reader.feed(chunk):
            _ = response.error
            _parse_everything(response.lines)
    reader.feed(b"\r\n>> ")


@FUZZ
@given(st.lists(st.text(max_size=60), max_size=8))
def test_parsers_survive_arbitrary_text(lines: list[str]) -> None:
    _parse_everything(lines)


_MUTATIONS = st.sampled_from(["delete", "insert", "replace", "duplicate", "truncate"])


@st.composite
def mutated_lines(draw: st.DrawFn) -> list[str]:
    lines = list(draw(st.lists(st.sampled_from(REAL_LINES), min_size=1, max_size=6)))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        pos = draw(st.integers(0, len(line)))
        kind = draw(_MUTATIONS)
        char = draw(st.sampled_from([*",:. -x0123456789ADSCFEeRrT\t*>", "\x1b[", "99999999999"]))
        if kind == "delete":
            line = line[:pos] + line[pos + 1 :]
        elif kind == "insert":
            line = line[:pos] + char + line[pos:]
        elif kind == "replace":
            line = line[:pos] + char + line[pos + 1 :]
        elif kind == "duplicate":
            line = line + line
        else:
            line = line[:pos]
        lines[i] = line
    return lines


@FUZZ
@given(mutated_lines())
def test_parsers_survive_mutated_real_lines(lines: list[str]) -> None:
    _parse_everything(lines)
    wire = "".join(f"{line}\r\n" for line in lines).encode("utf-8", "replace") + b">> "
    reader = ResponseReader()
    reader.expect("state")
    for response in reader.feed(wire):
        _parse_everything(response.lines)
