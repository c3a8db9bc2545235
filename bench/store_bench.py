"""Store figures: how long one transition commit takes (it runs on the event loop) and how many
progress updates per second the store absorbs.

Run: .venv/bin/python bench/store_bench.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from daemon.models import DeviceIdentity, PortRef, Transition
from daemon.mqtt.payloads import PayloadRenderer
from daemon.mqtt.topics import Topics
from daemon.store import Store
from daemon.workflow.phases import WORK, Phase

PORTS = 64


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.sqlite3", PayloadRenderer(Topics("benchhub", "bench")))
        refs = [PortRef("hub-a", n) for n in range(1, PORTS + 1)]
        store.ensure_ports(refs)
        latencies = []
        for ref in refs:
            device = DeviceIdentity(
                udid=f"00008030-{ref.port:016X}", ecid=f"{ref.port:016X}", serial=f"S{ref.port}"
            )
            for phase in (*WORK, Phase.DONE, Phase.EMPTY):
                started = time.perf_counter()
                store.record(Transition(ref, phase, step=phase.value, attempt=1, device=device))
                latencies.append(time.perf_counter() - started)
        latencies.sort()
        print(f"transitions: {len(latencies)} on {PORTS} ports (synchronous=FULL, WAL)")
        print(
            f"  commit latency p50 {statistics.median(latencies) * 1e3:.2f} ms, "
            f"p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.2f} ms, max {latencies[-1] * 1e3:.2f} ms"
        )
        for ref in refs:
            store.record(Transition(ref, Phase.DETECTED, device=DeviceIdentity(udid=f"u{ref.port}")))
            store.record(Transition(ref, Phase.UPDATING, step="update", attempt=1))
        count = 5000
        started = time.perf_counter()
        for i in range(count):
            store.set_progress(refs[i % PORTS], i % 100)
        took = time.perf_counter() - started
        print(
            f"progress updates: {count} in {took:.2f} s = {count / took:,.0f}/s "
            f"({took / count * 1e3:.2f} ms each)"
        )
        print(f"rows: {store.counts()}")
        store.close()


if __name__ == "__main__":
    main()
