"""The `benchhub` command: parse arguments, call into the daemon, print. Nothing else lives here.

Exit codes: 0 success, 1 the job did not succeed (e.g. a demo device did not finish), 2 bad usage or
bad configuration (one line per problem, never a traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from daemon import __version__
from daemon.board import elapsed, live, render, summary
from daemon.config import CambrionixHubConfig, Config, ConfigError, HubConfig, load_config
from daemon.doctor import check_apple, check_hubs, check_station
from daemon.doctor import render as render_doctor
from daemon.hubsetup import port_count
from daemon.logs import configure_logging
from daemon.models import PortState, iso
from daemon.mqtt.broker import BrokerUnavailable
from daemon.mqtt.payloads import state_document
from daemon.report import (
    DeviceOutcome,
    SinceError,
    WaitingSerial,
    audit,
    audit_csv,
    awaiting_assignment,
    outcomes,
    parse_since,
    render_audit,
    render_outcomes,
    waiting_document,
)
from daemon.sim.demo import DemoOptions, demo_config, technician
from daemon.station import Station, build_sim_world
from daemon.store import Store, StoreError
from daemon.usb.hotplug import open_hotplug
from daemon.usb.learn import FdLines, HubToLearn, LearnError, learn_ports
from daemon.usb.portmap import describe_port_map, load_port_map, render_port_map, save_port_map
from daemon.watch import watch_command
from daemon.workflow.phases import SETTLED, Phase

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchhub", description="Unattended iPhone/iPad provisioning bench."
    )
    parser.add_argument("--version", action="version", version=f"benchhub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the station daemon")
    run.add_argument("--config", "-c", type=Path, required=True, help="station TOML file")
    run.add_argument(
        "--log-format", choices=["auto", "console", "logfmt", "json"], help="override logging.format"
    )
    run.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="override logging.level"
    )

    demo = sub.add_parser("demo", help="a simulated station with an embedded MQTT broker; no hardware needed")
    demo.add_argument("--devices", type=int, default=8, help="devices to plug in at start (default 8)")
    demo.add_argument(
        "--hub-model",
        default="PP15S",
        help="Cambrionix model to simulate (PP8S PP15S SS15 U16S TS3-16 PDSync-C4) or 'sim'; default PP15S",
    )
    demo.add_argument("--ports", type=int, default=8, help="ports per hub with --hub-model sim (default 8)")
    demo.add_argument("--hubs", type=int, help="number of hubs (default: enough for --devices)")
    demo.add_argument("--speed", type=float, default=60.0, help="simulated time factor (default 60)")
    demo.add_argument("--seed", type=int, default=1, help="which simulated devices (default 1)")
    demo.add_argument(
        "--fail-rate", type=float, help="chance an operation fails (default 0.02 live, 0 --until-done)"
    )
    demo.add_argument("--minimum-ios", default="18.0", help="minimum iOS version (default 18.0)")
    demo.add_argument(
        "--mqtt-port", type=int, default=0, help="embedded broker port on 127.0.0.1 (default: free)"
    )
    demo.add_argument("--mqtt-url", help="use this broker instead of the embedded one")
    demo.add_argument(
        "--state-dir", type=Path, help="keep database, world and log here (default: a temp dir)"
    )
    demo.add_argument("--until-done", action="store_true", help="exit when every device has finished")
    demo.add_argument("--timeout", type=float, default=900.0, help="with --until-done: give up after (s)")

    doctor = sub.add_parser("doctor", help="check what a run needs: hubs, state, disk, usbmuxd, MQTT, Apple")
    doctor.add_argument("--config", "-c", type=Path, help="station TOML file (without: discovery only)")

    status = sub.add_parser("status", help="print every port's state from the station's database")
    status.add_argument("--config", "-c", type=Path, required=True)
    status.add_argument("--json", action="store_true", help="one JSON document per port")

    _report_parser(sub)

    ports = sub.add_parser("ports", help="the station's port map: which USB path each hub port has")
    ports_sub = ports.add_subparsers(dest="ports_command", required=True)
    learn = ports_sub.add_parser(
        "learn", help="plug an iPhone into each port in turn and save each port's USB path"
    )
    learn.add_argument("--config", "-c", type=Path, required=True, help="station TOML file")
    learn.add_argument("--hub", help="learn only this hub (default: every hub in the config)")
    learn.add_argument("--output", "-o", type=Path, help="port map file (default: [station] port_map)")
    show = ports_sub.add_parser("show", help="print the station's port map")
    show.add_argument("--config", "-c", type=Path, required=True, help="station TOML file")

    watch = sub.add_parser("watch", help="the live board of one station or of every station, from MQTT alone")
    watch.add_argument("--mqtt", required=True, metavar="URL", help="broker: mqtt://host[:port] or mqtts://…")
    watch.add_argument("--station", default="+", help="station id, or + for every station (default)")
    watch.add_argument("--prefix", default="benchhub", help="topic prefix (default benchhub)")
    watch.add_argument("--username", help="MQTT username")
    watch.add_argument(
        "--password-file", type=Path, metavar="FILE", help="file holding the password (or credential:NAME)"
    )
    watch.add_argument("--ca-file", type=Path, metavar="FILE", help="CA that signed the broker's certificate")
    watch.add_argument("--cert-file", type=Path, metavar="FILE", help="client certificate (mutual TLS)")
    watch.add_argument("--key-file", type=Path, metavar="FILE", help="client certificate's key")
    watch.add_argument("--once", action="store_true", help="print the board once the retained state is in")
    watch.add_argument("--verbose", "-v", action="store_true", help="debug log (e.g. skipped payloads)")
    return parser


def _report_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = sub.add_parser(
        "report", help="the audit trail of every device from the station's database (or --waiting)"
    )
    report.add_argument("--config", "-c", type=Path, required=True)
    report.add_argument(
        "--waiting",
        action="store_true",
        help="the serials waiting for MDM assignment in Apple Business Manager, one per line",
    )
    report.add_argument(
        "--since",
        metavar="WHEN",
        help="only devices with history since WHEN: an ISO date/time (local unless it has a zone) or 24h, 7d",
    )
    report.add_argument("--format", choices=["text", "csv", "json"], default="text", help="default text")
    report.add_argument(
        "--json", dest="format", action="store_const", const="json", help="same as --format json"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {
        "run": _run,
        "demo": _demo,
        "doctor": _doctor,
        "status": _status,
        "report": _report,
        "ports": _ports,
        "watch": watch_command,
    }
    try:
        return commands[args.command](args)
    except ConfigError as exc:
        for line in exc.lines:
            print(f"benchhub: config error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except (StoreError, BrokerUnavailable) as exc:
        print(f"benchhub: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


async def _serve(station: Station) -> None:
    """Run a station until SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await station.run(stop)


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configure_logging(args.log_level or config.logging.level, args.log_format or config.logging.format)
    station = Station(config)
    asyncio.run(_serve(station))
    return EXIT_OK


