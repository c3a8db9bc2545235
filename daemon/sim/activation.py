"""A simulated `com.apple.mobileactivationd`: enough for pymobiledevice3's `MobileActivationService.state()`.

pymobiledevice3 11.45 (`services/mobile_activation.py` `send_command`) opens a fresh service
connection per command and sends `{Command: ..., [Value: ...]}` in lockdownd framing; `state()`
sends `GetActivationStateRequest` and reads `Value` (the research prototype's reply,
/work/shared/research/ios.md §2.3, answered `{Value: "Unactivated"}`). Activation itself
(`CreateTunnel1SessionInfoRequest`, ...) needs Apple's albert servers and is not simulated: other
commands get an `Error`, on which `state()` falls back to lockdownd's `ActivationState`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from daemon.sim.services import ServiceStream
from daemon.sim.usbmuxd import MuxDevice

SERVICE_NAME: Final = "com.apple.mobileactivationd"


def activation_reply(request: object, state: str) -> dict[str, Any]:
    """The reply to one command (sans-IO)."""
    command = request.get("Command") if isinstance(request, dict) else None
    if command == "GetActivationStateRequest":
        return {"Value": state}
    return {"Error": f"unsupported command {command!r}"}


@dataclass
class ActivationService:
    """mobileactivationd as a lockdown service of the simulated usbmuxd (`FakeUsbmuxd.services`)."""

    state_of: Callable[[MuxDevice], str] = field(default=lambda device: device.lockdown.info.activation_state)
    ssl: bool = True
    """[INFERRED] whether real devices answer `EnableServiceSSL: true` here is not verified."""
    name: str = SERVICE_NAME
    commands: list[str] = field(default_factory=list)

    async def serve(self, device: MuxDevice, stream: ServiceStream) -> None:
        while (request := await stream.receive()) is not None:
            command = request.get("Command") if isinstance(request, dict) else None
            self.commands.append(str(command))
            await stream.send(activation_reply(request, self.state_of(device)))
