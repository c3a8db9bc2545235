"""A station's configuration: one TOML file, validated into typed models.

Every problem in a file is reported as one line naming the key and what is expected, e.g.
``hubs[1].ports: must be between 1 and 64 (got 0)``, and the CLI exits with code 2. Relative paths
are resolved against the directory of the config file, so a config works from any working directory.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from daemon.versions import parse_version
from daemon.workflow.phases import Phase
from hubdrivers.base import LedPattern

ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,31}$"
"""Station and hub ids appear in MQTT topics and Home Assistant ids; keep them to [a-z0-9-]."""

StepName = Literal["update", "erase", "enroll", "assign", "setup"]
STEP_NAMES: tuple[StepName, ...] = ("update", "erase", "enroll", "assign", "setup")


class ConfigError(Exception):
    """A config file that cannot be used; `lines` holds one human-readable problem per entry."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StationConfig(_Model):
    id: Annotated[str, Field(pattern=ID_PATTERN)]
    name: str = ""
    port_map: Path | None = None
    """The station's port map (physical port -> USB path), written by `benchhub ports learn` and read
    by `daemon.usb.portmap.load_port_map`. A missing file is fine (not learned yet); it is read by the
    station, not here, so a config stays valid before the wizard has run."""


class StepPolicy(_Model):
    """How one step is run: its time budget, how often it is retried, and how many ports of the
    station may run it at once (`concurrency`, across controllers; restores are also held to
    `scheduler.restores_per_controller` on each USB controller)."""

    timeout: Annotated[float, Field(gt=0)]
    retries: Annotated[int, Field(ge=0, le=20)] = 2
    backoff: Annotated[float, Field(ge=0)] = 5.0
    concurrency: Annotated[int, Field(ge=1)] | None = None


def default_policies() -> dict[str, StepPolicy]:
    return {
        "detect": StepPolicy(timeout=60, retries=3, backoff=2),
        "update": StepPolicy(timeout=3600, retries=1, backoff=30),
        "erase": StepPolicy(timeout=900, retries=2, backoff=10),
        # enroll waits for a person with Apple Configurator (or another way in); assign for the portal.
        "enroll": StepPolicy(timeout=3600, retries=0, backoff=0),
        "assign": StepPolicy(timeout=86400, retries=0, backoff=0),
        "setup": StepPolicy(timeout=1800, retries=2, backoff=10),
    }


class SchedulerConfig(_Model):
    """What heavy steps share (`daemon.workflow.scheduler`)."""

    restores_per_controller: Annotated[int, Field(ge=1, le=64)] = 10
    """Concurrent restores on one USB host controller (field reports: about 10; fewer behind deep
    hub chains)."""
    transfers_per_controller: Annotated[int, Field(ge=1, le=64)] = 3
    """Restores sending their filesystem image over one controller at once: enough to keep the bus
    busy (one USB 2 device takes most of it), few enough to stagger the restores so that one's
    transfer overlaps the others' verifying and flashing (`daemon.workflow.scheduler`)."""
    transfer_spacing: Annotated[float, Field(ge=0, le=3600)] = 60.0
    """Least seconds between two restores starting to use one controller's bus (see above)."""
    controllers: dict[Annotated[str, Field(pattern=r"^usb[0-9]+$")], Annotated[int, Field(ge=1, le=64)]] = {}
    """Per-controller caps that differ from `restores_per_controller`, by bus: `{ usb3 = 4 }`."""
    apple_requests_per_second: Annotated[float, Field(gt=0, le=100)] = 5.0
    """Every request to Apple's services waits its turn at this rate (Apple documents 429s, not a
    number)."""


