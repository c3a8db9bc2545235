"""A fake `cfgutil` executable for tests: `python -m daemon.sim.cfgutil_fake [options] command ...`.

Stateful through a JSON file named by `BENCHHUB_FAKE_CFGUTIL_STATE`:

```json
{"devices": {"0x1C604A3405801E": {"UDID": "...", "serialNumber": "...", "deviceType": "iPhone14,4",
  "deviceClass": "iPhone", "firmwareVersion": "17.5", "buildVersion": "21F79",
  "activationState": "Activated", "name": "iPhone", "locationID": 1179648, "supervised": true,
  "cloudConfiguration": null,
  "assignedConfiguration": {"ConfigurationURL": "https://mdm.example/enroll", "OrganizationName": "Ex"}}},
 "hang": ["erase"], "garbage": ["get"]}
```

`assignedConfiguration` is what Apple would hand the device on `prepare --dep` (absent: not
assigned, error 33001); `hang` lists commands that never finish (writing their pid to
`hang_pid_file` if given), `garbage` commands that print non-JSON. Only `--format JSON` is
implemented. The output shapes are those `daemon.ios.cfgutil_output` documents (and marks
[INFERRED] where they are); errors print a JSON error and exit 1, a missing
device prints "cfgutil: error: no devices found" on stderr and exits 1, as cfgutil does.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Final

STATE_ENV: Final = "BENCHHUB_FAKE_CFGUTIL_STATE"
CONFIG_DOMAIN: Final = "ConfigurationErrorDomain"
"""[INFERRED] A plausible `Domain` for errors; the real domains were not verified."""

INFO_KEYS: Final = (
    "UDID",
    "ECID",
    "serialNumber",
    "deviceType",
    "deviceClass",
    "firmwareVersion",
    "buildVersion",
    "activationState",
    "name",
    "locationID",
    "isSupervised",
    "cloudConfiguration",
)


class Usage(Exception):
    pass


def _ecid_key(text: str) -> str:
    return f"0x{int(text.removeprefix('0x').removeprefix('0X'), 16):X}"


def _load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise Usage("state file is not a JSON object")
    data.setdefault("devices", {})
    return data


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def _parse(argv: list[str]) -> tuple[dict[str, Any], str, list[str]]:
    options: dict[str, Any] = {"ecids": [], "format": "text"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-e", "--ecid", "--format", "--timeout", "-C", "--certificate", "-K", "--private-key"):
            if i + 1 >= len(argv):
                raise Usage(f"option {arg} needs an argument")
            value = argv[i + 1]
            if arg in ("-e", "--ecid"):
                options["ecids"].append(_ecid_key(value))
            elif arg == "--format":
                options["format"] = value
            i += 2
        elif arg in ("-f", "--foreach", "-v", "--verbose", "--progress"):
            i += 1
        elif arg.startswith("-"):
            raise Usage(f"unknown option {arg}")
        else:
            return options, arg, argv[i + 1 :]
    raise Usage("no command")


def _print(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def _error(message: str, code: int, ecids: list[str], command: str) -> int:
    _print(
        {
            "Type": "Error",
            "Command": command,
            "Message": message,
            "Code": code,
            "Domain": CONFIG_DOMAIN,
            "AffectedDevices": ecids,
        }
    )
    return 1


def _properties(device: dict[str, Any], ecid: str, keys: list[str]) -> dict[str, Any]:
    if keys == ["all"]:
        keys = list(INFO_KEYS)
    values: dict[str, Any] = {}
    for key in keys:
        if key == "ECID":
            values[key] = ecid
        elif key == "isSupervised":
            values[key] = bool(device.get("supervised", False))
        elif key in device and key not in ("supervised", "assignedConfiguration"):
            values[key] = device[key]
    return values


def run(argv: list[str]) -> int:  # noqa: PLR0911, PLR0912 - one branch per command
    state_path = os.environ.get(STATE_ENV)
    if not state_path:
        sys.stderr.write(f"cfgutil (fake): {STATE_ENV} is not set\n")
        return 2
    path = Path(state_path)
    try:
        options, command, args = _parse(argv)
        state = _load(path)
    except (Usage, ValueError, OSError) as exc:
        sys.stderr.write(f"cfgutil: error: {exc}\n")
        return 64
    if options["format"] != "JSON":
        sys.stderr.write("cfgutil (fake): only --format JSON is implemented\n")
        return 64
    if command in state.get("hang", []):
        if state.get("hang_pid_file"):
            Path(state["hang_pid_file"]).write_text(str(os.getpid()))
        time.sleep(3600)
    if command in state.get("garbage", []):
        sys.stdout.write("<<not JSON>>\n")
        return 0
    devices: dict[str, dict[str, Any]] = state["devices"]
    if command == "list":
        output = {
            ecid: _properties(d, ecid, ["UDID", "ECID", "deviceType", "name", "locationID"])
            for ecid, d in devices.items()
        }
        _print({"Command": "list", "Output": output, "Devices": list(devices), "Type": "CommandOutput"})
        return 0
    selected = options["ecids"] or list(devices)
    if not selected or any(ecid not in devices for ecid in selected):
        sys.stderr.write("cfgutil: error: no devices found\n")
        return 1
    if command in ("get", "get-property"):
        if not args:
            return _error("No property specified.", 1, selected, command)
        output = {ecid: _properties(devices[ecid], ecid, args) for ecid in selected}
        _print({"Command": command, "Output": output, "Devices": selected, "Type": "CommandOutput"})
        return 0
    if command in ("erase", "erase-content"):
        for ecid in selected:
            if not devices[ecid].get("supervised", False):
                return _error("The device is not supervised.", 4, selected, command)  # [INFERRED] wording
        for ecid in selected:
            device = devices[ecid]
            device["cloudConfiguration"] = None
            device["activationState"] = "Unactivated"
        _save(path, state)
        _print(
            {
                "Command": command,
                "Output": {e: {} for e in selected},
                "Devices": selected,
                "Type": "CommandOutput",
            }
        )
        return 0
    if command == "prepare":
        if "--dep" not in args:
            return _error("Only prepare --dep is implemented by the fake.", 1, selected, command)
        for ecid in selected:
            device = devices[ecid]
            if device.get("cloudConfiguration"):
                return _error(
                    "The device is already prepared and must be erased to change settings.",
                    33002,  # [INFERRED] code
                    [ecid],
                    command,
                )
            if not device.get("assignedConfiguration"):
                return _error("The configuration is not available.", 33001, [ecid], command)
        for ecid in selected:
            device = devices[ecid]
            device["cloudConfiguration"] = {
                **device["assignedConfiguration"],
                "ConfigurationWasApplied": True,
            }
            device["activationState"] = "Activated"
        _save(path, state)
        _print(
            {
                "Command": command,
                "Output": {e: {} for e in selected},
                "Devices": selected,
                "Type": "CommandOutput",
            }
        )
        return 0
    sys.stderr.write(f"cfgutil: error: unknown command {command!r}\n")
    return 64


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
