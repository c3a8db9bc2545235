"""A fake lockdownd, reached through the simulated usbmuxd's `Connect` to port 62078.

Framing is lockdownd's: a 4-byte big-endian length, then a plist dictionary (`Label`, `Request`,
options); every reply echoes `Request`, errors go in `Error` (the strings pymobiledevice3 maps to
exceptions). Enough of the protocol for pymobiledevice3's `create_using_usbmux()` to work unchanged,
with or without `autopair`:

* `QueryType` (`com.apple.mobile.lockdown`, or `com.apple.mobile.restored` in restore mode);
* `GetValue` (all values or one key; before a session only `UNPAIRED_KEYS`, like a real device;
  anything else answers `GetProhibited`, an unknown key `MissingValue`), `SetValue`;
* `GetValue` with a `Domain`: `com.apple.purplebuddy` (Setup Assistant's preferences: `SetupDone`
  once it has finished, nothing while it runs; needs a session) and any domain a test puts in
  `LockdownState.domains`; other domains read as empty;
* `Pair` (accepts any well-formed pair record, or answers `PairingDialogResponsePending` /
  `UserDeniedPairing` by policy), `ValidatePair`, `Unpair`;
* supervised pairing (pymobiledevice3 `LockdownClient.pair_supervised`): a `Pair` whose
  `PairingOptions.SupervisorCertificate` is one of the device's `supervisor_certificates` (its cloud
  configuration's `SupervisorHostCertificates`) answers `MCChallengeRequired` with
  `ExtendedResponse.PairingChallenge`; the second `Pair` with `PairingOptions.ChallengeResponse` (a
  PKCS#7 signature of the challenge) pairs without the Trust dialog, whatever `pair_policy` says.
  The response is checked structurally (it carries that certificate and the challenge); its
  signature is not verified (`cryptography` has no public PKCS#7 verification);
* `StartSession` (`InvalidHostID` for an unknown host; optional TLS upgrade in place, as real devices
  do), `StopSession`, `EnterRecovery`;
* `StartService`: with a session, a service the device offers (`on_start_service`, see
  `daemon.sim.services`) gets `Port` and `EnableServiceSSL`; anything else `InvalidService`,
  without a session `InvalidConnection`.

The device remembers the hosts it paired with (`LockdownState`), across connections and re-attaches.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import plistlib
import ssl
import struct
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import structlog

from daemon.ios.base import DeviceInfo, DeviceMode

log = structlog.get_logger("benchhub.usbmux")

MAX_FRAME: Final = 1024 * 1024

UNPAIRED_KEYS: Final = frozenset(
    {
        "UniqueDeviceID",
        "UniqueChipID",
        "ProductType",
        "ProductVersion",
        "BuildVersion",
        "DeviceClass",
        "HardwareModel",
        "DeviceName",
        "WiFiAddress",
        "DevicePublicKey",
        "CPUArchitecture",
    }
)
"""What lockdownd answers before a session (commonly reported; not verified on hardware)."""

PairPolicy = Literal["accept", "pending", "deny"]

PURPLEBUDDY_DOMAIN: Final = "com.apple.purplebuddy"
"""Setup Assistant's preferences domain, readable through lockdownd (libimobiledevice
`tools/ideviceinfo.c` lists it among the known domains). ManagedConfiguration sets `SetupDone` in it
(`CFPreferencesSetAppValue(@"com.apple.purplebuddy", kCFBooleanTrue, @"SetupDone")`, decompiled iOS
26.1). A freshly erased device has none of these values until Setup Assistant finishes."""

ServiceStarter = Callable[[str], tuple[int, bool] | None]
"""`StartService` hook: service name → (port, EnableServiceSSL), or None if the device has no such
service."""


@functools.cache
def _device_key_pem() -> bytes:
    """One RSA key for every simulated device (pymobiledevice3 needs a PKCS#1 PEM public key to build
    its pairing certificates); generated once per process because RSA generation is slow."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - slow import, sim only
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)


def device_tls_context() -> ssl.SSLContext:
    """The server side of every TLS a simulated device speaks (lockdownd's session, SSL services)."""
    return _tls_context()


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """Server side of the session TLS: a throwaway self-signed certificate (the client uses CERT_NONE)."""
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "benchhub simulated device")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "device.pem"
        path.write_bytes(pem)
        ctx.load_cert_chain(path)
    return ctx


