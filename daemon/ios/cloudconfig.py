"""What a device's cloud configuration says, and whether setup left the one it should.

Shared by the device backends (pymobiledevice3's MCInstall, Apple Configurator's cfgutil): both read
the same `CloudConfiguration` dictionary and must hold the result of a setup to the same rules.
"""

from __future__ import annotations

from collections.abc import Mapping

from daemon.ios.base import CloudConfig, SetupPlan, UnexpectedReplyError


class MdmUrlMismatchError(UnexpectedReplyError):
    """The applied cloud configuration names another MDM server than the plan expects. It is on the
    device now (until the next erase), so a person has to decide."""

    code = "mdm_url_mismatch"
    retryable = False


def cloud_config_from_details(details: object) -> CloudConfig:
    """`CloudConfig` from MCInstall's `CloudConfiguration` (None: the device has none).

    `applied` means the device holds an applied ADE/cloud configuration: `ConfigurationWasApplied`, or
    a configuration naming an MDM server (`ConfigurationURL` / `ConfigurationWebURL`), which is what
    `DownloadAndApplyCloudConfiguration` stores. [INFERRED: the exact keys a real device keeps after
    `DownloadAndApplyCloudConfiguration` are not verified.]
    """
    if details is None:
        return CloudConfig(applied=False)
    if not isinstance(details, Mapping):
        raise UnexpectedReplyError(f"MCInstall CloudConfiguration is not a dictionary: {details!r}")
    url = details.get("ConfigurationURL")
    web_url = details.get("ConfigurationWebURL")
    organization = details.get("OrganizationName")
    unremovable = details.get("IsMDMUnremovable", False)
    was_applied = details.get("ConfigurationWasApplied", False)
    for key, value, kind in (
        ("ConfigurationURL", url, str),
        ("ConfigurationWebURL", web_url, str),
        ("OrganizationName", organization, str),
        ("IsMDMUnremovable", unremovable, bool),
        ("ConfigurationWasApplied", was_applied, bool),
    ):
        if value is not None and not isinstance(value, kind):
            raise UnexpectedReplyError(
                f"MCInstall CloudConfiguration {key} is not a {kind.__name__}: {value!r}"
            )
    return CloudConfig(
        applied=bool(was_applied) or url is not None or web_url is not None,
        configuration_url=url if isinstance(url, str) else web_url if isinstance(web_url, str) else None,
        organization=organization if isinstance(organization, str) else None,
        is_mdm_unremovable=bool(unremovable),
    )


def verify_applied(after: CloudConfig, plan: SetupPlan, where: str, what_ran: str) -> None:
    """After a setup: a cloud configuration is applied, and it names the MDM the plan expects."""
    if not after.applied:
        raise UnexpectedReplyError(
            f"{where}: {what_ran} but the device reports no applied cloud configuration"
        )
    if plan.expected_mdm_url is not None and after.configuration_url != plan.expected_mdm_url:
        raise MdmUrlMismatchError(
            f"{where}: the applied cloud configuration names {after.configuration_url!r},"
            f" expected {plan.expected_mdm_url!r} (it stays on the device until the next erase)"
        )
