"""How many ports may run a step at once (restores share the USB bus; field reports put the
practical limit near 10 per controller). Waiting for a slot does not count against a step's timeout."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from daemon.config import WorkflowConfig


class Limits:
    def __init__(self, workflow: WorkflowConfig) -> None:
        self._slots = {
            name: asyncio.Semaphore(policy.concurrency)
            for name, policy in workflow.policy.items()
            if policy.concurrency is not None
        }

    @asynccontextmanager
    async def slot(self, step: str, waiting: Callable[[], None]) -> AsyncIterator[None]:
        semaphore = self._slots.get(step)
        if semaphore is None:
            yield
            return
        if semaphore.locked():
            waiting()
        async with semaphore:
            yield
