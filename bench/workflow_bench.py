"""End-to-end figures: `benchhub demo --until-done` for several bench sizes.

Each run is the real daemon (store, runners, hub polling, publisher to the embedded broker) on the
simulated bench. The speed factor compresses simulated hardware time; what remains is the daemon's
own overhead plus the compressed step durations, so compare runs at the same speed.

Run: .venv/bin/python bench/workflow_bench.py [--speed 2000] [--sizes 8,30,64]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(devices: int, speed: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "daemon",
            "demo",
            "--devices",
            str(devices),
            "--ports",
            "16",
            "--until-done",
            "--speed",
            str(speed),
            "--state-dir",
            tmp,
        ]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        wall = time.perf_counter() - started
        last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
        inner = re.search(r"in ([\d.]+) s", last)
        log = Path(tmp, "benchhub.log").read_text()
        transitions = log.count("event=transition")
        print(
            f"{devices:>4} devices x{speed:g}: exit {proc.returncode}, process {wall:.1f} s, "
            f"station {inner.group(1) if inner else '?'} s, {transitions} transitions logged | {last}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--speed", type=float, default=2000)
    parser.add_argument("--sizes", default="8,30,64")
    args = parser.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        run(size, args.speed)


if __name__ == "__main__":
    main()
