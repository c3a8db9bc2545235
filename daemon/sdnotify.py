"""A hand-written sd_notify: tell systemd that the daemon is ready, what it is doing, that it is alive.

The protocol (sd_notify(3), "Notes"; systemd.service(5), `Type=notify`, `WatchdogSec=`) is one
datagram of newline-separated `KEY=value` lines sent to the AF_UNIX socket named by `$NOTIFY_SOCKET`:
a filesystem path, or an abstract-namespace name written with a leading `@`. A dependency on
libsystemd (or a wrapper package) for a dozen lines of socket code is not worth it, and this way the
daemon runs unchanged where systemd is absent: without `$NOTIFY_SOCKET` every call is a no-op.

Sending never blocks the event loop (the socket is non-blocking; a full receive queue drops the
message, which systemd tolerates: the next STATUS or WATCHDOG replaces it) and never raises into the
daemon: a vanished socket is logged once at debug and otherwise ignored, because the service manager
going away must not take the bench down.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Final

import structlog

log = structlog.get_logger("benchhub.systemd")

READY: Final = "READY=1"
"""The service finished starting up (sd_notify(3): "READY=1")."""
STOPPING: Final = "STOPPING=1"
"""The service is beginning its shutdown (sd_notify(3): "STOPPING=1")."""
WATCHDOG: Final = "WATCHDOG=1"
"""Keep-alive ping for `WatchdogSec=` (sd_notify(3): "WATCHDOG=1")."""


def notify_address(value: str | None) -> str | bytes | None:
    """The socket address `$NOTIFY_SOCKET` names, in the form `socket.sendto` takes, or None if it is
    unset or unusable. sd_notify(3) accepts an absolute path or `@name` for Linux's abstract
    namespace (the `@` becomes a leading NUL byte); anything else is rejected there too (EINVAL)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """The watchdog interval in seconds, or None when the watchdog is off or meant for another
    process. Mirrors sd_watchdog_enabled(3): `$WATCHDOG_USEC` must be a positive integer, and if
    `$WATCHDOG_PID` is set it must be our pid (it is set so that a child that inherited the
    environment does not ping on its parent's behalf); an unset `$WATCHDOG_PID` means "for us"."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    wanted = environ.get("WATCHDOG_PID")
    if wanted is not None:
        try:
            if int(wanted) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 1_000_000


class Notifier:
    """Sends sd_notify(3) messages for this process. Build it once at start-up; it reads the
    environment then (like sd_notify, it leaves the environment alone, so the variables are still
    there for a restart in-process; `NotifyAccess=main` makes systemd ignore any child that
    inherits them)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = notify_address(env.get("NOTIFY_SOCKET"))
        """Where messages go; None when not run by systemd (or `$NOTIFY_SOCKET` is malformed)."""
        self.watchdog_interval = watchdog_interval(env) if self.address is not None else None
        """Seconds within which systemd wants `WATCHDOG=1` (`WatchdogSec=`), or None."""
        self._socket: socket.socket | None = None
        self._failed = False
        if env.get("NOTIFY_SOCKET") and self.address is None:
            log.debug("sd_notify_socket_invalid", notify_socket=env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens (`$NOTIFY_SOCKET` was set and usable)."""
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` assignments in one datagram, as sd_notify(3) does. Returns whether the
        datagram was handed to the kernel; False when disabled or when sending failed (logged at
        debug the first time only: a service manager that went away stays away)."""
        if self.address is None or not assignments:
            return False
        message = "\n".join(assignments).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(message, self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.debug("sd_notify_failed", notify_socket=_printable(self.address), error=str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """`READY=1` (and `STATUS=` with it): start-up is done; `Type=notify` units become active
        now, and units ordered after this one start."""
        return self.notify(READY, *([status_assignment(status)] if status is not None else []))

    def status(self, text: str) -> bool:
        """`STATUS=`: one line shown by `systemctl status`."""
        return self.notify(status_assignment(text))

    def watchdog(self) -> bool:
        """`WATCHDOG=1`: we are alive; send more often than `watchdog_interval` (half, per
        sd_watchdog_enabled(3)) or systemd kills and, with `Restart=on-failure`, restarts us."""
        return self.notify(WATCHDOG)

    def stopping(self, status: str | None = None) -> bool:
        """`STOPPING=1`: shutdown has begun; `systemctl status` says "deactivating", and from now on
        `TimeoutStopSec=`, not the watchdog, bounds how long the drain may take."""
        return self.notify(STOPPING, *([status_assignment(status)] if status is not None else []))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def status_assignment(text: str) -> str:
    """`STATUS=<text>` on one line: a newline would start a new assignment in the datagram."""
    return "STATUS=" + " ".join(text.splitlines())


def _printable(address: str | bytes) -> str:
    return "@" + address[1:].decode(errors="replace") if isinstance(address, bytes) else address