class WorkflowConfig(_Model):
    minimum_ios: str = "17.0"
    steps: tuple[StepName, ...] = STEP_NAMES
    policy: dict[str, StepPolicy] = Field(default_factory=default_policies)
    assignment_poll_interval: Annotated[float, Field(gt=0)] = 30.0
    """Seconds between two rounds of questions to Apple about every waiting serial (one round answers
    all of them; see `daemon.apple.tracker`)."""
    enrollment: Literal["configurator", "external", "skip"] = "external"
    """How devices get into Apple Business Manager: `configurator` asks the technician to add each
    one with Apple Configurator on a Mac (port light and instructions) and watches it arrive;
    `external` only watches (devices added some other way); `skip` expects them there already.
    Every mode verifies through the Apple Business API; none can add a device by itself, because
    Apple offers no host API for it."""
    mdm_server: str = ""
    """Name (or id) of the MDM server devices must end up assigned to, as shown in Apple Business
    Manager."""
    mdm_url: str = ""
    """The enrollment URL the devices' cloud configuration must name after setup (its
    `ConfigurationURL`); a device set up for another MDM goes to needs_attention. Empty: not checked."""
    reenumeration_window: Annotated[float, Field(gt=0, le=3600)] = 30.0
    """Seconds a device may be off USB and still be the same device on the same port (reboots,
    Recovery); on hubs that cannot sense unplugging, longer than this counts as unplugged."""

    @field_validator("minimum_ios")
    @classmethod
    def _version(cls, value: str) -> str:
        parse_version(value)
        return value

    @field_validator("steps")
    @classmethod
    def _steps_in_order(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("each step may appear only once")
        order = [STEP_NAMES.index(s) for s in value]
        if order != sorted(order):
            raise ValueError(f"steps must keep the workflow order {list(STEP_NAMES)}")
        return value

    @field_validator("policy", mode="before")
    @classmethod
    def _merge_policies(cls, value: Any) -> Any:
        """A `[workflow.policy.update]` table overrides only the keys it names."""
        if not isinstance(value, Mapping):
            return value
        merged: dict[str, Any] = {k: p.model_dump(exclude_none=True) for k, p in default_policies().items()}
        for name, override in value.items():
            if name not in merged:
                raise ValueError(f"unknown step {name!r}; expected one of {sorted(merged)}")
            merged[name] = {**merged[name], **override} if isinstance(override, Mapping) else override
        return merged

    def policy_for(self, step: str) -> StepPolicy:
        return self.policy[step]


UsbPath = Annotated[str, Field(pattern=r"^[1-9]\d*-[1-9]\d*(\.[1-9]\d*)*$")]
HUB_KINDS = ("sim", "cambrionix", "datamation", "usbhub")
CAMBRIONIX_MODELS = ("PP8S", "PP15S", "SS15", "U16S", "TS3-16", "PDSync-C4")


class _HubBase(_Model):
    id: Annotated[str, Field(pattern=ID_PATTERN)]
    usb_path: UsbPath | None = None
    """USB path of the hub's upstream port (e.g. `1-2`, see `ls /sys/bus/usb/devices`); the devices on
    its ports appear below it (`1-2.4`, `1-2.2.1`, ...)."""
    poll_interval: Annotated[float, Field(gt=0, le=60)] = 0.5
    leds: dict[Phase, LedPattern] = Field(default_factory=dict)
    """Hub LEDs as status lights (where the hub has them): phase -> pattern, e.g. done = "solid"."""
    hands_led: LedPattern | None = None
    """The pattern of a port waiting for a technician (add the device with Apple Configurator),
    shown over its phase's until the request is answered; e.g. "flash"."""


class SimHubConfig(_HubBase):
    kind: Literal["sim"]
    ports: Annotated[int, Field(ge=1, le=64)] = 8
    model: str = "SIM16"
    poll_interval: Annotated[float, Field(gt=0, le=60)] = 0.25
    attach_sense: bool = True
    """False simulates a hub that cannot tell whether a port is occupied (a plain USB hub): the
    station then learns unplugs from USB alone (`workflow.reenumeration_window`)."""


class CambrionixHubConfig(_HubBase):
    kind: Literal["cambrionix"]
    serial_port: str | None = None
    """The hub's control port, best by id (/dev/serial/by-id/usb-FTDI_FT230X_Basic_UART_<serial>-if00-port0)
    or by the udev rule's name (/dev/benchhub/cambrionix-<serial>)."""
    simulate: Literal["PP8S", "PP15S", "SS15", "U16S", "TS3-16", "PDSync-C4"] | None = None
    """Instead of hardware, run the byte-faithful simulator of this model on a pseudo-terminal."""
    ports: Annotated[int, Field(ge=1, le=64)] | None = None
    """Port count; defaults to the simulated model's. Required with serial_port."""

    @model_validator(mode="after")
    def _one_link(self) -> CambrionixHubConfig:
        if (self.serial_port is None) == (self.simulate is None):
            raise ValueError("give exactly one of serial_port (a real hub) or simulate (a model name)")
        if self.serial_port is not None and self.ports is None:
            raise ValueError("ports is required with serial_port (15 for a PP15S, 16 for a U16S, ...)")
        return self


class UsbHubConfig(_HubBase):
    """An unmanaged hub (Datamation and others): presence from USB topology, power where it has it."""

    kind: Literal["datamation", "usbhub"]
    usb_path: UsbPath
    ports: Annotated[int, Field(ge=1, le=64)]


HubConfig = Annotated[SimHubConfig | CambrionixHubConfig | UsbHubConfig, Field(discriminator="kind")]


class TlsConfig(_Model):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False

    @model_validator(mode="after")
    def _cert_pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


CommandAction = Literal["retry", "skip", "abort", "power_cycle", "identify"]
COMMAND_ACTIONS: tuple[CommandAction, ...] = ("retry", "skip", "abort", "power_cycle", "identify")

DEFAULT_COLORS: dict[str, str] = {
    "empty": "off",
    "detected": "blue",
    "updating": "blue",
    "erasing": "blue",
    "enrolling": "blue",
    "awaiting_assignment": "amber",
    "setting_up": "blue",
    "done": "green",
    "failed": "red",
    "needs_attention": "amber_blink",
    "interrupted": "purple",
}


class CommandsConfig(_Model):
    """Commands over MQTT (`…/port/<n>/set`, `<station>/set`). The broker's ACL decides who may
    publish there; the daemon checks the action against `actions` and, with `token_file`, a
    shared token carried in each command."""

    enabled: bool = True
    actions: tuple[CommandAction, ...] = COMMAND_ACTIONS
    token_file: Path | None = None
    """A file (or `credential:NAME`) holding a token each command must carry as `"token"`."""


class HomeAssistantConfig(_Model):
    enabled: bool = True
    prefix: Annotated[str, Field(pattern=r"^[a-z0-9_-]+$")] = "homeassistant"
    """Home Assistant's discovery prefix (Settings > MQTT > discovery prefix)."""


class MqttConfig(_Model):
    url: str = "embedded"
    """`mqtt://host[:port]`, `mqtts://host[:port]`, or `embedded` for an in-process broker on loopback."""
    embedded_port: Annotated[int, Field(ge=0, le=65535)] = 1883
    """Port of the embedded broker on 127.0.0.1; 0 picks a free one."""
    prefix: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_/-]*[a-z0-9]$|^[a-z0-9]$")] = "benchhub"
    client_id: str = ""
    username: str = ""
    password_file: Path | None = None
    """File holding the password; `credential:NAME` reads `$CREDENTIALS_DIRECTORY/NAME` (systemd)."""
    tls: TlsConfig | None = None
    keepalive: Annotated[int, Field(ge=5, le=3600)] = 30
    colors: dict[Phase, str] = Field(default_factory=lambda: {Phase(k): v for k, v in DEFAULT_COLORS.items()})
    """Phase -> colour word for the scalar `…/state/color` mirror (status lights without JSON);
    a table here overrides only the phases it names."""
    inflight: Annotated[int, Field(ge=1, le=100)] = 1
    """QoS 1 messages sent before their acknowledgements arrive. 1 suits a default Mosquitto;
    with `set_tcp_nodelay true` on the broker, 50 drains a backlog ~3x faster, while without it the
    broker's acknowledgements wait on Nagle's algorithm and a window makes things ~3x slower
    (docs/operations.md has the figures)."""
    outbox_limit: Annotated[int, Field(ge=100)] = 100_000
    """Most messages kept while the broker is unreachable. Beyond it the oldest events (not
    retained) are dropped and counted; the latest state of every port is never dropped."""
    commands: CommandsConfig = CommandsConfig()
    homeassistant: HomeAssistantConfig = HomeAssistantConfig()

    @field_validator("colors", mode="before")
    @classmethod
    def _merge_colors(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        return {**DEFAULT_COLORS, **value}

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value == "embedded":
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("must be 'embedded' or look like mqtt://host:1883 or mqtts://host:8883")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials; use mqtt.username and mqtt.password_file")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError("has an invalid port") from None
        return value

    @property
    def embedded(self) -> bool:
        return self.url == "embedded"

    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        default = 8883 if parts.scheme == "mqtts" else 1883
        return parts.hostname or "127.0.0.1", parts.port or default

    @property
    def use_tls(self) -> bool:
        return self.tls is not None or urlsplit(self.url).scheme == "mqtts"


class StorageConfig(_Model):
    path: Path = Path("benchhub.sqlite3")


class FirmwareConfig(_Model):
    """Where the station finds iOS firmware for the update step."""

    ipsw_dir: Path | None = None
    """Directory of downloaded `.ipsw` restore images (`daemon.ios.firmware.IpswCache`). Checked when
    firmware is needed, not here, so a config stays valid before the first download; `benchhub doctor`
    reports what it holds. None: no local cache."""


class LoggingConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "console", "logfmt", "json"] = "auto"