@dataclass
class LockdownState:
    """What a device's lockdownd keeps across connections."""

    info: DeviceInfo
    mode: DeviceMode = DeviceMode.NORMAL
    device_name: str | None = None
    """`DeviceName` (the name the owner gave it); None: an unnamed device's default, its class
    ("iPhone", "iPad"), as a freshly erased device reports."""
    hardware_model: str = "D16AP"
    wifi_address: str = "f0:99:b6:00:00:01"
    pair_policy: PairPolicy = "accept"
    session_ssl: bool = True
    paired_hosts: set[str] = field(default_factory=set)
    supervisor_certificates: set[bytes] = field(default_factory=set)
    """DER certificates of the hosts allowed to pair without the Trust dialog (the cloud
    configuration's `SupervisorHostCertificates`); an erase clears them."""
    extra_values: dict[str, Any] = field(default_factory=dict)
    domains: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Extra `GetValue` domains (tests); `com.apple.purplebuddy` is derived from `info`."""
    requests: list[str] = field(default_factory=list)
    """Every request name received, in order (for tests)."""

    def values(self) -> dict[str, Any]:
        info = self.info
        values: dict[str, Any] = {
            "UniqueDeviceID": info.udid,
            "UniqueChipID": int(info.ecid, 16),
            "SerialNumber": info.serial,
            "ProductType": info.product_type,
            "ProductVersion": info.ios_version,
            "BuildVersion": info.build,
            "ActivationState": info.activation_state,
            "DeviceClass": info.device_class,
            "DeviceName": self.device_name or info.device_class,
            "HardwareModel": self.hardware_model,
            "CPUArchitecture": "arm64e",
            "ProductName": "iPhone OS",
            "WiFiAddress": self.wifi_address,
            "DevicePublicKey": _device_key_pem(),
            "PasswordProtected": False,
        }
        values.update(self.extra_values)
        return values

    def domain_values(self, domain: str) -> dict[str, Any] | None:
        """A modelled domain's values (None: not modelled, reads as empty like before)."""
        if domain in self.domains:
            return dict(self.domains[domain])
        if domain == PURPLEBUDDY_DOMAIN:
            if self.info.in_setup_assistant:
                return {}
            return {"SetupDone": True, "SetupFinishedAllSteps": True}
        return None


