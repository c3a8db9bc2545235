"""Restores in worker processes: the JSON-line protocol (sans-IO), the real worker's pure parts and
its no-device path, and `ProcessRestorer` against real fake-worker processes (pipes, signals,
process groups)."""

from __future__ import annotations

import asyncio
import os
import plistlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import requests
import usb.core
from ipsw_parser.exceptions import NoSuchBuildIdentityError  # type: ignore[import-untyped]
from pymobiledevice3.exceptions import (
    ConnectionFailedError,
    ConnectionFailedToUsbmuxdError,
    IRecvNoDeviceConnectedError,
    TSSError,
)

from daemon.ios import restore_worker
from daemon.ios.base import DeviceMode
from daemon.ios.restore import (
    DEFAULT_WORKER,
    ProcessRestorer,
    RestoreBusyError,
    RestoreError,
    RestoreOutcome,
    RestoreRequest,
)
from daemon.ios.restore_protocol import (
    MAX_LINE,
    EventDecoder,
    Garbage,
    LogEvent,
    ModeEvent,
    ProgressEvent,
    ProtocolError,
    RestoreCode,
    RestoreEvent,
    ResultEvent,
    TailBuffer,
    TouchEvent,
    decode,
    encode,
)
from daemon.ios.restore_worker import (
    WorkerFailure,
    classify_exception,
    find_device,
    match_recovery_device,
    progress_from_restored,
    status_failure,
)
from daemon.sim import restore_worker as fake
from daemon.sim.devices import make_device
from daemon.sim.usbmuxd import FakeUsbmuxd

ECID = "001C604A3405801E"
OTHER = "00000000DEADBEEF"
FAKE = (sys.executable, "-m", "daemon.sim.restore_worker", "--speed", "20000")
"""A whole fake restore takes 900 s / 20000, about 45 ms, plus interpreter start."""


# ---------------------------------------------------------------------------------------- helpers


class Recorder:
    """A `ProgressFn` and an `on_event` that remember everything, plus waiting for an event."""

    def __init__(self) -> None:
        self.progress: list[tuple[int | None, str | None]] = []
        self.events: list[RestoreEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, percent: int | None, detail: str | None) -> None:
        self.progress.append((percent, detail))

    def on_event(self, event: RestoreEvent) -> None:
        self.events.append(event)
        self._changed.set()

    async def until(self, predicate: Callable[[RestoreEvent], bool], within: float = 5.0) -> RestoreEvent:
        async with asyncio.timeout(within):
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                self._changed.clear()
                await self._changed.wait()

    def steps(self) -> list[str]:
        """Step names in order, consecutive repeats folded, mode words left out."""
        out: list[str] = []
        for _percent, detail in self.progress:
            if detail and not detail.startswith("device in") and (not out or out[-1] != detail):
                out.append(detail)
        return out

    def child_pid(self) -> int:
        for event in self.events:
            if isinstance(event, LogEvent) and event.message.startswith("child pid "):
                return int(event.message.split()[-1])
        raise AssertionError("the fake worker reported no child")


