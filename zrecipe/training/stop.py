"""Stopping well: SIGINT / SIGTERM and a battery limit turn into "checkpoint now, then stop cleanly".

`StopMonitor` is a training callback: the loop asks it once per step (`stop_reason`); signal handlers only
set a flag (never raise inside MLX code), so the step in flight finishes and the checkpoint written after it
is consistent. Its handlers are installed for the run (`on_train_begin`) and the previous ones restored
after it (`on_train_end`).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from zrecipe.training.callbacks import TrainingCallback


@dataclass(frozen=True)
class BatteryStatus:
    percent: int
    discharging: bool


def _read_linux_battery(root: Path = Path("/sys/class/power_supply")) -> BatteryStatus | None:
    if not root.is_dir():
        return None
    for supply in sorted(root.iterdir()):
        capacity, status = supply / "capacity", supply / "status"
        kind = supply / "type"
        try:
            if kind.is_file() and kind.read_text().strip() != "Battery":
                continue
            if not capacity.is_file():
                continue
            percent = int(capacity.read_text().strip())
            state = status.read_text().strip().lower() if status.is_file() else "unknown"
        except (OSError, ValueError):
            continue
        return BatteryStatus(percent, state == "discharging")
    return None


def parse_pmset(text: str) -> BatteryStatus | None:
    """Parse `pmset -g batt` output, e.g. "... 85%; discharging; 4:10 remaining"."""
    match = re.search(r"(\d+)%;\s*([a-zA-Z ]+)", text)
    if not match:
        return None
    return BatteryStatus(int(match.group(1)), match.group(2).strip().lower() == "discharging")


def _read_macos_battery() -> BatteryStatus | None:
    try:
        out = subprocess.run(
            ["pmset", "-g", "batt"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_pmset(out)


def read_battery() -> BatteryStatus | None:
    """The machine's battery, or None where there is none (desktops, CI) or it cannot be read."""
    return _read_macos_battery() if sys.platform == "darwin" else _read_linux_battery()


class StopMonitor(TrainingCallback):
    """Collects reasons to stop: a caught signal, or the battery at/below `battery_limit` while discharging.

    As a callback it watches one training run; outside one, use it as a context manager so the previous
    signal handlers come back afterwards.
    """

    def __init__(self, battery_limit: int | None = None, battery_reader=read_battery, check_every: int = 1):
        self.battery_limit = battery_limit
        self._battery_reader = battery_reader
        self._check_every = max(1, int(check_every))
        self._calls = 0
        self._signal: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopMonitor:  # noqa: PYI034 (typing.Self needs Python 3.11)
        # Handlers can only be installed from the main thread (a build running training in a worker skips it).
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_begin(self, state) -> None:
        self.__enter__()

    def on_train_end(self, state) -> None:
        self.__exit__(None, None, None)

    def stop_reason(self, state) -> str | None:
        return self.reason()

    def _handle(self, signum, frame) -> None:
        if self._signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self._signal = signal.Signals(signum).name

    def reason(self) -> str | None:
        """Why training should stop now, or None."""
        if self._signal is not None:
            return f"received {self._signal}"
        if self.battery_limit is not None:
            self._calls += 1
            if self._calls % self._check_every == 0:
                battery = self._battery_reader()
                if battery is not None and battery.discharging and battery.percent <= self.battery_limit:
                    return f"battery at {battery.percent}% (limit {self.battery_limit}%)"
        return None
