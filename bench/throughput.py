"""Throughput: how close does the scheduler get to what the USB bus allows?

Run: .venv/bin/python bench/throughput.py [--devices 60] [--controllers 2] [--restore-gb 6]
     [--controller-mb-s 40] [--device-mb-s 35] [--cap 10] [--speed 100]
     [--serial-speed 500]
     [--policies scheduler,all-at-once,one-at-a-time] [--json]

Setup: the production station (store, runners, scheduler, hub supervisors, device watcher through
the simulated USB host, publisher to a real Mosquitto) on the simulated bench. `--devices` devices,
every one needing an erase-install (models that support iOS 18, running 17.0; minimum 18.0; steps
update + erase, the erase done by the erase-install), are plugged at once into 15-port hubs spread
evenly over `--controllers` USB host controllers. A restore is a 30 s ramdisk boot, then
`--restore-gb` crossing the controller's bus (fair shares of `--controller-mb-s`, at most
`--device-mb-s` per device), then 480 s on the device; beyond 10 concurrent transfers on one
controller a starting transfer breaks off part-way with probability 0.3 (`daemon.sim.usbbandwidth`;
the model's numbers are assumptions, from field reports, not measurements). Each ±20 % jittered.

Policies, each run on a fresh station with the same devices:

* scheduler      `scheduler.restores_per_controller = --cap`: first plugged, first served;
* all-at-once    no cap (every device restores the moment it is detected);
* one-at-a-time  one restore on the whole station at a time (`workflow.policy.update.concurrency`).

Figures, in simulated seconds (real seconds x speed): makespan (plug-in to the last device
settled), mean completion time, restores that broke off, devices done, and the lower bound:

    LB = max over controllers c of  head + bytes_c / min(bandwidth_c, cap x device rate) + tail

where head (detect + ramdisk boot) and tail (the last device's on-device time) take their shortest
jittered values, so no schedule can beat LB. Target: scheduler makespan <= 1.10 x LB. The update
timeout is raised to a day for every policy, so that the comparison is about throughput (at the
production timeout of an hour, all-at-once with 30 devices per controller would also time out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog

from daemon.config import parse_config
from daemon.models import PortRef
from daemon.sim.backend import DURATIONS
from daemon.sim.demo import DemoOptions, demo_config
from daemon.sim.devices import SimDevice, make_device
from daemon.sim.usbbandwidth import MB
from daemon.station import Station, build_sim_world
from daemon.workflow.phases import SETTLED, Phase
from tests.mqtt_broker import Mosquitto, mosquitto_binary

PORTS_PER_HUB = 15
RAMDISK_BOOT = 30.0  # simulated seconds before the transfer (`SimDeviceBackend._transfer`)
JITTER_LOW = 0.8  # `SimWorld.sleep` draws each duration from 0.8x to 1.2x
POLICIES = ("scheduler", "all-at-once", "one-at-a-time")


@dataclass
class Result:
    policy: str
    makespan: float
    mean_completion: float
    done: int
    other: dict[str, int]
    broke_off: int
    bus_utilisation: float
    wall: float


def old_device(index: int, seed: int) -> SimDevice:
    device = make_device(seed=seed, index=index, minimum_major=18)
    device.ios_version, device.build = "17.0", "21A329"
    return device


def speed_of(args: argparse.Namespace, policy: str) -> float:
    return float(args.serial_speed if policy == "one-at-a-time" else args.speed)


def make_config(args: argparse.Namespace, policy: str, state_dir: Path, broker_url: str) -> Any:
    hubs = -(-args.devices // PORTS_PER_HUB)
    speed = speed_of(args, policy)
    base = demo_config(
        DemoOptions(
            devices=0,
            hub_model="sim",
            ports_per_hub=PORTS_PER_HUB,
            hubs=hubs,
            speed=speed,
            mqtt_url=broker_url,
        ),
        state_dir,
    )
    data = base.model_dump(mode="json", exclude_none=True)
    for i, hub in enumerate(data["hubs"]):
        # Hubs spread over the controllers: hub i on bus (i mod controllers) + 1, port i // controllers.
        hub["usb_path"] = f"{i % args.controllers + 1}-{i // args.controllers + 1}"
    data["workflow"]["steps"] = ["update", "erase"]
    data["workflow"]["policy"]["update"]["timeout"] = 86400 / speed
    data["sim"].update(
        restore_gb=args.restore_gb,
        controller_mb_s=args.controller_mb_s,
        device_mb_s=args.device_mb_s,
        seed=args.seed,
    )
    data["scheduler"] = {
        "restores_per_controller": args.cap if policy == "scheduler" else 64,
        # The production defaults (the station compresses the spacing by the bench's speed); no bus
        # shares for the naive policies (as many transfers as restores, started at once).
        "transfers_per_controller": 3 if policy == "scheduler" else 64,
        "transfer_spacing": 60 if policy == "scheduler" else 0,
    }
    if policy == "one-at-a-time":
        data["workflow"]["policy"]["update"]["concurrency"] = 1
    return parse_config(data, state_dir)


async def run_policy(args: argparse.Namespace, policy: str, broker: Mosquitto, state_dir: Path) -> Result:
    config = make_config(args, policy, state_dir, broker.url)
    speed = speed_of(args, policy)
    world = build_sim_world(config)
    station = Station(config, world)
    refs = sorted(world.slots)[: args.devices]
    settled_at: dict[PortRef, float] = {}
    loop = asyncio.get_running_loop()

    def after_commit() -> None:
        for state in station.store.ports():
            if state.phase in SETTLED and state.ref not in settled_at:
                settled_at[state.ref] = loop.time()

    stop = asyncio.Event()
    task = asyncio.create_task(station.run(stop))
    await station.ready.wait()
    station.store.subscribe(after_commit)
    start = loop.time()
    for i, ref in enumerate(refs):
        world.plug(ref, old_device(i, args.seed))
    try:
        while len(settled_at) < len(refs):
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
        wall = loop.time() - start
        states = {s.ref: s for s in station.ports()}
        broke_off = sum(
            1
            for ref in refs
            for row in station.store.history(ref=ref)
            if row.phase is Phase.UPDATING and row.error is not None
        )
    finally:
        stop.set()
        await task
    phases = [states[ref].phase for ref in refs]
    moved = sum(c.moved for c in world.usb.controllers.values()) if world.usb else 0.0
    makespan = (max(settled_at.values()) - start) * speed
    capacity = args.controllers * args.controller_mb_s * MB * makespan
    return Result(
        policy=policy,
        makespan=makespan,
        mean_completion=statistics.fmean((t - start) * speed for t in settled_at.values()),
        done=phases.count(Phase.DONE),
        other={p.value: phases.count(p) for p in set(phases) if p is not Phase.DONE},
        broke_off=broke_off,
        bus_utilisation=moved / capacity if capacity else 0.0,
        wall=wall,
    )


def lower_bound(args: argparse.Namespace) -> float:
    devices_on = [0] * args.controllers  # devices fill hubs in order; hub i is on controller i mod n
    for i in range(args.devices):
        devices_on[(i // PORTS_PER_HUB) % args.controllers] += 1
    rate = min(args.controller_mb_s, args.cap * args.device_mb_s) * MB
    head = JITTER_LOW * (DURATIONS["detect"] + RAMDISK_BOOT)
    tail = JITTER_LOW * DURATIONS["update"]
    return max(head + n * args.restore_gb * 1e9 / rate + tail for n in devices_on)


async def main_async(args: argparse.Namespace, broker: Mosquitto, tmp: Path) -> list[Result]:
    results = []
    for policy in args.policies.split(","):
        if policy not in POLICIES:
            sys.exit(f"--policies: unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
        results.append(await run_policy(args, policy, broker, tmp / policy))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=60)
    parser.add_argument("--controllers", type=int, default=2)
    parser.add_argument("--restore-gb", type=float, default=6.0)
    parser.add_argument("--controller-mb-s", type=float, default=40.0)
    parser.add_argument("--device-mb-s", type=float, default=35.0)
    parser.add_argument("--cap", type=int, default=10)
    # x100: fast enough for a minute a policy, slow enough that the host's own work (pairing, TLS,
    # SQLite) stays small in simulated time (at x200 it adds about 5 % to the makespan).
    parser.add_argument("--speed", type=float, default=100.0)
    # One at a time takes eight times longer in simulated time; at x500 its run stays near a
    # minute and a half, and the host's work per device (about 0.15 s) adds roughly 10 % to it.
    parser.add_argument("--serial-speed", type=float, default=500.0)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if mosquitto_binary() is None:
        sys.exit("mosquitto is not installed (apt install mosquitto)")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "broker") as broker:
        results = asyncio.run(main_async(args, broker, Path(tmp)))
    bound = lower_bound(args)
    if args.json:
        print(json.dumps({"lower_bound": bound, "results": [asdict(r) for r in results]}, indent=2))
        return
    print(
        f"{args.devices} devices, erase-install of {args.restore_gb:g} GB each,"
        f" {args.controllers} controllers x {args.controller_mb_s:g} MB/s"
        f" (device {args.device_mb_s:g} MB/s), cap {args.cap}, x{args.speed:g}"
        f" (one-at-a-time x{args.serial_speed:g})"
    )
    print(f"lower bound {bound:,.0f} s (simulated)")
    print(
        f"{'policy':<14} {'makespan':>10} {'x LB':>6} {'mean done':>10} {'done':>5} {'broke off':>9}"
        f" {'bus use':>8} {'wall':>7}  other"
    )
    for r in results:
        other = ", ".join(f"{k} {v}" for k, v in sorted(r.other.items())) or "-"
        print(
            f"{r.policy:<14} {r.makespan:>9,.0f}s {r.makespan / bound:>6.3f} {r.mean_completion:>9,.0f}s"
            f" {r.done:>5} {r.broke_off:>9} {r.bus_utilisation:>7.1%} {r.wall:>6.1f}s  {other}"
        )


if __name__ == "__main__":
    main()