def group_gone(pgid: int) -> bool:
    """Nothing left in the worker's process group, and the worker itself reaped (no zombie)."""
    try:
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass  # reaped already, as it should be
    else:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def running(pid: int) -> bool:
    """Alive and not a zombie. (Orphans are reparented to PID 1, which in some containers never reaps
    them; a zombie is dead for every purpose here.)"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def dies(pid: int, within: float = 2.0) -> bool:
    """SIGKILL is delivered asynchronously: a killed process may still show as running for a moment
    after its pipes closed."""
    deadline = time.monotonic() + within
    while running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def restorer(*extra: str, grace: float = 0.5, linger: float = 10.0) -> ProcessRestorer:
    return ProcessRestorer([*FAKE, *extra], timeout=20.0, grace=grace, kill_wait=5.0, linger=linger)


def request(ecid: str = ECID, *, erase: bool = False, timeout: float | None = None) -> RestoreRequest:
    return RestoreRequest(
        ecid, Path("/var/cache/benchhub/ipsw/iPhone_17.5_21F79_Restore.ipsw"), erase, None, timeout
    )


@pytest.fixture
def fake_ipsw(tmp_path: Path) -> Path:
    """An extracted IPSW with nothing but a BuildManifest: enough for the worker to open it."""
    folder = tmp_path / "ipsw"
    folder.mkdir()
    manifest = {
        "BuildIdentities": [],
        "ProductVersion": "17.5",
        "ProductBuildVersion": "21F79",
        "SupportedProductTypes": ["iPhone14,2"],
    }
    (folder / "BuildManifest.plist").write_bytes(plistlib.dumps(manifest))
    return folder


# ---------------------------------------------------------------------------------------- protocol

EXAMPLES: list[tuple[RestoreEvent, bytes]] = [
    (
        ProgressEvent("Flashing firmware", "FLASH_FIRMWARE", 40),
        b'{"v":1,"event":"progress","step":"Flashing firmware","operation":"FLASH_FIRMWARE","percent":40}\n',
    ),
    (
        ProgressEvent("Entering Recovery mode"),
        b'{"v":1,"event":"progress","step":"Entering Recovery mode","operation":null,"percent":null}\n',
    ),
    (ModeEvent(DeviceMode.RECOVERY), b'{"v":1,"event":"mode","mode":"recovery"}\n'),
    (
        LogEvent("warning", "iBoot says hi"),
        b'{"v":1,"event":"log","level":"warning","message":"iBoot says hi"}\n',
    ),
    (TouchEvent("enter_recovery"), b'{"v":1,"event":"touch","what":"enter_recovery"}\n'),
    (ResultEvent(True), b'{"v":1,"event":"result","ok":true}\n'),
    (
        ResultEvent(False, RestoreCode.TSS_UNREACHABLE, "gs.apple.com: timed out"),
        b'{"v":1,"event":"result","ok":false,"code":"tss_unreachable","message":"gs.apple.com: timed out"}\n',
    ),
]


@pytest.mark.parametrize(("event", "line"), EXAMPLES)
def test_events_encode_to_one_line_and_back(event: RestoreEvent, line: bytes) -> None:
    assert encode(event) == line
    assert decode(line) == event
    assert decode(line.decode().strip()) == event


def test_encoding_escapes_newlines_and_clips_long_messages() -> None:
    line = encode(LogEvent("info", "two\nlines " + "x" * 10_000))
    assert line.count(b"\n") == 1
    event = decode(line)
    assert isinstance(event, LogEvent)
    assert event.message.startswith("two\nlines ")
    assert len(event.message) == 4000


@pytest.mark.parametrize(
    "line",
    [
        b"plain text",
        b"[1, 2]",
        b'{"event":"progress","step":"no version"}',
        b'{"v":2,"event":"progress","step":"newer"}',
        b'{"v":1,"event":"teleport"}',
        b'{"v":1,"event":"progress"}',
        b'{"v":1,"event":"progress","step":"x","percent":101}',
        b'{"v":1,"event":"progress","step":"x","percent":true}',
        b'{"v":1,"event":"progress","step":"x","percent":12.5}',
        b'{"v":1,"event":"progress","step":"x","percent":NaN}',
        b'{"v":1,"event":"mode","mode":"sleeping"}',
        b'{"v":1,"event":"log","level":"shout","message":"x"}',
        b'{"v":1,"event":"result","ok":"yes"}',
        b'{"v":1,"event":"result","ok":false}',
        b'{"v":1,"event":"result","ok":false,"code":"timeout","message":"only the restorer says that"}',
        b"\xff\xfe",
    ],
)
def test_what_is_not_an_event_is_refused(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(line)


def test_an_unknown_error_code_from_a_newer_worker_is_still_a_failure() -> None:
    event = decode(b'{"v":1,"event":"result","ok":false,"code":"battery_low","message":"charge it"}')
    assert event == ResultEvent(False, RestoreCode.RESTORE_FAILED, "[battery_low] charge it")


def test_a_result_has_a_code_exactly_when_it_failed() -> None:
    with pytest.raises(ValueError, match="code"):
        ResultEvent(True, RestoreCode.TIMEOUT)
    with pytest.raises(ValueError, match="code"):
        ResultEvent(False)


def test_decoder_is_indifferent_to_chunking() -> None:
    stream = b"".join(line for _event, line in EXAMPLES)
    whole = EventDecoder().feed(stream)
    decoder = EventDecoder()
    bytewise = [item for i in range(len(stream)) for item in decoder.feed(stream[i : i + 1])]
    assert whole == bytewise == [event for event, _line in EXAMPLES]
    assert decoder.finish() == []


def test_decoder_reports_garbage_and_goes_on() -> None:
    decoder = EventDecoder()
    items = decoder.feed(b"hello\r\n\n" + encode(TouchEvent("x")) + b"x" * (MAX_LINE + 10))
    items += decoder.feed(b"still the long line\n" + encode(ResultEvent(True))[:-1].replace(b"\n", b""))
    items += decoder.finish()
    assert [type(item) for item in items] == [Garbage, TouchEvent, Garbage, ResultEvent]
    assert isinstance(items[0], Garbage)
    assert items[0].line == "hello"
    assert isinstance(items[2], Garbage)
    assert items[2].reason == "line too long"


def test_decoder_reports_a_truncated_last_line() -> None:
    decoder = EventDecoder()
    assert decoder.feed(b'{"v":1,"event":"res') == []
    [item] = decoder.finish()
    assert isinstance(item, Garbage)


def test_tail_keeps_the_end() -> None:
    tail = TailBuffer(limit=32)
    for i in range(100):
        tail.append(f"line {i}\n".encode())
    assert len(tail.text().encode()) == 32
    assert tail.text().endswith("line 98\nline 99\n")
    assert tail.last_lines(2) == "line 98 | line 99"
    assert tail.dropped > 0


# ---------------------------------------------------------------------------------------- worker: pure


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"Operation": 18, "Progress": 40}, ProgressEvent("Flashing firmware", "FLASH_FIRMWARE", 40)),
        ({"Operation": 14, "Progress": 100}, ProgressEvent("Verifying restore", "VERIFY_RESTORE", 100)),
        ({"Operation": 13, "Progress": -1}, ProgressEvent("Restoring image", "RESTORE_IMAGE", None)),
        ({"Operation": 65}, ProgressEvent("Update rose", "UPDATE_ROSE", None)),
        ({"Operation": 999, "Progress": 5}, ProgressEvent("Operation 999", "OPERATION_999", 5)),
        (
            {"Operation": "VERIFY_RESTORE", "Progress": 7},
            ProgressEvent("Verifying restore", "VERIFY_RESTORE", 7),
        ),
        ({"Progress": 5}, None),
    ],
)
def test_restored_progress_reads_as_steps(message: dict[str, object], expected: ProgressEvent | None) -> None:
    assert progress_from_restored(message) == expected


def test_a_non_zero_final_status_is_a_failure_in_words() -> None:
    failure = status_failure(6)
    assert failure.code is RestoreCode.RESTORE_FAILED
    assert "disk failure" in failure.message
    assert "unknown error" in status_failure(12345).message


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (WorkerFailure(RestoreCode.NO_DEVICE, "not here"), RestoreCode.NO_DEVICE),
        (TSSError("This device isn't eligible for the requested build."), RestoreCode.TSS_REFUSED),
        (requests.ConnectionError("gs.apple.com: Name or service not known"), RestoreCode.TSS_UNREACHABLE),
        (requests.Timeout("read timed out"), RestoreCode.TSS_UNREACHABLE),
        (usb.core.NoBackendError("No backend available"), RestoreCode.USB_UNAVAILABLE),
        (ConnectionFailedToUsbmuxdError(), RestoreCode.USB_UNAVAILABLE),
        (ConnectionFailedError(), RestoreCode.DEVICE_GONE),
        (
            IRecvNoDeviceConnectedError("No device in Recovery or DFU mode was found."),
            RestoreCode.DEVICE_GONE,
        ),
        (usb.core.USBError("No such device", errno=19), RestoreCode.DEVICE_GONE),
        (usb.core.USBError("No such device", error_code=-4), RestoreCode.DEVICE_GONE),
        (usb.core.USBError("Access denied", errno=13), RestoreCode.USB_UNAVAILABLE),
        (usb.core.USBError("Operation timed out", errno=110), RestoreCode.RESTORE_FAILED),
        (ConnectionResetError(), RestoreCode.DEVICE_GONE),
        (NoSuchBuildIdentityError("failed to find the correct BuildIdentity"), RestoreCode.IPSW_INVALID),
        (KeyboardInterrupt(), RestoreCode.CANCELLED),
        (RuntimeError("something new"), RestoreCode.RESTORE_FAILED),
    ],
)
def test_exceptions_map_to_codes(exc: BaseException, code: RestoreCode) -> None:
    got, message = classify_exception(exc)
    assert got is code
    assert message


def test_recovery_and_dfu_devices_are_matched_by_ecid_from_the_iboot_string() -> None:
    ecid = int(ECID, 16)
    recovery = f"CPID:8101 CPRV:11 CPFM:03 SCEP:01 BDID:0C ECID:{ECID} IBFL:3C SRNM:[F2LXK3ABHG7F]"
    dfu = f"CPID:8101 CPRV:11 CPFM:03 SCEP:01 BDID:0C ECID:{ECID} IBFL:3C SRTG:[iBoot-4479.0.0.100.4]"
    normal_serial = f"00008101{ECID}"
    assert match_recovery_device([(0x05AC, 0x1281, recovery)], ecid) is DeviceMode.RECOVERY
    assert match_recovery_device([(0x05AC, 0x1227, dfu)], ecid) is DeviceMode.DFU
    assert match_recovery_device([(0x05AC, 0x1281, recovery)], ecid + 1) is None
    assert match_recovery_device([(0x05AC, 0x12A8, normal_serial)], ecid) is None  # found via usbmuxd
    assert match_recovery_device([(0x1234, 0x1281, recovery), (0x05AC, 0x1281, None)], ecid) is None


# ---------------------------------------------------------------------------------------- worker: I/O


@pytest.fixture
async def mux(
    socket_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[FakeUsbmuxd]:
    monkeypatch.setenv("USBMUXD_SOCKET_ADDRESS", str(socket_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # No libusb here, and no Recovery devices anyway: the USB scan finds nothing.
    monkeypatch.setattr(restore_worker, "_usb_apple_devices", list)
    fake_mux = FakeUsbmuxd(socket_path)
    await fake_mux.start()
    yield fake_mux
    await fake_mux.stop()


async def test_worker_finds_a_normal_mode_device_by_ecid_through_usbmuxd(
    mux: FakeUsbmuxd, tmp_path: Path
) -> None:
    """The simulated usbmuxd and lockdownd, with pymobiledevice3's own client (and auto-pairing into
    the station's directory)."""
    others, target = make_device(7, 1).info(), make_device(7, 2).info()
    mux.attach(others, "1-1.1")
    mux.attach(target, "1-1.2")
    device, mode = await find_device(int(target.ecid, 16), None, 0, tmp_path / "pair")
    assert (tmp_path / "pair" / f"{target.udid}.plist").exists()
    assert mode is DeviceMode.NORMAL
    assert device.get_ecid_value() == int(target.ecid, 16)
    assert device.lockdown is not None
    await device.lockdown.close()


