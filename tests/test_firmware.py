"""The IPSW cache: which restore image a device gets, read from small synthetic IPSWs.

The archives are real zips with a BuildManifest.plist shaped like Apple's (top-level keys, one
BuildIdentity per board and behaviour with `ApChipID`/`ApBoardID` as hex strings, `Info` with
`DeviceClass`/`RestoreBehavior`/`Variant`, a `Manifest` of components) plus a few dummy members.
Boards and chips follow the devices' published identifiers (iPhone12,8 = D79AP on A13 0x8030,
iPhone14,5 = D17AP on A15 0x8110, iPad12,1/2 = J181AP/J182AP); board ids and builds not checked
against a real manifest are marked as made up.
"""

from __future__ import annotations

import os
import plistlib
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.ios.base import FirmwareSource, UpdateTarget
from daemon.ios.firmware import IpswCache, IpswManifest, is_candidate, read_manifest

ERASE = ("Erase", "Customer Erase Install (IPSW)")
UPDATE = ("Update", "Customer Upgrade Install (IPSW)")


def identity(
    device_class: str,
    chip: str,
    board: str,
    behavior: tuple[str, str],
    *,
    build: str,
    product_type: str | None = None,
) -> dict[str, Any]:
    """One BuildIdentity as Apple ships it (abridged: two components instead of ~40)."""
    restore_behavior, variant = behavior
    target = device_class.removesuffix("ap")
    ident: dict[str, Any] = {
        "ApBoardID": board,
        "ApChipID": chip,
        "ApSecurityDomain": "0x01",
        "Info": {
            "BuildNumber": build,
            "CodeName": "Synthetic",
            "DeviceClass": device_class,
            "FDRSupport": True,
            "MinimumSystemPartition": 6000,
            "MobileDeviceMinVersion": "1600.0.0",
            "OSVarContentSize": 0,
            "RestoreBehavior": restore_behavior,
            "SystemPartitionPadding": {"128": 1280, "16": 160, "256": 1280, "32": 320, "64": 640},
            "Variant": variant,
            "VariantContents": {
                "BasebandFirmware": "Release",
                "OS": "Production",
                "RestoreRamDisk": "Production",
            },
        },
        "Manifest": {
            "LLB": {
                "Digest": bytes(48),
                "Info": {"IsFirmwarePayload": True, "Path": f"Firmware/all_flash/LLB.{target}.RELEASE.im4p"},
                "Trusted": True,
            },
            "RestoreRamDisk": {
                "Digest": bytes(48),
                "Info": {"IsFUDFirmware": False, "Path": "096-12345-067.dmg"},
                "Trusted": True,
            },
        },
        "UniqueBuildID": bytes(20),
    }
    if product_type is not None:
        ident["Ap,ProductType"] = product_type
        ident["Ap,Target"] = device_class.upper()
        ident["Ap,TargetType"] = target
    return ident


def manifest(
    version: str, build: str, product_types: Iterable[str], identities: Iterable[dict[str, Any]]
) -> bytes:
    return plistlib.dumps(
        {
            "BuildIdentities": list(identities),
            "ManifestVersion": 0,
            "ProductBuildVersion": build,
            "ProductVersion": version,
            "SupportedProductTypes": list(product_types),
        }
    )


