"""Sans-IO interpretation of what Apple Configurator's `cfgutil --format JSON` prints.

Pure functions: an exit status and the bytes on stdout/stderr in, a `CfgutilReply` or a typed
`daemon.ios.base` error out. `daemon.ios.cfgutil` runs the process; `daemon.sim.cfgutil_fake`
prints the same shapes.

Sources (public; see /work/shared/research/ios.md §3.1):

* Global options `-e|--ecid <ECID>` ("Device to act on, by ECID. Can be used more than once."),
  `--format <text|JSON|plist>`, `--timeout <seconds>`, `-C|--certificate`, `-K|--private-key`, and
  the commands `list`, `get | get-property`, `erase | erase-content` ("supervised only") and
  `prepare`: the output of `cfgutil help`, cfgutil 2.6.1 (379) (pastebin.com/ZzeueLK2), and the
  cfgutil man page (gist.github.com/FredCox3/59341f80beee39e38c25,
  gist.github.com/AloPress/1c708593e64472b2e6c26b28d52eeecb).
* Property names `UDID`, `ECID`, `deviceType`, `firmwareVersion`, `buildVersion`, `deviceName`,
  `locationID`: `cfgutil help exec` (gist.github.com/FredCox3/0617eba0818a3ba957b7), which sets them
  as environment variables; `serialNumber`, `deviceClass`, `UDID`, `ECID`, `deviceType`: public
  scripts running `cfgutil --format JSON --ecid <ECID> get ECID deviceType deviceClass ... UDID
  serialNumber name`.
* JSON shape: success output has an `Output` dictionary keyed by the device's ECID (text such as
  `0x1C604A3405801E`), one dictionary of properties per device (public scripts read
  `json["Output"][ECID]`, `json["Output"][ecid]["UDID"]` after `get all`, and
  `Output[ecid]["deviceType"]` / `["name"]` after `list`). A failure is a dictionary with `Code`,
  `Message` and `AffectedDevices` at the top level; per-device failures may sit in
  `Output["Errors"][ECID]` with `Code` and `Message` (AZTEC's `cfgutil.check_for_errors`). Messages
  seen in those scripts: "The device is already prepared and must be erased to change settings.",
  "The configuration is not available." (code 33001), and on stderr "cfgutil: error: no devices
  found".
* [INFERRED] The top-level `"Type": "CommandOutput"` / `"Type": "Error"`, `"Command"`, `"Devices"`
  and `"Domain"` keys: from the brief this module was written to, not from a verified transcript.
  The parser therefore does not depend on them: a dictionary with `Message` and `Code` but no
  `Output` is an error whatever its `Type`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from daemon.ios.base import DeviceError, DeviceGoneError, UnexpectedReplyError
from daemon.usb.apple import AppleUsbError, format_ecid, parse_ecid

NO_DEVICES_PATTERN: Final = re.compile(r"no devices? (?:were )?found|device (?:is )?not found", re.IGNORECASE)
"""cfgutil's word for "the device selected with --ecid is not attached" (stderr "cfgutil: error: no
devices found", AZTEC); "device not found" is accepted too. [INFERRED: the JSON error's wording.]"""

ALREADY_PREPARED_PATTERN: Final = re.compile(r"already prepared", re.IGNORECASE)
""""The device is already prepared and must be erased to change settings." (AZTEC)."""

CONFIGURATION_NOT_AVAILABLE_CODE: Final = 33001
""""The configuration is not available." (AZTEC): no ADE configuration assigned to the device yet."""

MAX_DETAIL: Final = 300
"""How much of an unparsable output goes into an error message."""


class CfgutilError(DeviceError):
    """cfgutil reported a failure; `cfgutil_code` and `domain` are cfgutil's, where it gave them."""

    code = "cfgutil_error"

    def __init__(self, message: str, *, cfgutil_code: int | None = None, domain: str | None = None) -> None:
        super().__init__(message)
        self.cfgutil_code = cfgutil_code
        self.domain = domain


