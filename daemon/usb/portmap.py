"""The station's learned port map: which USB path each physical hub port has on this bench.

Written by `benchhub ports learn` (`daemon.usb.learn`), read by the station
(`Topology.apply_learned`) and `benchhub ports show`. The file is small TOML, one table per hub,
one line per port, so a technician can read it, diff it and fix one line by hand:

    # benchhub port map, written by `benchhub ports learn` 2025-03-14T10:02:11+01:00
    [hub-a]
    1 = "3-2.4.1"
    2 = "3-2.4.2"

It is written here by hand (the values are validated USB paths and hub ids, which need no quoting
rules beyond `"..."`), so no TOML writer dependency; it is read with `tomllib`.

A bad file is a `PortMapError` (a `ConfigError`, so the CLI prints it like a bad config and exits 2)
with one line per problem naming the file, the key and the fix. One USB path is one port: the same
path twice, or one port's path below another's, cannot both be right, so such a file is refused
rather than guessed at.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from daemon.config import ID_PATTERN, ConfigError
from hubdrivers.usbhub.sysfs import valid_usb_path

PortMap = dict[str, dict[int, str]]
"""hub id -> physical port -> full USB path (`{"hub-a": {1: "3-2.4.1"}}`)."""

HEADER: Final = "# benchhub port map, written by `benchhub ports learn`"

_HUB_ID: Final = re.compile(ID_PATTERN)


class PortMapError(ConfigError):
    """A port map file that cannot be used; one line per problem in `lines`."""


def paths_overlap(a: str, b: str) -> bool:
    """Whether two USB paths cannot both be ports: the same path, or one below the other (a device
    cannot sit on a port and also behind a device on that port)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def find_overlap(path: str, port_map: Mapping[str, Mapping[int, str]]) -> tuple[str, int, str] | None:
    """The (hub, port, path) in `port_map` that `path` overlaps, if any."""
    for hub, ports in port_map.items():
        for port, other in ports.items():
            if paths_overlap(path, other):
                return hub, port, other
    return None


def _fix(hub: str) -> str:
    return f"fix the line by hand, or run `benchhub ports learn --hub {hub}` again"


def _parse_port(key: str) -> int | None:
    if not (key.isascii() and key.isdigit()) or key.startswith("0"):
        return None
    return int(key)


def parse_port_map(data: Mapping[str, object], source: str) -> PortMap:
    """Validate parsed TOML; `source` (the file name) starts every problem line."""
    problems: list[str] = []
    result: PortMap = {}
    seen: dict[str, tuple[str, int]] = {}
    for hub, table in data.items():
        if not isinstance(table, dict):
            problems.append(
                f'{source}: {hub}: must be a [hub-id] table of port = "usb path" lines'
                f" (got {table!r}); fix it by hand, or delete the file and run `benchhub ports learn`"
            )
            continue
        if not _HUB_ID.match(hub):
            problems.append(
                f"{source}: [{hub}]: is not a hub id (lowercase letters, digits and '-', as [[hubs]] id"
                " in the station config); rename the table to the hub's id"
            )
            continue
        ports: dict[int, str] = {}
        for key, value in table.items():
            port = _parse_port(key)
            if port is None:
                problems.append(
                    f"{source}: {hub}.{key}: port numbers are whole numbers from 1 (got {key!r}); {_fix(hub)}"
                )
                continue
            if not isinstance(value, str) or not valid_usb_path(value):
                problems.append(
                    f'{source}: {hub}.{key}: {value!r} is not a USB path like "3-2.4.1"'
                    f" (ls /sys/bus/usb/devices); {_fix(hub)}"
                )
                continue
            clash = next(((p, seen[p]) for p in seen if paths_overlap(value, p)), None)
            if clash is not None:
                other_path, (other_hub, other_port) = clash
                relation = "is also" if other_path == value else f"overlaps {other_path}, which is"
                problems.append(
                    f"{source}: {hub}.{key}: {value} {relation} {other_hub}.{other_port};"
                    f" one USB path is one port: {_fix(hub)}"
                )
                continue
            seen[value] = (hub, port)
            ports[port] = value
        if ports:
            result[hub] = dict(sorted(ports.items()))
    if problems:
        raise PortMapError(problems)
    return result


