"""Run every benchmark in bench/ and print their key figures in one table, against their targets.

Run: .venv/bin/python bench/run_all.py [--quick] [--only hub_poll,idle_cost] [--json] [--keep DIR]

Each bench runs as its own subprocess (a fresh interpreter: one bench's memory, threads or event
loop cannot colour the next one's figures), one after the other (they would compete for the CPUs),
with options chosen so the whole suite takes a few minutes (`--quick`: about two). The figures are
parsed from the lines each bench prints for people, so the benches stay readable scripts with no
reporting framework; only idle_cost prints `--json`, because it already has a structured result.
A bench whose output no longer matches its parser shows up as "unparsed" rather than vanishing.

Verdicts: `met`/`NOT met` where the bench or its issue states a target, with value/target as the
ratio; figures without a target are shown for the record (compare them with docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


@dataclass
class Figure:
    bench: str
    figure: str
    value: float
    unit: str
    target: float | None = None
    higher_is_better: bool = False

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        ok = self.value >= self.target if self.higher_is_better else self.value <= self.target
        return "met" if ok else "NOT met"

    @property
    def ratio(self) -> float | None:
        return self.value / self.target if self.target else None


Parser = Callable[[str], list[tuple[str, float, str, float | None, bool]]]
"""stdout -> (figure, value, unit, target, higher_is_better) per figure."""


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def parse_workflow(out: str) -> list[tuple[str, float, str, float | None, bool]]:
    rows: list[tuple[str, float, str, float | None, bool]] = []
    for m in re.finditer(
        r"^\s*(\d+) devices x[\d.]+: exit (\d+), process [\d.]+ s, station ([\d.]+) s", out, re.M
    ):
        rows.append((f"{m[1]} devices, station time (exit {m[2]})", _num(m[3]), "s", None, False))
    return rows


def parse_throughput(out: str) -> list[tuple[str, float, str, float | None, bool]]:
    rows: list[tuple[str, float, str, float | None, bool]] = []
    for m in re.finditer(
        r"^(scheduler|all-at-once|one-at-a-time)\s+([\d,]+)s\s+([\d.]+)\s+.*?(\d+)\s+(\d+)\s+[\d.]+%",
        out,
        re.M,
    ):
        target = 1.10 if m[1] == "scheduler" else None
        rows.append(
            (
                f"{m[1]}: makespan / lower bound ({m[4]} done, {m[5]} broke off)",
                _num(m[3]),
                "x",
                target,
                False,
            )
        )
    return rows


def parse_store(out: str) -> list[tuple[str, float, str, float | None, bool]]:
    rows: list[tuple[str, float, str, float | None, bool]] = []
    if m := re.search(r"commit latency p50 ([\d.]+) ms, p99 ([\d.]+) ms", out):
        rows += [("transition commit p50", _num(m[1]), "ms", None, False)]
        rows += [("transition commit p99", _num(m[2]), "ms", None, False)]
    if m := re.search(r"= ([\d,]+)/s", out):
        rows.append(("progress updates", _num(m[1]), "/s", None, True))
    return rows


def parse_mqtt_bench(out: str) -> list[tuple[str, float, str, float | None, bool]]:
    rows: list[tuple[str, float, str, float | None, bool]] = []
    broker = "?"
    for line in out.splitlines():
        if line and not line.startswith(" ") and not line[0].isdigit():  # a broker's heading
            broker = line.split(" (")[0].replace(" with set_tcp_nodelay true", " nodelay")
        elif m := re.search(r"backlog drain:.*-> ([\d.]+) msg/s", line):
            rows.append((f"{broker}: backlog drain", _num(m[1]), "msg/s", None, True))
        elif m := re.search(r"live, flat out:.*-> ([\d.]+) msg/s", line):
            rows.append((f"{broker}: live flat out", _num(m[1]), "msg/s", None, True))
        elif m := re.search(r"live, paced:.*p50 ([\d.]+) ms, p99 ([\d.]+) ms", line):
            rows.append((f"{broker}: live paced latency p99", _num(m[2]), "ms", None, False))
    return rows


def parse_fanout(out: str) -> list[tuple[str, float, str, float | None, bool]]:
    rows: list[tuple[str, float, str, float | None, bool]] = []
    if m := re.search(r"sustained\s+([\d,]+) msg/s acked", out):
        rows.append(("live: acked by the broker", _num(m[1]), "msg/s", None, True))
    if m := re.search(r"latency .*p50 ([\d.]+) ms, p99 ([\d.]+) ms", out):
        rows.append(("live: transition -> subscriber p50", _num(m[1]), "ms", None, False))
        rows.append(("live: transition -> subscriber p99", _num(m[2]), "ms", None, False))
    if m := re.search(r"reconnect\s+([\d.]+) s after .*drained ([\d.]+) s after that .*?([\d,]+) msg/s", out):
        rows.append(("outage: reconnect after broker back", _num(m[1]), "s", None, False))
        rows.append(("outage: outbox drain rate", _num(m[3]), "msg/s", None, True))
    if m := re.search(r"dropped\s+([\d,]+) events in the outage", out):
        rows.append(("outage: events dropped", _num(m[1]), "events", None, False))
    return rows


def parse_hub_poll(out: str) -> list[tuple[str, float, str, float | None, bool]]:
    rows: list[tuple[str, float, str, float | None, bool]] = []
    if m := re.search(r"\[paced 115200\] state round trip:.*ratio ([\d.]+)x", out):
        rows.append(("state round trip / wire floor", _num(m[1]), "x", 1.3, False))
    if m := re.search(r"\[paced 115200\] (\d+) hubs every (\d+) ms.* ([\d.]+) % of one core", out):
        rows.append((f"{m[1]} hubs @ {m[2]} ms, driver CPU", _num(m[3]), "% core", 1.0, False))
    return rows


def parse_detect(out: str) -> list[tuple[str, float, str, float | None, bool]]:
    rows: list[tuple[str, float, str, float | None, bool]] = []
    p99: dict[str, float] = {}
    for m in re.finditer(r"^(floor|store|mqtt)\s+p50\s+([\d.]+) ms\s+p99\s+([\d.]+) ms", out, re.M):
        p99[m[1]] = _num(m[3])
        if m[1] != "store":
            rows.append((f"plug -> {m[1]} p50", _num(m[2]), "ms", None, False))
    if "mqtt" in p99 and "floor" in p99:
        # The bench's target: mqtt p99 <= floor p99 + 100 ms, i.e. the daemon adds at most 100 ms.
        rows.append(("mqtt p99 - floor p99", p99["mqtt"] - p99["floor"], "ms", 100.0, False))
    if m := re.search(r"^overhead\s+p50\s+([\d.]+) ms\s+p99\s+([\d.]+) ms.*\(store - floor\)", out, re.M):
        rows.append(("daemon overhead plug->store p99", _num(m[2]), "ms", None, False))
    return rows


def parse_assignment(out: str) -> list[tuple[str, float, str, float | None, bool]]:
    rows: list[tuple[str, float, str, float | None, bool]] = []
    for m in re.finditer(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+[\d.]+$", out, re.M):
        best = min(_num(m[2]), _num(m[3]))  # the tracker should never lose to a fixed strategy
        rows.append((f"requests/round, {m[1]} waiting", _num(m[4]), "req", best, False))
    return rows


def parse_idle(out: str) -> list[tuple[str, float, str, float | None, bool]]:
    doc = json.loads(out.strip().splitlines()[-1])
    return [(f["figure"], f["value"], f["unit"], f["target"], False) for f in doc["figures"]]


@dataclass(frozen=True)
class Bench:
    name: str
    args: tuple[str, ...]
    quick: tuple[str, ...]
    parse: Parser


BENCHES = (
    Bench("store_bench", (), (), parse_store),
    Bench("hub_poll", ("--seconds", "10"), ("--seconds", "3", "--rounds", "20"), parse_hub_poll),
    Bench(
        "assignment_poll",
        ("--waiting", "1", "3", "10", "50", "200"),
        ("--waiting", "1", "10", "50"),
        parse_assignment,
    ),
    Bench("mqtt_bench", (), ("--ops", "1000"), parse_mqtt_bench),
    Bench("workflow_bench", ("--sizes", "8,30"), ("--sizes", "8"), parse_workflow),
    Bench("throughput", (), ("--devices", "30", "--controllers", "1"), parse_throughput),
    Bench("detect_latency", (), ("--devices", "20", "--spread", "3"), parse_detect),
    Bench("mqtt_fanout", ("--outage", "10"), ("--outage", "5"), parse_fanout),
    Bench(
        "idle_cost", ("--seconds", "60", "--json"), ("--seconds", "15", "--warmup", "3", "--json"), parse_idle
    ),
)


def run(bench: Bench, quick: bool, keep: Path | None) -> tuple[list[Figure], float]:
    argv = [sys.executable, str(BENCH / f"{bench.name}.py"), *(bench.quick if quick else bench.args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    print(f"running {' '.join(argv[1:])} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
        )
        out, err, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, err, code = str(exc.stdout or ""), "timed out after 900 s", -1
    took = time.perf_counter() - started
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        (keep / f"{bench.name}.txt").write_text(f"$ {' '.join(argv[1:])}\n{out}\n--- stderr\n{err}")
    figures: list[Figure] = []
    if code != 0:
        tail = (err.strip().splitlines() or ["?"])[-1][:100]
        figures.append(Figure(bench.name, f"FAILED (exit {code}): {tail}", float(code), "", None))
    try:
        parsed = bench.parse(out)
    except (ValueError, KeyError, IndexError):
        parsed = []
    figures += [Figure(bench.name, f, v, u, t, h) for f, v, u, t, h in parsed]
    if not parsed and code == 0:
        figures.append(Figure(bench.name, "unparsed output (see --keep)", float("nan"), ""))
    return figures, took


def table(figures: list[Figure], times: dict[str, float]) -> str:
    header = f"{'bench':<16} {'figure':<46} {'value':>12} {'unit':<13} {'target':>8} {'ratio':>6}  verdict"
    lines = [header, "-" * len(header)]
    last = ""
    for f in figures:
        name = f.bench if f.bench != last else ""
        last = f.bench
        target = f"{'>=' if f.higher_is_better else '<='}{f.target:g}" if f.target is not None else ""
        ratio = f"{f.ratio:.2f}" if f.ratio is not None else ""
        value = f"{f.value:,.3f}".rstrip("0").rstrip(".") if f.value == f.value else "-"
        cells = f"{name:<16} {f.figure:<46} {value:>12} {f.unit:<13} {target:>8} {ratio:>6}"
        lines.append(f"{cells}  {f.verdict}")
    lines.append("-" * len(header))
    lines.append("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (about two minutes in all)")
    parser.add_argument("--only", help="comma-separated bench names, e.g. hub_poll,idle_cost")
    parser.add_argument("--json", action="store_true", help="the figures as JSON instead of a table")
    parser.add_argument("--keep", type=Path, help="write each bench's full output to DIR/<bench>.txt")
    args = parser.parse_args()
    chosen = [b for b in BENCHES if not args.only or b.name in args.only.split(",")]
    missing = sorted({p.stem for p in BENCH.glob("*.py")} - {b.name for b in BENCHES} - {"run_all"})
    if missing and not args.only:
        print(f"note: not in the suite yet (no parser): {', '.join(missing)}", file=sys.stderr)
    figures: list[Figure] = []
    times: dict[str, float] = {}
    for bench in chosen:
        found, times[bench.name] = run(bench, args.quick, args.keep)
        figures += found
    if args.json:
        rows = [{**asdict(f), "ratio": f.ratio, "verdict": f.verdict} for f in figures]
        print(json.dumps({"quick": args.quick, "figures": rows, "seconds": times}, indent=1))
    else:
        print(table(figures, times))
    sys.exit(1 if any(f.verdict == "NOT met" or f.figure.startswith("FAILED") for f in figures) else 0)


if __name__ == "__main__":
    main()
