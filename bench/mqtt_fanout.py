"""A full bench on MQTT: 60 ports working flat out, then a broker outage. What reaches the broker?

Run: .venv/bin/python bench/mqtt_fanout.py [--outage 30] [--outbox-limit 100000] [--speed 100000]
     [--ports 60] [--mqtt-url mqtt://host:port]

Setup: the real station in-process (store, 60 port runners on 4 simulated 15-port hubs, simulated
devices, the production publisher) at the simulator's top speed, so device time is negligible and
the message rate is bounded by the host. Mosquitto is started for the run (`set_tcp_nodelay true`,
no persistence), unless `--mqtt-url` names one; the outage needs our own broker. The simulated
world's state file is off (saving every device on each change is simulator cost, not the daemon's).

Two rounds, each one device per port through the whole workflow:

* live        broker up. Messages/s acknowledged by the broker (deleted from the outbox) and
              received by an independent subscriber; latency from a transition's commit in SQLite
              to its event at the subscriber (p50/p99/max; the subscriber shares the daemon's event
              loop); the outbox's size; how late a 10 ms sleep wakes (how busy the loop is).
* outage      all devices unplugged, the broker stopped, 60 new devices plugged: the workflow runs
              while the broker is away for `--outage` seconds. Outbox size (max), transitions
              recorded meanwhile, the daemon's reconnect delay after the broker is back (its
              backoff: up to 30 s +-20 % late in an outage), the drain time from reconnect to an
              empty outbox, and events dropped (a small `--outbox-limit` shows the bound: the size
              stays at the limit, or at one retained message per topic if that is more, and the
              oldest events go).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiomqtt  # noqa: E402
import structlog  # noqa: E402

from daemon.config import parse_config  # noqa: E402
from daemon.models import PortState, Transition  # noqa: E402
from daemon.sim.demo import DemoOptions, demo_config, minimum_major  # noqa: E402
from daemon.station import Station  # noqa: E402
from daemon.workflow.phases import SETTLED, Phase  # noqa: E402
from tests.mqtt_broker import Mosquitto, mosquitto_binary  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()}"


def mosquitto_version(binary: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5, check=False)
        first = (out.stdout or out.stderr).splitlines()
        if first:
            return first[0].strip()
    return "mosquitto"


class Meter:
    """Counts what the daemon commits and what the broker acknowledges, by wrapping the store."""

    def __init__(self, station: Station) -> None:
        self.committed: dict[tuple[str, int, int], float] = {}
        """(hub, port, seq) of each transition -> perf_counter() right after its commit."""
        self.transitions = 0
        self.acked = 0
        store = station.store
        record, ack = store.record, store.ack

        def timed_record(t: Transition) -> PortState:
            state = record(t)
            self.committed[(t.ref.hub, t.ref.port, state.seq)] = time.perf_counter()
            self.transitions += 1
            return state

        def counted_ack(ids: Any) -> None:
            ack(ids)
            self.acked += len(ids)

        store.record = timed_record  # type: ignore[method-assign]
        store.ack = counted_ack  # type: ignore[method-assign]


class Subscriber:
    """An independent client on everything the station publishes; reconnects across the outage."""

    def __init__(self, host: str, port: int, base: str) -> None:
        self.host, self.port, self.base = host, port, base
        self.received = 0
        self.events: list[tuple[tuple[str, int, int], float]] = []
        self.online_at: float | None = None
        """perf_counter() of the last `online` status received (the daemon's (re)connect)."""

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(self.host, self.port, timeout=5) as client:
                    await client.subscribe(f"{self.base}/#", qos=1)
                    async for message in client.messages:
                        now = time.perf_counter()
                        self.received += 1
                        topic = message.topic.value
                        assert isinstance(message.payload, bytes)
                        if topic.endswith("/event"):
                            doc = json.loads(message.payload)
                            self.events.append(((doc["hub"], doc["port"], doc["seq"]), now))
                        elif topic == f"{self.base}/status" and message.payload == b"online":
                            self.online_at = now
            except (aiomqtt.MqttError, OSError):
                await asyncio.sleep(0.05)


async def loop_lag(samples: list[float]) -> None:
    """How late a 10 ms sleep wakes up: how busy the event loop the publisher shares is."""
    while True:
        before = time.perf_counter()
        await asyncio.sleep(0.01)
        samples.append(time.perf_counter() - before - 0.01)


async def wait_for(condition: Any, limit: float, step: float = 0.005) -> float | None:
    """perf_counter() when `condition()` first held, or None after `limit` seconds."""
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        if condition():
            return time.perf_counter()
        await asyncio.sleep(step)
    return None


async def measure(args: argparse.Namespace, url: str, broker: Mosquitto | None, state_dir: Path) -> None:  # noqa: PLR0915
    options = DemoOptions(
        devices=args.ports, hub_model="sim", ports_per_hub=15, speed=args.speed, mqtt_url=url
    )
    data = demo_config(options, state_dir).model_dump(mode="json", exclude_none=True)
    data["logging"] = {"level": "warning"}
    data["mqtt"]["outbox_limit"] = args.outbox_limit
    data["mqtt"]["inflight"] = args.inflight
    # The demo saves the simulated world (every device ever made) on each change, a third of the
    # CPU of this run, and nothing the daemon does: without it the figures are the daemon's.
    data["sim"].pop("state_file", None)
    config = parse_config(data, state_dir)
    station = Station(config)
    world = station.world
    assert world is not None
    meter = Meter(station)
    base = f"{config.mqtt.prefix}/{config.station.id}"
    host, port = config.mqtt.host_port()
    subscriber = Subscriber(host, port, base)
    listening = asyncio.create_task(subscriber.run())
    stop = asyncio.Event()
    running = asyncio.create_task(station.run(stop))
    await asyncio.wait_for(station.ready.wait(), 30)
    store = station.store
    ports = len(station.runners)

    def settled() -> bool:
        return all(s.phase in SETTLED for s in store.ports())

    # Live: the station plugged a device into every port at start; all run the whole workflow.
    sizes: list[int] = []
    lags: list[float] = []
    lagging = asyncio.create_task(loop_lag(lags))
    t0, received0 = time.perf_counter(), subscriber.received
    while not settled() or store.outbox_size() > 0:
        sizes.append(store.outbox_size())
        await asyncio.sleep(0.02)
        if time.perf_counter() - t0 > args.timeout:
            print(f"live: not all ports settled within {args.timeout:g} s")
            break
    t1 = time.perf_counter()
    lagging.cancel()
    await wait_for(lambda: len(subscriber.events) >= meter.transitions, 5)
    live_s = t1 - t0
    latencies = [
        arrived - meter.committed[key] for key, arrived in subscriber.events if key in meter.committed
    ]
    print(
        f"live: {ports} devices x whole workflow, {meter.transitions:,} transitions in {live_s:.1f} s "
        f"({meter.transitions / live_s:,.0f} transitions/s)"
    )
    print(
        f"  sustained   {meter.acked / live_s:,.0f} msg/s acked by the broker ({meter.acked:,} messages), "
        f"{(subscriber.received - received0) / live_s:,.0f} msg/s received by the subscriber"
    )
    ms = [v * 1000 for v in latencies]
    print(
        f"  latency     transition -> its event at the subscriber: p50 {pct(ms, 0.5):.1f} ms, "
        f"p99 {pct(ms, 0.99):.1f} ms, max {max(ms, default=float('nan')):.1f} ms ({len(ms):,} events)"
    )
    print(
        f"  outbox      max {max(sizes, default=0)} rows while live, "
        f"{store.dropped_events():,} events dropped meanwhile (limit {args.outbox_limit:,})"
    )
    lag = [v * 1000 for v in lags]
    print(
        f"  event loop  a 10 ms sleep wakes {pct(lag, 0.5):.1f} ms late (p50), {pct(lag, 0.99):.1f} ms "
        "(p99): the simulated bench shares the loop and the CPUs"
    )

    if broker is None:
        print("outage: skipped (--mqtt-url: the broker is not ours to stop)")
    else:
        for state in store.ports():
            world.unplug(state.ref)
        await wait_for(lambda: all(s.phase is Phase.EMPTY for s in store.ports()), 30)
        await wait_for(lambda: store.outbox_size() == 0, 30)
        trans_before, acked_before, dropped_before = meter.transitions, meter.acked, store.dropped_events()
        broker.stop()
        down = time.perf_counter()
        world.plug_new(ports, minimum_major(config))  # the next 60 devices, worked on while it is down
        peak = 0
        done_at: float | None = None
        while time.perf_counter() - down < args.outage:
            peak = max(peak, store.outbox_size())
            if done_at is None and settled():
                done_at = time.perf_counter()
            await asyncio.sleep(0.02)
        during = meter.transitions - trans_before
        at_return = store.outbox_size()
        broker.start()
        back = time.perf_counter()
        subscriber.online_at = None
        online = await wait_for(lambda: subscriber.online_at is not None, 60)
        drained = await wait_for(lambda: store.outbox_size() == 0, 120)
        work = f"all settled after {done_at - down:.1f} s" if done_at is not None else "still working"
        print(
            f"outage ({args.outage:g} s; {ports} new devices x whole workflow meanwhile, {work}; "
            f"outbox_limit {args.outbox_limit:,}): {during:,} transitions recorded"
        )
        print(f"  outbox      max {peak:,} rows during the outage, {at_return:,} when the broker returned")
        if online is None or drained is None:
            print("  reconnect   the daemon did not come back within 60 s / drain within 120 s")
        else:
            sent = meter.acked - acked_before
            print(
                f"  reconnect   {online - back:.1f} s after the broker was back (publisher backoff); "
                f"outbox drained {drained - online:.2f} s after that ({sent:,} messages, "
                f"{sent / max(drained - online, 1e-3):,.0f} msg/s)"
            )
        print(
            f"  dropped     {store.dropped_events() - dropped_before:,} events in the outage "
            f"(oldest first; every port's state kept), {store.dropped_events():,} in all"
        )

    stop.set()
    await running
    listening.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listening


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--ports", type=int, default=60, help="ports and devices (15 per hub)")
    parser.add_argument("--speed", type=float, default=100_000.0, help="simulator speed (max 100000)")
    parser.add_argument("--timeout", type=float, default=120.0, help="most seconds for a workflow round")
    parser.add_argument("--outage", type=float, default=30.0, help="seconds the broker is stopped")
    parser.add_argument("--outbox-limit", type=int, default=100_000, help="[mqtt] outbox_limit (>= 100)")
    parser.add_argument("--inflight", type=int, default=50, help="[mqtt] inflight (the broker has nodelay)")
    parser.add_argument("--mqtt-url", help="an existing broker (no outage phase)")
    args = parser.parse_args()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(int(os.environ.get("BENCH_LOG", "40")))
    )
    print(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {machine()}")
    if args.mqtt_url:
        with tempfile.TemporaryDirectory(prefix="fanout-") as tmp:
            print(f"broker: {args.mqtt_url}")
            asyncio.run(measure(args, args.mqtt_url, None, Path(tmp)))
        return
    binary = mosquitto_binary()
    if binary is None:
        sys.exit("mosquitto is not installed (apt-get install mosquitto), or pass --mqtt-url")
    with tempfile.TemporaryDirectory(prefix="fanout-") as tmp:
        broker = Mosquitto(Path(tmp) / "broker", binary=binary, extra_config=["set_tcp_nodelay true"])
        print(f"broker: {mosquitto_version(binary)} on loopback, set_tcp_nodelay true, no persistence")
        with broker:
            asyncio.run(measure(args, broker.url, broker, Path(tmp) / "state"))


if __name__ == "__main__":
    main()
