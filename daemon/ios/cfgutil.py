"""`DeviceBackend` over Apple Configurator's command-line tool `cfgutil` (macOS stations).

cfgutil lives at `/Applications/Apple Configurator.app/Contents/MacOS/cfgutil` (Configurator can
install it into the PATH). Every operation runs it once or a few times with
`asyncio.create_subprocess_exec` (never a shell), `--format JSON`, and the device selected with
`--ecid`; each run has its own timeout, after which the process is killed. What cfgutil prints is
interpreted by the pure functions of `daemon.ios.cfgutil_output` (sources cited there and in
/work/shared/research/ios.md §3.1).

What each operation runs:

* `info`: `cfgutil --format JSON list` to find the ECID of the device with this UDID (cfgutil
  selects devices by ECID only), then `cfgutil --format JSON --ecid <ECID> get UDID ECID
  serialNumber deviceType deviceClass firmwareVersion buildVersion activationState`.
  [INFERRED] `activationState` as a `get` property name, and `in_setup_assistant` as
  "`activationState` is `Unactivated`": cfgutil shows no Setup Assistant state that was verified.
* `erase`: `cfgutil --format JSON --ecid <ECID> erase` ("Erase content and settings on devices.
  (supervised only)": the device must be supervised by the organization whose `-C`/`-K` identity
  is given, or cfgutil refuses).
* `cloud_configuration`: `cfgutil --format JSON --ecid <ECID> get cloudConfiguration`, read like
  MCInstall's `CloudConfiguration` dictionary (`daemon.ios.pmd3.cloud_config_from_details`).
  [INFERRED] The property name and that its value is that dictionary.
* `setup`: `cloud_configuration`, then `cfgutil --format JSON --ecid <ECID> prepare --dep
  [--skip-...]` (public scripts run `cfgutil prepare --dep --skip-language --skip-region`), then
  `cloud_configuration` again to verify whom it names. [INFERRED] `--dep` applies the device's ADE
  configuration from Apple, like MCInstall `DownloadAndApplyCloudConfiguration`; `prepare` also
  activates the device.
* `update`: `RestoreUnavailableError`. cfgutil has `update` and `restore` commands taking an IPSW
  (`-I <ipsw>` by recollection and one secondary source), but their JSON output and progress were not
  verified, so restores stay with the `Restorer` (docs/restores.md).

No secrets pass through here: the supervision identity is given as file paths (`-C`, `-K`), and
outputs are logged only as error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import structlog

from daemon.ios.base import (
    CloudConfig,
    DeviceError,
    DeviceGoneError,
    DeviceInfo,
    ProgressFn,
    ServiceUnavailableError,
    SetupPlan,
    UnexpectedReplyError,
    UpdateTarget,
)
from daemon.ios.cfgutil_output import (
    CfgutilAlreadyPreparedError,
    CfgutilReply,
    cfgutil_ecid,
    interpret,
    udid_to_ecid,
)
from daemon.ios.cloudconfig import cloud_config_from_details, verify_applied
from daemon.ios.pmd3 import RestoreUnavailableError

log = structlog.get_logger("benchhub.cfgutil")

DEFAULT_TIMEOUT: Final = 60.0
DEFAULT_SETUP_TIMEOUT: Final = 300.0

INFO_PROPERTIES: Final = (
    "UDID",
    "ECID",
    "serialNumber",
    "deviceType",
    "deviceClass",
    "firmwareVersion",
    "buildVersion",
    "activationState",
)

SKIP_FLAGS: Final[Mapping[str, str]] = {
    "language": "--skip-language",
    "region": "--skip-region",
    "location": "--skip-location",
    "siri": "--skip-siri",
    "passcode": "--skip-passcode",
    "appleid": "--skip-appleid",
    "restore": "--skip-restore",
    "softwareupdate": "--skip-software-update",
    "welcome": "--skip-welcome",
    "simsetup": "--skip-sim-setup",
    "privacy": "--skip-privacy",
}
"""`prepare`'s `--skip-*` flags seen in a public transcript (research §3.1), by pane name lower-cased
without `-`/`_` (so ADE's `SIMSetup` and `sim-setup` both match). Unknown panes are not passed: an
unknown flag would make cfgutil refuse the whole command."""


class CfgutilTimeoutError(ServiceUnavailableError):
    """cfgutil did not finish in time; it was killed."""

    code = "cfgutil_timeout"


def skip_flags(panes: Sequence[str]) -> tuple[list[str], list[str]]:
    """(`--skip-*` flags for the panes cfgutil knows, the panes it does not)."""
    flags: list[str] = []
    unknown: list[str] = []
    for pane in panes:
        flag = SKIP_FLAGS.get(pane.lower().replace("-", "").replace("_", ""))
        if flag is None:
            unknown.append(pane)
        elif flag not in flags:
            flags.append(flag)
    return flags, unknown


def device_info(ecid: str, values: Mapping[str, Any]) -> DeviceInfo:
    """`DeviceInfo` from `get`'s properties; `UnexpectedReplyError` naming the first missing one."""
    fields: dict[str, str] = {}
    for key in INFO_PROPERTIES:
        if key == "ECID":
            continue
        value = values.get(key)
        if not isinstance(value, str) or not value:
            raise UnexpectedReplyError(f"info: cfgutil did not report {key} as text: {value!r}")
        fields[key] = value
    activation = fields["activationState"]
    return DeviceInfo(
        udid=fields["UDID"],
        ecid=ecid,
        serial=fields["serialNumber"],
        product_type=fields["deviceType"],
        ios_version=fields["firmwareVersion"],
        build=fields["buildVersion"],
        device_class=fields["deviceClass"],
        activation_state=activation,
        in_setup_assistant=activation == "Unactivated",
    )


class CfgutilBackend:
    """`DeviceBackend` for devices attached to a Mac with Apple Configurator's automation tools.

    `executable`: the program, or an argv prefix (tests pass `[sys.executable, "-m",
    "daemon.sim.cfgutil_fake"]`). `certificate` / `private_key`: the supervising organization's
    DER files (`-C` / `-K`), needed by supervised-only commands such as `erase`. `timeout` bounds
    each run, `setup_timeout` the `prepare` run (the device downloads from Apple). `detect_timeout`:
    cfgutil's own `--timeout` for detecting attached devices (None: cfgutil's default).
    `env`: the environment of the process (None: the daemon's).
    """

    def __init__(
        self,
        executable: str | Sequence[str] = "cfgutil",
        *,
        certificate: Path | None = None,
        private_key: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        setup_timeout: float = DEFAULT_SETUP_TIMEOUT,
        detect_timeout: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv_prefix: tuple[str, ...] = (
            (executable,) if isinstance(executable, str) else tuple(executable)
        )
        if not self.argv_prefix:
            raise ValueError("cfgutil executable must not be empty")
        self.certificate = certificate
        self.private_key = private_key
        self.timeout = timeout
        self.setup_timeout = setup_timeout
        self.detect_timeout = detect_timeout
        self.env = dict(env) if env is not None else None

    # -- DeviceBackend -----------------------------------------------------------------------------------

    async def info(self, udid: str) -> DeviceInfo:
        ecid = await self.ecid_of(udid)
        reply = await self._run(["get", *INFO_PROPERTIES], operation=f"info on {udid}", ecid=ecid)
        values = reply.for_device(ecid, f"info on {udid}")
        info = device_info(ecid, values)
        if info.udid.casefold() != udid.casefold():
            raise UnexpectedReplyError(f"info on {udid}: cfgutil reported UDID {info.udid} for ECID {ecid}")
        return info

    async def update(self, udid: str, target: UpdateTarget, *, erase: bool, progress: ProgressFn) -> None:
        raise RestoreUnavailableError(
            f"update of {udid} to iOS {target.version}: the cfgutil backend does not restore"
            " (cfgutil update/restore are not verified); use the Restorer"
        )

    async def restore_from_recovery(
        self, ecid: str, target: UpdateTarget, *, erase: bool, progress: ProgressFn
    ) -> None:
        """Refused like `update`: a device left in Recovery needs a restore, which this backend does
        not do; the port goes to `needs_attention` with this message."""
        raise RestoreUnavailableError(
            f"restore of ECID {ecid} (in Recovery) to iOS {target.version}: the cfgutil backend does"
            " not restore; restore the device with Apple Configurator or Finder, then retry"
        )

    async def erase(self, udid: str) -> None:
        ecid = await self.ecid_of(udid)
        reply = await self._run(["erase"], operation=f"erase on {udid}", ecid=ecid)
        if ecid in reply.errors:
            reply.for_device(ecid, f"erase on {udid}")
        log.info("erase_acknowledged", udid=udid, ecid=ecid)

    async def cloud_configuration(self, udid: str) -> CloudConfig | None:
        ecid = await self.ecid_of(udid)
        return await self._cloud_configuration(udid, ecid)

    async def setup(self, udid: str, plan: SetupPlan, progress: ProgressFn) -> None:
        ecid = await self.ecid_of(udid)
        flags, unknown = skip_flags(plan.skip_panes)
        if unknown:
            log.warning("setup_skip_panes_ignored", udid=udid, panes=unknown)
        progress(None, "reading the cloud configuration")
        before = await self._cloud_configuration(udid, ecid)
        if before.applied:
            raise CfgutilAlreadyPreparedError(
                f"setup on {udid}: the device already has a cloud configuration"
                f" ({before.organization or '?'}, {before.configuration_url or 'no MDM URL'});"
                " it applies once per erase"
            )
        progress(None, "cfgutil prepare --dep: the device is fetching its cloud configuration")
        reply = await self._run(
            ["prepare", "--dep", *flags],
            operation=f"setup on {udid}",
            ecid=ecid,
            limit=self.setup_timeout,
        )
        if ecid in reply.errors:
            reply.for_device(ecid, f"setup on {udid}")
        after = await self._cloud_configuration(udid, ecid)
        verify_applied(after, plan, f"setup on {udid}", "cfgutil prepare --dep succeeded")
        progress(100, f"managed by {after.organization or '?'} ({after.configuration_url})")
        log.info("cloud_configuration_applied", udid=udid, ecid=ecid, url=after.configuration_url)

    # -- beyond DeviceBackend ----------------------------------------------------------------------------

    async def list_devices(self) -> CfgutilReply:
        """`cfgutil --format JSON list`: the attached devices, keyed by ECID."""
        return await self._run(["list"], operation="list")

    async def ecid_of(self, udid: str) -> str:
        """The ECID of the attached device with this UDID; `DeviceGoneError` if none has it."""
        ecid = udid_to_ecid(await self.list_devices(), udid)
        if ecid is None:
            raise DeviceGoneError(f"{udid}: no device with this UDID is attached (cfgutil list)")
        return ecid

    # -- plumbing ----------------------------------------------------------------------------------------

    async def _cloud_configuration(self, udid: str, ecid: str) -> CloudConfig:
        operation = f"cloud_configuration on {udid}"
        reply = await self._run(["get", "cloudConfiguration"], operation=operation, ecid=ecid)
        values = reply.for_device(ecid, operation)
        try:
            return cloud_config_from_details(values.get("cloudConfiguration"))
        except UnexpectedReplyError as exc:
            raise UnexpectedReplyError(f"{operation}: {exc.message}") from exc

    def _argv(self, args: Sequence[str], ecid: str | None) -> list[str]:
        argv = [*self.argv_prefix, "--format", "JSON"]
        if self.certificate is not None:
            argv += ["-C", str(self.certificate)]
        if self.private_key is not None:
            argv += ["-K", str(self.private_key)]
        if self.detect_timeout is not None:
            argv += ["--timeout", f"{self.detect_timeout:g}"]
        if ecid is not None:
            argv += ["--ecid", cfgutil_ecid(ecid)]
        return argv + list(args)

    async def _run(
        self,
        args: Sequence[str],
        *,
        operation: str,
        ecid: str | None = None,
        limit: float | None = None,
    ) -> CfgutilReply:
        """Run cfgutil once and interpret its output; killed (and reaped) on timeout or cancellation."""
        argv = self._argv(args, ecid)
        limit = self.timeout if limit is None else limit
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.env,
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            raise ServiceUnavailableError(
                f"{operation}: cfgutil is not available ({self.argv_prefix[0]}: {exc.strerror or exc});"
                " install Apple Configurator's automation tools"
            ) from exc
        except OSError as exc:
            raise ServiceUnavailableError(f"{operation}: cannot start cfgutil: {exc}") from exc
        try:
            async with asyncio.timeout(limit):
                stdout, stderr = await process.communicate()
        except TimeoutError as exc:
            raise CfgutilTimeoutError(
                f"{operation}: cfgutil {args[0] if args else ''} did not finish in {limit:g} s; killed"
            ) from exc
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                with contextlib.suppress(Exception):
                    await asyncio.shield(process.wait())
        returncode = process.returncode if process.returncode is not None else -1
        try:
            return interpret(returncode, stdout, stderr, operation)
        except DeviceError as exc:
            log.info("cfgutil_failed", op=operation, code=exc.code, returncode=returncode, error=exc.message)
            raise
