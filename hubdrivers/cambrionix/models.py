"""What differs between Cambrionix products: port count, firmware family, commands, LEDs, identity
strings, the internal USB tree (`bd`) and the USB id of the control interface.

One table serves the driver (capabilities, fallback port map, which commands it may send) and the
simulator (what to print), so the two cannot disagree about a model. Sources, per hubs.md:
commands per product from CLI-MAN §11; port maps from GAZOO `usb_config.py`; the SS15 `bd` verbatim
from CLI-MAN §3.2; titles of PP8S/PP15S from GAZOO captures. Everything marked INFERRED (other
titles, the `bd` trees of models without a published listing, where their control port sits, hwid,
firmware numbers) is a plausible stand-in that only the simulator uses; the driver never trusts it
over what a real hub says.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from hubdrivers.cambrionix.parsing import FirmwareFamily

FTDI_FT230X = (0x0403, 0x6015)
"""USB2-generation hubs: an FTDI FT230X UART ("FT230X Basic UART"), /dev/ttyUSBn on Linux."""
CAMBRIONIX_USB3 = (0x2CD9, 0x0021)
"""USB3-generation hubs (SuperSync15, ThunderSync3-16): a CDC-ACM port, /dev/ttyACMn on Linux."""
CONTROL_USB_IDS = frozenset({FTDI_FT230X, CAMBRIONIX_USB3})


class UsbGeneration(enum.StrEnum):
    USB2 = "usb2"
    USB3 = "usb3"


_EVERY = frozenset(
    {"bd", "cef", "cls", "crf", "health", "id", "l", "limits", "loge", "mode", "reboot", "sef", "state"}
    | {"system", "beep", "detail", "boot", "help"}
)
_PROFILES = frozenset(
    {"en_profile", "get_profiles", "list_profiles", "logc", "serial_speed", "set_delays", "set_profiles"}
)
_LEDS = frozenset({"ledb", "leds", "remote"})
_PANEL = frozenset({"clcd", "keys", "lcd", "sec"})
_PD = frozenset({"logp", "power", "qcmode"})


@dataclass(frozen=True, slots=True)
class ModelSpec:
    part: str  # CLI-MAN part number, our key
    hardware: str  # what `id` (hw:) and `system` (Hardware:) print
    title: str  # first line of `system`
    ports: int
    family: FirmwareFamily
    usb: UsbGeneration
    control_usb_id: tuple[int, int]
    commands: frozenset[str]
    tree: Mapping[int, tuple[str, tuple[str, ...]]]  # hub number -> (node type, target per port)
    fallback_port_map: Mapping[str, int]  # GAZOO's table; empty when none is published
    rails: tuple[str, ...] = ("5V", "12V")
    temperature: bool = True
    hwid: str = "0x13"
    firmware: str = "1.83"
    aliases: tuple[str, ...] = ()
    sync: bool = True
    external_psu: bool = True
    notes: str = ""
    limits_lines: tuple[str, ...] = ()  # verbatim `limits` where a capture exists

    @property
    def has_leds(self) -> bool:
        return "ledb" in self.commands

    @property
    def has_security(self) -> bool:
        return "sec" in self.commands

    @property
    def mode_letters(self) -> str:
        """PDSync/TS3-C10 ports are either on (`c`, sync and charge) or off."""
        return "co" if self.family.three_column_flags else "csbo"

    def bd_lines(self) -> tuple[str, ...]:
        """The `bd` reply, rendered from `tree` in the layout of the manual's SS15 example."""
        lines = [
            f"Ports: {self.ports}",
            f"Sync: {int(self.sync)}",
            f"Temp: {int(self.temperature)}",
            f"EXTPSU: {int(self.external_psu)}",
            "Console: none",
            f"Nodes : {len(self.tree)}",
        ]
        for node, (hub, (node_type, targets)) in enumerate(sorted(self.tree.items()), start=1):
            lines += [f"Node {node} Type : {node_type}", f"Node {node} Ports : {len(targets)}"]
            lines += [f"Hub {hub} Port {port} : {t}" for port, t in enumerate(targets, start=1)]
        return tuple(lines)