async def test_worker_reports_no_device_for_an_unknown_ecid(mux: FakeUsbmuxd) -> None:
    mux.attach(make_device(7, 1).info(), "1-1.1")
    with pytest.raises(WorkerFailure) as failure:
        await find_device(int(OTHER, 16), None, 0)
    assert failure.value.code is RestoreCode.NO_DEVICE


def worker_env(tmp_path: Path) -> dict[str, str]:
    """Nothing real to find: no usbmuxd at that address, pair records in the sandbox."""
    return os.environ | {"USBMUXD_SOCKET_ADDRESS": str(tmp_path / "no-usbmuxd"), "HOME": str(tmp_path)}


async def test_real_worker_without_the_device_fails_cleanly(tmp_path: Path, fake_ipsw: Path) -> None:
    """`python -m daemon.ios.restore_worker` for real: a JSON error, not a traceback. On this host
    pyusb may lack libusb (usb_unavailable); with libusb the device is simply not there."""
    real = ProcessRestorer([*DEFAULT_WORKER, "--find-timeout", "0"], timeout=30, env=worker_env(tmp_path))
    outcome = await real.restore(RestoreRequest(OTHER, fake_ipsw), Recorder())
    assert not outcome.ok
    assert outcome.code in (RestoreCode.USB_UNAVAILABLE, RestoreCode.NO_DEVICE), outcome
    assert outcome.failed_cleanly
    assert outcome.garbage_lines == 0
    assert outcome.returncode == 1
    assert group_gone(outcome.pid or 0)