def _doctor(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else None
    configure_logging("warning", "console")
    world = build_sim_world(config) if config is not None and config.sim is not None else None
    checks, found = asyncio.run(check_hubs(config, world))
    station = asyncio.run(check_station(config)) if config is not None else []
    apple = asyncio.run(check_apple(config))
    print(
        "\n".join([render_doctor(checks, found), *(line for c in station for line in c.lines), *apple.lines])
    )
    ok = all(c.ok for c in checks) and all(c.ok for c in station) and apple.ok
    return EXIT_OK if ok else EXIT_FAILED


def _open_store(config_path: Path) -> Store | None:
    config = load_config(config_path)
    if not config.storage.path.exists():
        print(
            f"benchhub: no database at {config.storage.path} yet (the station has not run)", file=sys.stderr
        )
        return None
    return Store(config.storage.path)


def _report(args: argparse.Namespace) -> int:
    try:
        since = parse_since(args.since) if args.since else None
    except SinceError as exc:
        print(f"benchhub: {exc}", file=sys.stderr)
        return EXIT_USAGE
    store = _open_store(args.config)
    if store is None:
        return EXIT_FAILED
    try:
        if args.waiting:
            _print_waiting(awaiting_assignment(store.ports()), args.format)
            return EXIT_OK
        rows = audit(store, since)
    finally:
        store.close()
    if args.format == "json":
        print(json.dumps([r.as_dict() for r in rows], indent=1))
    elif args.format == "csv":
        sys.stdout.write(audit_csv(rows))
    else:
        print(render_audit(rows))
    return EXIT_OK


def _print_waiting(waiting: list[WaitingSerial], fmt: str) -> None:
    """Text stays serial-first and tab-separated: the first column pastes into the portal's search."""
    if fmt == "json":
        print(json.dumps(waiting_document(waiting)))
    elif fmt == "csv":
        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(["serial", "port", "since"])
        out.writerows([row.serial, str(row.ref), iso(row.since)] for row in waiting)
    else:
        for row in waiting:
            print(f"{row.serial}\t{row.ref}\twaiting since {iso(row.since)}")


def _status(args: argparse.Namespace) -> int:
    store = _open_store(args.config)
    if store is None:
        return EXIT_FAILED
    try:
        states = store.ports()
    finally:
        store.close()
    if args.json:
        for state in states:
            print(json.dumps(state_document(state)))
    else:
        print(render(states))
    return EXIT_OK


# -------------------------------------------------------------------------- ports


def _ports(args: argparse.Namespace) -> int:
    return _ports_learn(args) if args.ports_command == "learn" else _ports_show(args)


def _simulated(hub: HubConfig) -> bool:
    return hub.kind == "sim" or (isinstance(hub, CambrionixHubConfig) and hub.simulate is not None)


def _say(text: str) -> None:
    print(text, flush=True)


class _Usage(Exception):
    """A subcommand's usage problem: one line on stderr, exit 2."""


def _learn_targets(args: argparse.Namespace, config: Config) -> tuple[Path, list[HubConfig]]:
    """Where the map goes and which hubs to walk (the chosen ones without the simulated)."""
    output: Path | None = args.output or config.station.port_map
    if output is None:
        raise _Usage("no port map file: set port_map in [station] of the config, or pass --output FILE")
    chosen = [h for h in config.hubs if args.hub is None or h.id == args.hub]
    if not chosen:
        known = ", ".join(h.id for h in config.hubs)
        raise _Usage(f"--hub {args.hub}: no such hub in {args.config} (hubs: {known})")
    for hub in chosen:
        if _simulated(hub) and args.hub is None:
            print(f"Skipping {hub.id}: simulated, no USB ports.", flush=True)
    real = [h for h in chosen if not _simulated(h)]
    if not real:
        what = f"hub {args.hub} is" if args.hub else "every hub in the config is"
        raise _Usage(f"{what} simulated: no USB ports to learn")
    return output, real


def _stdin_fd() -> int:
    try:
        return sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        raise _Usage("ports learn needs an input (a terminal or a pipe)") from None


def _ports_learn(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    try:
        output, real = _learn_targets(args, config)
        stdin = _stdin_fd()
    except _Usage as exc:
        print(f"benchhub: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        saved = load_port_map(output)
    except FileNotFoundError:
        saved = {}
    learning = {h.id for h in real}
    fixed = {hub: ports for hub, ports in saved.items() if hub not in learning}
    configure_logging("warning", "console")
    hotplug = open_hotplug(interval=0.5)
    print(f"USB hotplug: {hotplug.description}", flush=True)
    hubs = [HubToLearn(h.id, port_count(h), h.usb_path) for h in real]
    try:
        with FdLines(stdin) as lines:
            learner = asyncio.run(learn_ports(hubs, hotplug, lines, _say, fixed=fixed))
    except LearnError as exc:
        print(f"benchhub: {exc}; nothing saved", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\nbenchhub: interrupted; nothing saved", file=sys.stderr)
        return EXIT_FAILED
    if not learner.count:
        print(f"benchhub: no port learned; {output} left as it was", file=sys.stderr)
        return EXIT_FAILED
    try:
        notes = save_port_map(output, learner.learned)
    except (OSError, ConfigError) as exc:
        print(f"benchhub: cannot write {output} ({exc}); the learned ports:", file=sys.stderr)
        print(render_port_map(learner.learned), end="")
        return EXIT_FAILED
    for note in notes:
        print(note)
    print(f"Saved {learner.count} port(s) to {output}.")
    if config.station.port_map is None or output.resolve() != config.station.port_map.resolve():
        print(f'The station reads [station] port_map; set port_map = "{output}" to use this file.')
    return EXIT_OK


def _ports_show(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    path = config.station.port_map
    if path is None:
        print(
            "benchhub: no port map configured: set port_map in [station] of the config,"
            " then run `benchhub ports learn`",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        port_map = load_port_map(path)
    except FileNotFoundError:
        print(
            f"benchhub: no port map at {path} yet (run `benchhub ports learn --config {args.config}`)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(f"port map {path}")
    for line in describe_port_map(port_map, {h.id: port_count(h) for h in config.hubs}):
        print(line)
    return EXIT_OK


# -------------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    if args.devices < 1 or args.ports < 1 or args.speed <= 0:
        print("benchhub: --devices, --ports and --speed must be positive", file=sys.stderr)
        return EXIT_USAGE
    fail_rate = args.fail_rate if args.fail_rate is not None else (0.0 if args.until_done else 0.02)
    options = DemoOptions(
        devices=args.devices,
        hub_model=args.hub_model,
        ports_per_hub=args.ports,
        hubs=args.hubs,
        speed=args.speed,
        seed=args.seed,
        fail_rate=fail_rate,
        minimum_ios=args.minimum_ios,
        mqtt_port=args.mqtt_port,
        mqtt_url=args.mqtt_url,
    )
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="benchhub-demo-"))
    state_dir.mkdir(parents=True, exist_ok=True)
    config = demo_config(options, state_dir)
    log_file = (state_dir / "benchhub.log").open("a", encoding="utf-8")
    with log_file:
        configure_logging("info", "logfmt", stream=log_file)
        station = Station(config)
        if args.until_done:
            return asyncio.run(_until_done(station, args.timeout, state_dir, sys.stdout))
        asyncio.run(_live_demo(station, config, state_dir))
    return EXIT_OK


def _header(station: Station, state_dir: Path, started: float) -> str:
    config = station.config
    speed = f", x{config.sim.speed:g} speed" if config.sim else ""
    running_for = elapsed(time.monotonic() - started)
    lines = [f"benchhub demo - simulated station '{config.station.id}'{speed}, running {running_for}"]
    if station.mqtt is not None:
        host, port = station.mqtt.host, station.mqtt.port
        topic = f"{config.mqtt.prefix}/{config.station.id}/#"
        lines.append(f"MQTT mqtt://{host}:{port}   try: mosquitto_sub -h {host} -p {port} -t '{topic}' -v")
    if station.bus is not None:
        socket_path = station.bus.socket_path
        lines.append(
            f"usbmuxd {socket_path}   try: USBMUXD_SOCKET_ADDRESS={socket_path} pymobiledevice3 usbmux list"
        )
    lines.append(f"state and log: {state_dir}    Ctrl-C to stop")
    return "\n".join(lines)


async def _live_demo(station: Station, config: Config, state_dir: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    running = asyncio.create_task(station.run(stop))
    await station.ready.wait()
    assert station.world is not None, "the demo is a simulated bench"
    helpers = [asyncio.create_task(technician(station.world, config, station.ports))]
    if sys.stdout.isatty():
        helpers.append(
            asyncio.create_task(
                live(station.ports, sys.stdout, header=lambda: _header(station, state_dir, started))
            )
        )
    else:
        print(_header(station, state_dir, started), flush=True)
    await stop.wait()
    for task in helpers:
        task.cancel()
    await running
    print("\n" + render(station.ports()))


async def _until_done(station: Station, give_up_after: float, state_dir: Path, out: TextIO) -> int:
    stop = asyncio.Event()
    started = time.monotonic()
    running = asyncio.create_task(station.run(stop))
    await station.ready.wait()
    print(_header(station, state_dir, started).splitlines()[0], file=out, flush=True)
    finished = False
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(give_up_after):
            while not (finished := _all_settled(station.ports())):
                await station.changed()
    took = time.monotonic() - started
    states = station.ports()
    rows = outcomes(station.store, states)
    stop.set()
    await running
    print(_summary(rows, took), file=out)
    if not finished:
        print(
            f"benchhub: not every device finished within {give_up_after:g} s (see {state_dir}/benchhub.log)",
            file=out,
        )
    all_done = finished and all(s.phase in (Phase.DONE, Phase.EMPTY) for s in states)
    return EXIT_OK if all_done else EXIT_FAILED


def _all_settled(states: list[PortState]) -> bool:
    occupied = [s for s in states if s.phase is not Phase.EMPTY]
    return bool(occupied) and all(s.phase in SETTLED for s in occupied)


def _summary(rows: list[DeviceOutcome], took: float) -> str:
    done = sum(1 for r in rows if r.phase is Phase.DONE)
    counts = summary(PortState(r.ref, r.phase) for r in rows)
    return (
        f"{render_outcomes(rows)}\n\n{len(rows)} devices: {counts}; {done}/{len(rows)} done in {took:.1f} s"
    )
