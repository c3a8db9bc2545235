"""The Cambrionix simulator against the pinned transcripts (so it cannot drift from the documented
format), its state machines, fault injection, and its pseudo-terminal behaviour."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import serial_asyncio_fast

from hubdrivers.cambrionix.models import MODELS, find_model
from hubdrivers.cambrionix.parsing import parse_state
from hubdrivers.cambrionix.protocol import WIRE_BYTES_PER_SECOND, ErrorFlag, ModeChar
from hubdrivers.cambrionix.sim_engine import HubEngine, HubState, SimConfig
from hubdrivers.cambrionix.sim_ports import DeviceBehaviour
from hubdrivers.cambrionix.simulator import CambrionixSimulator
from tests.cambrionix_fixtures import Transcript, all_transcripts, load, load_wire

ROOT = Path(__file__).resolve().parents[1]


def engine_for(model: str, now: float = 0.0, **config: object) -> HubEngine:
    spec = find_model(model)
    assert spec is not None
    return HubEngine(spec, SimConfig(**config), now=now)  # type: ignore[arg-type]


def run(engine: HubEngine, command: str, now: float = 1.0) -> list[str]:
    """Send one command; check the framing (echo, CRLF lines, prompt) and return the reply lines."""
    out = engine.receive(f"{command}\r\n".encode(), now).output.decode()
    echo = f"{command}\r\n"
    assert out.startswith(echo), out
    prompt = "boot>> " if engine.state is HubState.BOOT else ">> "
    assert out.endswith(prompt), out
    body = out[len(echo) : -len(prompt)]
    assert body == "" or body.endswith("\r\n"), body
    return body.split("\r\n")[:-1] if body else []


def shape(line: str) -> str:
    """A line with its numbers and padding abstracted away: what must match for `exact: shape`."""
    return re.sub(r"\s*\d+(?:\.\d+)?", " N", line.strip())


EXACT = [t for t in all_transcripts() if t.meta.get("exact") == "yes"]


@pytest.mark.parametrize("transcript", EXACT, ids=[t.name for t in EXACT])
def test_simulator_reproduces_transcript_verbatim(transcript: Transcript) -> None:
    engine = engine_for(transcript.model)
    for setup in filter(None, transcript.meta.get("setup", "").split(";")):
        run(engine, setup.strip())
    assert run(engine, transcript.command) == list(transcript.lines)


def test_mbed_wire_capture_byte_for_byte() -> None:
    engine = engine_for("PP15S", blank_line_before_prompt=True)
    run(engine, "mode o 12", now=0.0)
    assert engine.receive(b"state 12\r\n", 1.0).output == load_wire("mbed_state12")


def test_health_has_the_manuals_shape() -> None:
    engine = engine_for("SS15")
    assert [shape(x) for x in run(engine, "health")] == [shape(x) for x in load("ss15_health").lines]


def test_state_rows_have_the_manuals_shape() -> None:
    engine = engine_for("SS15")
    run(engine, "mode c", now=0.0)
    engine.attach(7, DeviceBehaviour(profiling_s=5), now=1.0)
    rows = run(engine, "state", now=1.5)
    assert [shape(r) for r in rows] == [shape(r) for r in load("ss15_loge_rows").lines]

    engine = engine_for("PP15S")
    run(engine, "crf")
    run(engine, "mode c 5", now=0.0)
    engine.attach(5, DeviceBehaviour(charge_ma=1044, profiling_s=1), now=1.0)
    assert shape(run(engine, "state 5", now=8.0)[0]) == shape(load("pp15s_state5").lines[0])

    engine = engine_for("PP15S")
    run(engine, "crf")
    engine.attach(4, DeviceBehaviour(), now=0.0)
    engine.set_port_error(4, True)
    assert shape(run(engine, "state 4")[0]) == shape(load("pp15s_state4_port_error").lines[0])


def test_pdsync_rows_have_the_documented_shape() -> None:
    engine = engine_for("PDSync-C4")
    engine.attach(1, DeviceBehaviour(profiling_s=0), now=0.0)
    run(engine, "mode o 3", now=0.0)
    rows = run(engine, "state", now=5.0)
    assert [shape(r) for r in rows] == [shape(r) for r in load("pdsync_state").lines]


@pytest.mark.parametrize("part", sorted(MODELS))
def test_every_model_answers_the_core_commands(part: str) -> None:
    engine = engine_for(part)
    spec = MODELS[part]
    rows = parse_state(run(engine, "state"), spec.family)
    assert not rows.ignored
    assert len(rows.statuses()) == spec.ports
    assert run(engine, "bd") == list(spec.bd_lines())
    assert run(engine, "id")[0].startswith(f"mfr:cambrionix,mode:main,hw:{spec.hardware},")
    assert run(engine, "system")[0] == spec.title
    assert run(engine, "nonsense") == ["*E400: Command not recognised"]
    assert run(engine, f"state {spec.ports + 1}") == [f"*E410: Port number must be 1..{spec.ports}"]
    if spec.has_leds:
        assert run(engine, "ledb 1 1 11110000b H") == []
        assert engine.ports[0].leds == {1: 0b11110000}
        assert run(engine, "leds 2 x1f") == []
        assert engine.ports[1].leds[2] == 0xFF
        assert run(engine, "ledb 1 1 zz") == ["*E425: Bad LED pattern"]
    else:
        assert run(engine, "ledb 1 1 255") == ["*E400: Command not recognised"]


def test_charge_state_machine_counters_and_energy() -> None:
    engine = engine_for("PP15S", port_reset_s=0.4)
    run(engine, "mode c 1", now=0.0)
    assert run(engine, "state 1", now=0.1) == ["1, 0000, R r D I, 0, 0, x, 0.00"]
    assert run(engine, "state 1", now=0.5) == ["1, 0000, R D I, 0, 0, x, 0.00"]
    run(engine, "crf")
    device = DeviceBehaviour(charge_ma=2000, profile_id=4, profiling_s=2, charge_s=3600, finished_ma=5)
    engine.attach(1, device, now=1.0)
    assert run(engine, "state 1", now=2.0).pop().startswith("1, 0070, A P, ")
    assert run(engine, "state 1", now=1803.0) == ["1, 2000, A C, 4, 1800, x, 5.00"]
    assert run(engine, "state 1", now=3663.0) == ["1, 0005, A F, 4, 3600, 60, 10.00"]
    engine.detach(1, now=3700.0)
    assert run(engine, "state 1", now=3701.0) == ["1, 0000, D I, 0, 0, x, 0.00"]


def test_rebooted_flag_until_crf_and_error_flags_until_cef() -> None:
    engine = engine_for("PP15S")
    assert all(" R " in f" {row} " for row in run(engine, "state"))
    run(engine, "crf")
    assert not any(" R " in row for row in run(engine, "state"))
    assert run(engine, "sef 5UV OT") == []
    assert all(", E " in row for row in run(engine, "state"))
    health = run(engine, "health")
    assert "5V Flags: UV" in health
    assert "Temperature Flags: OT" in health
    assert run(engine, "mode c 1") == ["*E422: Refused: an error flag is set"]
    assert run(engine, "sef 3UV") == ["*E426: Bad error flag"]  # PP15S has no 3.3 V rail
    run(engine, "cef")
    assert not any(" E " in row for row in run(engine, "state"))
    assert run(engine, "mode c 1") == []


def test_uv_can_latch_through_cef() -> None:
    engine = engine_for("U16S", latch_uv=True)
    run(engine, "sef 5UV")
    run(engine, "cef")
    assert engine.error_flags == {ErrorFlag.UV5}


def test_theft_when_armed_only_on_models_with_sec() -> None:
    engine = engine_for("U16S")
    run(engine, "crf")
    engine.attach(2, DeviceBehaviour(), now=0.0)
    assert run(engine, "sec") == ["disarmed"]
    run(engine, "sec arm")
    engine.detach(2, now=1.0)
    assert run(engine, "state 2") == ["2, 0000, T D S, 0, 0, x, 0.00"]
    run(engine, "sec disarm")
    assert run(engine, "state 2") == ["2, 0000, D S, 0, 0, x, 0.00"]
    assert run(engine_for("PP15S"), "sec arm") == ["*E400: Command not recognised"]


def test_modes_words_and_pd_limits() -> None:
    engine = engine_for("PP15S")
    changes: list[tuple[int, ModeChar]] = []
    engine.on_mode_change = lambda port, mode: changes.append((port, mode))
    assert run(engine, "mode charge 2 6") == []
    assert run(engine, "mode biased 3") == []
    assert run(engine, "mode s 4 1") == ["*E401: Extraneous parameter"]
    assert changes == [(2, ModeChar.CHARGE), (3, ModeChar.BIASED)]
    pd = engine_for("PDSync-C4")
    assert run(pd, "mode s 1")[0].startswith("*E421")
    assert run(pd, "mode o 1") == []


def test_fatal_error_then_boot_mode_until_reboot() -> None:
    engine = engine_for("PP15S", reboot_s=0.5)
    assert engine.fatal(123, "Stack overflow") == b"\r\n*FATAL ERROR E123: Stack overflow\r\n"
    assert engine.receive(b"state", 1.0).output == b""  # ignored: only ETX / CR count
    assert engine.receive(b"\r\n", 1.0).output == b"\r\nboot>> "
    assert run(engine, "id") == ["*E900: Invalid bootloader command"]
    assert engine.receive(b"reboot\r\n", 2.0).output == b"reboot\r\n"
    assert engine.receive(b"id\r\n", 2.1).output == b""  # rebooting: deaf
    assert engine.next_deadline() == 2.5
    banner = engine.due_output(2.6)
    assert banner.startswith(b"\x1bc")
    assert banner.endswith(b"\r\n>> ")
    assert b"cambrionix PP15S 15 Port USB Charge+Sync" in banner
    assert engine.state is HubState.MAIN
    assert engine.rebooted


def test_etx_cancels_partial_line_and_bare_cr_is_not_enough() -> None:
    engine = engine_for("PP15S")
    assert engine.receive(b"mode o", 0.0).output == b"mode o"
    assert engine.receive(b"\x03", 0.0).output == b"\r\n>> "
    assert engine.receive(b"state 1\r", 0.0).output == b"state 1\r"  # waits for LF
    assert engine.receive(b"\n", 0.0).output.endswith(b"\r\n>> ")
    assert engine.ports[0].mode is ModeChar.SYNC


def test_two_commands_in_one_write_are_a_violation() -> None:
    engine = engine_for("PP15S")
    engine.receive(b"state\r\nstate\r\n", 0.0)
    assert engine.violations


# --- over the pseudo-terminal ------------------------------------------------------------------------


@asynccontextmanager
async def client(path: str) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await serial_asyncio_fast.open_serial_connection(url=path, baudrate=115200)
    try:
        yield reader, writer
    finally:
        writer.close()
        await asyncio.sleep(0.05)  # let the transport close the fd


async def read_until_prompt(reader: asyncio.StreamReader, prompt: bytes = b">> ") -> bytes:
    return await asyncio.wait_for(reader.readuntil(prompt), 2.0)


async def test_pty_echo_prompt_cls_banner_and_etx() -> None:
    async with CambrionixSimulator("SS15") as sim, client(sim.path) as (reader, writer):
        writer.write(b"crf\r\n")
        assert await read_until_prompt(reader) == b"crf\r\n>> "
        writer.write(b"cls\r\n")
        banner = await read_until_prompt(reader)
        assert banner.startswith(b"cls\r\n\x1bc")
        assert b"cambrionix SuperSync15 15 Port USB Charge+Sync\r\n" in banner
        writer.write(b"sta\x03")
        assert await read_until_prompt(reader) == b"sta\r\n>> "
        assert sim.violations == []


async def test_strict_mode_records_a_client_that_does_not_wait() -> None:
    async with CambrionixSimulator("PP8S", strict=True, reply_delay=0.02) as sim, client(sim.path) as (r, w):
        w.write(b"state\r\n")
        await asyncio.sleep(0.005)
        w.write(b"id\r\n")
        await read_until_prompt(r)
        await read_until_prompt(r)
        assert sim.violations


async def test_disconnect_and_reconnect_keep_the_path() -> None:
    async with CambrionixSimulator("PP15S") as sim:
        first = sim.tty_path
        async with client(sim.path) as (reader, writer):
            sim.disconnect()
            assert not Path(sim.path).is_symlink()  # noqa: ASYNC240 - a local stat, not I/O to wait on
            with pytest.raises((asyncio.IncompleteReadError, OSError)):
                await asyncio.wait_for(reader.read(), 2.0) or (_ for _ in ()).throw(OSError("eof"))
        sim.reconnect()
        assert str(Path(sim.path).resolve()) == sim.tty_path  # noqa: ASYNC240
        assert first is not None
        async with client(sim.path) as (reader, writer):
            writer.write(b"id\r\n")
            assert b"hw:PP15S" in await read_until_prompt(reader)


async def test_paced_output_runs_at_115200_baud() -> None:
    async with CambrionixSimulator("PP15S", paced=True) as sim, client(sim.path) as (reader, writer):
        await asyncio.sleep(0.01)
        start = time.perf_counter()
        writer.write(b"state\r\n")
        data = await read_until_prompt(reader)
        elapsed = time.perf_counter() - start
        floor = len(data) / WIRE_BYTES_PER_SECOND
        assert floor <= elapsed < floor * 1.3 + 0.005


def test_standalone_prints_its_path() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hubdrivers.cambrionix.simulator", "--model", "U16S", "--attach", "1,2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        path = proc.stdout.readline().strip()
        assert path.endswith("cambrionix-U16S")
        assert os.path.islink(path)
    finally:
        proc.terminate()
        proc.wait(5)
