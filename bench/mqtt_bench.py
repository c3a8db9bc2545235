"""How fast does the outbox reach the broker? Prints figures for Mosquitto and the embedded amqtt.

Run: .venv/bin/python bench/mqtt_bench.py [--ops 2000] [--ports 16]

Two scenarios per broker, each with a fresh SQLite store and a real broker on loopback:
- backlog: N operations are recorded while no publisher runs (an outage, a restart), then the
  publisher starts; we time connect + drain until the outbox is empty.
- live: the publisher is connected and N operations are recorded one by one, yielding to the loop
  between them as the workflow does; we time until the outbox is empty and measure, with an
  independent subscriber, the latency from `Store.record()` to the state message arriving.

An operation is a phase transition (3 messages: state, phase mirror, event) or a progress update
(1 message: state), in the mix a port's workflow produces (8 transitions and 5 progress updates).
Every message is QoS 1 and published one at a time, waiting for its PUBACK before the next.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.mqtt_broker

import aiomqtt
import structlog

from daemon.config import MqttConfig
from daemon.models import PortRef, Transition
from daemon.mqtt.broker import embedded_broker
from daemon.mqtt.payloads import PayloadRenderer
from daemon.mqtt.publisher import MqttPublisher
from daemon.mqtt.topics import Topics
from daemon.store import Store
from daemon.workflow.phases import Phase
from tests.mqtt_broker import Mosquitto, mosquitto_binary

TOPICS = Topics("benchhub", "bench")
CYCLE: list[Phase | int] = [
    Phase.DETECTED,
    Phase.UPDATING,
    10,
    30,
    50,
    70,
    90,
    Phase.ERASING,
    Phase.ENROLLING,
    Phase.AWAITING_ASSIGNMENT,
    Phase.SETTING_UP,
    Phase.DONE,
    Phase.EMPTY,
]
"""One device's life on a port: transitions, with progress updates while updating."""