class CfgutilAlreadyPreparedError(CfgutilError):
    """The device was prepared already; only an erase undoes that, so retrying cannot help."""

    code = "cloud_config_already_applied"
    retryable = False


class CfgutilConfigurationUnavailableError(CfgutilError):
    """No ADE configuration for the device (code 33001): not assigned in Business Manager yet."""

    code = "cloud_config_unavailable"


@dataclass(frozen=True, slots=True)
class CfgutilFailure:
    """One device's failure, from `Output["Errors"][ECID]`."""

    message: str
    code: int | None = None
    domain: str | None = None


@dataclass(frozen=True, slots=True)
class CfgutilReply:
    """A successful `--format JSON` output. ECIDs are spelled as the daemon spells them
    (`format_ecid`: 16 upper-case hex digits), whatever cfgutil printed."""

    command: str | None
    output: Mapping[str, Mapping[str, Any]]
    devices: tuple[str, ...] = ()
    errors: Mapping[str, CfgutilFailure] = field(default_factory=dict)

    def for_device(self, ecid: str, operation: str) -> Mapping[str, Any]:
        """The properties cfgutil reported for `ecid`; the device's own failure raised as typed
        error, `DeviceGoneError` if cfgutil did not mention the device at all."""
        failure = self.errors.get(ecid)
        if failure is not None:
            raise error_for(failure.message, failure.code, failure.domain, operation)
        values = self.output.get(ecid)
        if values is None:
            raise DeviceGoneError(f"{operation}: cfgutil reported nothing for ECID {ecid}")
        return values


def normalize_ecid(text: object) -> str | None:
    """`format_ecid` of an ECID as cfgutil prints it (`0x1C604A3405801E`, or a number); None if not
    an ECID."""
    if isinstance(text, bool):
        return None
    if isinstance(text, int):
        value = text
    elif isinstance(text, str):
        try:
            value = parse_ecid(text)
        except AppleUsbError:
            return None
    else:
        return None
    try:
        return format_ecid(value)
    except AppleUsbError:
        return None


def cfgutil_ecid(ecid: str) -> str:
    """An ECID as cfgutil takes it on `--ecid` (`0x1C604A3405801E`, as in public transcripts)."""
    return f"0x{parse_ecid(ecid):X}"


def error_for(message: str, code: int | None, domain: str | None, operation: str) -> DeviceError:
    """The typed error for a failure cfgutil reported."""
    where = f"{operation}: cfgutil: {message}"
    if code is not None:
        where += f" (code {code}{', ' + domain if domain else ''})"
    if NO_DEVICES_PATTERN.search(message):
        return DeviceGoneError(where)
    if ALREADY_PREPARED_PATTERN.search(message):
        return CfgutilAlreadyPreparedError(where, cfgutil_code=code, domain=domain)
    if code == CONFIGURATION_NOT_AVAILABLE_CODE:
        return CfgutilConfigurationUnavailableError(where, cfgutil_code=code, domain=domain)
    return CfgutilError(where, cfgutil_code=code, domain=domain)


def _excerpt(data: bytes) -> str:
    text = data.decode("utf-8", "replace").strip()
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL] + "…"


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _failure(value: object, operation: str) -> CfgutilFailure:
    if not isinstance(value, Mapping):
        raise UnexpectedReplyError(f"{operation}: cfgutil error entry is not a dictionary: {value!r}")
    message = value.get("Message")
    return CfgutilFailure(
        message=message if isinstance(message, str) else "(no message)",
        code=_int_or_none(value.get("Code")),
        domain=_text_or_none(value.get("Domain")),
    )


