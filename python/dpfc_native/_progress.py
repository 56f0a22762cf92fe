"""Progress reporting that works with and without a terminal.

On a TTY: a rich progress bar (transient). Otherwise (logs, CI, ``nohup``, pipes): a plain
line when it starts, then one every ``interval`` seconds (from a background thread, so a
single long step, such as one large gram, still shows that the run is alive) and one at
the end, e.g.::

    DP-FC: 4/10 (40%), 12s elapsed, ~18s left

Used by the estimators' ``verbose``, by ``dpfc demo``, ``dpfc train``, ``dpfc extract``,
``dpfc audit``
and by anything else with a loop to report (``progress(total, "extract")``).
"""

from __future__ import annotations

import sys
import threading
import time

__all__ = ["progress", "Progress", "DEFAULT_INTERVAL"]

#: Seconds between two plain lines when the stream is not a terminal.
DEFAULT_INTERVAL = 5.0


def format_seconds(s: float, sep: str = "") -> str:
    """``s`` seconds as whole seconds, or minutes or hours with one decimal; ``sep`` stands
    between the number and the unit (``"12s"`` in progress lines, ``"12 s"`` in the CLI)."""
    if s < 90:
        return f"{s:.0f}{sep}s"
    if s < 5400:
        return f"{s / 60:.1f}{sep}min"
    return f"{s / 3600:.1f}{sep}h"


class Progress:
    """A progress reporter over ``total`` units (None: unknown total), used as a context
    manager::

        with progress(len(files), "extract") as bar:
            for f in files:
                ...
                bar.advance(f.name)

    Parameters
    ----------
    total : int or None
    description : str
        What is being done (first word of every line).
    enabled : bool
        False: report nothing (all methods are no-ops).
    stream : file-like or None
        Default ``sys.stderr`` (looked up when entering, so redirections apply).
    interval : float or None
        Seconds between plain lines (non-TTY only); None: ``DEFAULT_INTERVAL`` (looked up
        here, so setting ``dpfc_native._progress.DEFAULT_INTERVAL`` changes every report).
    rich : bool or None
        Force the rich bar (True) or plain lines (False); None: rich iff the stream is a
        TTY.
    """

    def __init__(
        self,
        total,
        description: str,
        *,
        enabled: bool = True,
        stream=None,
        interval: float | None = None,
        rich: bool | None = None,
    ):
        if interval is None:
            interval = DEFAULT_INTERVAL
        self.total = None if total is None else int(total)
        self.description = description
        self.enabled = bool(enabled)
        self.stream = stream
        self.interval = float(interval)
        self.rich = rich
        self.done = 0
        self.status = ""
        self._bar = None
        self._task = None
        self._t0 = 0.0
        self._last = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    # -- context manager -------------------------------------------------------------
    def __enter__(self):
        if not self.enabled:
            return self
        if self.stream is None:
            self.stream = sys.stderr
        use_rich = self.rich
        if use_rich is None:
            isatty = getattr(self.stream, "isatty", None)
            use_rich = bool(isatty and isatty())
        self._t0 = self._last = time.monotonic()
        if use_rich:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            columns = [
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            ]
            if self.total is not None:
                columns.append(TimeRemainingColumn())
            self._bar = RichProgress(*columns, console=Console(file=self.stream), transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total)
        else:
            self._line("started")
            if self.interval > 0:
                self._thread = threading.Thread(
                    target=self._heartbeat, daemon=True, name=f"progress {self.description}"
                )
                self._thread.start()
        return self

    def _heartbeat(self) -> None:
        # Wakes every interval; prints only if no line went out meanwhile (advance prints
        # too), so the stream gets about one line per interval whatever the step length.
        while not self._stop.wait(self.interval):
            with self._lock:
                if time.monotonic() - self._last >= self.interval:
                    self._line()

    def __exit__(self, exc_type, exc, tb):
        if not self.enabled:
            return False
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, tb)
            self._bar = None
        else:
            if self._thread is not None:
                self._stop.set()
                self._thread.join()
                self._thread = None
            self._line("stopped (error)" if exc_type is not None else "done")
        return False

    # -- reporting ---------------------------------------------------------------------
    def advance(self, status: str | None = None, n: int = 1) -> None:
        """``n`` more units done; ``status`` replaces the text after the description."""
        if not self.enabled:
            return
        self.done += n
        if status is not None:
            self.status = status
        if self._bar is not None:
            desc = self.description + (f": {self.status}" if self.status else "")
            self._bar.update(self._task, advance=n, description=desc)
            return
        with self._lock:
            if time.monotonic() - self._last >= self.interval:
                self._line()

    def update(
        self, done: int | None = None, total: int | None = None, status: str | None = None
    ) -> None:
        """Set the count (``done``) and/or the ``total`` (once it becomes known) directly."""
        if not self.enabled:
            return
        with self._lock:
            if total is not None:
                self.total = int(total)
            if done is not None:
                self.done = int(done)
            if status is not None:
                self.status = status
            if self._bar is not None:
                desc = self.description + (f": {self.status}" if self.status else "")
                self._bar.update(
                    self._task, completed=self.done, total=self.total, description=desc
                )
            elif time.monotonic() - self._last >= self.interval:
                self._line()

    def _line(self, event: str | None = None) -> None:
        now = time.monotonic()
        self._last = now
        elapsed = now - self._t0
        if self.total:
            head = f"{self.done}/{self.total} ({100.0 * self.done / self.total:.0f}%)"
        else:  # unknown total: a count once there is one (a one-pass fit has none)
            head = f"{self.done}" if self.done else ""
        parts = [head] if head else []
        if event or not head:
            parts.append(event or "running")
        parts.append(f"{format_seconds(elapsed)} elapsed")
        if self.total and 0 < self.done < self.total and event is None:
            parts.append(f"~{format_seconds(elapsed / self.done * (self.total - self.done))} left")
        if self.status:
            parts.append(f"[{self.status}]")
        print(f"{self.description}: " + ", ".join(parts), file=self.stream, flush=True)


#: The name callers use: ``progress(total, description, ...)`` is a :class:`Progress`.
progress = Progress
