"""How close does a Cambrionix `state` poll get to the wire, and what does polling cost the daemon?

Run: .venv/bin/python bench/hub_poll.py [--hubs 4] [--seconds 10] [--interval 0.5] [--rounds 50]

Setup: each hub is a standalone simulator process (`python -m hubdrivers.cambrionix.simulator
--model PP15S --paced`, 15 ports, some devices attached) on its own pseudo-terminal, so this
process contains only the drivers and `time.process_time()` measures the driver side alone.

1. Round trip. A pty has no baud rate, so the simulator paces its output at 115200 baud 8N1
   (11520 bytes/s). The floor of one poll is the bytes the hub must send - echo of `state\r\n`,
   15 rows, prompt - divided by 11520 (the host's 7 command bytes travel while the echo does, so
   they add nothing). Measured: driver write -> parsed `list[PortStatus]`, sequential polls on one
   hub. Also shown unpaced (pty speed), which is pure driver + simulator + scheduling overhead.
2. CPU. All hubs polled every `--interval` s for `--seconds` s, concurrently as the daemon's
   supervisors do; reports CPU seconds per poll and % of one core.
Targets: round trip <= 1.3x floor; 4 hubs @ 500 ms <= 1 % of one core.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hubdrivers.cambrionix.driver import CambrionixDriver  # noqa: E402
from hubdrivers.cambrionix.protocol import WIRE_BYTES_PER_SECOND  # noqa: E402


def start_simulator(model: str, paced: bool) -> tuple[subprocess.Popen[str], str]:
    argv = [sys.executable, "-m", "hubdrivers.cambrionix.simulator", "--model", model, "--attach", "1,4,7,12"]
    proc = subprocess.Popen(
        [*argv, *(["--paced"] if paced else [])],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


async def round_trip(driver: CambrionixDriver, rounds: int) -> tuple[float, float, int]:
    """(median seconds per poll, floor seconds, bytes per poll)."""
    await driver.poll()  # warm up
    times = []
    per_poll = 0
    for _ in range(rounds):
        before = driver.bytes_received
        started = time.perf_counter()
        await driver.poll()
        times.append(time.perf_counter() - started)
        per_poll = driver.bytes_received - before
    return statistics.median(times), per_poll / WIRE_BYTES_PER_SECOND, per_poll


async def poll_every(driver: CambrionixDriver, interval: float, until: float, counter: list[int]) -> None:
    loop = asyncio.get_running_loop()
    tick = loop.time()
    while tick < until:
        await driver.poll()
        counter[0] += 1
        tick += interval
        await asyncio.sleep(max(0.0, tick - loop.time()))


async def main(args: argparse.Namespace) -> None:
    for paced in (True, False):
        procs = [start_simulator("PP15S", paced) for _ in range(args.hubs)]
        drivers = [CambrionixDriver(path) for _, path in procs]
        try:
            for driver in drivers:
                await driver.open()
            median, floor, size = await round_trip(drivers[0], args.rounds)
            label = "paced 115200" if paced else "unpaced pty "
            print(
                f"[{label}] state round trip: median {median * 1000:6.2f} ms, wire floor "
                f"{floor * 1000:6.2f} ms ({size} bytes), ratio {median / floor:4.2f}x"
            )
            if not paced:
                continue
            loop = asyncio.get_running_loop()
            counter = [0]
            cpu0, wall0 = time.process_time(), time.perf_counter()
            until = loop.time() + args.seconds
            await asyncio.gather(*(poll_every(d, args.interval, until, counter) for d in drivers))
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            print(
                f"[{label}] {args.hubs} hubs every {args.interval * 1000:.0f} ms for {wall:.1f} s: "
                f"{counter[0]} polls, {cpu / counter[0] * 1e6:.0f} us CPU per poll, "
                f"{cpu / wall * 100:.3f} % of one core"
            )
        finally:
            for driver in drivers:
                await driver.close()
            for proc, _ in procs:
                proc.terminate()
                proc.wait(5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hubs", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=50)
    asyncio.run(main(parser.parse_args()))
