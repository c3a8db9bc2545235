"""The IPSW cache: the real `FirmwareSource`, a directory of downloaded restore images.

An IPSW is a zip archive of several GB. Which iOS it installs and on which devices is written in
`BuildManifest.plist` at its root: `ProductVersion`, `ProductBuildVersion`, `SupportedProductTypes`,
and `BuildIdentities`, one per board (`Info.DeviceClass`, e.g. `d79ap`) and restore behaviour
(`Info.RestoreBehavior` `Erase` or `Update`, named by `Info.Variant`, e.g. "Customer Erase Install
(IPSW)"). The restorer (pymobiledevice3) picks the identity by the device's HardwareModel and the
behaviour, so that is what this module reports too.

Only the manifest is read, straight from the zip (the central directory and one member), never the
whole archive. Reads are cached per (path, size, mtime, inode), so scanning the directory on every
call is a `stat` per file: an operator can drop a new IPSW in, or delete one, while the daemon runs. A file
that cannot be used (still downloading, truncated, not an IPSW) is logged once and skipped; one bad
file never stops the bench from updating the devices the good ones cover.
"""

from __future__ import annotations

import asyncio
import os
import plistlib
import stat
import threading
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from daemon.ios.base import UpdateTarget
from daemon.versions import parse_version

log = structlog.get_logger("benchhub.firmware")

MANIFEST_NAME = "BuildManifest.plist"
MAX_MANIFEST_BYTES = 128 * 1024 * 1024
"""Real manifests are a few MB; anything far larger is not one, and is not read into memory."""

ERASE_VARIANT = "Erase Install (IPSW)"
"""Matched as a substring of `Info.Variant`, as pymobiledevice3 does when it restores with
`Behavior.Erase` ("Customer Erase Install (IPSW)")."""


class ManifestError(Exception):
    """An IPSW that cannot be used; the message says why, for the log and `benchhub doctor`."""


@dataclass(frozen=True, slots=True)
class BuildIdentity:
    """One entry of `BuildIdentities`: a board and a way of restoring it."""

    device_class: str
    """`Info.DeviceClass`, lower case (`d79ap`); the device's HardwareModel (`D79AP`) names it."""
    restore_behavior: str
    """`Info.RestoreBehavior`: `Erase` or `Update` ("" if the manifest does not say)."""
    variant: str
    """`Info.Variant`, e.g. "Customer Upgrade Install (IPSW)"."""
    chip_id: int | None = None
    """`ApChipID` (0x8030 for A13); what the device reports as CPID in Recovery/DFU."""
    board_id: int | None = None
    """`ApBoardID`; the device's BDID."""
    product_type: str | None = None
    """`Ap,ProductType` where the manifest names it per identity (newer manifests do), which tells
    the boards of a multi-model IPSW apart without knowing the device's HardwareModel."""

    @property
    def erase_install(self) -> bool:
        return self.restore_behavior == "Erase" and ERASE_VARIANT in self.variant

    @property
    def update_install(self) -> bool:
        return self.restore_behavior == "Update"


@dataclass(frozen=True, slots=True)
class IpswManifest:
    """What one IPSW file installs, read from its BuildManifest."""

    path: Path
    size: int
    version: str
    build: str
    product_types: tuple[str, ...]
    identities: tuple[BuildIdentity, ...]

    @property
    def boards(self) -> tuple[str, ...]:
        return tuple(sorted({i.device_class for i in self.identities}))

    @property
    def erase_install(self) -> bool:
        """Every board in the file can be erase-installed (what `benchhub doctor` shows)."""
        return _all_boards(self.identities, erase=True)

    @property
    def update_install(self) -> bool:
        return _all_boards(self.identities, erase=False)

    def supports(self, product_type: str) -> bool:
        wanted = product_type.casefold()
        return any(p.casefold() == wanted for p in self.product_types)

    def identities_for(self, product_type: str, board: str | None = None) -> tuple[BuildIdentity, ...]:
        """The identities that can restore this device; empty if the file does not cover it.

        With a board (the device's HardwareModel) the match is exact. Without one, identities that
        name another product type are left out; where the manifest does not name them, all of the
        file's identities count, since it cannot say which board belongs to which model.
        """
        if not self.supports(product_type):
            return ()
        wanted = product_type.casefold()
        found = tuple(
            i for i in self.identities if i.product_type is None or i.product_type.casefold() == wanted
        )
        if board is not None:
            found = tuple(i for i in found if i.device_class == board.casefold())
        return found

    def target(self, product_type: str, board: str | None = None) -> UpdateTarget:
        identities = self.identities_for(product_type, board)
        return UpdateTarget(
            version=self.version,
            build=self.build,
            ipsw=self.path,
            erase_install=_all_boards(identities, erase=True),
            update_install=_all_boards(identities, erase=False),
        )

    def describe(self) -> str:
        """One line for `benchhub doctor`: `iOS 17.4 (21E219) iPhone12,8 [d79ap] erase+update, 6.1 GB`."""
        ways = "+".join(w for w, ok in (("erase", self.erase_install), ("update", self.update_install)) if ok)
        return (
            f"iOS {self.version} ({self.build}) {', '.join(self.product_types)} [{', '.join(self.boards)}] "
            f"{ways or 'no restore identity'}, {self.size / 1e9:.1f} GB: {self.path.name}"
        )