def write_ipsw(path: Path, manifest_bytes: bytes | None, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A small zip laid out like an IPSW: the manifest at the root and a few other members."""
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        if manifest_bytes is not None:
            archive.writestr("BuildManifest.plist", manifest_bytes)
        archive.writestr("Restore.plist", plistlib.dumps({"ProductVersion": "x"}))
        archive.writestr("Firmware/all_flash/LLB.d79.RELEASE.im4p", os.urandom(4096))
        archive.writestr("096-12345-067.dmg", bytes(64 * 1024))
    return path


def iphone_se2(
    directory: Path, version: str, build: str, behaviors: Iterable[tuple[str, str]] = (ERASE, UPDATE)
) -> Path:
    """iPhone SE (2nd generation): iPhone12,8, board D79AP, A13 (0x8030); board id 0x10 made up."""
    data = manifest(
        version,
        build,
        ["iPhone12,8"],
        [identity("d79ap", "0x8030", "0x10", b, build=build, product_type="iPhone12,8") for b in behaviors],
    )
    return write_ipsw(directory / f"iPhone12,8_{version}_{build}_Restore.ipsw", data)


def iphone_13(
    directory: Path, version: str, build: str, behaviors: Iterable[tuple[str, str]] = (ERASE, UPDATE)
) -> Path:
    """iPhone 13: iPhone14,5, board D17AP, A15 (0x8110); board id 0x0E made up."""
    data = manifest(
        version,
        build,
        ["iPhone14,5"],
        [identity("d17ap", "0x8110", "0x0E", b, build=build, product_type="iPhone14,5") for b in behaviors],
    )
    return write_ipsw(directory / f"iPhone14,5_{version}_{build}_Restore.ipsw", data)


def ipad_9(directory: Path, version: str, build: str) -> Path:
    """iPad (9th generation): one IPSW for iPad12,1 (J181AP, BDID 0x18) and iPad12,2 (J182AP, 0x1A),
    both A13; the file name names a family, not a model, as Apple's iPad IPSWs do."""
    identities = [
        identity(board, "0x8030", bdid, b, build=build, product_type=ptype)
        for board, bdid, ptype in (("j181ap", "0x18", "iPad12,1"), ("j182ap", "0x1A", "iPad12,2"))
        for b in (ERASE, UPDATE)
    ]
    data = manifest(version, build, ["iPad12,1", "iPad12,2"], identities)
    return write_ipsw(directory / f"iPad_64bit_TouchID_ASTC_{version}_{build}_Restore.ipsw", data)


def counting(reads: list[Path]) -> Any:
    def reader(path: Path) -> IpswManifest:
        reads.append(path)
        return read_manifest(path)

    return reader


# --- choosing -------------------------------------------------------------------------------------


async def test_newest_satisfying_version_is_chosen(tmp_path: Path) -> None:
    iphone_se2(tmp_path, "16.7.8", "20H343")
    iphone_se2(tmp_path, "17.4", "21E219")
    newest = iphone_se2(tmp_path, "17.5.1", "21F90")
    iphone_13(tmp_path, "17.6", "21G80")  # newer, but another model

    target = await IpswCache(tmp_path).target_for("iPhone12,8", "17.0")

    assert target == UpdateTarget(
        version="17.5.1", build="21F90", ipsw=newest, erase_install=True, update_install=True
    )


async def test_versions_compare_as_numbers(tmp_path: Path) -> None:
    iphone_se2(tmp_path, "17.9", "21Y100")  # made-up releases: iOS 17 never reached .9
    ten = iphone_se2(tmp_path, "17.10", "21Z100")
    cache = IpswCache(tmp_path)

    target = await cache.target_for("iPhone12,8", "17.2")
    assert target is not None
    assert (target.version, target.ipsw) == ("17.10", ten)
    exact = await cache.target_for("iPhone12,8", "17.10")
    assert exact is not None
    assert exact.version == "17.10"


async def test_unsupported_model_or_unreachable_minimum_gives_none(tmp_path: Path) -> None:
    iphone_se2(tmp_path, "17.5.1", "21F90")
    cache = IpswCache(tmp_path)

    assert await cache.target_for("iPhone15,2", "17.0") is None
    assert await cache.target_for("iPhone12,8", "17.6") is None
    assert await cache.target_for("iPhone12,8", "18.0") is None
    assert await IpswCache(tmp_path / "empty-but-missing").target_for("iPhone12,8", "17.0") is None


async def test_a_multi_model_ipsw_serves_each_model_and_board(tmp_path: Path) -> None:
    ipsw = ipad_9(tmp_path, "17.4", "21E219")
    cache = IpswCache(tmp_path)
    source: FirmwareSource = cache

    for product in ("iPad12,1", "iPad12,2"):
        target = await source.target_for(product, "17.0")
        assert target is not None
        assert target.ipsw == ipsw
    by_board = await cache.target_for_board("iPad12,2", "J182AP", "17.0")
    assert by_board is not None
    assert by_board.ipsw == ipsw
    assert await cache.target_for_board("iPad12,2", "j182ap", "17.0") == by_board  # case-insensitive
    assert await cache.target_for_board("iPad12,2", "J999AP", "17.0") is None
    # Ap,ProductType says J181AP belongs to iPad12,1: a claimed iPad12,2 on that board finds nothing.
    assert await cache.target_for_board("iPad12,2", "J181AP", "17.0") is None


async def test_board_exact_choice_skips_a_newer_file_without_that_board(tmp_path: Path) -> None:
    """iPhone8,1 was built on two boards (N71AP, Samsung A9 0x8000; N71mAP, TSMC A9 0x8003). Old
    manifests name no product type per identity, so only the board tells them apart."""
    both = [identity("n71ap", "0x8000", "0x04", b, build="19H386") for b in (ERASE, UPDATE)] + [
        identity("n71map", "0x8003", "0x04", b, build="19H386") for b in (ERASE, UPDATE)
    ]
    older = write_ipsw(
        tmp_path / "iPhone_4.7_P3_15.8.3_19H386_Restore.ipsw",
        manifest("15.8.3", "19H386", ["iPhone8,1"], both),
    )
    only_n71 = [identity("n71ap", "0x8000", "0x04", b, build="19H999") for b in (ERASE, UPDATE)]
    newer = write_ipsw(  # made up: a release for one board only
        tmp_path / "iPhone_4.7_P3_15.8.9_19H999_Restore.ipsw",
        manifest("15.8.9", "19H999", ["iPhone8,1"], only_n71),
    )
    cache = IpswCache(tmp_path)

    tsmc = await cache.target_for_board("iPhone8,1", "N71mAP", "15.0")
    assert tsmc is not None
    assert tsmc.ipsw == older
    samsung = await cache.target_for_board("iPhone8,1", "N71AP", "15.0")
    assert samsung is not None
    assert samsung.ipsw == newer
    unknown_board = await cache.target_for("iPhone8,1", "15.0")
    assert unknown_board is not None
    assert unknown_board.ipsw == newer


async def test_erase_and_update_identities_are_reported(tmp_path: Path) -> None:
    iphone_13(tmp_path, "17.4", "21E219", behaviors=[UPDATE])
    iphone_se2(tmp_path, "17.4", "21E219", behaviors=[ERASE])
    cache = IpswCache(tmp_path)

    update_only = await cache.target_for_board("iPhone14,5", "D17AP", "17.0")
    assert update_only is not None
    assert (update_only.erase_install, update_only.update_install) == (False, True)
    erase_only = await cache.target_for("iPhone12,8", "17.0")
    assert erase_only is not None
    assert (erase_only.erase_install, erase_only.update_install) == (True, False)


async def test_without_a_board_every_board_must_have_the_identity(tmp_path: Path) -> None:
    """A multi-model IPSW whose identities name their product type: iPhone11,8 (N841AP) has both
    behaviours, iPhone12,1 (N104AP) only Update (made up, to tell them apart)."""
    identities = [
        identity("n841ap", "0x8020", "0x0C", b, build="21E219", product_type="iPhone11,8")
        for b in (ERASE, UPDATE)
    ] + [identity("n104ap", "0x8030", "0x04", UPDATE, build="21E219", product_type="iPhone12,1")]
    write_ipsw(
        tmp_path / "iPhone11,8,iPhone12,1_17.4_21E219_Restore.ipsw",
        manifest("17.4", "21E219", ["iPhone11,8", "iPhone12,1"], identities),
    )
    cache = IpswCache(tmp_path)

    xr = await cache.target_for("iPhone11,8", "17.0")
    eleven = await cache.target_for("iPhone12,1", "17.0")
    assert xr is not None
    assert eleven is not None
    assert (xr.erase_install, eleven.erase_install) == (True, False)
    inventory = await cache.inventory()
    assert not inventory.firmware[0].erase_install  # not every board in the file can be erased


async def test_same_version_prefers_the_release_build(tmp_path: Path) -> None:
    iphone_se2(tmp_path, "17.5", "21F5073b")  # a beta with the release's version number
    release = iphone_se2(tmp_path, "17.5", "21F79")

    target = await IpswCache(tmp_path).target_for("iPhone12,8", "17.0")
    assert target is not None
    assert (target.build, target.ipsw) == ("21F79", release)


# --- bad files ------------------------------------------------------------------------------------


async def test_unusable_files_are_skipped_and_logged_once(tmp_path: Path) -> None:
    good = iphone_se2(tmp_path, "17.4", "21E219")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "random.ipsw").write_bytes(os.urandom(2048))
    truncated = iphone_se2(elsewhere, "17.6", "21G80").rename(tmp_path / "truncated.ipsw")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    write_ipsw(tmp_path / "no-manifest.ipsw", None)
    write_ipsw(tmp_path / "bad-xml.ipsw", b"<?xml version='1.0'?><plist><dict><key>ProductVersion")
    write_ipsw(tmp_path / "no-version.ipsw", plistlib.dumps({"SupportedProductTypes": ["iPhone12,8"]}))
    bad_version = manifest(
        "seventeen", "21E219", ["iPhone12,8"], [identity("d79ap", "0x8030", "0x10", ERASE, build="x")]
    )
    write_ipsw(tmp_path / "bad-version.ipsw", bad_version)
    no_board = manifest("17.9", "21Y1", ["iPhone12,8"], [{"ApChipID": "0x8030", "Info": {}}])
    write_ipsw(tmp_path / "no-board.ipsw", no_board)
    # Downloads in progress and macOS/rsync side files: never opened, even when they are valid zips.
    iphone_se2(elsewhere, "18.0", "22A3354").rename(tmp_path / "iPhone12,8_18.0_22A3354_Restore.ipsw.part")
    (tmp_path / "iPhone12,8_18.1_22B83_Restore.ipsw.download").mkdir()
    (tmp_path / "._iPhone12,8_17.4_21E219_Restore.ipsw").write_bytes(b"\x00\x05\x16\x07" + bytes(4092))
    (tmp_path / "folder.ipsw").mkdir()
    reads: list[Path] = []
    cache = IpswCache(tmp_path, reader=counting(reads))

    with capture_logs() as logs:
        target = await cache.target_for("iPhone12,8", "17.0")
        again = await cache.target_for("iPhone12,8", "17.0")
        inventory = await cache.inventory()

    assert target is not None
    assert target.ipsw == good
    assert again == target
    bad = {
        "random.ipsw",
        "truncated.ipsw",
        "no-manifest.ipsw",
        "bad-xml.ipsw",
        "no-version.ipsw",
        "bad-version.ipsw",
        "no-board.ipsw",
    }
    assert {p.name for p in reads} == bad | {good.name}
    assert len(reads) == len(bad) + 1  # nothing read twice
    assert {s.path.name for s in inventory.skipped} == bad
    reasons = {s.path.name: s.reason for s in inventory.skipped}
    assert "zip" in reasons["random.ipsw"]
    assert "no BuildManifest.plist" in reasons["no-manifest.ipsw"]
    assert "property list" in reasons["bad-xml.ipsw"]
    assert "ProductVersion" in reasons["no-version.ipsw"]
    assert "ProductVersion" in reasons["bad-version.ipsw"]
    assert "DeviceClass" in reasons["no-board.ipsw"]
    warnings = [e for e in logs if e["event"] == "ipsw_skipped"]
    assert sorted(Path(e["file"]).name for e in warnings) == sorted(bad)
    assert all(e["log_level"] == "warning" for e in warnings)


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
async def test_a_corrupted_manifest_member_is_skipped(tmp_path: Path, compression: int) -> None:
    """Deflated: the decompressor fails; stored: the CRC check does."""
    path = write_ipsw(
        tmp_path / "iPhone12,8_17.4_21E219_Restore.ipsw",
        manifest(
            "17.4", "21E219", ["iPhone12,8"], [identity("d79ap", "0x8030", "0x10", ERASE, build="21E219")]
        ),
        compression,
    )
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("BuildManifest.plist")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for i in range(start + 10, start + 60):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    cache = IpswCache(tmp_path)

    assert await cache.target_for("iPhone12,8", "17.0") is None
    (skipped,) = (await cache.inventory()).skipped
    assert skipped.path == path
    assert skipped.reason.startswith("BuildManifest.plist cannot be extracted")


