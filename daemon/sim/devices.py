"""Simulated iPhones and iPads: believable identities and the state a real device would keep.

A real device remembers what happened to it (its iOS version, whether it was erased, whether it
accepted a provisional enrollment) no matter what happens to the daemon; so does a `SimDevice`, and
the world persists it. `completed` counts effects that took place on the device, which is how tests
prove that no unsafe operation was carried out twice.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from daemon.ios.base import DeviceInfo, DeviceMode
from daemon.sim.catalog import MODELS, MODELS_BY_TYPE, Model, major, releases_for
from daemon.usb.apple import format_ecid

_SERIAL_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"


@dataclass
class SimDevice:
    product_type: str
    ecid: int
    udid: str
    serial: str
    ios_version: str
    build: str
    in_setup_assistant: bool = False
    cloud_config_applied: bool = False
    """The device holds a cloud configuration (what MCInstall's `GetCloudConfiguration` reports)."""
    cloud_config: dict[str, Any] | None = None
    """Its details as the device stored them; None with `cloud_config_applied` for state files
    written before the details were kept (`cloud_configuration()` fills in the simulated portal's)."""
    mode: DeviceMode = DeviceMode.NORMAL
    completed: Counter[str] = field(default_factory=Counter)
    started: Counter[str] = field(default_factory=Counter)

    @property
    def model(self) -> Model:
        return MODELS_BY_TYPE[self.product_type]

    @property
    def ecid_hex(self) -> str:
        return format_ecid(self.ecid)

    def info(self) -> DeviceInfo:
        return DeviceInfo(
            udid=self.udid,
            ecid=self.ecid_hex,
            serial=self.serial,
            product_type=self.product_type,
            ios_version=self.ios_version,
            build=self.build,
            device_class=self.model.device_class,
            activation_state="Unactivated" if self.in_setup_assistant else "Activated",
            in_setup_assistant=self.in_setup_assistant,
        )

    def store_cloud_config(self, details: dict[str, Any]) -> None:
        self.cloud_config = dict(details)
        self.cloud_config_applied = True

    def clear_cloud_config(self) -> None:
        """An erase (or erase-install restore) removes the cloud configuration."""
        self.cloud_config = None
        self.cloud_config_applied = False

    def to_json(self) -> dict[str, Any]:
        return {
            "product_type": self.product_type,
            "ecid": self.ecid,
            "udid": self.udid,
            "serial": self.serial,
            "ios_version": self.ios_version,
            "build": self.build,
            "in_setup_assistant": self.in_setup_assistant,
            "cloud_config_applied": self.cloud_config_applied,
            "cloud_config": _jsonable(self.cloud_config),
            "completed": dict(self.completed),
            "started": dict(self.started),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SimDevice:
        return cls(
            product_type=data["product_type"],
            ecid=data["ecid"],
            udid=data["udid"],
            serial=data["serial"],
            ios_version=data["ios_version"],
            build=data["build"],
            in_setup_assistant=data["in_setup_assistant"],
            cloud_config_applied=data["cloud_config_applied"],
            cloud_config=data.get("cloud_config"),
            completed=Counter(data.get("completed", {})),
            started=Counter(data.get("started", {})),
        )


def _jsonable(details: dict[str, Any] | None) -> dict[str, Any] | None:
    """The details a state file can keep: plain values only. A host-made configuration may carry
    DER certificates (bytes); they matter to lockdownd while the bench runs, not across restarts."""
    if details is None:
        return None
    plain = (str, int, float, bool)
    return {
        k: v
        for k, v in details.items()
        if isinstance(v, plain) or (isinstance(v, list) and all(isinstance(i, plain) for i in v))
    }


def make_device(seed: int, index: int, minimum_major: int = 0) -> SimDevice:
    """The `index`-th device of a bench with this seed; the same inputs give the same device, so a
    restarted simulation finds the devices it had."""
    rng = random.Random(f"benchhub-sim-{seed}-{index}")
    candidates = [m for m in MODELS if m.max_major >= minimum_major] or list(MODELS)
    model = rng.choice(candidates)
    release = rng.choice(releases_for(model))
    ecid = rng.getrandbits(52) | (1 << 44)
    if model.new_udid or major(release.version) >= 26:
        serial = "".join(rng.choice(_SERIAL_ALPHABET) for _ in range(10))
    else:
        serial = "".join(rng.choice(_SERIAL_ALPHABET) for _ in range(12))
    if model.new_udid:
        udid = f"{model.chip_id:08X}-{format_ecid(ecid)}"
    else:
        udid = hashlib.sha1(f"{serial}{ecid}".encode(), usedforsecurity=False).hexdigest()
    return SimDevice(
        product_type=model.product_type,
        ecid=ecid,
        udid=udid,
        serial=serial,
        ios_version=release.version,
        build=release.build,
    )
