"""What a long command shows a person: one line per stage, with a progress bar while it runs and its
key figure when it ends; everything else (Ray's, DeepSpeed's and the libraries' own output, from
this process and the workers Ray forwards) goes to a log file.

    with Console("runs/demo/logs/demo.log") as console:
        with console.stage("[1/8] world") as stage:
            ...                      # utils.progress bars inside move this stage's bar
            stage.finish("200 pages, 1108 image-text pairs")

On a terminal the line is redrawn in place; in a pipe or a CI log only the finished lines appear.
``Console(None)`` writes the same lines without redirecting anything.
"""
from __future__ import annotations

import os
import sys
import threading
import time

from . import progress

BAR_WIDTH = 24
LABEL_WIDTH = 26


class Console:
    def __init__(self, log_path: str | None):
        self.log_path = log_path
        self.terminal, self.tty, self._saved = sys.stdout, False, None

    def __enter__(self) -> "Console":
        if self.log_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
            sys.stdout.flush()
            sys.stderr.flush()
            self._saved = (os.dup(1), os.dup(2))
            self.terminal = os.fdopen(os.dup(1), "w", buffering=1)
            log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log, 1)  # at the descriptor level: child processes and C libraries follow
            os.dup2(log, 2)
            os.close(log)
        self.tty = self.terminal.isatty()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._saved:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, saved in zip((1, 2), self._saved):
                os.dup2(saved, fd)
                os.close(saved)
            self._saved = None
            if exc_type is not None and exc_type is not KeyboardInterrupt:
                self.say(f"failed: {exc_type.__name__}: {exc} (the whole log: {self.log_path})")
            self.terminal.close()
            self.terminal = sys.stdout

    def say(self, text: str = "") -> None:
        self.terminal.write(text + "\n")
        self.terminal.flush()

    def stage(self, label: str) -> "Stage":
        return Stage(self, label)


class Stage:
    """One stage's line. Progress comes from ``utils.progress`` bars opened while it runs."""

    def __init__(self, console: Console, label: str):
        self.console, self.label = console, label
        self.done, self.total, self.unit = 0, None, ""
        self.start, self.finished = time.time(), False
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._thread = None

    def __enter__(self) -> "Stage":
        progress.listen(self._open_bar)
        if self.console.tty:
            self._thread = threading.Thread(target=self._redraw_loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        progress.unlisten(self._open_bar)
        if not self.finished:
            self.finish("failed" if exc_type else "done")

    def _open_bar(self, total, desc, unit):
        self.total, self.unit, self.done = total, unit, 0
        return Counter(self)

    def line(self) -> str:
        seconds = time.time() - self.start
        if self.total:
            filled = int(BAR_WIDTH * min(1.0, self.done / self.total))
            bar, counts = "#" * filled + "-" * (BAR_WIDTH - filled), f"{self.done}/{self.total} {self.unit}"
        else:  # no count to show: a bar that sweeps, so the stage is visibly alive
            at = int(seconds * 4) % BAR_WIDTH
            bar, counts = "-" * at + "=" + "-" * (BAR_WIDTH - at - 1), ""
        return f"{self.label:<{LABEL_WIDTH}} [{bar}] {counts:<20} {seconds:5.0f} s"

    def _redraw_loop(self) -> None:
        while not self._stop.wait(0.25):
            with self._lock:
                self.console.terminal.write("\r" + self.line())
                self.console.terminal.flush()

    def finish(self, figure: str, seconds: float | None = None) -> None:
        """The stage's last line: its key figure and how long it took."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        seconds = time.time() - self.start if seconds is None else seconds
        text = f"{self.label:<{LABEL_WIDTH}} {figure}  ({seconds:.0f} s)"
        with self._lock:
            self.console.terminal.write(("\r\033[K" if self.console.tty else "") + text + "\n")
            self.console.terminal.flush()
        self.finished = True


class Counter:
    """What ``progress.bar`` hands the library while a console stage listens."""

    def __init__(self, stage: Stage):
        self.stage = stage

    @property
    def total(self):
        return self.stage.total

    @total.setter
    def total(self, value):
        self.stage.total = value

    def update(self, n: int = 1) -> None:
        self.stage.done += n

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