async def test_real_worker_refuses_a_missing_ipsw(tmp_path: Path) -> None:
    real = ProcessRestorer(DEFAULT_WORKER, timeout=30, env=worker_env(tmp_path))
    outcome = await real.restore(RestoreRequest(OTHER, tmp_path / "missing.ipsw"), Recorder())
    assert outcome.code is RestoreCode.IPSW_INVALID
    assert "missing.ipsw" in outcome.message
    assert not outcome.retryable
    assert outcome.failed_cleanly


# ---------------------------------------------------------------------------------------- the restorer


def test_requests_name_devices_by_normalised_ecid() -> None:
    assert request("0x1C604A3405801E").ecid == ECID
    assert request("1c604a3405801e").ecid == ECID
    with pytest.raises(ValueError, match="ECID"):
        request("not-an-ecid")


@pytest.mark.parametrize("erase", [False, True])
async def test_a_restore_reports_ordered_progress_and_modes(erase: bool) -> None:
    seen = Recorder()
    outcome = await restorer().restore(request(erase=erase), seen, on_event=seen.on_event)
    assert outcome.ok, outcome
    assert outcome.code is None
    assert outcome.touched  # it did change the device, as a restore does
    assert not outcome.interrupted
    assert outcome.modes == (DeviceMode.NORMAL, DeviceMode.RECOVERY, DeviceMode.RESTORE, DeviceMode.NORMAL)
    assert outcome.returncode == 0
    assert outcome.garbage_lines == 0
    assert outcome.last_step == "Rebooting device"
    expected = [stage.step for stage in fake.STAGES if erase or not stage.erase_only]
    assert seen.steps() == expected
    for step in expected:
        percents = [percent for percent, detail in seen.progress if detail == step]
        assert percents == list(range(0, 101, 10)), step
    assert seen.progress[0] == (None, "device in normal mode")
    assert (None, "device in Recovery mode") in seen.progress
    # the touch comes after the signing request and before the device is sent to Recovery
    kinds = [type(e).__name__ for e in seen.events if not isinstance(e, ProgressEvent | LogEvent)]
    assert kinds == ["ModeEvent", "TouchEvent", "ModeEvent", "ModeEvent", "ModeEvent", "ResultEvent"]
    assert group_gone(outcome.pid or 0)