def _all_boards(identities: tuple[BuildIdentity, ...], *, erase: bool) -> bool:
    """True if every board among `identities` has an identity for this behaviour.

    Without the device's board a multi-board answer must hold for each of them, or a restore could
    find no identity for the board it meets.
    """
    boards = {i.device_class for i in identities}
    if not boards:
        return False
    ok = {i.device_class for i in identities if (i.erase_install if erase else i.update_install)}
    return boards <= ok


@dataclass(frozen=True, slots=True)
class SkippedFile:
    """A `*.ipsw` that cannot be used, and why."""

    path: Path
    reason: str


@dataclass(frozen=True, slots=True)
class Inventory:
    """What the cache holds, newest first: for `benchhub doctor` and the docs."""

    directory: Path
    firmware: tuple[IpswManifest, ...]
    skipped: tuple[SkippedFile, ...] = ()
    error: str | None = None
    """Set when the directory itself cannot be read (missing, not a directory, no permission)."""

    def lines(self) -> list[str]:
        if self.error is not None:
            return [f"{self.directory}: {self.error}"]
        if not self.firmware and not self.skipped:
            return [f"{self.directory}: no .ipsw files"]
        out = [m.describe() for m in self.firmware]
        out += [f"skipped {s.path.name}: {s.reason}" for s in self.skipped]
        return out


# --- reading one file -------------------------------------------------------------------------------


def _hex(value: Any) -> int | None:
    """`ApChipID`/`ApBoardID` are strings like "0x8030" in Apple's manifests; tolerate integers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 16)
        except ValueError:
            return None
    return None


def _identity(raw: Any) -> BuildIdentity | None:
    """One BuildIdentity, or None if it names no board (such an entry cannot be restored to)."""
    if not isinstance(raw, Mapping):
        return None
    info = raw.get("Info")
    if not isinstance(info, Mapping):
        return None
    device_class = info.get("DeviceClass")
    if not isinstance(device_class, str) or not device_class:
        return None
    behavior = info.get("RestoreBehavior")
    variant = info.get("Variant")
    product_type = raw.get("Ap,ProductType")
    return BuildIdentity(
        device_class=device_class.casefold(),
        restore_behavior=behavior if isinstance(behavior, str) else "",
        variant=variant if isinstance(variant, str) else "",
        chip_id=_hex(raw.get("ApChipID")),
        board_id=_hex(raw.get("ApBoardID")),
        product_type=product_type if isinstance(product_type, str) and product_type else None,
    )


def parse_manifest(data: bytes, path: Path, size: int) -> IpswManifest:
    """A BuildManifest's bytes -> IpswManifest; ManifestError names the first problem."""
    try:
        manifest = plistlib.loads(data)
    except (
        Exception
    ) as exc:  # plistlib fails on bad input in many ways: ExpatError, ValueError, AttributeError
        raise ManifestError(f"{MANIFEST_NAME} is not a valid property list ({exc})") from None
    if not isinstance(manifest, Mapping):
        raise ManifestError(f"{MANIFEST_NAME} is not a dictionary")
    version = manifest.get("ProductVersion")
    build = manifest.get("ProductBuildVersion")
    types = manifest.get("SupportedProductTypes")
    identities = manifest.get("BuildIdentities")
    if not isinstance(version, str):
        raise ManifestError(f"{MANIFEST_NAME} has no ProductVersion")
    try:
        parse_version(version)
    except ValueError:
        raise ManifestError(f"{MANIFEST_NAME} has an unreadable ProductVersion {version!r}") from None
    if not isinstance(build, str) or not build:
        raise ManifestError(f"{MANIFEST_NAME} has no ProductBuildVersion")
    if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        raise ManifestError(f"{MANIFEST_NAME} has no SupportedProductTypes")
    if not isinstance(identities, list):
        raise ManifestError(f"{MANIFEST_NAME} has no BuildIdentities")
    parsed = tuple(i for i in (_identity(raw) for raw in identities) if i is not None)
    if not parsed:
        raise ManifestError(f"{MANIFEST_NAME} has no BuildIdentity naming a DeviceClass")
    return IpswManifest(
        path=path,
        size=size,
        version=version,
        build=build,
        product_types=tuple(types),
        identities=parsed,
    )