class DevicesConfig(_Model):
    """How the station reaches real iPhones and iPads (ignored on a simulated bench)."""

    usbmuxd: str | None = None
    """usbmuxd's socket: a path, or HOST:PORT; default `$USBMUXD_SOCKET_ADDRESS`, else the system's
    (`/var/run/usbmuxd`)."""
    pair_records: Path | None = None
    """Where pair records are kept; default `pair-records/` next to the database (never a home folder:
    the service user has none, and records must survive with the station's state)."""
    hotplug: Literal["auto", "udev", "poll"] = "auto"
    """USB hotplug source: udev where it runs, else polling sysfs (containers) or libusb (macOS)."""
    backend: Literal["pymobiledevice3", "cfgutil"] = "pymobiledevice3"
    """How device operations are carried out: pymobiledevice3 (Linux and macOS), or Apple
    Configurator's `cfgutil` on a Mac (restores then are not available: no update step)."""
    cfgutil: str = "cfgutil"
    """The cfgutil executable (Apple Configurator > Install Automation Tools puts it on the PATH)."""


SIM_MDM_SERVER = "benchhub MDM"
"""The MDM server of the simulated organisation, unless the config names one."""


class AppleConfig(_Model):
    """Access to Apple Business Manager (or School Manager): the Apple Business API account an
    administrator creates under Preferences > API, and/or an MDM server's legacy DEP token.

    Ids are not secrets and live here; the private key and the DEP token are read from files or
    systemd credentials (`credential:NAME`), never from this file, never logged or published."""

    client_id: str = ""
    """The API account's client id, `BUSINESSAPI.<uuid>` (or `SCHOOLAPI.<uuid>`)."""
    key_id: str = ""
    """The key id Apple Business Manager shows for the uploaded key."""
    private_key_file: Path | None = None
    """The account's EC P-256 private key (PEM), or `credential:NAME`."""
    api_url: str = ""
    """Default: `https://api-business.apple.com` (`https://api-school.apple.com` for SCHOOLAPI ids)."""
    token_url: str = "https://account.apple.com/auth/oauth2/token"  # noqa: S105 - a URL, not a secret
    auto_assign: str = ""
    """Name (or id) of an MDM server the daemon assigns devices to itself, through the API, instead
    of waiting for someone to do it in the portal. Also the assignment target when
    `workflow.mdm_server` is empty."""
    dep_token_file: Path | None = None
    """An MDM server's decrypted DEP server token (JSON), or `credential:NAME`: a second way to see
    assignment, for organisations without an API account (it sees only that server's devices)."""
    dep_url: str = "https://mdmenrollment.apple.com"

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, value: str) -> str:
        if value and not re.match(r"^(BUSINESSAPI|SCHOOLAPI)\.[0-9A-Za-z-]+$", value):
            raise ValueError(
                "must look like BUSINESSAPI.<uuid> or SCHOOLAPI.<uuid> (Apple Business Manager > API)"
            )
        return value

    @model_validator(mode="after")
    def _complete(self) -> AppleConfig:
        if self.client_id and not self.key_id:
            raise ValueError("apple.key_id: the API account's key id is required with client_id")
        if self.client_id and self.private_key_file is None:
            raise ValueError(
                "apple.private_key_file: the API account's private key is required with client_id"
            )
        if (self.key_id or self.private_key_file is not None) and not self.client_id:
            raise ValueError("apple.client_id: is required with key_id and private_key_file")
        return self

    @property
    def has_api(self) -> bool:
        return bool(self.client_id)

    @property
    def has_dep(self) -> bool:
        return self.dep_token_file is not None

    @property
    def resolved_api_url(self) -> str:
        if self.api_url:
            return self.api_url
        school = self.client_id.startswith("SCHOOLAPI.")
        return "https://api-school.apple.com" if school else "https://api-business.apple.com"


