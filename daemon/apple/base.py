"""Errors of Apple's side of the workflow: adding devices to the organisation and MDM assignment.

Adding a device to an organisation ("provisional enrollment") needs an Apple-minted nonce that only
Apple Configurator on a Mac (after an Apple Business Manager sign-in) or an entitled iOS app can get;
there is no host API for it. So the daemon never enrolls by itself: the enrolling step asks a
technician (`daemon.technician`) and watches the result arrive through Apple's APIs
(`daemon.apple.tracker`), which can also assign devices to an MDM server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx

Pacer = Callable[[httpx.Request], Awaitable[None]]
"""Awaited before each request to Apple: how a station keeps all its calls under one rate."""


class AppleServiceError(Exception):
    """Apple's services said no, or could not be reached. `retryable` errors are waited out."""

    code = "apple_service"
    retryable = True

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
