"""Restores in worker processes: the `Restorer` interface and `ProcessRestorer`, its one transport.

Why a process (docs/restores.md has the long version): pymobiledevice3's Recovery/DFU layer is
synchronous pyusb code that busy-waits (`IRecv._find` spins without sleeping, with a default timeout
of 136 years), a restore takes a quarter of an hour, needs Apple's signing server and can wedge in a
USB call. None of that may touch the daemon's event loop, and a wedged restore must be killable
without killing the daemon. So each restore is `python -m daemon.ios.restore_worker --ecid ...
--ipsw ...` in a session of its own; it reports as JSON lines (`daemon.ios.restore_protocol`), and
cancellation or a timeout kills its whole process group (the worker, pyusb's threads, any child).

The device is named by ECID: the UDID and the usbmuxd DeviceID change or vanish between normal,
Recovery and restore mode; the ECID is the one identity every mode reports. At most one restore per
ECID runs at a time: two workers driving one device would each undo the other.

What the update step learns (`RestoreOutcome`): ok, or a stable `RestoreCode`, plus `touched`:
whether the worker had started changing the device. `interrupted` (failed after touching) means "the
effect is unknown, look at the device before doing anything"; a failure without `touched` happened
before anything was sent to the device and may simply be retried.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import structlog

from daemon.ios.base import DeviceError, DeviceMode, ProgressFn, transfer_listener
from daemon.ios.restore_protocol import (
    RETRYABLE,
    EventDecoder,
    Garbage,
    LogEvent,
    ModeEvent,
    ProgressEvent,
    RestoreCode,
    RestoreEvent,
    ResultEvent,
    TailBuffer,
    TouchEvent,
)
from daemon.usb.apple import AppleUsbError, format_ecid, parse_ecid

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_WORKER",
    "EventFn",
    "LogEvent",
    "ModeEvent",
    "ProcessRestorer",
    "ProgressEvent",
    "RestoreBusyError",
    "RestoreCode",
    "RestoreError",
    "RestoreEvent",
    "RestoreOutcome",
    "RestoreRequest",
    "Restorer",
    "ResultEvent",
    "TouchEvent",
    "normalize_ecid",
]

log = structlog.get_logger("benchhub.restore")

DEFAULT_WORKER: Final = (sys.executable, "-m", "daemon.ios.restore_worker")
"""The real worker (pymobiledevice3). Tests and the simulated bench pass `daemon.sim.restore_worker`."""

DEFAULT_TIMEOUT: Final = 45 * 60.0
"""A restore from a cached IPSW over USB 2 takes about 15 minutes; research/ios.md budgets 30-45."""

EventFn = Callable[[RestoreEvent], None]

_MODE_WORDS: Final = {
    DeviceMode.NORMAL: "device in normal mode",
    DeviceMode.RECOVERY: "device in Recovery mode",
    DeviceMode.DFU: "device in DFU mode",
    DeviceMode.RESTORE: "device in restore mode",
}


def normalize_ecid(ecid: str) -> str:
    """The daemon's spelling of an ECID (`DeviceIdentity.ecid`); ValueError if it is not one."""
    try:
        return format_ecid(parse_ecid(ecid))
    except AppleUsbError as exc:
        raise ValueError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class RestoreRequest:
    """One restore. `ecid` is normalised to the daemon's spelling (16 upper-case hex digits), so
    `0x1C604A3405801E` and `001C604A3405801E` are the same device (and the same lock). `erase`
    selects Apple's "Erase Install" instead of "Upgrade Install". `udid`, where known, spares the
    worker opening lockdown on every device whose legacy UDID carries no ECID (a device in Recovery
    has none: `recovery`). `timeout` overrides the restorer's default."""

    ecid: str
    ipsw: Path
    erase: bool = False
    udid: str | None = None
    timeout: float | None = None
    pair_records: Path | None = None
    """The station's pair record directory: the worker pairs (and looks for records) there, never in
    a home folder."""
    recovery: bool = False
    """The device is already in Recovery (a restore that failed part-way left it there): the worker
    looks for it on USB only, by ECID, and never opens lockdown on the bench's normal-mode devices
    (which, without a UDID to go by, it would otherwise probe one by one)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ecid", normalize_ecid(self.ecid))

    def worker_args(self) -> list[str]:
        args = ["--ecid", self.ecid, "--ipsw", str(self.ipsw)]
        if self.erase:
            args.append("--erase")
        if self.udid:
            args += ["--udid", self.udid]
        if self.pair_records is not None:
            args += ["--pair-records", str(self.pair_records)]
        if self.recovery:
            args.append("--recovery")
        return args


@dataclass(frozen=True, slots=True)
class RestoreOutcome:
    """How one restore ended. `touched`: the worker had announced it was changing the device (see
    `TouchEvent`); `modes`: the USB modes it reported, in order; `last_step`: the last progress step
    (where an interrupted restore stopped); `stderr_tail`: the end of the worker's stderr."""

    ecid: str
    ok: bool
    code: RestoreCode | None
    message: str
    touched: bool
    modes: tuple[DeviceMode, ...] = ()
    last_step: str | None = None
    returncode: int | None = None
    pid: int | None = None
    """The worker's pid, which is also its process group id."""
    stderr_tail: str = ""
    garbage_lines: int = 0
    duration: float = 0.0

    @property
    def interrupted(self) -> bool:
        """Failed after the device was touched: its state is unknown (still in Recovery, partly
        restored, or even done). The update step must look (`check()`) before acting again."""
        return not self.ok and self.touched

    @property
    def failed_cleanly(self) -> bool:
        """Failed before anything was sent to the device: it is as it was, a retry is a first try."""
        return not self.ok and not self.touched

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE

    def raise_for_error(self) -> None:
        if not self.ok:
            raise RestoreError(self)