class SimConfig(_Model):
    """The simulated bench: devices, the portal admin, and injected faults."""

    speed: Annotated[float, Field(gt=0, le=100000)] = 60.0
    """How much faster than real life simulated operations run (a 15-minute restore takes 15 s at 60)."""
    seed: int = 1
    devices: Annotated[int, Field(ge=0, le=1024)] = 0
    """Devices plugged in when the station starts (one per free port, in port order)."""
    state_file: Path | None = None
    """Where simulated devices and the simulated portal keep their state, so a restarted daemon finds
    the same devices in the same condition, as it would on a real bench."""
    assign_delay: Annotated[float, Field(ge=0)] = 120.0
    """Seconds (at speed 1) before the simulated administrator assigns a new serial in the portal."""
    configurator_delay: Annotated[float, Field(ge=0)] = 45.0
    """Seconds (at speed 1) the simulated technician takes to add a device with Apple Configurator
    once the station asks (`workflow.enrollment = "configurator"`)."""
    fail_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Chance that any one simulated operation fails with a transient error."""
    restore_gb: Annotated[float, Field(ge=0, le=100)] = 6.0
    """Gigabytes (10^9 bytes) an erase-install moves over USB (0: restores use no bandwidth)."""
    controller_mb_s: Annotated[float, Field(gt=0, le=10000)] = 40.0
    """Megabytes a second one USB host controller carries for all its devices (USB 2 in practice)."""
    device_mb_s: Annotated[float, Field(gt=0, le=10000)] = 35.0
    """Megabytes a second one device's restore takes at most."""
    reliable_restores: Annotated[int, Field(ge=1, le=1024)] = 10
    """Concurrent restores a controller carries reliably; beyond, `overload_failure` applies."""
    overload_failure: Annotated[float, Field(ge=0, le=1)] = 0.3
    """Chance that a restore starting on an overloaded controller breaks off part-way."""


