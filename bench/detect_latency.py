"""How long from a device touching a port to the station knowing, in the store and on MQTT?

Run: .venv/bin/python bench/detect_latency.py [--hubs 4] [--devices 60] [--spread 10] [--model PP15S]

Setup: the real station in-process (store, runners, Cambrionix drivers on pty simulators, the
production `DeviceWatcher` and usbmuxd client, the publisher) against the simulated bench at demo
speed (x60, so the host's USB delays are real-world values), publishing to a real Mosquitto started
for the run. `--devices` devices are plugged into random free ports at random moments over
`--spread` seconds while the bench keeps working on the ones already in.

The floor is what the hardware takes before any software can know: enumeration (sysfs + uevent) then
usbmuxd's `Attached` (the simulated host draws each from 0.25 s / 0.35 s +-20 %, typical of a real
Linux host). It is measured per device: plug -> the `Attached` leaving the fake usbmuxd. Reported:

* floor          plug -> usbmuxd Attached (hardware + usbmuxd, not ours)
* store          plug -> port `detected` committed in SQLite
* mqtt           plug -> retained `detected` state received by a subscriber at Mosquitto
* overhead       store - floor and mqtt - floor per device: the daemon's own share

Hub polling is not on this path: a device is detected from USB, and the hub's attach flag only
decides unplugs. Target: mqtt p99 <= floor p99 + 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiomqtt  # noqa: E402
import structlog  # noqa: E402

from daemon.config import parse_config  # noqa: E402
from daemon.models import PortRef  # noqa: E402
from daemon.sim.demo import DemoOptions, demo_config  # noqa: E402
from daemon.sim.devices import SimDevice  # noqa: E402
from daemon.station import Station  # noqa: E402
from daemon.workflow.phases import Phase  # noqa: E402
from tests.mqtt_broker import Mosquitto, mosquitto_binary  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def line(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"{name:<9} p50 {pct(ms, 0.5):7.1f} ms   p99 {pct(ms, 0.99):7.1f} ms   "
        f"max {max(ms):7.1f} ms   mean {statistics.fmean(ms):7.1f} ms"
    )


async def measure(args: argparse.Namespace, broker: Mosquitto, state_dir: Path) -> None:  # noqa: PLR0915
    base = demo_config(
        DemoOptions(devices=0, hub_model=args.model, hubs=args.hubs, speed=60.0, mqtt_url=broker.url),
        state_dir,
    )
    data = base.model_dump(mode="json", exclude_none=True)
    data["logging"] = {"level": "warning"}
    config = parse_config(data, state_dir)
    station = Station(config)
    rng = random.Random(args.seed)
    plugged: dict[str, float] = {}  # udid -> plug time
    floor: dict[str, float] = {}
    stored: dict[str, float] = {}
    received: dict[str, float] = {}
    udid_of_port: dict[PortRef, str] = {}

    def on_commit() -> None:
        now = time.perf_counter()
        for ref, udid in udid_of_port.items():
            if udid not in stored and station.store.port(ref).phase is not Phase.EMPTY:
                stored[udid] = now

    station.store.subscribe(on_commit)
    stop = asyncio.Event()
    task = asyncio.create_task(station.run(stop))
    await asyncio.wait_for(station.ready.wait(), 30)
    bus = station.bus
    assert bus is not None
    attach = bus.usbmuxd.attach

    def timed_attach(device: object, usb_path: str, *a: object, **kw: object) -> object:
        entry = attach(device, usb_path, *a, **kw)  # type: ignore[arg-type]
        if entry is not None and entry.udid in plugged and entry.udid not in floor:
            floor[entry.udid] = time.perf_counter()
        return entry

    bus.usbmuxd.attach = timed_attach  # type: ignore[method-assign]

    async with aiomqtt.Client(broker.host, broker.port, identifier="detect-bench") as client:
        await client.subscribe(f"{config.mqtt.prefix}/{config.station.id}/hub/+/port/+/state", qos=1)

        async def listen() -> None:
            async for message in client.messages:
                payload = json.loads(bytes(message.payload)) if message.payload else {}
                udid = payload.get("udid")
                if udid in plugged and udid not in received and payload.get("phase") != "empty":
                    received[udid] = time.perf_counter()

        listener = asyncio.create_task(listen())
        await asyncio.sleep(2.0)  # hubs open, port maps known, retained snapshot delivered
        moments = sorted(rng.uniform(0, args.spread) for _ in range(args.devices))
        started = time.perf_counter()
        for moment in moments:
            await asyncio.sleep(max(0.0, started + moment - time.perf_counter()))
            free = station.world.free_ports()
            ref = rng.choice(free)
            device: SimDevice = station.world.new_device(18)
            udid_of_port[ref] = device.udid
            plugged[device.udid] = time.perf_counter()
            station.world.plug(ref, device)
        await asyncio.sleep(3.0)  # well past the slowest expected detection
        listener.cancel()
    stop.set()
    await task

    missing = args.devices - len(received)
    udids = [u for u in plugged if u in floor and u in stored and u in received]
    print(
        f"{args.devices} devices plugged at random over {args.spread:g} s into {args.hubs} x {args.model} "
        f"({len(station.runners)} ports), real Mosquitto; {len(udids)} fully measured, {missing} missing"
    )
    print(line("floor", [floor[u] - plugged[u] for u in udids]))
    print(line("store", [stored[u] - plugged[u] for u in udids]))
    print(line("mqtt", [received[u] - plugged[u] for u in udids]))
    print(line("overhead", [stored[u] - floor[u] for u in udids]) + "   (store - floor)")
    print(line("overhead", [received[u] - floor[u] for u in udids]) + "   (mqtt - floor)")
    ratio = pct([received[u] - plugged[u] for u in udids], 0.5) / pct(
        [floor[u] - plugged[u] for u in udids], 0.5
    )
    print(f"ratio     mqtt p50 / floor p50 = {ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hubs", type=int, default=4)
    parser.add_argument("--model", default="PP15S")
    parser.add_argument("--devices", type=int, default=60)
    parser.add_argument("--spread", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if mosquitto_binary() is None:
        sys.exit("mosquitto is not installed (apt install mosquitto)")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "broker") as broker:
        asyncio.run(measure(args, broker, Path(tmp) / "state"))


if __name__ == "__main__":
    main()