class RestoreError(DeviceError):
    """A restore did not succeed, as a `DeviceError` the runner already knows how to classify:
    `code` is the outcome's code (so `device_gone` makes the runner wait for the device), `retryable`
    follows `RETRYABLE`. `touched`/`outcome` tell the update step whether the device may have
    changed."""

    def __init__(self, outcome: RestoreOutcome) -> None:
        code = outcome.code or RestoreCode.RESTORE_FAILED
        state = "device state unknown" if outcome.touched else "device untouched"
        super().__init__(f"restore {code.value} ({state}): {outcome.message}")
        self.code = code.value
        self.retryable = outcome.retryable
        self.touched = outcome.touched
        self.outcome = outcome


class RestoreBusyError(DeviceError):
    """A restore for this ECID is already running (or its worker is still being killed)."""

    code = "restore_busy"


class Restorer(Protocol):
    async def restore(
        self, request: RestoreRequest, progress: ProgressFn, *, on_event: EventFn | None = None
    ) -> RestoreOutcome:
        """Run one restore to its end and say how it ended; failures are outcomes, not exceptions.

        Raises `RestoreBusyError` (before starting) if this ECID is being restored already. On
        cancellation the worker is killed and reaped first, then `CancelledError` propagates; the
        outcome (code `cancelled`) is still recorded. `progress(percent, step)` gets each step's
        percent and name, and the mode changes; `on_event` gets every event, for whoever wants
        more."""
        ...


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Signal the worker's process group; False if nothing is left in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Only possible if the group id was reused by a process we do not own, i.e. ours is gone.
        return False
    return True


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "an unknown status"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


class _WorkerProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's own stream protocol plus an event for "the worker process has exited". asyncio's
    `Process.wait()` also waits for the pipes to close, which a surviving child holding stdout would
    delay forever; the exit itself is what decides that it is time to clean up."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited = asyncio.Event()

    def process_exited(self) -> None:
        super().process_exited()
        self.exited.set()