async def test_an_unreadable_file_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = iphone_se2(tmp_path, "17.4", "21E219")
    locked = iphone_se2(tmp_path, "17.5.1", "21F90")
    real_zipfile = zipfile.ZipFile

    def zip_file(path: Path, *args: Any, **kwargs: Any) -> zipfile.ZipFile:
        if Path(path) == locked:  # as chmod 000 would, but also when the tests run as root
            raise PermissionError(13, "Permission denied", str(path))
        return real_zipfile(path, *args, **kwargs)

    monkeypatch.setattr("daemon.ios.firmware.zipfile.ZipFile", zip_file)
    cache = IpswCache(tmp_path)

    target = await cache.target_for("iPhone12,8", "17.0")

    assert target is not None
    assert target.ipsw == good
    (skipped,) = (await cache.inventory()).skipped
    assert skipped.reason == "cannot be read (Permission denied)"


async def test_a_reader_bug_is_contained(tmp_path: Path) -> None:
    iphone_se2(tmp_path, "17.4", "21E219")

    def broken(path: Path) -> IpswManifest:
        raise ZeroDivisionError("bug")

    cache = IpswCache(tmp_path, reader=broken)
    with capture_logs():
        assert await cache.target_for("iPhone12,8", "17.0") is None
    (skipped,) = (await cache.inventory()).skipped
    assert "ZeroDivisionError" in skipped.reason