def _tree_from_map(
    port_map: Mapping[str, int], control: str, root: str, sub: str
) -> dict[int, tuple[str, tuple[str, ...]]]:
    """A two-tier `bd` tree that reproduces `port_map` (INFERRED wiring for models whose `bd` was
    never published; only the GAZOO map itself is sourced). `control` is where the UART sits."""
    entries = {**{key: f"Port {port}" for key, port in port_map.items()}, control: "Control Port"}
    firsts = sorted({int(key.split(".")[0]) for key in entries})
    hub_of: dict[int, int] = {}
    root_targets: list[str] = []
    for first in range(1, max(firsts) + 1):
        if first not in firsts:
            root_targets.append("Unused Port")
        elif str(first) in entries:
            root_targets.append(entries[str(first)])
        else:
            hub_of[first] = len(hub_of) + 2
            root_targets.append(f"{sub} {hub_of[first]}")
    tree = {1: (f"{root} 1", tuple(root_targets))}
    for first, hub in hub_of.items():
        seconds = [int(k.split(".")[1]) for k in entries if k.startswith(f"{first}.")]
        width = max(4, *seconds)
        targets = tuple(entries.get(f"{first}.{s}", "Unused Port") for s in range(1, width + 1))
        tree[hub] = (f"{sub} {hub}", targets)
    return tree


def _map(text: str) -> Mapping[str, int]:
    pairs = (item.split("→") for item in text.split())
    return MappingProxyType({key: int(port) for key, port in pairs})


PP8S_MAP = _map("1.1→1 1.2→2 1.3→3 1.4→4 2.1→8 2.2→7 2.3→6 2.4→5")
PP15S_MAP = _map(
    "1.1→4 1.2→5 1.3→6 1.4→7 2.1→15 2.2→14 2.3→13 2.4→12 3.1→11 3.2→10 3.3→9 3.4→8 4.2→1 4.3→2 4.4→3"
)
SS15_MAP = _map(
    "1.1→1 1.2→2 1.3→9 1.4→8 2.1→6 2.2→7 2.3→15 2.4→14 3.1→3 3.2→4 3.3→11 3.4→10 4.1→5 4.3→13 4.4→12"
)
U16S_MAP = _map(
    "2→1 5→2 4.1→4 4.2→3 4.3→5 4.4→6 4.5→8 4.6→7 4.7→9 7.1→11 7.2→13 7.3→14 7.4→15 7.5→16 7.6→10 7.7→12"
)
TS3_16_MAP = _map(
    "1.2→4 2.1→3 2.3→1 2.4→2 3.1→7 3.2→8 3.3→5 3.4→6 4.1→11 4.2→12 4.3→9 4.4→10 5.1→15 5.2→16 5.3→13 5.4→14"
)

SS15_TREE: Mapping[int, tuple[str, tuple[str, ...]]] = MappingProxyType(
    {  # CLI-MAN §3.2, verbatim
        1: ("USB3 Hub 1", ("Turbo Hub 2", "Turbo Hub 5", "Turbo Hub 3", "Turbo Hub 4", "Control Port")),
        2: ("Turbo Hub 2", ("Port 1", "Port 2", "Port 9", "Port 8")),
        3: ("Turbo Hub 3", ("Port 3", "Port 4", "Port 11", "Port 10")),
        4: ("Turbo Hub 4", ("Port 5", "Unused Port", "Port 13", "Port 12")),
        5: ("Turbo Hub 5", ("Port 6", "Port 7", "Port 15", "Port 14")),
    }
)

_UNIVERSAL = FirmwareFamily.UNIVERSAL
_SS15_LIMITS = (  # CLI-MAN §3.11, verbatim
    "5V Min:   4.50",
    "5V Max:   5.58",
    "Input Min: 9.59",
    "Input Max: 20.00",
    "Temperature (C): 75.0",
)
_GAZOO_LIMITS = (  # GAZOO cambrionix_logs fixture
    "5V Min:   4.50",
    "5V Max:   5.58",
    "12V Min:  9.59",
    "12V Max: 14.50",
    "Temperature (C): 75.0",
)

MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {
        spec.part: spec
        for spec in (
            ModelSpec(
                part="PP8S",
                hardware="PP8S",
                title="cambrionix PP8S 8 Port USB Charge+Sync",
                ports=8,
                family=_UNIVERSAL,
                usb=UsbGeneration.USB2,
                control_usb_id=FTDI_FT230X,
                commands=_EVERY | _PROFILES | {"host"},
                tree=_tree_from_map(PP8S_MAP, "4.1", "Hub", "Hub"),
                fallback_port_map=PP8S_MAP,
                limits_lines=_GAZOO_LIMITS,
                firmware="1.68",
                hwid="0x12",
            ),
            ModelSpec(
                part="PP15S",
                hardware="PP15S",
                title="cambrionix PP15S 15 Port USB Charge+Sync",
                ports=15,
                family=_UNIVERSAL,
                usb=UsbGeneration.USB2,
                control_usb_id=FTDI_FT230X,
                commands=_EVERY | _PROFILES | {"host"},
                tree=_tree_from_map(PP15S_MAP, "4.1", "Hub", "Hub"),
                fallback_port_map=PP15S_MAP,
                limits_lines=_GAZOO_LIMITS,
                firmware="1.68",  # the GAZOO `system` capture and the CLI-MAN `id` example
            ),
            ModelSpec(
                part="SS15",
                hardware="SS15",
                title="cambrionix SuperSync15 15 Port USB Charge+Sync",
                ports=15,
                family=_UNIVERSAL,
                usb=UsbGeneration.USB3,
                control_usb_id=CAMBRIONIX_USB3,
                commands=_EVERY | _PROFILES | {"host"},
                tree=SS15_TREE,
                fallback_port_map=SS15_MAP,
                limits_lines=_SS15_LIMITS,
                hwid="0x21",
                aliases=("SuperSync15", "SuperSync15b", "PS15-USB3"),
            ),
            ModelSpec(
                part="U16S",
                hardware="U16S Spade",
                title="cambrionix U16S Spade 16 Port USB Charge+Sync",
                ports=16,
                family=_UNIVERSAL,
                usb=UsbGeneration.USB2,
                control_usb_id=FTDI_FT230X,
                commands=_EVERY | _PROFILES | _LEDS | _PANEL | {"host"},
                tree=_tree_from_map(U16S_MAP, "1", "Hub", "Hub"),
                fallback_port_map=U16S_MAP,
                rails=("5V",),
                hwid="0x16",
                aliases=("U16S", "U16S Spade-NL"),
            ),
            ModelSpec(
                part="U8S",
                hardware="U8S",
                title="cambrionix U8S 8 Port USB Charge+Sync",
                ports=8,
                family=_UNIVERSAL,
                usb=UsbGeneration.USB2,
                control_usb_id=FTDI_FT230X,
                commands=_EVERY | _PROFILES | _LEDS | _PANEL | {"host"},
                tree=_tree_from_map(PP8S_MAP, "4.1", "Hub", "Hub"),
                fallback_port_map=MappingProxyType({}),
                rails=("5V",),
                temperature=False,
                hwid="0x08",
                aliases=("U8S-EXT",),
                notes="no published port map; the simulator borrows the PP8S wiring",
            ),
            ModelSpec(
                part="TS3-16",
                hardware="ThunderSync3-16",
                title="cambrionix ThunderSync3-16 16 Port USB Charge+Sync",
                ports=16,
                family=_UNIVERSAL,
                usb=UsbGeneration.USB3,
                control_usb_id=CAMBRIONIX_USB3,
                commands=_EVERY | _PROFILES | _LEDS | {"host"},
                tree=_tree_from_map(TS3_16_MAP, "1.1", "USB3 Hub", "USB3 Hub"),
                fallback_port_map=TS3_16_MAP,
                rails=("5V",),
                hwid="0x30",
                aliases=("TS3-16", "ModIT Max", "ModIT-Max"),
            ),
            ModelSpec(
                part="PDSync-C4",
                hardware="PDSync-C4",
                title="cambrionix PDSync-C4 4 Port USB-C Charge+Sync",
                ports=4,
                family=FirmwareFamily.PDSYNC,
                usb=UsbGeneration.USB2,
                control_usb_id=FTDI_FT230X,
                commands=_EVERY | _LEDS | _PD | {"host"},
                tree=_tree_from_map(_map("1→1 2→2 3→3 4→4"), "5", "USB3 Hub", "USB3 Hub"),
                fallback_port_map=MappingProxyType({}),
                rails=(),
                hwid="0x40",
                firmware="1.2.1",
                aliases=("PD-Sync 4", "PDSync-4", "PDSync-C4"),
                notes="`state` has a host row 0 and three flag columns; modes are c (on) and o",
            ),
        )
    }
)


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


_BY_NAME = {
    _normalise(name): spec for spec in MODELS.values() for name in (spec.part, spec.hardware, *spec.aliases)
}


def find_model(hardware: str) -> ModelSpec | None:
    """The spec for what a hub calls itself (`id` hw:, `system` Hardware:), ignoring case and
    punctuation, so "SuperSync15" and "SS15" land on the same model."""
    return _BY_NAME.get(_normalise(hardware))