def operations(n: int, ports: int) -> Iterator[tuple[PortRef, Phase | int]]:
    refs = [PortRef("a", p) for p in range(1, ports + 1)]
    for i in range(n):
        yield refs[i % ports], CYCLE[(i // ports) % len(CYCLE)]


def apply(store: Store, ref: PortRef, op: Phase | int) -> int:
    """Record one operation; returns the new state's seq."""
    if isinstance(op, Phase):
        return store.record(Transition(ref=ref, to=op, step=op.value)).seq
    return store.set_progress(ref, op).seq


async def until(condition: Callable[[], bool], limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the outbox did not drain")
        await asyncio.sleep(0.002)


@asynccontextmanager
async def publishing(url: str, store: Store) -> AsyncIterator[MqttPublisher]:
    publisher = MqttPublisher(MqttConfig(url=url), TOPICS, store, PayloadRenderer(TOPICS))
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop))
    try:
        yield publisher
    finally:
        stop.set()
        await task


async def backlog(url: str, workdir: Path, n: int, ports: int) -> dict[str, float]:
    store = Store(workdir / "backlog.sqlite3", renderer=PayloadRenderer(TOPICS))
    started = time.perf_counter()
    for ref, op in operations(n, ports):
        apply(store, ref, op)
    record_s = time.perf_counter() - started
    messages = store.outbox_size()
    started = time.perf_counter()
    async with publishing(url, store) as publisher:
        await until(lambda: publisher.connected and store.outbox_size() == 0)
        drain_s = time.perf_counter() - started
    store.close()
    return {"messages": messages, "record_s": record_s, "drain_s": drain_s, "rate": messages / drain_s}


@dataclass(frozen=True)
class Target:
    name: str
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


async def live(target: Target, workdir: Path, n: int, ports: int, pace: float) -> dict[str, float]:
    """Record while the publisher runs, `pace` seconds apart (0: as fast as the recording loop
    goes, which measures throughput; the outbox then queues and latency grows with it)."""
    store = Store(workdir / f"live-{pace}.sqlite3", renderer=PayloadRenderer(TOPICS))
    sent: dict[tuple[int, int], float] = {}
    latencies: list[float] = []
    latest: dict[int, int] = {}  # port -> newest state seq received
    async with aiomqtt.Client(target.host, target.port) as sub:
        await sub.subscribe(f"{TOPICS.base}/hub/+/port/+/state", qos=1)

        async def receive() -> None:
            async for message in sub.messages:
                arrived = time.perf_counter()
                assert isinstance(message.payload, bytes)
                doc = json.loads(message.payload)
                latest[doc["port"]] = max(latest.get(doc["port"], -1), doc["seq"])
                at = sent.pop((doc["port"], doc["seq"]), None)
                if at is not None:
                    latencies.append(arrived - at)

        receiver = asyncio.create_task(receive())
        async with publishing(target.url, store) as publisher:
            await until(lambda: publisher.connected and store.outbox_size() == 0)
            started = time.perf_counter()
            messages = 0
            for ref, op in operations(n, ports):
                before = store.outbox_size()
                seq = apply(store, ref, op)
                sent[(ref.port, seq)] = time.perf_counter()
                messages += store.outbox_size() - before
                await asyncio.sleep(pace)  # the workflow yields between transitions
            await until(lambda: store.outbox_size() == 0)
            total_s = time.perf_counter() - started
        # An unsent state is replaced by the port's next one in the outbox, so a state may never be
        # published: done when every port's newest recorded state has arrived.
        await until(lambda: all(seq <= latest.get(port, -1) for port, seq in sent), limit=5)
        receiver.cancel()
    store.close()
    latencies.sort()
    return {
        "ops": n,
        "messages": messages,
        "total_s": total_s,
        "rate": messages / total_s,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000,
    }


async def measure(target: Target, workdir: Path, ops: int, ports: int) -> None:
    back = await backlog(target.url, workdir, ops, ports)
    fast = await live(target, workdir, ops, ports, pace=0)
    paced = await live(target, workdir, 300, ports, pace=0.005)
    print(target.name)
    print(
        f"  backlog drain:  {back['messages']:.0f} msgs (recorded in {back['record_s']:.2f} s) "
        f"drained in {back['drain_s']:.2f} s -> {back['rate']:.0f} msg/s"
    )
    print(
        f"  live, flat out: {fast['messages']:.0f} msgs recorded+published in {fast['total_s']:.2f} s "
        f"-> {fast['rate']:.0f} msg/s (queueing: commit->subscriber p50 {fast['p50_ms']:.0f} ms)"
    )
    print(
        f"  live, paced:    {paced['ops']:.0f} ops at <=200/s, commit->subscriber latency "
        f"p50 {paced['p50_ms']:.2f} ms, p99 {paced['p99_ms']:.2f} ms"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=2000, help="operations to record (default 2000)")
    parser.add_argument("--ports", type=int, default=16, help="ports the operations spread over")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.basicConfig(level=logging.WARNING, format="  [%(name)s] %(message)s")

    print(f"{args.ops} operations over {args.ports} ports; QoS 1, one message in flight at a time\n")
    with tempfile.TemporaryDirectory(prefix="mqtt-bench-") as tmp:
        workdir = Path(tmp)
        if mosquitto_binary() is None:
            print("mosquitto: not installed, skipped (apt-get install mosquitto)")
        else:
            for name, extra in (
                ("mosquitto 2 (separate process, default config)", []),
                # Nagle on the broker's side delays some deliveries to subscribers by ~20 ms.
                ("mosquitto 2 with set_tcp_nodelay true", ["set_tcp_nodelay true"]),
            ):
                with Mosquitto(workdir / f"mosquitto-{len(extra)}", extra_config=extra) as broker:
                    target = Target(name, broker.host, broker.port)
                    await measure(target, workdir / f"m-{len(extra)}", args.ops, args.ports)
        async with embedded_broker(0) as (host, port):
            target = Target("amqtt (embedded, same event loop as the publisher)", host, port)
            await measure(target, workdir / "a", args.ops, args.ports)


if __name__ == "__main__":
    asyncio.run(main())
