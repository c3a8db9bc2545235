"""Logging for operators: structlog on top of the standard library.

Readable console lines on a terminal, logfmt under systemd (journalctl stays readable and greppable),
JSON for log shippers. Every line written inside a port's task carries station, hub, port, udid and
phase, because the port runner binds them as context variables. Library loggers (aiomqtt, paho,
pymobiledevice3) go through the same pipeline. Secrets are redacted by key, whatever the caller does.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog

Format = Literal["auto", "console", "logfmt", "json"]

SECRET_KEYS = frozenset({"password", "passwd", "secret", "token", "authorization", "private_key", "key_pem"})


def redact_secrets(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in SECRET_KEYS & event.keys():
        event[key] = "***"
    return event


def _renderer(fmt: Format, stream: TextIO) -> structlog.types.Processor:
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "logfmt"
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=stream.isatty())
    if fmt == "json":
        return structlog.processors.JSONRenderer(sort_keys=False)
    return structlog.processors.LogfmtRenderer(
        key_order=["timestamp", "level", "event", "station", "hub", "port", "udid", "phase"],
        drop_missing=True,
    )


def configure_logging(level: str = "info", fmt: Format = "auto", stream: TextIO | None = None) -> None:
    """Install the pipeline on the root logger; safe to call again (tests and `demo` do)."""
    stream = stream or sys.stderr
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _renderer(fmt, stream),
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries that chat at INFO about every packet; their warnings still come through.
    for noisy in ("amqtt", "transitions", "asyncio", "pymobiledevice3", "paho"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def get_logger(name: str = "benchhub") -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
