"""The composition root: builds hubs, device watcher, port runners, store and publisher, and runs them.

Data flows one way: hub supervisors and the device watcher produce events, `Station` maps them to
ports (through the USB topology) and hands them to the port's runner; runners record transitions
in the store; the publisher drains the store's outbox to MQTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from daemon import __version__
from daemon.applesetup import real_apple, sim_apple
from daemon.backoff import backoff_delay
from daemon.config import CambrionixHubConfig, Config, ConfigError, read_secret
from daemon.devicesetup import real_services, real_watcher, sim_services
from daemon.hubs import HubSupervisor
from daemon.hubsetup import HubFactory, model_spec, physical_port_paths, port_count
from daemon.inbound import Inbound
from daemon.ios.base import DeviceEvent, DeviceGone, DeviceSeen
from daemon.models import OutboxMessage, PortRef, PortState
from daemon.mqtt.broker import embedded_broker
from daemon.mqtt.commands import CommandRejected, CommandRules
from daemon.mqtt.discovery import discovery_messages, ha_status_topics, removal_messages
from daemon.mqtt.payloads import PayloadRenderer
from daemon.mqtt.publisher import MqttPublisher
from daemon.mqtt.topics import Topics
from daemon.sdnotify import Notifier
from daemon.sim.demo import plug_initial
from daemon.sim.usbbandwidth import MB, BusModel
from daemon.sim.usbbus import SimUsbBus
from daemon.sim.world import SimWorld, build_world
from daemon.store import Store, StoreUnavailable
from daemon.technician import HandsRequest, TechnicianDesk
from daemon.usb.portmap import load_port_map_if_present
from daemon.usb.topology import Topology
from daemon.usb.watcher import DeviceWatcher
from daemon.workflow.actions import Action
from daemon.workflow.phases import Phase
from daemon.workflow.runner import PortRunner
from daemon.workflow.scheduler import Scheduler, controller_of
from hubdrivers.base import Capability, HubError, LedPattern, PortEvent, PortEventKind


def build_sim_world(config: Config) -> SimWorld:
    sim = config.sim
    if sim is None:
        raise ConfigError(["(file): the simulated bench needs a [sim] table"])
    return build_world(
        [
            (
                h.id,
                port_count(h),
                h.usb_path,
                physical_port_paths(model_spec(h))
                if isinstance(h, CambrionixHubConfig) and h.simulate
                else {},
            )
            for h in config.hubs
        ],
        speed=sim.speed,
        seed=sim.seed,
        assign_delay=sim.assign_delay,
        fail_rate=sim.fail_rate,
        target_server=config.assignment_target,
        state_file=sim.state_file,
        bus=BusModel(
            controller_rate=sim.controller_mb_s * MB,
            device_rate=sim.device_mb_s * MB,
            reliable=sim.reliable_restores,
            overload_failure=sim.overload_failure,
        ),
        restore_bytes=sim.restore_gb * 1e9,
    )


IDENTIFY_SECONDS = 10.0
STATUS_EVERY = 1.0
"""Seconds between systemd STATUS= refreshes at most (a busy bench changes many times a second)."""


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    host: str
    port: int


class Station:
    def __init__(self, config: Config, world: SimWorld | None = None) -> None:
        self.config = config
        self.log = structlog.get_logger("benchhub.station")
        if world is None and config.sim is not None:
            world = build_sim_world(config)
        self.world = world
        """The simulated bench, or None on a bench of real devices."""
        self.topics = Topics(config.mqtt.prefix, config.station.id)
        self.renderer = PayloadRenderer(self.topics, config.mqtt.colors)
        self.store = Store(config.storage.path, self.renderer, outbox_limit=config.mqtt.outbox_limit)
        self.topology = Topology.from_config((h.id, port_count(h), h.usb_path) for h in config.hubs)
        for note in self.topology.apply_learned(load_port_map_if_present(config.station.port_map)):
            self.log.warning("port_map_note", note=note)
        self.hubs = HubFactory(config, self.world)
        self.bus: SimUsbBus | None = (
            SimUsbBus(world, Path(tempfile.mkdtemp(prefix="benchhub-usb-"))) if world is not None else None
        )
        """The simulated USB host (sysfs, udev, usbmuxd), served while the station runs; made here
        because the device backend talks to its usbmuxd socket."""
        self.desk = TechnicianDesk(self._on_hands)
        """Open requests for a person (add this device with Apple Configurator)."""
        self.scheduler = Scheduler(
            config.scheduler,
            config.workflow.policy,
            lambda ref: controller_of(self.topology.hubs[ref.hub].path_of(ref.port)),
            time_scale=world.speed if world is not None else 1.0,
        )
        pace = self.scheduler.apple.wait
        self.apple = (
            sim_apple(config, world, self.desk, pace) if world is not None else real_apple(config, pace)
        )
        self.services = (
            sim_services(world, self.bus, self.apple.tracker, self.desk)
            if world is not None
            else real_services(config, self.apple.tracker, self.desk)
        )
        self.supervisors = {
            hub.id: HubSupervisor(
                hub.id,
                self.hubs.factory(hub),
                hub.poll_interval,
                self._on_port_event,
                self._on_hub_link,
            )
            for hub in config.hubs
        }
        self.runners = {
            ref: PortRunner(
                ref,
                self.store,
                self.services,
                config.workflow,
                self.scheduler,
                power_cycle=self.supervisors[ref.hub].power_cycle,
                on_phase=self._on_phase,
                senses_unplug=self.supervisors[ref.hub].senses_unplug,
            )
            for ref in self.topology.ports()
        }
        self.inbound = self._inbound(config)
        """Commands and Home Assistant's birth message, handed over by the MQTT publisher."""
        self.mqtt: MqttEndpoint | None = None
        self.watcher: DeviceWatcher | None = None
        self.ready = asyncio.Event()
        self._changes = asyncio.Event()
        self.store.subscribe(self._changes.set)
        self._final: list[PortState] | None = None
        self._leds = {hub.id: hub.leds for hub in config.hubs}
        self._hands_led = {hub.id: hub.hands_led for hub in config.hubs}
        self._awaiting: set[PortRef] = set()
        self._identifying: dict[PortRef, int] = {}
        """Ports blinking for `identify`, with how many requests are still running."""
        """Ports awaiting assignment, so the retained list is republished when it changes."""
        # Device events held until the hub has told us its port map (see `_route`).
        self._held: dict[str, list[DeviceEvent]] = {
            hub.id: []
            for hub in config.hubs
            if isinstance(hub, CambrionixHubConfig) and not self.topology.fully_learned(hub.id)
        }
        self._led_wanted: dict[PortRef, LedPattern] = {}
        self._led_shown: dict[PortRef, LedPattern] = {}
        self._led_dirty = asyncio.Event()
        self.notifier = Notifier()
        """systemd's notification socket (READY, STATUS, WATCHDOG, STOPPING); a no-op elsewhere."""

    # ---------------------------------------------------------------- events

    def _on_port_event(self, hub: str, event: PortEvent) -> None:
        runner = self.runners.get(PortRef(hub, event.port))
        if runner is None:
            return
        supervisor = self.supervisors[hub]
        if event.kind is PortEventKind.DETACHED and Capability.ATTACH_SENSE in supervisor.capabilities:
            runner.unplugged()

    def _on_hub_link(self, hub: str, online: bool) -> None:
        supervisor = self.supervisors[hub]
        if online:
            if supervisor.port_paths:
                self.topology.set_port_paths(hub, supervisor.port_paths)
            for event in self._held.pop(hub, []):
                self._route(event)
            for ref in [r for r in self._led_shown if r.hub == hub]:
                del self._led_shown[ref]
            self._led_dirty.set()
        self.store.set_hub_status(hub, online)

    def _on_phase(self, ref: PortRef, phase: Phase) -> None:
        self._repaint(ref, phase)
        waiting = phase is Phase.AWAITING_ASSIGNMENT
        if waiting or ref in self._awaiting:
            if waiting:
                self._awaiting.add(ref)
            else:
                self._awaiting.discard(ref)
            self.store.publish(self.renderer.waiting_messages(self.store.ports()))

    def _on_hands(self, ref: PortRef, request: HandsRequest | None) -> None:
        self._repaint(ref)

    def _repaint(self, ref: PortRef, phase: Phase | None = None) -> None:
        """Hub LEDs as status lights: remember what each port should show; `_show_leds` applies it.
        An `identify` blink beats a request for the technician (`hands_led`), which beats the
        phase's pattern; a port painted before whose phase has no pattern goes dark."""
        if ref in self._identifying:
            pattern: LedPattern | None = LedPattern.FAST_BLINK
        elif self.desk.wanted(ref):
            pattern = self._hands_led[ref.hub]
        else:
            pattern = self._leds[ref.hub].get(phase or self.store.port(ref).phase)
        if pattern is None and ref in self._led_wanted:
            pattern = LedPattern.OFF
        if pattern is not None:
            self._led_wanted[ref] = pattern
            self._led_dirty.set()

    def _inbound(self, config: Config) -> Inbound:
        commands, ha = config.mqtt.commands, config.mqtt.homeassistant
        rules = None
        if commands.enabled:
            token = read_secret(commands.token_file) if commands.token_file is not None else None
            rules = CommandRules(commands.actions, token, lambda ref: ref in self.runners)
        return Inbound(
            self.topics,
            rules=rules,
            act=self.act,
            identify=self.identify,
            respond=self._respond,
            ha_status_topics=ha_status_topics(ha.prefix) if ha.enabled else (),
            on_ha_online=self._announce_soon,
        )

    def _forget_removed_hubs(self) -> None:
        """A hub that left the config leaves MQTT too: its retained status and its Home Assistant
        device are cleared (empty retained payloads), so dashboards and HA do not keep a ghost."""
        removed = sorted(set(self.store.hub_statuses()) - {hub.id for hub in self.config.hubs})
        if not removed:
            return
        ha = self.config.mqtt.homeassistant
        messages = [OutboxMessage(self.topics.hub_status(hub), b"", retain=True) for hub in removed]
        if ha.enabled:
            messages += removal_messages(ha.prefix, self.config.station.id, removed)
        self.store.forget_hubs(removed, messages)
        self.log.info("hubs_removed", hubs=removed)

    def announcements(self) -> list[OutboxMessage]:
        """Home Assistant discovery for the station and its hubs (empty when disabled)."""
        return discovery_messages(self.config, self.topics, __version__)

    def _announce_soon(self) -> None:
        """Home Assistant restarted and forgot every discovered device: announce again, after a
        short random delay (HA's advice, so a fleet of stations does not answer at once)."""
        delay = random.uniform(0.0, 2.0)  # noqa: S311 - spreading load, not cryptography
        asyncio.get_running_loop().call_later(delay, lambda: self.store.publish(self.announcements()))

    def _respond(self, document: dict[str, Any]) -> None:
        self.store.publish(self.renderer.response_messages(document))

    def identify(self, ref: PortRef) -> str:
        """Blink the port's LED for `IDENTIFY_SECONDS`, so a person finds the port (MQTT `identify`)."""
        supervisor = self.supervisors[ref.hub]
        if Capability.PORT_LED not in supervisor.capabilities:
            raise CommandRejected("no_leds", f"hub {ref.hub} has no port LEDs (or is offline)")
        self._identifying[ref] = self._identifying.get(ref, 0) + 1
        self._repaint(ref)

        def done() -> None:
            self._identifying[ref] -= 1
            if not self._identifying[ref]:
                del self._identifying[ref]
            self._repaint(ref)

        asyncio.get_running_loop().call_later(IDENTIFY_SECONDS, done)
        return f"blinking for {IDENTIFY_SECONDS:g} s"

    async def _show_leds(self) -> None:
        """Bring hub LEDs to the wanted patterns, newest wins, in order per port. A hub that was
        offline (or not yet open) or refused a command is retried, and a reconnected hub is
        repainted, since it may have rebooted with its LEDs reset."""
        while True:
            await self._led_dirty.wait()
            self._led_dirty.clear()
            for ref, pattern in list(self._led_wanted.items()):
                supervisor = self.supervisors[ref.hub]
                if self._led_shown.get(ref) is pattern or Capability.PORT_LED not in supervisor.capabilities:
                    continue
                try:
                    await supervisor.set_led(ref.port, pattern)
                except HubError as exc:
                    self.log.warning("led_failed", hub=ref.hub, port=ref.port, error=str(exc))
                    self._led_dirty.set()
                    await asyncio.sleep(1.0)
                else:
                    self._led_shown[ref] = pattern

    async def _watch_devices(self, watcher: DeviceWatcher) -> None:
        """Route the watcher's events. The watcher restarts its own sources (usbmuxd restarts,
        garbage on the socket); this loop only guards against a bug ending the stream."""
        failures = 0
        while True:
            try:
                async with contextlib.aclosing(watcher.events()) as events:
                    async for event in events:
                        failures = 0
                        self._route(event)
            except Exception as exc:
                failures += 1
                self.log.exception("device_watch_failed", error=repr(exc), failures=failures)
            await asyncio.sleep(backoff_delay(failures))

    def _route(self, event: DeviceEvent) -> None:
        """Hand a device event to the runner of the port it happened on. Events under a hub whose
        port map is not known yet (a Cambrionix reports it when opened) wait for the map: routed
        with a guessed map, a device would land on the wrong port."""
        hub = self.topology.hub_for(event.usb_path)
        if hub is None:
            self.log.debug("device_outside_bench", usb_path=event.usb_path)
            return
        if hub in self._held:
            self._held[hub].append(event)
            return
        ref = self.topology.port_for(event.usb_path)
        if ref is None:
            self.log.debug("device_on_unknown_port", usb_path=event.usb_path)
            return
        match event:
            case DeviceSeen():
                self.runners[ref].device_present(event)
            case DeviceGone():
                self.runners[ref].device_absent()

    # ------------------------------------------------------------ operations

    def ports(self) -> list[PortState]:
        """Every port's state; after the station stopped, the state it stopped with."""
        return self._final if self._final is not None else self.store.ports()

    async def changed(self) -> None:
        """Return after the next recorded change (a transition, progress or hub status)."""
        self._changes.clear()
        await self._changes.wait()

    async def act(self, ref: PortRef, action: Action) -> str:
        runner = self.runners.get(ref)
        if runner is None:
            raise KeyError(f"no port {ref} on this station")
        return await runner.act(action)

    # -------------------------------------------------------------------- run

    @contextlib.asynccontextmanager
    async def _broker(self) -> AsyncIterator[MqttEndpoint]:
        mqtt = self.config.mqtt
        if mqtt.embedded:
            async with embedded_broker(mqtt.embedded_port) as (host, port):
                self.log.info("embedded_broker_started", host=host, port=port)
                yield MqttEndpoint(host, port)
        else:
            host, port = mqtt.host_port()
            yield MqttEndpoint(host, port)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then shut down cleanly: runners stop (their steps are recorded as
        they stand, and resume from the store next time), the publisher drains and says offline."""
        # Every log line of this station, including those of the tasks started below, names it.
        structlog.contextvars.bind_contextvars(station=self.config.station.id)
        self._forget_removed_hubs()  # written later if the database does not take writes now
        recovered = await self._prepare_store()
        if recovered:
            self.log.warning("recovered_interrupted_ports", ports=[str(s.ref) for s in recovered])
        password = read_secret(self.config.mqtt.password_file) if self.config.mqtt.password_file else None
        if self.world is None:
            self.watcher = real_watcher(self.config)
            await self._run(stop, self.watcher, contextlib.nullcontext(), password)
            return
        plugged = plug_initial(self.world, self.config)
        if plugged:
            self.log.info("sim_devices_plugged", count=len(plugged))
        bus = self.bus
        assert bus is not None, "a simulated bench has its USB host from the start"
        self.watcher = bus.watcher()
        try:
            await self._run(stop, self.watcher, bus.running(), password)
        finally:
            bus.close()

    async def _prepare_store(self) -> list[PortState]:
        """Rows for newly configured ports, then `Store.recover`, waiting for the database if it does
        not take writes (a start while the disk is full or the database is locked must not exit, to
        be restarted into the same failure by systemd until it gives up); both are idempotent and
        each port's record is its own transaction, so the next pass finishes the rest (and returns
        only those)."""
        while True:
            try:
                self.store.ensure_ports(self.runners)
                return self.store.recover()
            except StoreUnavailable:
                await self.store.writable()

    def status_line(self, publisher: MqttPublisher, unhealthy: str | None = None) -> str:
        """One line for `systemctl status` (systemd's STATUS=): hubs and ports, what the ports are
        doing, and what the daemon is riding out by itself (broker outage, offline hubs, a database
        that does not take writes)."""
        counts: Counter[Phase] = Counter(state.phase for state in self.store.ports())
        counts.pop(Phase.EMPTY, None)
        busy = ", ".join(f"{counts[p]} {p.value.replace('_', ' ')}" for p in Phase if counts[p])
        hubs = len(self.supervisors)
        parts = [f"{hubs} hub{'s' if hubs != 1 else ''}, {len(self.runners)} ports: {busy or 'all empty'}"]
        offline = [hub for hub, s in self.supervisors.items() if not s.online]
        if offline:
            parts.append(f"offline: {', '.join(offline)}")
        if self.store.failing is not None:
            parts.append(f"database: {self.store.failing}, ports paused until it takes writes")
        if not publisher.connected:
            error = publisher.last_error
            parts.append(f"MQTT down ({error}), retrying" if error else "MQTT connecting")
        if unhealthy:
            parts.append(f"UNHEALTHY: {unhealthy}")
        return "; ".join(parts)

    async def _systemd(
        self, stop: asyncio.Event, publisher: MqttPublisher, vital: list[asyncio.Task[None]]
    ) -> None:
        """Keep systemd informed until `stop`: STATUS= when the summary changes (at most every
        `STATUS_EVERY` s), WATCHDOG=1 every half watchdog interval while healthy, STOPPING=1 at the end.

        Healthy means: this task ran on time (the event loop's lag, measured over the ticks since the
        last ping, stayed within half the interval: a loop blocked that long is not serving hubs or
        devices), and every vital task (hub supervisors, the MQTT publisher, the device watcher) is
        still running. Those loop forever and handle outages themselves; one that raised takes the
        whole TaskGroup (and the process) down anyway, but one that returned would leave the station
        silently deaf, so withholding the ping makes systemd restart it. A broker outage or an
        offline hub is not unhealthy: restarting would not help, so STATUS= says so instead."""
        notifier = self.notifier
        if not notifier.enabled:
            await stop.wait()
            return
        loop = asyncio.get_running_loop()
        interval = notifier.watchdog_interval
        half = interval / 2 if interval is not None else None
        tick = min(STATUS_EVERY, half) if half is not None else STATUS_EVERY
        shown, shown_at, pinged_at, lag = "", -STATUS_EVERY, loop.time(), 0.0
        while True:
            planned = loop.time() + tick
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await stop.wait()
            if stop.is_set():
                break
            now = loop.time()
            lag = max(lag, now - planned)
            unhealthy = None
            if half is not None and now - pinged_at >= half - tick / 2:
                dead = [t.get_name() for t in vital if t.done()]
                if dead:
                    unhealthy = f"task ended: {', '.join(dead)}"
                elif lag > half:
                    unhealthy = f"event loop stalled {lag:.1f} s"
                if unhealthy is None:
                    notifier.watchdog()
                else:
                    self.log.warning("watchdog_withheld", reason=unhealthy)
                pinged_at, lag = now, 0.0
            line = self.status_line(publisher, unhealthy)
            if line != shown and (unhealthy or now - shown_at >= STATUS_EVERY):
                notifier.status(line)
                shown, shown_at = line, now
        notifier.stopping("stopping: interrupting running steps, draining the MQTT outbox")

    async def _run(
        self,
        stop: asyncio.Event,
        watcher: DeviceWatcher,
        usb_host: contextlib.AbstractAsyncContextManager[object],
        password: str | None,
    ) -> None:
        async with (
            self._broker() as endpoint,
            self.hubs.running(),
            usb_host,
            self.apple.running(),
            asyncio.TaskGroup() as group,
        ):
            self.mqtt = endpoint
            mqtt_config = self.config.mqtt
            if mqtt_config.embedded:
                mqtt_config = mqtt_config.model_copy(
                    update={"url": f"mqtt://{endpoint.host}:{endpoint.port}"}
                )
            mqtt_publisher = MqttPublisher(
                mqtt_config,
                self.topics,
                self.store,
                self.renderer,
                password=password,
                subscriptions=self.inbound.subscriptions,
                on_message=self.inbound,
                announcements=self.announcements,
            )
            publisher_stop = asyncio.Event()
            publisher = group.create_task(mqtt_publisher.run(publisher_stop), name="mqtt publisher")
            runners = [group.create_task(r.run(), name=f"runner {r.ref}") for r in self.runners.values()]
            hubs = [group.create_task(s.run(), name=f"hub {s.hub_id}") for s in self.supervisors.values()]
            watching = group.create_task(self._watch_devices(watcher), name="device watcher")
            workers = [
                *runners,
                *hubs,
                watching,
                group.create_task(self._show_leds(), name="hub leds"),
            ]
            vital = [publisher, *hubs, watching]
            group.create_task(self._systemd(stop, mqtt_publisher, vital), name="systemd")
            self.log.info(
                "station_started",
                station=self.config.station.id,
                hubs=len(self.supervisors),
                ports=len(self.runners),
                mqtt=f"{endpoint.host}:{endpoint.port}",
                usbmuxd=str(watcher.usbmux.address),
                hotplug=watcher.hotplug.description,
            )
            self.ready.set()
            self.notifier.ready(self.status_line(mqtt_publisher))
            await stop.wait()
            self.log.info("station_stopping")
            for task in workers:
                task.cancel()
            await asyncio.wait(workers)
            publisher_stop.set()
            await publisher
        self._final = self.store.ports()
        self.store.close()
        self.log.info("station_stopped")
