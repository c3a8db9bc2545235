"""A simulated device bench for pymobiledevice3: fake usbmuxd + lockdownd + MCInstall + mobileactivationd.

Import the fixture into a test module::

    from tests.ios_bench import ios_bench  # noqa: F401  (provides the `ios_bench` fixture)

pymobiledevice3 takes `USBMUXD_SOCKET_ADDRESS` as a bare path (a colon would make it HOST:PORT), and
AF_UNIX paths are limited to 107 bytes, so the socket lives in a short directory under /tmp. Pair
records always go to an explicit folder: pymobiledevice3 fixes its home folder at import.
"""

from __future__ import annotations

import dataclasses
import datetime
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from daemon.ios.base import DeviceInfo
from daemon.sim.activation import ActivationService
from daemon.sim.devices import make_device
from daemon.sim.lockdownd import LockdownState
from daemon.sim.mcinstall import McInstallService, MemoryDeviceEffects, MemoryDevices, install_services
from daemon.sim.usbmuxd import FakeUsbmuxd

MDM_URL = "https://mdm.example.com/enroll"
ADE_PROFILE = {
    "ConfigurationURL": MDM_URL,
    "OrganizationName": "Example Corp",
    "IsMDMUnremovable": True,
    "IsSupervised": True,
    "AllowPairing": True,
    "SkipSetup": ["Location", "Restore"],
}
"""What Apple's device enrollment service hands a device assigned to the example MDM server."""


@dataclass
class IosBench:
    mux: FakeUsbmuxd
    devices: MemoryDevices
    mcinstall: McInstallService
    activation: ActivationService
    socket: Path
    records: Path
    """A pair record directory (the station's state directory in production)."""

    def plug(self, index: int = 0, *, usb_path: str = "1-1.1", setup_assistant: bool = False) -> DeviceInfo:
        info = make_device(7, index).info()
        if setup_assistant:
            info = dataclasses.replace(info, in_setup_assistant=True, activation_state="Unactivated")
        assert self.mux.attach(info, usb_path) is not None
        return info

    def effects(self, udid: str) -> MemoryDeviceEffects:
        return self.devices[udid]

    def lockdown(self, udid: str) -> LockdownState:
        return self.mux.lockdown[udid]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="bh-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def ios_bench(
    short_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[IosBench]:
    socket = short_dir / "mux"
    monkeypatch.setenv("USBMUXD_SOCKET_ADDRESS", str(socket))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    mux = FakeUsbmuxd(socket)
    devices = MemoryDevices(mux, reboot_after=0.2)
    mcinstall, activation = install_services(mux, devices.effects_for)
    await mux.start()
    try:
        yield IosBench(mux, devices, mcinstall, activation, socket, tmp_path / "pair")
    finally:
        await mux.stop()


def supervisor_identity(folder: Path) -> tuple[Path, Path, bytes]:
    """A supervising host's certificate and key (two PEM files) and the certificate's DER."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "benchhub supervisor")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "supervisor.crt", folder / "supervisor.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path, cert.public_bytes(serialization.Encoding.DER)
