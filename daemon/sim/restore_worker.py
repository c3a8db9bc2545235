"""A fake restore worker: `python -m daemon.sim.restore_worker --ecid ... --ipsw ... [--erase]`.

It speaks the real worker's protocol (`daemon.ios.restore_protocol`) and walks through what a real
restore reports: normal mode, the signing request, `touch` before EnterRecovery, Recovery, the
restore ramdisk, restore mode with restored's operations (verifying, sending the filesystem,
flashing firmware, the baseband), the reboot and normal mode again, each step with percent
progress. An erase-install adds the partition map and filesystem steps. With `--recovery` (the
daemon restoring a device a failed restore left in Recovery) it starts in Recovery, as the real
worker does when it finds the device there: no EnterRecovery, and `touch` comes before the iBEC and
restore ramdisk are sent.

It exists so that `ProcessRestorer` is tested against a real process (pipes, signals, process
groups, exit codes) and so the simulated bench can exercise the same path. Misbehaviour on demand:

* `--fail-at PERCENT --error CODE`: report that error when the overall progress reaches PERCENT
  (before about 3 % the device is not touched yet: a clean failure; later an interrupted one);
* `--hang` / `--hang-at PERCENT`: stop talking and sleep, like a worker stuck in a USB call;
* `--crash` / `--crash-at PERCENT`: print a traceback to stderr and exit 3 without a result;
* `--garbage`: interleave lines that are not events (text, broken JSON, unknown events, bad UTF-8,
  an over-long line);
* `--ignore-term`: ignore SIGTERM, so only SIGKILL ends it;
* `--linger`: after the result, do not exit (a teardown that hangs);
* `--child`: start a child process in the worker's process group (its pid in a log event), to prove
  a kill takes the whole group;
* `--speed FACTOR`: a full restore takes 900 s / FACTOR (tests use thousands).

It ignores the IPSW's contents: nothing is read from it.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from daemon.ios.base import DeviceMode
from daemon.ios.restore_protocol import (
    WORKER_CODES,
    EventWriter,
    LogEvent,
    ModeEvent,
    ProgressEvent,
    RestoreCode,
    ResultEvent,
    TouchEvent,
    claim_stdout,
    watch_parent,
)


@dataclass(frozen=True, slots=True)
class Stage:
    step: str
    operation: str
    seconds: float
    """Real-life duration; the sum is a typical 15-minute restore."""
    touch: str | None = None
    """Announce `touch` with this name before the stage starts."""
    then: DeviceMode | None = None
    """The mode the device is in when the stage ends."""
    erase_only: bool = False


STAGES: tuple[Stage, ...] = (
    Stage("Verifying IPSW", "verify_ipsw", 10),
    Stage("Requesting signatures from Apple (TSS)", "tss", 15),
    Stage("Entering Recovery mode", "enter_recovery", 25, touch="enter_recovery", then=DeviceMode.RECOVERY),
    Stage("Booting restore ramdisk", "boot_ramdisk", 60, then=DeviceMode.RESTORE),
    Stage("Creating partition map", "CREATE_PARTITION_MAP", 10, erase_only=True),
    Stage("Creating filesystem", "CREATE_FILESYSTEM", 10, erase_only=True),
    Stage("Verifying restore", "VERIFY_RESTORE", 60),
    Stage("Sending filesystem", "RESTORE_IMAGE", 420),
    Stage("Flashing firmware", "FLASH_FIRMWARE", 120),
    Stage("Updating baseband", "UPDATE_BASEBAND", 90),
    Stage("Rebooting device", "REBOOT_DEVICE", 80, then=DeviceMode.NORMAL),
)

TICKS = 10
"""Progress events per stage (0, 10, ..., 100 percent)."""

GARBAGE: tuple[bytes, ...] = (
    b"pymobiledevice3 printed this to stdout\n",
    b'{"v":1,"event":"progress","step":"trunc\n',
    b"[1, 2, 3]\n",
    b'{"v":1,"event":"teleport","where":"moon"}\n',
    b'{"v":99,"event":"progress","step":"from the future"}\n',
    b'{"v":1,"event":"progress","step":"Bad percent","percent":250}\n',
    b"\xff\xfe not utf-8 \x80\n",
    b"x" * 70_000 + b"\n",
)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m daemon.sim.restore_worker", description=__doc__)
    parser.add_argument("--ecid", required=True)
    parser.add_argument("--ipsw", required=True)
    parser.add_argument("--erase", action="store_true")
    parser.add_argument("--udid")
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--pair-records", help="accepted like the real worker's; unused")
    parser.add_argument("--recovery", action="store_true", help="the device starts in Recovery mode")
    parser.add_argument("--fail-at", type=float)
    parser.add_argument("--error", default=RestoreCode.RESTORE_FAILED.value, choices=sorted(WORKER_CODES))
    parser.add_argument("--hang", action="store_true", help="hang at 50 %%")
    parser.add_argument("--hang-at", type=float)
    parser.add_argument("--crash", action="store_true", help="crash at 50 %%")
    parser.add_argument("--crash-at", type=float)
    parser.add_argument("--garbage", action="store_true")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--linger", action="store_true")
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args(argv)
    if args.hang and args.hang_at is None:
        args.hang_at = 50.0
    if args.crash and args.crash_at is None:
        args.crash_at = 50.0
    if args.speed <= 0:
        parser.error("--speed must be positive")
    return args


class FakeRestore:
    def __init__(self, args: argparse.Namespace, out: EventWriter) -> None:
        self.args = args
        self.out = out
        self.stages = [s for s in STAGES if (args.erase or not s.erase_only) and not self._skipped(s)]
        self.total = sum(s.seconds for s in self.stages)
        self._garbage = 0

    def _skipped(self, stage: Stage) -> bool:
        """From Recovery there is no EnterRecovery: the device is there already."""
        return bool(self.args.recovery) and stage.operation == "enter_recovery"

    def _touch(self, stage: Stage) -> str | None:
        """What the stage announces before it changes the device; from Recovery the first change is
        sending the iBEC, when the restore ramdisk is booted (`send_iboot`, as the real worker says)."""
        if self.args.recovery and stage.operation == "boot_ramdisk":
            return "send_iboot"
        return stage.touch

    def run(self) -> int:
        args, out = self.args, self.out
        how = f"erase={args.erase}, recovery={args.recovery}"
        out.emit(LogEvent("info", f"fake restore of ECID {args.ecid} from {args.ipsw} ({how})"))
        if args.child:
            child = subprocess.Popen(
                [sys.executable, "-c", "import time; time.sleep(3600)"], stdin=subprocess.DEVNULL
            )
            out.emit(LogEvent("info", f"child pid {child.pid}"))
        out.emit(ModeEvent(DeviceMode.RECOVERY if args.recovery else DeviceMode.NORMAL))
        done = 0.0
        for stage in self.stages:
            if (touch := self._touch(stage)) is not None:
                if (code := self._misbehave(100 * done / self.total)) is not None:
                    return code
                out.emit(TouchEvent(touch))
            for tick in range(TICKS + 1):
                overall = 100 * (done + stage.seconds * tick / TICKS) / self.total
                if (code := self._misbehave(overall)) is not None:
                    return code
                out.emit(ProgressEvent(stage.step, stage.operation, 100 * tick // TICKS))
                if tick < TICKS:
                    time.sleep(stage.seconds / TICKS / args.speed)
            done += stage.seconds
            if stage.then is not None:
                out.emit(ModeEvent(stage.then))
            self._spray()
        out.emit(ResultEvent(True))
        while args.linger:
            time.sleep(3600)
        return 0

    def _misbehave(self, overall: float) -> int | None:
        args = self.args
        if args.fail_at is not None and overall >= args.fail_at:
            message = f"simulated {args.error} at {overall:.0f} %"
            self.out.emit(ResultEvent(False, RestoreCode(args.error), message))
            return 1
        if args.crash_at is not None and overall >= args.crash_at:
            sys.stderr.write(
                "Traceback (most recent call last):\n"
                '  File "daemon/sim/restore_worker.py", line 1, in run\n'
                f"RuntimeError: simulated crash at {overall:.0f} %\n"
            )
            sys.stderr.flush()
            return 3
        if args.hang_at is not None and overall >= args.hang_at:
            sys.stderr.write(f"hanging at {overall:.0f} %\n")
            sys.stderr.flush()
            while True:
                time.sleep(3600)
        return None

    def _spray(self) -> None:
        if self.args.garbage and self._garbage < len(GARBAGE):
            self.out.write_raw(GARBAGE[self._garbage])
            self._garbage += 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    out = EventWriter(claim_stdout())
    watch_parent()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return FakeRestore(args, out).run()


if __name__ == "__main__":
    sys.exit(main())