async def test_a_worker_error_after_touching_is_an_interrupted_restore() -> None:
    outcome = await restorer("--fail-at", "50", "--error", "restore_failed").restore(request(), Recorder())
    assert outcome.code is RestoreCode.RESTORE_FAILED
    assert outcome.touched
    assert outcome.interrupted
    assert outcome.returncode == 1
    assert outcome.last_step == "Sending filesystem"
    with pytest.raises(RestoreError) as raised:
        outcome.raise_for_error()
    assert raised.value.code == "restore_failed"
    assert raised.value.retryable
    assert raised.value.touched
    assert "device state unknown" in raised.value.message


async def test_a_signing_failure_leaves_the_device_untouched() -> None:
    outcome = await restorer("--fail-at", "2", "--error", "tss_unreachable").restore(request(), Recorder())
    assert outcome.code is RestoreCode.TSS_UNREACHABLE
    assert outcome.failed_cleanly
    assert outcome.retryable
    assert outcome.modes == (DeviceMode.NORMAL,)
    assert "device untouched" in RestoreError(outcome).message


async def test_a_refused_signature_is_not_retried() -> None:
    outcome = await restorer("--fail-at", "2", "--error", "tss_refused").restore(request(), Recorder())
    assert outcome.code is RestoreCode.TSS_REFUSED
    assert not RestoreError(outcome).retryable


