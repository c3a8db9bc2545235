"""CambrionixDriver against the simulator over a real pseudo-terminal (no serial mocks): every model,
link loss and reopen, alarms, serialised commands, boot-mode recovery and resync after noise."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

from hubdrivers.base import (
    Capability,
    HubError,
    LedPattern,
    PortAlarm,
    PortEventKind,
    PortMode,
    diff_ports,
)
from hubdrivers.cambrionix.discovery import SerialCandidate, discover
from hubdrivers.cambrionix.driver import LED_PATTERNS, LED_ROW, CambrionixDriver, CambrionixRefused
from hubdrivers.cambrionix.models import MODELS
from hubdrivers.cambrionix.protocol import ErrorFlag, ModeChar
from hubdrivers.cambrionix.sim_engine import HubState, SimConfig
from hubdrivers.cambrionix.simulator import CambrionixSimulator


@asynccontextmanager
async def hub(
    model: str = "PP15S", *, command_timeout: float = 1.0, **sim_options: object
) -> AsyncIterator[tuple[CambrionixSimulator, CambrionixDriver]]:
    sim = CambrionixSimulator(model, strict=True, **sim_options)  # type: ignore[arg-type]
    sim.start()
    driver = CambrionixDriver(
        sim.path, usb_serial="DJ00JMN0", command_timeout=command_timeout, reboot_timeout=3.0
    )
    try:
        yield sim, driver
    finally:
        await driver.close()
        sim.close()
    assert sim.violations == []  # the driver never overlapped commands on the wire


@pytest.mark.parametrize("part", sorted(MODELS))
async def test_every_model_every_command(part: str) -> None:
    spec = MODELS[part]
    async with hub(part) as (sim, driver):
        sim.attach(2, current_ma=900, profiling_s=0)
        info = await driver.open()
        assert (info.model, info.port_count, info.serial) == (part, spec.ports, "DJ00JMN0")
        expected_caps = {
            Capability.ATTACH_SENSE,
            Capability.PORT_POWER,
            Capability.PORT_MODE,
            Capability.CURRENT_SENSE,
        }
        assert info.capabilities == expected_caps | ({Capability.PORT_LED} if spec.has_leds else set())
        assert driver.capabilities == info.capabilities

        statuses = await driver.poll()
        assert [s.port for s in statuses] == list(range(1, spec.ports + 1))
        assert statuses[1].attached
        assert statuses[1].current_ma == 900
        assert not statuses[0].attached

        paths = await driver.port_paths()
        assert sorted(paths) == list(range(1, spec.ports + 1))
        if spec.fallback_port_map:
            assert paths == {port: path for path, port in spec.fallback_port_map.items()}

        pd = spec.family.three_column_flags
        for mode in PortMode:
            if pd and mode in (PortMode.CHARGE, PortMode.BIASED):
                with pytest.raises(HubError, match="no"):
                    await driver.set_mode(2, mode)
                continue
            await driver.set_mode(2, mode)
            assert (await driver.poll())[1].mode is mode
        with pytest.raises(HubError, match="does not exist"):
            await driver.set_mode(spec.ports + 1, PortMode.OFF)

        if spec.has_leds:
            await driver.set_led(3, LedPattern.SLOW_BLINK)
            assert sim.engine.ports[2].leds == {LED_ROW: LED_PATTERNS[LedPattern.SLOW_BLINK]}
        else:
            with pytest.raises(HubError, match="LED"):
                await driver.set_led(3, LedPattern.SOLID)

        health = await driver.health()
        assert health.rebooted
        assert [r.name for r in health.rails] == list(spec.rails)
        assert (await driver.host()).present


async def test_rebooted_flag_is_information_until_the_caller_clears_it() -> None:
    async with hub() as (_sim, driver):
        await driver.open()
        assert all(PortAlarm.REBOOTED in s.alarms for s in await driver.poll())
        await driver.clear_rebooted_flag()
        assert not any(s.alarms for s in await driver.poll())


async def test_hub_vanishes_and_a_new_driver_reads_it_again() -> None:
    async with hub() as (sim, driver):
        sim.attach(5, current_ma=500)
        await driver.open()
        assert (await driver.poll())[4].attached
        sim.disconnect()
        with pytest.raises(HubError):
            await driver.poll()
        with pytest.raises(HubError):  # single-use: it stays broken
            await driver.poll()
        await driver.close()

        with pytest.raises(HubError, match="cannot open"):
            await CambrionixDriver(sim.path).open()

        sim.reconnect()
        again = CambrionixDriver(sim.path, command_timeout=1.0)
        try:
            await again.open()
            assert (await again.poll())[4].attached
        finally:
            await again.close()


async def test_link_loss_while_waiting_fails_fast() -> None:
    async with hub(command_timeout=5.0) as (sim, driver):
        await driver.open()
        sim.wedge()
        asyncio.get_running_loop().call_later(0.1, sim.disconnect)
        started = asyncio.get_running_loop().time()
        with pytest.raises(HubError, match="link lost"):
            await driver.poll()
        assert asyncio.get_running_loop().time() - started < 2.0


async def test_port_error_and_hub_error_are_alarms_not_detaches() -> None:
    async with hub() as (sim, driver):
        sim.attach(3)
        await driver.open()
        await driver.clear_rebooted_flag()
        before = {s.port: s for s in await driver.poll()}
        sim.set_port_error(3)
        sim.set_error_flags(ErrorFlag.OV12)
        after = await driver.poll()
        assert after[2].attached
        assert after[2].alarms == {PortAlarm.PORT_ERROR, PortAlarm.HUB_ERROR}
        events = diff_ports(before, after)
        assert {e.kind for e in events} == {PortEventKind.ALARMS, PortEventKind.CURRENT}
        assert (await driver.health()).error_flags == {"12V OV"}

        with pytest.raises(CambrionixRefused) as refused:
            await driver.set_mode(3, PortMode.CHARGE)
        assert refused.value.error.code == 422
        await driver.clear_error_flags()
        await driver.set_mode(3, PortMode.CHARGE)


async def test_concurrent_calls_are_serialised_on_the_wire() -> None:
    async with hub("U16S", reply_delay=0.002) as (sim, driver):
        await driver.open()
        calls: list[Coroutine[Any, Any, object]] = [driver.poll() for _ in range(20)]
        calls += [driver.set_mode(p, PortMode.CHARGE) for p in range(1, 9)]
        calls += [driver.set_led(p, LedPattern.FAST_BLINK) for p in range(1, 5)]
        results = await asyncio.gather(*calls)
        assert all(isinstance(r, list) and len(r) == 16 for r in results[:20])
        assert all(p.mode is ModeChar.CHARGE for p in sim.engine.ports[:8])
    # `hub` asserts the strict simulator saw no command before the previous prompt


async def test_fatal_error_boot_mode_is_recovered_by_reboot() -> None:
    async with hub(config=SimConfig(reboot_s=0.2)) as (sim, driver):
        sim.attach(1)
        await driver.open()
        await driver.clear_rebooted_flag()
        sim.fatal(123, "Stack overflow")
        statuses = await driver.poll()  # boot>> -> reboot -> resync -> retried
        assert statuses[0].attached
        assert PortAlarm.REBOOTED in statuses[0].alarms
        assert sim.state is HubState.MAIN


async def test_open_recovers_a_hub_left_in_boot_mode() -> None:
    async with hub(config=SimConfig(reboot_s=0.1)) as (sim, driver):
        sim.engine.state = HubState.BOOT
        info = await driver.open()
        assert info.model == "PP15S"
        assert sim.state is HubState.MAIN


async def test_timeout_then_etx_resync_after_a_garbled_partial_line(caplog: pytest.LogCaptureFixture) -> None:
    async with hub(command_timeout=0.3) as (sim, driver):
        await driver.open()
        sim.wedge()
        with pytest.raises(HubError, match="no reply"):
            await driver.poll()
        sim.wedge(False)
        sim.inject_bytes(b"\x1b[2J12, 00\xff\xfegarbled")  # half a line, no newline, no prompt
        caplog.set_level(logging.WARNING, "hubdrivers.cambrionix")
        assert len(await driver.poll()) == 15

        sim.inject_bytes(b"line noise\r\n")  # a stray complete line between commands is logged
        assert len(await driver.poll()) == 15
        assert "line noise" in caplog.text


async def test_second_driver_cannot_share_the_port() -> None:
    async with hub() as (sim, driver):
        await driver.open()
        other = CambrionixDriver(sim.path)
        with pytest.raises(HubError, match="cannot open"):
            await other.open()
        await other.close()
        assert len(await driver.poll()) == 15


async def test_paced_round_trip_close_to_wire_time() -> None:
    async with hub("SS15", paced=True) as (sim, driver):
        await driver.open()
        before = sim.bytes_out
        loop = asyncio.get_running_loop()
        started = loop.time()
        await driver.poll()
        elapsed = loop.time() - started
        floor = (sim.bytes_out - before) / 11520
        assert floor <= elapsed < floor * 1.3 + 0.005


async def test_discovery_probes_with_the_driver() -> None:
    async with hub("SS15") as (sim, _driver):
        missing = SerialCandidate("/nonexistent/ttyUSB9", 0x0403, 0x6015, "NOPE")
        found = await discover(
            [SerialCandidate(sim.path, 0x2CD9, 0x0021, "000000897FD0505A", "1-14.5:1.1"), missing],
            command_timeout=0.5,
        )
        assert found[0].ok
        assert (found[0].model, found[0].hardware, found[0].port_count) == ("SS15", "SS15", 15)
        assert found[0].usb_serial == "000000897FD0505A"
        assert not found[1].ok
        assert found[1].error is not None
