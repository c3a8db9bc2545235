"""A real Mosquitto for tests and benchmarks: a free loopback port, a four-line config, no Docker.

Tests talk to the same broker the stations run in production, so retained messages, QoS 1 acks,
last wills and outages behave as they really do. The broker can be stopped and started again on
the same port to play an outage; it runs without persistence, so a restart also loses every
retained message, as a broker whose disk was wiped (or that never persisted) does.

Fixture for conftest.py or a test module::

    from tests.mqtt_broker import mosquitto_fixture  # noqa: F401  (provides the `mosquitto` fixture)

A missing binary fails the test with install instructions: MQTT behaviour is part of what the
suite checks, so it must never be skipped silently.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")
"""Mosquitto installs its broker in an sbin directory, which is often not on a user's PATH."""

INSTALL_HINT = (
    "the tests need the Mosquitto broker binary: install it with `sudo apt-get install mosquitto` "
    "(Debian/Ubuntu), `sudo dnf install mosquitto` (Fedora) or `brew install mosquitto` (macOS); "
    f"it is looked up on PATH and in {', '.join(SEARCH_DIRS)}"
)


class MosquittoMissing(RuntimeError):
    """The mosquitto binary is not installed (or not where we look)."""


def mosquitto_binary() -> str | None:
    """Path of the mosquitto binary: PATH first, then the usual sbin directories."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for directory in SEARCH_DIRS:
        candidate = Path(directory, "mosquitto")
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port() -> int:
    """A port on 127.0.0.1 nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Mosquitto:
    """One mosquitto process on 127.0.0.1:`port`, restartable on the same port."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        binary: str | None = None,
        extra_config: Sequence[str] = (),
    ) -> None:
        """`extra_config`: lines added to the listener's section (e.g. `certfile ...` for TLS, or
        `allow_anonymous false` with `password_file`/`acl_file`, which replaces the default
        `allow_anonymous true`)."""
        binary = binary or mosquitto_binary()
        if binary is None:
            raise MosquittoMissing(INSTALL_HINT)
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.config_path = workdir / "mosquitto.conf"
        # A file, not a pipe: nobody drains a pipe during a long test session, and a full pipe
        # blocks the broker.
        self.log_path = workdir / "mosquitto.log"
        self.extra_config = list(extra_config)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _write_config(self) -> None:
        # Anonymous access unless the test configures authentication itself (a second
        # `allow_anonymous` line would silently win or lose depending on its position).
        anonymous = (
            []
            if any(line.startswith("allow_anonymous") for line in self.extra_config)
            else ["allow_anonymous true"]
        )
        lines = [
            f"listener {self.port} {self.host}",
            *self.extra_config,
            *anonymous,
            "persistence false",
            f"log_dest file {self.log_path}",
            "log_type all",
        ]
        if os.geteuid() == 0:
            # Started as root, mosquitto drops to the user `mosquitto`, which cannot write our
            # log file in a root-owned temporary directory. Staying root is fine for a test broker.
            lines.append(f"user {pwd.getpwuid(0).pw_name}")
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 5.0) -> None:
        """Start the broker and return once its port accepts connections."""
        if self.running:
            return
        self._write_config()
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with code {self._proc.returncode} on port {self.port}; "
                    f"its log:\n{self.log_text()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"mosquitto did not accept connections on port {self.port} within {timeout}s")

    def stop(self) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL); its retained messages are gone."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def restart(self) -> None:
        """Stop and start on the same port: an outage that also wipes retained messages."""
        self.stop()
        self.start()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def require_mosquitto() -> str:
    """The binary's path, or fail the running test with install instructions (never skip)."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return binary


@pytest.fixture(name="mosquitto")
def mosquitto_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A fresh Mosquitto per test (starting one takes ~20 ms); the test may stop/restart it."""
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"), binary=require_mosquitto())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


async def retained_messages(
    host: str,
    port: int,
    topic_filter: str,
    expect: set[str],
    *,
    within: float = 2.0,
    tls_context: ssl.SSLContext | None = None,
    username: str | None = None,
    password: str | None = None,
) -> dict[str, bytes]:
    """Subscribe as a late, independent client and collect retained messages by topic.

    Returns as soon as every topic in `expect` has arrived, or after `within` seconds with whatever did
    arrive, so a test asserts on real messages and fails (rather than hangs) when some are missing.
    """
    found: dict[str, bytes] = {}
    identifier = f"late-{os.getpid()}-{time.monotonic_ns()}"
    async with aiomqtt.Client(
        host, port, identifier=identifier, tls_context=tls_context, username=username, password=password
    ) as client:
        await client.subscribe(topic_filter, qos=1)
        try:
            async with asyncio.timeout(within):
                async for message in client.messages:
                    if not message.retain:
                        continue
                    assert isinstance(message.payload, bytes)
                    found[message.topic.value] = message.payload
                    if expect <= found.keys():
                        break
        except TimeoutError:
            pass
    return found


# ------------------------------------------------------------------------------ certificates


class TestCA:
    """A private certificate authority for TLS tests: server and client certificates on demand.

    One CA signs both sides, so a broker with `cafile` = `ca` and `require_certificate true` accepts
    exactly the clients this CA issued, and a client trusting `ca` accepts the broker: mutual TLS
    without touching the system trust store.
    """

    __test__ = False  # not a test class, despite the name

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "benchhub test CA")])
        usage = x509.KeyUsage(
            digital_signature=False,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        )
        cert = (
            self._builder(self._name, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca = directory / "ca.pem"
        self.ca.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        now = datetime.now(UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
        )

    def _issue(self, name: str, extensions: list[x509.ExtensionType]) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key())
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
        )
        cert = builder.sign(self._key, hashes.SHA256())
        cert_path, key_path = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert_path, key_path

    def server(self) -> tuple[Path, Path]:
        """(cert, key) for a broker on 127.0.0.1/localhost."""
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        return self._issue(
            "server",
            [x509.SubjectAlternativeName(names), x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])],
        )

    def client(self, name: str) -> tuple[Path, Path]:
        """(cert, key) of a client whose certificate's common name is `name` (Mosquitto's
        `use_identity_as_username` turns it into the username the ACL sees)."""
        return self._issue(name, [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])])

    def listener_config(self, *, require_certificate: bool = False) -> list[str]:
        """Mosquitto listener lines for TLS with a server certificate from this CA."""
        cert, key = self.server()
        lines = [f"cafile {self.ca}", f"certfile {cert}", f"keyfile {key}"]
        if require_certificate:
            lines.append("require_certificate true")
        return lines


def make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1/localhost: (ca, cert, key) files."""
    authority = TestCA(directory)
    return (authority.ca, *authority.server())


# ------------------------------------------------------------------------------ authentication

MOSQUITTO_PASSWD = "/usr/bin/mosquitto_passwd"


def password_file(path: Path, users: dict[str, str]) -> Path:
    """A Mosquitto password file made by `mosquitto_passwd -b` (it hashes; we never write the
    format ourselves). Skips the test, saying why, only when the tool is not installed."""
    binary = shutil.which("mosquitto_passwd") or MOSQUITTO_PASSWD
    if not Path(binary).is_file():
        pytest.skip(f"{MOSQUITTO_PASSWD} is not installed (it comes with the mosquitto package)")
    path.touch(mode=0o600)
    for user, password in users.items():
        subprocess.run([binary, "-b", str(path), user, password], check=True, capture_output=True)
    return path