class Config(_Model):
    station: StationConfig
    hubs: Annotated[list[HubConfig], Field(min_length=1)]
    workflow: WorkflowConfig = WorkflowConfig()
    mqtt: MqttConfig = MqttConfig()
    storage: StorageConfig = StorageConfig()
    firmware: FirmwareConfig = FirmwareConfig()
    devices: DevicesConfig = DevicesConfig()
    logging: LoggingConfig = LoggingConfig()
    apple: AppleConfig = AppleConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    sim: SimConfig | None = None

    @model_validator(mode="after")
    def _unique_hubs(self) -> Config:
        seen: set[str] = set()
        for hub in self.hubs:
            if hub.id in seen:
                raise ValueError(f"hub id {hub.id!r} is used twice")
            seen.add(hub.id)
        simulated = any(h.kind == "sim" or (h.kind == "cambrionix" and h.simulate) for h in self.hubs)
        if simulated and self.sim is None:
            raise ValueError("simulated hubs need a [sim] table (speed, devices, ...)")
        self._assignment_target()
        if self.sim is None:
            self._real_bench_ready()
        return self

    def _assignment_target(self) -> None:
        mdm, auto = self.workflow.mdm_server, self.apple.auto_assign
        if mdm and auto and mdm != auto:
            raise ValueError(
                f"apple.auto_assign: names {auto!r} but workflow.mdm_server names {mdm!r}; devices can be"
                " assigned to one server only (leave workflow.mdm_server empty to use auto_assign)"
            )
        if "assign" in self.workflow.steps and self.sim is None and self.apple.has_api and not (mdm or auto):
            raise ValueError(
                "workflow.mdm_server: name the MDM server devices must be assigned to (as shown in"
                " Apple Business Manager)"
            )

    @property
    def assignment_target(self) -> str:
        """The MDM server devices must end up on (the simulated organisation has one by default)."""
        default = SIM_MDM_SERVER if self.sim is not None else ""
        return self.workflow.mdm_server or self.apple.auto_assign or default

    def _real_bench_ready(self) -> None:
        """What a bench of real devices needs that a simulated one provides by itself."""
        steps, apple = self.workflow.steps, self.apple
        if apple.auto_assign and not apple.has_api:
            raise ValueError(
                "apple.auto_assign: assigning devices needs the Apple Business API; set apple.client_id,"
                " key_id and private_key_file, or remove auto_assign"
            )
        if "enroll" in steps and not apple.has_api:
            raise ValueError(
                "apple.client_id: the enroll step watches devices arrive in Apple Business Manager"
                " through the Apple Business API; configure an API account (see docs/apple.md) or"
                ' leave "enroll" out of workflow.steps'
            )
        if "assign" in steps and not (apple.has_api or apple.has_dep):
            raise ValueError(
                "apple.client_id: the assign step needs the Apple Business API (or apple.dep_token_file)"
                " to see assignments; configure one (see docs/apple.md) or leave"
                ' "assign" out of workflow.steps'
            )
        if "update" in self.workflow.steps and self.devices.backend == "cfgutil":
            raise ValueError(
                "devices.backend: the update step needs the pymobiledevice3 backend (cfgutil restores are"
                ' not supported); use backend = "pymobiledevice3" or leave "update" out of workflow.steps'
            )
        if "update" in self.workflow.steps and self.firmware.ipsw_dir is None:
            raise ValueError(
                "firmware.ipsw_dir: the update step needs an IPSW cache directory (see docs/devices.md),"
                ' or leave "update" out of workflow.steps'
            )