def load_port_map(path: Path) -> PortMap:
    """The port map in `path`. A missing file raises FileNotFoundError (the caller decides whether
    "not learned yet" is fine); anything unusable raises PortMapError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise PortMapError([f"{path}: cannot be read ({exc.strerror})"]) from None
    except UnicodeDecodeError:
        raise PortMapError([f"{path}: is not UTF-8 text; delete it and run `benchhub ports learn`"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PortMapError(
            [f"{path}: not valid TOML: {exc}; fix it by hand, or delete it and run `benchhub ports learn`"]
        ) from None
    return parse_port_map(data, str(path))


def load_port_map_if_present(path: Path | None) -> PortMap:
    """The station's map: empty when none is configured (`[station] port_map` unset) or the file
    does not exist yet (not learned); PortMapError when it exists and is unusable."""
    if path is None:
        return {}
    try:
        return load_port_map(path)
    except FileNotFoundError:
        return {}


def render_port_map(port_map: Mapping[str, Mapping[int, str]], written: datetime | None = None) -> str:
    """The file text: a dated header, one table per hub in the given order, ports in order. Raises
    ValueError for anything `load_port_map` would refuse, so a bad map is never written."""
    try:
        parse_port_map({hub: {str(p): v for p, v in ports.items()} for hub, ports in port_map.items()}, "map")
    except PortMapError as exc:
        raise ValueError(str(exc)) from None
    when = (written or datetime.now(UTC)).astimezone().isoformat(timespec="seconds")
    lines = [f"{HEADER} {when}"]
    for hub, ports in port_map.items():
        if not ports:
            continue
        lines += ["", f"[{hub}]"]
        lines += [f'{port} = "{ports[port]}"' for port in sorted(ports)]
    return "\n".join(lines) + "\n"


def merge_port_maps(
    saved: Mapping[str, Mapping[int, str]], learned: Mapping[str, Mapping[int, str]]
) -> tuple[PortMap, list[str]]:
    """`saved` with the hubs in `learned` replaced wholesale (a re-learned hub's old ports are
    stale), in file order, new hubs last. A kept port whose path overlaps a newly learned one is
    dropped, because a device just proved where that path is; each drop is returned as a note."""
    merged: PortMap = {}
    notes: list[str] = []
    for hub, ports in saved.items():
        if hub in learned:
            merged[hub] = dict(learned[hub])
            continue
        kept: dict[int, str] = {}
        for port, path in ports.items():
            clash = find_overlap(path, learned)
            if clash is None:
                kept[port] = path
            else:
                notes.append(
                    f"dropped {hub} port {port} ({path}) from the saved map:"
                    f" {clash[2]} was just learned as {clash[0]} port {clash[1]}"
                )
        if kept:
            merged[hub] = kept
    for hub, ports in learned.items():
        if hub not in merged and ports:
            merged[hub] = dict(ports)
    return merged, notes


def save_port_map(path: Path, learned: Mapping[str, Mapping[int, str]]) -> list[str]:
    """Merge `learned` into the map in `path` (see `merge_port_maps`) and write it atomically: a
    temporary file in the same directory, fsynced, then `os.replace`, so the station never reads a
    half-written map and a failed write leaves the old one. The file is readable by all (0644, or the
    old file's mode), because the wizard usually runs as root and the station as its own user.
    Returns the merge notes; raises PortMapError if the existing file is unusable, OSError if the
    file cannot be written."""
    try:
        saved = load_port_map(path)
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        saved, mode = {}, 0o644
    merged, notes = merge_port_maps(saved, learned)
    text = render_port_map(merged)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable; not possible on every filesystem
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return notes


def _ranges(numbers: list[int]) -> str:
    """`[5, 6, 7, 9]` -> `5-7, 9`."""
    out: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(f"{start}-{prev}" if prev > start else str(start))
        if n is not None:
            start = prev = n
    return ", ".join(out)


def describe_port_map(port_map: Mapping[str, Mapping[int, str]], hubs: Mapping[str, int]) -> list[str]:
    """`benchhub ports show`: per configured hub (`hubs`: id -> port count) its learned ports and
    which are not learned, then the map's hubs the config does not have (the station ignores them)."""
    lines: list[str] = []
    for hub, count in hubs.items():
        ports = port_map.get(hub, {})
        inside = {p: v for p, v in ports.items() if 1 <= p <= count}
        lines.append(f"{hub} ({count} ports): {len(inside)} learned")
        lines += [f"  port {p:>2}  {v}" for p, v in sorted(inside.items())]
        missing = [n for n in range(1, count + 1) if n not in inside]
        if inside and missing:
            lines.append(f"  not learned: {_ranges(missing)} (the hub's own map or usb_path.<port>)")
        beyond = sorted(p for p in ports if p not in inside)
        if beyond:
            lines.append(f"  ignored: port(s) {_ranges(beyond)} (the hub has {count} ports)")
    for hub, ports in port_map.items():
        if hub not in hubs:
            lines.append(f"{hub}: in the map but not in the config (ignored)")
            lines += [f"  port {p:>2}  {v}" for p, v in sorted(ports.items())]
    return lines