def parse_json_output(stdout: bytes, operation: str) -> CfgutilReply:
    """A `--format JSON` output: a `CfgutilReply`, or the typed error cfgutil reported
    (`error_for`), or `UnexpectedReplyError` if it is not JSON of the documented shape."""
    try:
        document = json.loads(stdout)
    except (UnicodeDecodeError, ValueError) as exc:
        raise UnexpectedReplyError(f"{operation}: cfgutil printed no JSON: {_excerpt(stdout)!r}") from exc
    if not isinstance(document, dict):
        raise UnexpectedReplyError(f"{operation}: cfgutil JSON is not a dictionary: {_excerpt(stdout)!r}")
    output = document.get("Output")
    kind = document.get("Type")
    if kind == "Error" or (output is None and "Message" in document):
        failure = _failure(document, operation)
        raise error_for(failure.message, failure.code, failure.domain, operation)
    if not isinstance(output, dict):
        raise UnexpectedReplyError(
            f"{operation}: cfgutil JSON has no Output dictionary: {_excerpt(stdout)!r}"
        )
    values: dict[str, Mapping[str, Any]] = {}
    errors: dict[str, CfgutilFailure] = {}
    for key, entry in output.items():
        if key == "Errors":
            if not isinstance(entry, dict):
                raise UnexpectedReplyError(f"{operation}: cfgutil Output.Errors is not a dictionary")
            for ecid_text, failure in entry.items():
                ecid = normalize_ecid(ecid_text)
                if ecid is None:
                    raise UnexpectedReplyError(f"{operation}: cfgutil error for a non-ECID {ecid_text!r}")
                errors[ecid] = _failure(failure, operation)
            continue
        ecid = normalize_ecid(key)
        if ecid is None or not isinstance(entry, dict):
            raise UnexpectedReplyError(
                f"{operation}: cfgutil Output entry {key!r} is not an ECID with properties: {entry!r}"
            )
        values[ecid] = entry
    devices_raw = document.get("Devices", [])
    devices: list[str] = []
    if isinstance(devices_raw, list):
        devices = [ecid for ecid in (normalize_ecid(d) for d in devices_raw) if ecid is not None]
    command = document.get("Command")
    return CfgutilReply(
        command=command if isinstance(command, str) else None,
        output=values,
        devices=tuple(devices),
        errors=errors,
    )


def interpret(returncode: int, stdout: bytes, stderr: bytes, operation: str) -> CfgutilReply:
    """The outcome of one `cfgutil --format JSON ...` run.

    A JSON error on stdout wins (whatever the exit status: cfgutil exits non-zero with one). Without
    JSON on stdout a non-zero exit is judged by stderr: "no devices found" is `DeviceGoneError`,
    anything else `CfgutilError` carrying stderr's first lines. A zero exit without usable JSON is
    `UnexpectedReplyError`."""
    if returncode != 0 and not stdout.strip():
        detail = _excerpt(stderr) or f"exit status {returncode}"
        if NO_DEVICES_PATTERN.search(detail):
            raise DeviceGoneError(f"{operation}: cfgutil: {detail}")
        raise CfgutilError(f"{operation}: cfgutil failed (exit status {returncode}): {detail}")
    try:
        reply = parse_json_output(stdout, operation)
    except UnexpectedReplyError:
        if returncode != 0:
            detail = _excerpt(stderr) or _excerpt(stdout)
            if NO_DEVICES_PATTERN.search(detail):
                raise DeviceGoneError(f"{operation}: cfgutil: {detail}") from None
            raise CfgutilError(f"{operation}: cfgutil failed (exit status {returncode}): {detail}") from None
        raise
    return reply


def udid_to_ecid(reply: CfgutilReply, udid: str) -> str | None:
    """The ECID of the device whose `UDID` is `udid`, from `cfgutil --format JSON list` (the
    UDID is compared case-insensitively); None if no attached device has it."""
    wanted = udid.casefold()
    for ecid, values in reply.output.items():
        found = values.get("UDID")
        if isinstance(found, str) and found.casefold() == wanted:
            return ecid
    return None