class LockdownSession:
    """One client connection to lockdownd (one `Connect` to port 62078)."""

    def __init__(
        self,
        state: LockdownState,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        on_enter_recovery: Callable[[], None] | None = None,
        on_start_service: ServiceStarter | None = None,
    ) -> None:
        self.state = state
        self.reader = reader
        self.writer = writer
        self.session_id: str | None = None
        self.host_id: str | None = None
        self._on_enter_recovery = on_enter_recovery
        self._on_start_service = on_start_service
        self._challenge: tuple[bytes, bytes] | None = None
        """Supervised pairing in progress: (supervisor certificate, challenge sent)."""

    async def run(self, initial: bytes = b"") -> None:
        buffer = bytearray(initial)
        try:
            while True:
                while len(buffer) < 4:
                    chunk = await self.reader.read(65536)
                    if not chunk:
                        return
                    buffer += chunk
                (size,) = struct.unpack_from(">I", buffer)
                if size > MAX_FRAME:
                    log.warning("lockdownd_bad_frame", size=size)
                    return
                while len(buffer) < 4 + size:
                    chunk = await self.reader.read(65536)
                    if not chunk:
                        return
                    buffer += chunk
                payload = bytes(buffer[4 : 4 + size])
                del buffer[: 4 + size]
                try:
                    message = plistlib.loads(payload)
                except Exception:
                    log.warning("lockdownd_bad_plist", size=size)
                    return
                if not isinstance(message, dict) or not isinstance(message.get("Request"), str):
                    log.warning("lockdownd_bad_request", message=repr(message)[:200])
                    return
                reply, after = self.handle(message)
                self.writer.write(_frame(reply))
                await self.writer.drain()
                if after == "tls":
                    await self.writer.start_tls(_tls_context())
                elif after == "close":
                    return
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            log.debug("lockdownd_connection_lost", error=repr(exc))
        finally:
            self.writer.close()

    def handle(self, message: dict[str, Any]) -> tuple[dict[str, Any], str | None]:  # noqa: PLR0912
        """The reply to one request, and what to do after sending it (None, "tls" or "close")."""
        name: str = message["Request"]
        self.state.requests.append(name)
        reply: dict[str, Any] = {"Request": name}
        state = self.state
        if name == "QueryType":
            if state.mode == DeviceMode.RESTORE:
                reply.update(Type="com.apple.mobile.restored", RestoreProtocolVersion=14)
                return reply, None
            reply["Type"] = "com.apple.mobile.lockdown"
        elif name == "GetValue":
            reply.update(self._get_value(message))
        elif name == "SetValue":
            if self.session_id is None:
                reply["Error"] = "SetProhibited"
            elif isinstance(message.get("Key"), str) and message.get("Domain") is None:
                state.extra_values[message["Key"]] = message.get("Value")
        elif name == "Pair":
            reply.update(self._pair(message))
        elif name == "ValidatePair":
            if _host_id(message) not in state.paired_hosts:
                reply["Error"] = "InvalidHostID"
        elif name == "Unpair":
            state.paired_hosts.discard(_host_id(message) or self.host_id or "")
        elif name == "StartSession":
            host_id = message.get("HostID")
            if host_id not in state.paired_hosts:
                reply["Error"] = "InvalidHostID"
            else:
                self.host_id = host_id
                self.session_id = str(uuid.uuid4()).upper()
                reply.update(SessionID=self.session_id, EnableSessionSSL=state.session_ssl)
                return reply, "tls" if state.session_ssl else None
        elif name == "StopSession":
            self.session_id = None
            reply["Result"] = "Success"
        elif name == "StartService":
            service = message.get("Service")
            reply["Service"] = service
            started = None
            if self.session_id and isinstance(service, str) and self._on_start_service is not None:
                started = self._on_start_service(service)
            if started is None:
                reply["Error"] = "InvalidService" if self.session_id else "InvalidConnection"
            else:
                reply.update(Port=started[0], EnableServiceSSL=started[1])
        elif name == "EnterRecovery":
            if self._on_enter_recovery is not None:
                asyncio.get_running_loop().call_soon(self._on_enter_recovery)
            return reply, "close"
        else:
            reply["Error"] = "UnknownRequest"
        return reply, None

    def _get_value(self, message: dict[str, Any]) -> dict[str, Any]:  # noqa: PLR0911
        values = self.state.values()
        if self.session_id is None:
            values = {k: v for k, v in values.items() if k in UNPAIRED_KEYS}
        domain, key = message.get("Domain"), message.get("Key")
        if domain:
            modelled = self.state.domain_values(str(domain))
            if modelled is None:  # not modelled: reads as empty
                return {"Domain": domain, "Error": "MissingValue"} if key else {"Domain": domain, "Value": {}}
            if self.session_id is None:
                return {"Domain": domain, "Error": "GetProhibited"}
            if key is None:
                return {"Domain": domain, "Value": modelled}
            if key in modelled:
                return {"Domain": domain, "Key": key, "Value": modelled[key]}
            return {"Domain": domain, "Key": key, "Error": "MissingValue"}
        if key is None:
            return {"Value": values}
        if key in values:
            return {"Key": key, "Value": values[key]}
        if key in self.state.values():
            return {"Key": key, "Error": "GetProhibited"}
        return {"Key": key, "Error": "MissingValue"}

    def _pair(self, message: dict[str, Any]) -> dict[str, Any]:  # noqa: PLR0911
        record = message.get("PairRecord")
        if not isinstance(record, dict) or not isinstance(record.get("HostID"), str):
            return {"Error": "InvalidPairRecord"}
        options = message.get("PairingOptions")
        options = options if isinstance(options, dict) else {}
        supervisor = options.get("SupervisorCertificate")
        if isinstance(supervisor, bytes) and supervisor in self.state.supervisor_certificates:
            challenge = uuid.uuid4().bytes
            self._challenge = (supervisor, challenge)
            return {"Error": "MCChallengeRequired", "ExtendedResponse": {"PairingChallenge": challenge}}
        response = options.get("ChallengeResponse")
        if isinstance(response, bytes) and self._challenge is not None:
            certificate, challenge = self._challenge
            self._challenge = None
            if not _signed_by(response, certificate, challenge):
                return {"Error": "InvalidPairRecord"}
            self.state.paired_hosts.add(record["HostID"])
            return {"EscrowBag": uuid.uuid4().bytes * 2}
        if self.state.pair_policy == "pending":
            return {"Error": "PairingDialogResponsePending"}
        if self.state.pair_policy == "deny":
            return {"Error": "UserDeniedPairing"}
        self.state.paired_hosts.add(record["HostID"])
        return {"EscrowBag": uuid.uuid4().bytes * 2}


def _signed_by(response: bytes, certificate: bytes, challenge: bytes) -> bool:
    """Whether a PKCS#7 `ChallengeResponse` carries the supervisor's certificate and the challenge
    (structure only: the signature itself is not verified)."""
    from cryptography import x509  # noqa: PLC0415 - slow import, sim only
    from cryptography.hazmat.primitives.serialization import Encoding, pkcs7  # noqa: PLC0415

    try:
        certificates = pkcs7.load_der_pkcs7_certificates(response)
    except ValueError:
        return False
    ders = {c.public_bytes(Encoding.DER) for c in certificates if isinstance(c, x509.Certificate)}
    return certificate in ders and challenge in response


def _host_id(message: dict[str, Any]) -> str | None:
    record = message.get("PairRecord")
    if isinstance(record, dict) and isinstance(record.get("HostID"), str):
        return str(record["HostID"])
    host_id = message.get("HostID")
    return host_id if isinstance(host_id, str) else None


def _frame(body: dict[str, Any]) -> bytes:
    payload = plistlib.dumps(body)
    return struct.pack(">I", len(payload)) + payload
