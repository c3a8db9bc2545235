"""The two Apple-side protocols the workflow needs, one implementation per real mechanism.

Adding a device to an organisation ("provisional enrollment") needs an Apple-minted nonce that only
Apple Configurator on a Mac (after an Apple Business Manager sign-in) or an entitled iOS app can get;
there is no host API for it. `Enroller` therefore has implementations that drive Configurator or
wait for an operator, never one that pretends. Assignment to an MDM server can be observed (and on
accounts with the Business Manager API, performed) through `AssignmentSource`.
"""

from __future__ import annotations

from typing import Protocol

from daemon.ios.base import DeviceInfo, ProgressFn

APPLE_CONFIGURATOR_SERVER = "Devices Added by Apple Configurator"
"""The pseudo-server Apple parks provisionally enrolled devices on; being assigned to it proves
nothing about MDM assignment."""


class AppleServiceError(Exception):
    code = "apple_service"
    retryable = True

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EnrollmentRejectedError(AppleServiceError):
    code = "enrollment_rejected"
    retryable = False


class Enroller(Protocol):
    name: str

    async def is_enrolled(self, device: DeviceInfo) -> bool | None:
        """Whether the device is already in the organisation; None when this enroller cannot tell."""
        ...

    async def enroll(self, device: DeviceInfo, progress: ProgressFn) -> None: ...


class AssignmentSource(Protocol):
    name: str

    async def assigned_server(self, serial: str) -> str | None:
        """The MDM server the serial is assigned to, or None. A parking pseudo-server such as
        "Devices Added by Apple Configurator" is reported as what it is; callers compare names."""
        ...

    async def assign(self, serial: str, server: str) -> bool:
        """Ask for the assignment; False when this source can only observe."""
        ...