def test_only_visible_ipsw_names_are_candidates() -> None:
    assert is_candidate("iPhone12,8_17.4_21E219_Restore.ipsw")
    assert is_candidate("UPPER.IPSW")
    for name in (
        "x.ipsw.part",
        "x.ipsw.download",
        "x.ipsw.crdownload",
        "._x.ipsw",
        ".x.ipsw.Ab12Cd",
        "x.zip",
    ):
        assert not is_candidate(name), name


# --- the cache ------------------------------------------------------------------------------------


async def test_manifests_are_read_once_until_the_file_changes(tmp_path: Path) -> None:
    se = iphone_se2(tmp_path, "17.4", "21E219")
    thirteen = iphone_13(tmp_path, "17.4", "21E219")
    reads: list[Path] = []
    cache = IpswCache(tmp_path, reader=counting(reads))

    for _ in range(3):
        assert await cache.target_for("iPhone12,8", "17.0") is not None
        assert await cache.target_for("iPhone14,5", "17.0") is not None
    assert sorted(reads) == sorted([se, thirteen])

    # Replaced in place (same name, new content): read again, and only that file.
    stat = se.stat()
    replacement = manifest(
        "17.5.1", "21F90", ["iPhone12,8"], [identity("d79ap", "0x8030", "0x10", ERASE, build="21F90")]
    )
    write_ipsw(se, replacement)
    os.utime(se, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    target = await cache.target_for("iPhone12,8", "17.0")
    assert target is not None
    assert (target.version, target.ipsw) == ("17.5.1", se)
    assert sorted(reads) == sorted([se, thirteen, se])

    # Deleted: forgotten. Added: read.
    thirteen.unlink()
    assert await cache.target_for("iPhone14,5", "17.0") is None
    newer = iphone_13(tmp_path, "17.6", "21G80")
    target = await cache.target_for("iPhone14,5", "17.0")
    assert target is not None
    assert target.ipsw == newer
    assert reads[-1] == newer
    assert len(reads) == 4


async def test_a_fixed_file_is_read_again_and_a_missing_directory_recovers(tmp_path: Path) -> None:
    directory = tmp_path / "ipsw"
    cache = IpswCache(directory)
    with capture_logs() as logs:
        assert await cache.target_for("iPhone12,8", "17.0") is None
        assert await cache.target_for("iPhone12,8", "17.0") is None
    assert [e["event"] for e in logs] == ["firmware_directory_unusable"]  # once
    inventory = await cache.inventory()
    assert inventory.error is not None
    assert inventory.lines() == [f"{directory}: {inventory.error}"]

    directory.mkdir()
    broken = directory / "iPhone12,8_17.4_21E219_Restore.ipsw"
    broken.write_bytes(b"PK\x03\x04 still downloading")
    assert await cache.target_for("iPhone12,8", "17.0") is None
    iphone_se2(directory, "17.4", "21E219")  # the download finished: same name, now complete
    target = await cache.target_for("iPhone12,8", "17.0")
    assert target is not None
    assert target.ipsw == broken
    assert (await cache.inventory()).skipped == ()


async def test_inventory_lists_newest_first(tmp_path: Path) -> None:
    iphone_se2(tmp_path, "17.4", "21E219")
    ipad_9(tmp_path, "17.5.1", "21F90")
    (tmp_path / "junk.ipsw").write_bytes(b"nope")
    cache = IpswCache(tmp_path)

    inventory = await cache.inventory()

    assert [(m.version, m.build) for m in inventory.firmware] == [("17.5.1", "21F90"), ("17.4", "21E219")]
    ipad = inventory.firmware[0]
    assert ipad.product_types == ("iPad12,1", "iPad12,2")
    assert ipad.boards == ("j181ap", "j182ap")
    assert {(i.chip_id, i.board_id) for i in ipad.identities} == {(0x8030, 0x18), (0x8030, 0x1A)}
    lines = inventory.lines()
    assert lines[0].startswith("iOS 17.5.1 (21F90) iPad12,1, iPad12,2 [j181ap, j182ap] erase+update")
    assert lines[0].endswith("iPad_64bit_TouchID_ASTC_17.5.1_21F90_Restore.ipsw")
    assert lines[-1].startswith("skipped junk.ipsw: ")