def read_manifest(path: Path) -> IpswManifest:
    """Read one IPSW's BuildManifest without extracting the archive (blocking; call in a thread).

    Only the zip's central directory (at the end of the file) and the manifest member are read.
    """
    try:
        size = path.stat().st_size
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile as exc:
            raise ManifestError(
                f"not a zip archive ({exc}): an unfinished download, a truncated copy, or not an IPSW"
            ) from None
        with archive:
            try:
                member = archive.getinfo(MANIFEST_NAME)
            except KeyError:
                raise ManifestError(
                    f"no {MANIFEST_NAME} in the archive (not an iOS restore image?)"
                ) from None
            if member.file_size > MAX_MANIFEST_BYTES:
                raise ManifestError(f"{MANIFEST_NAME} is implausibly large ({member.file_size} bytes)")
            try:
                data = archive.read(member)
            except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as exc:
                # bad CRC, truncated member, unsupported compression or encryption
                raise ManifestError(f"{MANIFEST_NAME} cannot be extracted ({exc})") from None
    except OSError as exc:
        raise ManifestError(f"cannot be read ({exc.strerror or exc})") from None
    return parse_manifest(data, path, size)


# --- the cache --------------------------------------------------------------------------------------


def is_candidate(name: str) -> bool:
    """A directory entry that may be an IPSW: `*.ipsw` and not hidden.

    Downloads in progress carry another suffix until they are complete (`.ipsw.part`, `.ipsw.download`,
    `.crdownload`), so they are never opened. Hidden files are left alone: macOS leaves `._name.ipsw`
    AppleDouble files on non-Mac volumes, and rsync writes `.name.ipsw.XXXXXX` while copying.
    """
    return name.lower().endswith(".ipsw") and not name.startswith(".")


@dataclass(slots=True)
class _Entry:
    key: tuple[int, int, int]
    """(size, mtime_ns, inode) at the time of the read: a changed or replaced file is read again."""
    result: IpswManifest | SkippedFile