class _Run:
    """One worker process: start, read its events, kill it, and say how it ended."""

    def __init__(
        self,
        request: RestoreRequest,
        progress: ProgressFn,
        on_event: EventFn | None,
        stderr_limit: int,
    ) -> None:
        self.request = request
        self.progress = progress
        self.transfer_done = transfer_listener()
        self.imaging = False
        """In pymobiledevice3's `RESTORE_IMAGE` operation (the filesystem crossing USB, via ASR): the
        next operation means the bulk transfer is over."""
        self.on_event = on_event
        self.log = log.bind(ecid=request.ecid)
        self.decoder = EventDecoder()
        self.tail = TailBuffer(stderr_limit)
        self.started = time.monotonic()
        self.touched = False
        self.modes: list[DeviceMode] = []
        self.last_step: str | None = None
        self.result: ResultEvent | None = None
        self.got_result = asyncio.Event()
        self.garbage = 0
        self.transport: asyncio.SubprocessTransport | None = None
        self.protocol: _WorkerProtocol | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.readers: list[asyncio.Task[None]] = []
        self.start_error: str | None = None
        self.stopping: str | None = None
        """Set when the restorer itself ends the worker (daemon shutdown): the reason."""
        self.callback_failures = 0

    # ------------------------------------------------------------------ process

    async def start(self, argv: Sequence[str], env: Mapping[str, str] | None) -> bool:
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _WorkerProtocol(limit=2**16, loop=loop),
                *argv,
                stdin=asyncio.subprocess.PIPE,  # held open: the worker dies when we do (watch_parent)
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group: one killpg takes everything
                env=dict(env) if env is not None else None,
            )
        except OSError as exc:
            self.start_error = f"cannot start the restore worker {argv[0]!r}: {exc}"
            return False
        self.transport, self.protocol = transport, protocol
        self.proc = asyncio.subprocess.Process(transport, protocol, loop)
        self.log = self.log.bind(pid=self.proc.pid)
        self.log.info("restore_started", ipsw=str(self.request.ipsw), erase=self.request.erase)
        self.readers = [
            asyncio.create_task(self._read_stdout(), name=f"restore-stdout-{self.request.ecid}"),
            asyncio.create_task(self._read_stderr(), name=f"restore-stderr-{self.request.ecid}"),
        ]
        return True

    @property
    def pgid(self) -> int:
        assert self.proc is not None
        return self.proc.pid  # session leader: its pid is the group id

    async def wait_end(self, within: float | None) -> bool:
        """Until the worker exits or delivers its result: True, or False if `within` ran out."""
        assert self.protocol is not None
        waits = [
            asyncio.create_task(self.protocol.exited.wait()),
            asyncio.create_task(self.got_result.wait()),
        ]
        try:
            done, _pending = await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        return bool(done)

    async def wait_exit(self, within: float | None) -> bool:
        """True once the worker has exited, False if `within` seconds ran out first."""
        assert self.protocol is not None
        try:
            async with asyncio.timeout(within):
                await self.protocol.exited.wait()
        except TimeoutError:
            return False
        return True

    async def terminate(self, grace: float, kill_wait: float) -> None:
        """SIGTERM to the group, `grace` seconds to go, then SIGKILL to the group. Idempotent."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.log.info("restore_terminating", grace=grace)
        _signal_group(self.pgid, signal.SIGTERM)
        if await self.wait_exit(grace):
            return
        self.log.warning("restore_killing")
        _signal_group(self.pgid, signal.SIGKILL)
        if not await self.wait_exit(kill_wait):
            # Stuck in uninterruptible USB I/O: it dies when the kernel lets it, and asyncio's child
            # watcher reaps it then. Nothing more we can do from here.
            self.log.error("restore_worker_unkillable", waited=kill_wait)

    async def finish(self, drain: float) -> None:
        """After the worker exited: kill anything left in its group, read what it wrote before it
        died (a `touch` or a result may still be in the pipe), close the pipes."""
        if self.proc is not None:
            _signal_group(self.pgid, signal.SIGKILL)  # stragglers only; the worker itself is gone
        if self.readers:
            _done, pending = await asyncio.wait(self.readers, timeout=drain)
            for task in pending:
                # Something outside the group (a grandchild that called setsid) holds the pipe.
                self.log.warning("restore_pipe_held_open", reader=task.get_name())
                task.cancel()
            await asyncio.gather(*self.readers, return_exceptions=True)
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ streams

    async def _read_stdout(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(65536):
            for item in self.decoder.feed(chunk):
                self._handle(item)
        for item in self.decoder.finish():
            self._handle(item)

    async def _read_stderr(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self.tail.append(chunk)

    def _handle(self, item: RestoreEvent | Garbage) -> None:
        match item:
            case Garbage(line, reason):
                self.garbage += 1
                self.log.warning("restore_worker_garbage", reason=reason, line=line)
                return
            case ProgressEvent(step, operation, percent):
                self.last_step = step
                if operation == "RESTORE_IMAGE":
                    self.imaging = True
                elif self.imaging and operation is not None:
                    self.imaging = False
                    self.transfer_done()
                self._progress(percent, step)
            case ModeEvent(mode):
                self.modes.append(mode)
                self.log.info("restore_mode", mode=mode.value)
                self._progress(None, _MODE_WORDS[mode])
            case LogEvent(level, message):
                # The worker's chatter goes to debug; its warnings and errors are worth a line.
                method = self.log.debug if level in ("debug", "info") else getattr(self.log, level)
                method("restore_worker_log", message=message, worker_level=level)
            case TouchEvent(what):
                self.touched = True
                self.log.info("restore_touching_device", what=what)
            case ResultEvent():
                if self.result is not None:
                    self.log.warning("restore_worker_second_result", ok=item.ok, code=item.code)
                    return
                self.result = item
                self.got_result.set()
        if self.on_event is not None:
            try:
                self.on_event(item)
            except Exception:
                self._callback_failed("on_event")

    def _progress(self, percent: int | None, detail: str | None) -> None:
        """A broken progress display must not break a restore."""
        try:
            self.progress(percent, detail)
        except Exception:
            self._callback_failed("progress")

    def _callback_failed(self, which: str) -> None:
        """Logged with its traceback once per restore; a callback that fails on every event would
        otherwise bury the log in identical tracebacks."""
        self.callback_failures += 1
        if self.callback_failures == 1:
            self.log.exception("restore_callback_failed", callback=which)

    # ------------------------------------------------------------------ verdict

    def outcome(self, forced: RestoreCode | None = None, forced_message: str = "") -> RestoreOutcome:
        """The worker's own result wins (it may have finished just as the timeout struck); else the
        restorer's verdict (`timeout`, `cancelled`); else the worker died without a word."""
        returncode = self.proc.returncode if self.proc is not None else None
        ok, code, message = False, forced, forced_message
        if self.result is not None:
            ok, code, message = self.result.ok, self.result.code, self.result.message
        elif self.start_error is not None:
            code, message = RestoreCode.WORKER_CRASHED, self.start_error
        elif forced is None:
            code = RestoreCode.WORKER_CRASHED
            message = f"the restore worker ended with {_describe_exit(returncode)} and no result"
            if last := self.tail.last_lines():
                message += f": {last}"
        return RestoreOutcome(
            ecid=self.request.ecid,
            ok=ok,
            code=None if ok else code,
            message=message,
            touched=self.touched,
            modes=tuple(self.modes),
            last_step=self.last_step,
            returncode=returncode,
            pid=self.proc.pid if self.proc is not None else None,
            stderr_tail=self.tail.text(),
            garbage_lines=self.garbage,
            duration=time.monotonic() - self.started,
        )