async def test_a_crashed_worker_is_reported_with_its_stderr() -> None:
    outcome = await restorer("--crash").restore(request(), Recorder())
    assert outcome.code is RestoreCode.WORKER_CRASHED
    assert outcome.returncode == 3
    assert "exit status 3" in outcome.message
    assert "RuntimeError: simulated crash" in outcome.message
    assert "Traceback" in outcome.stderr_tail
    assert outcome.interrupted  # it crashed at 50 %, long after touching the device
    assert group_gone(outcome.pid or 0)


async def test_a_hung_worker_is_killed_at_the_timeout() -> None:
    started = time.monotonic()
    outcome = await restorer("--hang").restore(request(timeout=0.5), Recorder())
    assert outcome.code is RestoreCode.TIMEOUT
    assert outcome.returncode == -signal.SIGTERM
    assert outcome.interrupted
    assert time.monotonic() - started < 5
    assert outcome.pid is not None
    assert group_gone(outcome.pid)  # os.killpg(pgid, 0) raises ProcessLookupError


async def test_a_worker_that_ignores_sigterm_gets_sigkill() -> None:
    outcome = await restorer("--hang", "--ignore-term", grace=0.3).restore(request(timeout=0.5), Recorder())
    assert outcome.code is RestoreCode.TIMEOUT
    assert outcome.returncode == -signal.SIGKILL
    assert group_gone(outcome.pid or 0)


async def test_a_worker_that_does_not_exit_after_its_result_is_ended() -> None:
    started = time.monotonic()
    outcome = await restorer("--linger", linger=0.2).restore(request(), Recorder())
    assert outcome.ok  # the result stands
    assert outcome.returncode == -signal.SIGTERM
    assert time.monotonic() - started < 5
    assert group_gone(outcome.pid or 0)


async def test_a_kill_takes_the_workers_children_too() -> None:
    seen = Recorder()
    outcome = await restorer("--hang", "--child").restore(request(timeout=0.5), seen, on_event=seen.on_event)
    assert outcome.code is RestoreCode.TIMEOUT
    assert dies(seen.child_pid())


async def test_a_child_left_behind_by_a_finished_worker_is_cleaned_up_without_waiting() -> None:
    """The child holds the worker's stderr open; the restore still ends when the worker does."""
    seen = Recorder()
    started = time.monotonic()
    outcome = await restorer("--child").restore(request(), seen, on_event=seen.on_event)
    assert outcome.ok
    assert time.monotonic() - started < 5
    assert dies(seen.child_pid())


async def test_cancelling_kills_the_worker_and_records_the_interruption() -> None:
    the_restorer = restorer("--hang-at", "60")
    seen = Recorder()
    task = asyncio.create_task(the_restorer.restore(request(), seen, on_event=seen.on_event))
    await seen.until(lambda e: isinstance(e, ProgressEvent) and e.step == "Sending filesystem")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    last = the_restorer.last_outcome(ECID)
    assert last is not None
    assert last.code is RestoreCode.CANCELLED
    assert last.interrupted
    assert last.last_step == "Sending filesystem"
    assert last.pid is not None
    assert group_gone(last.pid)
    assert not the_restorer.busy(ECID)


async def test_cancelling_before_the_touch_is_a_clean_failure() -> None:
    the_restorer = restorer("--hang-at", "1")
    seen = Recorder()
    task = asyncio.create_task(the_restorer.restore(request(), seen, on_event=seen.on_event))
    await seen.until(lambda e: isinstance(e, ProgressEvent) and e.step == "Verifying IPSW")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    last = the_restorer.last_outcome(ECID)
    assert last is not None
    assert last.code is RestoreCode.CANCELLED
    assert last.failed_cleanly