class IpswCache:
    """`FirmwareSource` over a directory of `.ipsw` files.

    `reader` reads one file (blocking); tests wrap it to count reads. The directory is scanned on
    every call, so files added, replaced or deleted while the daemon runs are seen at the next
    device; only new or changed files are opened.
    """

    def __init__(self, directory: Path, *, reader: Callable[[Path], IpswManifest] = read_manifest) -> None:
        self.directory = directory
        self._reader = reader
        self._entries: dict[Path, _Entry] = {}
        self._reported: dict[Path, str] = {}
        """Problems already logged, per file, so a file that stays bad (or keeps growing while it
        downloads) is logged once, not at every scan."""
        self._dir_error: str | None = None
        self._lock = threading.Lock()
        """Held by the worker thread for a whole scan. A thread lock, not an asyncio one: a caller
        cancelled mid-scan (a step timeout) leaves its thread running, and the next scan must still
        wait for it."""

    async def target_for(self, product_type: str, minimum: str) -> UpdateTarget | None:
        """The newest cached firmware for this model that satisfies `minimum`, or None."""
        return await self._best(product_type, None, minimum)

    async def target_for_board(self, product_type: str, board: str, minimum: str) -> UpdateTarget | None:
        """As `target_for`, exact to the board (the device's HardwareModel, e.g. `D79AP`): the file
        must hold a BuildIdentity for it, and `erase_install`/`update_install` describe that board."""
        return await self._best(product_type, board, minimum)

    async def inventory(self) -> Inventory:
        manifests, skipped = await self._scan()
        return Inventory(
            directory=self.directory,
            firmware=tuple(sorted(manifests, key=_newest_first)),
            skipped=tuple(sorted(skipped, key=lambda s: s.path.name)),
            error=self._dir_error,
        )

    async def _best(self, product_type: str, board: str | None, minimum: str) -> UpdateTarget | None:
        floor = parse_version(minimum)
        manifests, _ = await self._scan()
        fitting = [
            m
            for m in manifests
            if parse_version(m.version) >= floor and m.identities_for(product_type, board)
        ]
        if not fitting:
            return None
        best = min(fitting, key=_newest_first)
        return best.target(product_type, board)

    async def _scan(self) -> tuple[list[IpswManifest], list[SkippedFile]]:
        return await asyncio.to_thread(self._scan_blocking)

    def _scan_blocking(self) -> tuple[list[IpswManifest], list[SkippedFile]]:
        with self._lock:
            return self._scan_locked()

    def _scan_locked(self) -> tuple[list[IpswManifest], list[SkippedFile]]:
        try:
            with os.scandir(self.directory) as listing:
                names = sorted(e.name for e in listing if is_candidate(e.name))
        except OSError as exc:
            self._directory_problem(f"cannot be read ({exc.strerror or exc})")
            self._entries.clear()
            self._reported.clear()
            return [], []
        if self._dir_error is not None:
            log.info("firmware_directory_readable", directory=str(self.directory))
            self._dir_error = None

        seen: set[Path] = set()
        manifests: list[IpswManifest] = []
        skipped: list[SkippedFile] = []
        for name in names:
            path = self.directory / name
            result = self._load(path)
            if result is None:
                continue  # gone since the listing, or a directory named *.ipsw
            seen.add(path)
            if isinstance(result, IpswManifest):
                manifests.append(result)
            else:
                skipped.append(result)
        for gone in set(self._entries) - seen:
            del self._entries[gone]
            self._reported.pop(gone, None)
        return manifests, skipped

    def _load(self, path: Path) -> IpswManifest | SkippedFile | None:
        try:
            st = path.stat()
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        entry = self._entries.get(path)
        if entry is not None and entry.key == key:
            return entry.result
        result: IpswManifest | SkippedFile
        try:
            result = self._reader(path)
        except ManifestError as exc:
            result = SkippedFile(path, str(exc))
        except Exception as exc:  # a reader bug or an odd file must not stop every update
            result = SkippedFile(path, f"unexpected error ({type(exc).__name__}: {exc})")
            if self._reported.get(path) != result.reason:
                log.exception("ipsw_skipped", file=str(path), reason=result.reason)
                self._reported[path] = result.reason
        self._entries[path] = _Entry(key, result)
        self._report(result)
        return result

    def _report(self, result: IpswManifest | SkippedFile) -> None:
        path = result.path
        if isinstance(result, SkippedFile):
            if self._reported.get(path) != result.reason:
                log.warning("ipsw_skipped", file=str(path), reason=result.reason)
                self._reported[path] = result.reason
            return
        self._reported.pop(path, None)
        log.info(
            "ipsw_found",
            file=str(path),
            version=result.version,
            build=result.build,
            product_types=",".join(result.product_types),
        )

    def _directory_problem(self, reason: str) -> None:
        if self._dir_error != reason:
            log.warning("firmware_directory_unusable", directory=str(self.directory), reason=reason)
            self._dir_error = reason


def _newest_first(m: IpswManifest) -> tuple[tuple[int, int, int], int, str, str]:
    """Sort key: highest version first; at the same version a release build (`21E219`) before a beta
    (`21E5200d`, a trailing letter), then by name so the choice is stable."""
    major, minor, patch = parse_version(m.version)
    beta = 1 if m.build[-1:].isalpha() and m.build[-1:].islower() else 0
    return (-major, -minor, -patch), beta, m.build, m.path.name
