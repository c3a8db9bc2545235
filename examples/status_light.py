"""A status light per port from benchhub's MQTT topics: the pattern a microcontroller follows.

Subscribe to `benchhub/+/hub/+/port/+/state/color` and show the word that arrives (`green`,
`amber_blink`, …; the station's `[mqtt] colors` table decides them). Those messages are retained,
so the broker hands over every port's current colour the moment we subscribe, and each change
after that: no polling, no start-up query, no JSON parser. A station that publishes no colour
words still publishes `…/state/phase`; we subscribe to it too and map the phase ourselves, but
once a port has sent a colour its phase is ignored (colour is subscribed first, so its retained
messages arrive first). Replace `show()` with the code that drives your LEDs; only aiomqtt and
the standard library are needed.

    python examples/status_light.py --host broker.example [--username dashboard --password-file F]
"""
# ruff: noqa: T201 - printing is what this example does

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

import aiomqtt

PHASE_COLORS = {
    "empty": "off",
    "awaiting_assignment": "amber",
    "done": "green",
    "failed": "red",
    "needs_attention": "amber_blink",
    "interrupted": "purple",
}  # any other phase: blue


def show(station: str, port: str, color: str) -> None:
    print(f"{station} {port} {color}", flush=True)


async def lights(args: argparse.Namespace) -> None:
    password = args.password_file.read_text().strip() if args.password_file else None
    has_color: set[str] = set()
    shown = 0
    async with aiomqtt.Client(args.host, args.port, username=args.username, password=password) as client:
        for kind in ("color", "phase"):  # colour first: its retained messages then come first
            await client.subscribe(f"{args.prefix}/+/hub/+/port/+/state/{kind}", qos=1)
        async for message in client.messages:
            *_, station, _, hub, _, port, _, kind = message.topic.value.split("/")
            word = str(message.payload.decode() if isinstance(message.payload, bytes) else message.payload)
            key = f"{station}/{hub}/{port}"
            if kind == "color":
                has_color.add(key)
            elif key in has_color:
                continue
            show(station, f"{hub}/{port}", word if kind == "color" else PHASE_COLORS.get(word, "blue"))
            shown += 1
            if shown == args.count:
                return


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="benchhub status lights")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--prefix", default="benchhub")
    parser.add_argument("--username")
    parser.add_argument("--password-file", type=Path)
    parser.add_argument("--count", type=int, default=0, help="exit after N lights were set (tests)")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(lights(parser.parse_args()))