async def test_garbage_on_stdout_is_skipped() -> None:
    seen = Recorder()
    outcome = await restorer("--garbage").restore(request(), seen, on_event=seen.on_event)
    assert outcome.ok, outcome
    assert outcome.garbage_lines == len(fake.GARBAGE)
    assert seen.steps() == [stage.step for stage in fake.STAGES if not stage.erase_only]


async def test_two_devices_restore_at_once() -> None:
    the_restorer = restorer()
    a, b = Recorder(), Recorder()
    first, second = await asyncio.gather(
        the_restorer.restore(request(ECID), a), the_restorer.restore(request(OTHER), b)
    )
    assert first.ok
    assert second.ok
    assert (first.ecid, second.ecid) == (ECID, OTHER)
    assert first.pid != second.pid
    assert a.steps() == b.steps()


async def test_one_restore_per_ecid() -> None:
    the_restorer = restorer("--hang-at", "10")
    seen = Recorder()
    task = asyncio.create_task(the_restorer.restore(request(), seen, on_event=seen.on_event))
    await seen.until(lambda e: isinstance(e, ModeEvent))
    assert the_restorer.busy("0x1C604A3405801E")
    with pytest.raises(RestoreBusyError, match=ECID):
        await the_restorer.restore(request("0x1C604A3405801E"), Recorder())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    outcome = await restorer().restore(request(), Recorder())  # free again
    assert outcome.ok


async def test_a_broken_progress_display_does_not_break_the_restore() -> None:
    def progress(_percent: int | None, _detail: str | None) -> None:
        raise RuntimeError("board crashed")

    outcome = await restorer().restore(request(), progress)
    assert outcome.ok


async def test_a_worker_that_cannot_start_is_a_clean_failure(tmp_path: Path) -> None:
    the_restorer = ProcessRestorer([str(tmp_path / "no-such-python")])
    outcome = await the_restorer.restore(request(), Recorder())
    assert outcome.code is RestoreCode.WORKER_CRASHED
    assert outcome.failed_cleanly
    assert "cannot start" in outcome.message
    assert not the_restorer.busy(ECID)


async def test_shutdown_kills_running_restores() -> None:
    the_restorer = restorer("--hang-at", "30")
    seen = Recorder()
    task = asyncio.create_task(the_restorer.restore(request(), seen, on_event=seen.on_event))
    await seen.until(lambda e: isinstance(e, TouchEvent))
    await the_restorer.aclose()
    outcome: RestoreOutcome = await asyncio.wait_for(task, 5)
    assert outcome.code is RestoreCode.CANCELLED
    assert "stopping" in outcome.message
    assert group_gone(outcome.pid or 0)


def test_a_worker_ends_itself_when_the_daemon_goes_away() -> None:
    """The daemon holds the worker's stdin; its death closes it, and the worker kills its group."""
    proc = subprocess.Popen(
        [*FAKE, "--ecid", ECID, "--ipsw", "x", "--hang-at", "1", "--child"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    child = None
    for line in proc.stdout:
        event = decode(line)
        if isinstance(event, LogEvent) and event.message.startswith("child pid "):
            child = int(event.message.split()[-1])
        if isinstance(event, ProgressEvent):
            break
    proc.stdin.close()  # what the kernel does when the daemon dies
    assert proc.wait(timeout=5) == -signal.SIGKILL
    proc.stdout.close()
    assert child is not None
    assert dies(child)


def test_the_worker_is_told_the_stations_pair_record_directory(tmp_path: Path) -> None:
    """Never a home folder: the worker pairs and looks for records where the station keeps them."""
    request = RestoreRequest("1C604A3405801E", tmp_path / "a.ipsw", udid="U", pair_records=tmp_path / "pr")
    args = request.worker_args()
    assert args[args.index("--pair-records") + 1] == str(tmp_path / "pr")
    assert "--pair-records" not in RestoreRequest("1C604A3405801E", tmp_path / "a.ipsw").worker_args()