class ProcessRestorer:
    """`Restorer` running each restore as `worker + request args` in a new session.

    `worker` is the argv prefix (default: the pymobiledevice3 worker under this interpreter);
    `timeout` bounds a whole restore (None: no limit of our own, the step's timeout then cancels
    us); `grace` is how long SIGTERM has before SIGKILL; `linger` is how long a worker may take to
    exit after its result; `env` replaces the environment (tests point `USBMUXD_SOCKET_ADDRESS`
    somewhere harmless)."""

    def __init__(
        self,
        worker: Sequence[str] = DEFAULT_WORKER,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        grace: float = 5.0,
        kill_wait: float = 10.0,
        drain: float = 2.0,
        linger: float = 10.0,
        env: Mapping[str, str] | None = None,
        stderr_limit: int = 16 * 1024,
    ) -> None:
        if not worker:
            raise ValueError("the worker command is empty")
        self.worker = tuple(worker)
        self.timeout = timeout
        self.grace = grace
        self.kill_wait = kill_wait
        self.drain = drain
        self.linger = linger
        self.env = env
        self.stderr_limit = stderr_limit
        self._active: dict[str, _Run] = {}
        self._last: dict[str, RestoreOutcome] = {}
        self._cleanups: set[asyncio.Task[None]] = set()

    def busy(self, ecid: str) -> bool:
        return normalize_ecid(ecid) in self._active

    def last_outcome(self, ecid: str) -> RestoreOutcome | None:
        """How the last restore of this device ended, including a cancelled one (whose caller only
        saw `CancelledError`): where it stopped and whether it had touched the device."""
        return self._last.get(normalize_ecid(ecid))

    async def restore(
        self, request: RestoreRequest, progress: ProgressFn, *, on_event: EventFn | None = None
    ) -> RestoreOutcome:
        ecid = request.ecid
        if ecid in self._active:
            raise RestoreBusyError(f"a restore of ECID {ecid} is already running")
        run = _Run(request, progress, on_event, self.stderr_limit)
        self._active[ecid] = run
        release = True
        try:
            if not await run.start([*self.worker, *request.worker_args()], self.env):
                return self._record(run, run.outcome())
            timeout = request.timeout if request.timeout is not None else self.timeout
            forced: RestoreCode | None = None
            message = ""
            if not await run.wait_end(timeout):
                forced, message = RestoreCode.TIMEOUT, f"the restore took longer than {timeout:g} s"
                run.log.warning("restore_timeout", timeout=timeout, last_step=run.last_step)
                await run.terminate(self.grace, self.kill_wait)
            elif not await run.wait_exit(self.linger):
                # The result is the worker's final word; a worker stuck in its teardown (a thread
                # pyusb or an executor left behind) must not hold the device's slot until the timeout.
                run.log.warning("restore_worker_lingering", linger=self.linger)
                await run.terminate(self.grace, self.kill_wait)
            if run.stopping is not None:
                forced, message = RestoreCode.CANCELLED, run.stopping
            await run.finish(self.drain)
            return self._record(run, run.outcome(forced, message))
        except asyncio.CancelledError:
            # Kill and reap in a task of its own: a second cancellation of ours must not leave the
            # worker running, and the ECID stays locked until the process is really gone.
            release = False
            cleanup = asyncio.create_task(self._cancelled(run), name=f"restore-kill-{ecid}")
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)
            await asyncio.shield(cleanup)
            raise
        finally:
            if release:
                self._active.pop(ecid, None)

    async def _cancelled(self, run: _Run) -> None:
        try:
            await run.terminate(self.grace, self.kill_wait)
            await run.finish(self.drain)
            self._record(run, run.outcome(RestoreCode.CANCELLED, "the restore was cancelled"))
        finally:
            self._active.pop(run.request.ecid, None)

    def _record(self, run: _Run, outcome: RestoreOutcome) -> RestoreOutcome:
        self._last[outcome.ecid] = outcome
        fields = {
            "ok": outcome.ok,
            "code": outcome.code,
            "touched": outcome.touched,
            "last_step": outcome.last_step,
            "returncode": outcome.returncode,
            "duration": round(outcome.duration, 2),
        }
        if outcome.garbage_lines:
            fields["garbage_lines"] = outcome.garbage_lines
        if outcome.ok:
            run.log.info("restore_finished", **fields)
        else:
            run.log.warning("restore_finished", message=outcome.message, **fields)
            if outcome.stderr_tail and outcome.code is RestoreCode.WORKER_CRASHED:
                run.log.warning("restore_worker_stderr", tail=outcome.stderr_tail[-4000:])
        return outcome

    async def aclose(self) -> None:
        """Daemon shutdown: kill every running worker and wait until each is gone. Their `restore()`
        calls return `cancelled` outcomes (or their callers were cancelled already)."""
        runs = list(self._active.values())
        for run in runs:
            run.stopping = "the daemon is stopping"
        await asyncio.gather(*(run.terminate(self.grace, self.kill_wait) for run in runs))
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