_HINTS = {
    "missing": "is required",
    "extra_forbidden": "is not a known setting (check the spelling)",
    "string_pattern_mismatch": "must use only lowercase letters, digits and '-' (1-32 characters)",
    "union_tag_invalid": "names an unknown hub kind",
    "path_type": "must be a path, as a string",
}


_NAMES_ITS_KEY = re.compile(r"^[a-z_]+(\.[a-z_]+)+: ")


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in HUB_KINDS and out.startswith("hubs[") and out.count(".") == 0:
            continue  # pydantic inserts the union tag into the path; operators never wrote it
        else:
            out += f".{part}" if out else str(part)
    return out or "(file)"


def _describe(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    if kind == "union_tag_invalid":
        return f"unknown hub kind {err['input'].get('kind')!r}; expected one of: {', '.join(HUB_KINDS)}"
    if kind == "union_tag_not_found":
        return f"needs a kind (one of: {', '.join(HUB_KINDS)})"
    hint = _HINTS.get(kind)
    msg: str = hint or str(err["msg"]).removeprefix("Value error, ")
    if kind not in ("missing", "extra_forbidden") and not isinstance(err.get("input"), Mapping | list):
        msg += f" (got {err['input']!r})"
    return msg


def format_validation_error(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = err["loc"]
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = (*loc, "kind")  # the error is about the hub's `kind` key, which pydantic leaves out
        where, what = _where(tuple(loc)), _describe(err)
        if _NAMES_ITS_KEY.match(what) and (not loc or what.startswith(f"{where}.")):
            lines.append(what)  # a check of a whole table that names the key itself
        else:
            lines.append(f"{where}: {what}")
    return lines


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def rel(p: Path | None) -> Path | None:
        if p is None or p.is_absolute():
            return p
        return base / p

    updates: dict[str, Any] = {"storage": cfg.storage.model_copy(update={"path": rel(cfg.storage.path)})}
    updates["station"] = cfg.station.model_copy(update={"port_map": rel(cfg.station.port_map)})
    updates["firmware"] = cfg.firmware.model_copy(update={"ipsw_dir": rel(cfg.firmware.ipsw_dir)})
    pair_records = rel(cfg.devices.pair_records) or updates["storage"].path.parent / "pair-records"
    updates["devices"] = cfg.devices.model_copy(update={"pair_records": pair_records})
    if cfg.sim is not None:
        updates["sim"] = cfg.sim.model_copy(update={"state_file": rel(cfg.sim.state_file)})
    apple = cfg.apple
    for key in ("private_key_file", "dep_token_file"):
        value = getattr(apple, key)
        if value is not None and not str(value).startswith("credential:"):
            apple = apple.model_copy(update={key: rel(value)})
    updates["apple"] = apple
    mqtt = cfg.mqtt
    if mqtt.password_file is not None and not str(mqtt.password_file).startswith("credential:"):
        mqtt = mqtt.model_copy(update={"password_file": rel(mqtt.password_file)})
    token = mqtt.commands.token_file
    if token is not None and not str(token).startswith("credential:"):
        mqtt = mqtt.model_copy(
            update={"commands": mqtt.commands.model_copy(update={"token_file": rel(token)})}
        )
    if mqtt.tls is not None:
        tls = mqtt.tls.model_copy(
            update={k: rel(getattr(mqtt.tls, k)) for k in ("ca_file", "cert_file", "key_file")}
        )
        mqtt = mqtt.model_copy(update={"tls": tls})
    updates["mqtt"] = mqtt
    return cfg.model_copy(update=updates)


def parse_config(data: Mapping[str, Any], base: Path) -> Config:
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    return _resolve_paths(cfg, base)


def load_config(path: Path) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file (pass --config with the station's TOML file)"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot be read ({exc.strerror})"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: is not UTF-8 text"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    try:
        return parse_config(data, path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError([f"{path}: {line}" for line in exc.lines]) from None


def read_secret(ref: Path) -> str:
    """Read a secret from a file, or from a systemd credential given as `credential:NAME`.

    Secrets never live in the config file itself, so the config can be world-readable and logged.
    """
    text = str(ref)
    if text.startswith("credential:"):
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(
                [f"{text}: $CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit)"]
            )
        ref = Path(directory) / text.removeprefix("credential:")
    try:
        return ref.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError([f"{ref}: secret cannot be read ({exc.strerror})"]) from None
