"""What a long command shows on the console: live progress, and how much of Ray's own output.

Quiet by default: a long command (``run``, ``train``, ``eval``, ``tune``, ``serve``) prints its stage
lines, a progress bar per training stage and per evaluation, warnings that need the user, the Ray
dashboard's URL and the summary; Ray's own lines stay in the Ray session's log files (their
directory is printed once, when the local Ray starts). ``-v`` on those commands, or
``NANOCHAT_VERBOSE=1``, brings every line back.

On a terminal, progress is a `tqdm <https://tqdm.github.io>`_ bar redrawn in place. Elsewhere (CI,
``ray job logs``, a file) a bar would be a stream of carriage returns, so it becomes plain lines:
one per training report (every ``report_every`` steps), and one per evaluation when it ends.
``NANOCHAT_PROGRESS=plain`` forces plain lines, ``=bar`` forces bars.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

VERBOSE_ENV = "NANOCHAT_VERBOSE"
PROGRESS_ENV = "NANOCHAT_PROGRESS"

_bars: list[Any] = []  # tqdm bars drawn now: lines printed meanwhile go above them


def verbose() -> bool:
    """Whether every line (Ray's included) goes to the console: ``NANOCHAT_VERBOSE`` is 1/true/yes."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def interactive(stream: TextIO | None = None) -> bool:
    """Whether progress is drawn as a bar (a terminal) rather than printed as plain lines."""
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced in ("plain", "bar"):
        return forced == "bar"
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def write(line: str, stream: TextIO | None = None) -> None:
    """Print ``line`` (to stderr by default) above any bar being drawn, so the bar is not torn."""
    stream = stream or sys.stderr
    if _bars:
        from tqdm import tqdm

        tqdm.write(line, file=stream)
    else:
        print(line, file=stream, flush=True)


@contextlib.contextmanager
def console_options(verbose: bool = False, dashboard: bool | None = None) -> Iterator[None]:
    """Apply a command's ``-v`` / ``--no-dashboard`` for its duration (as ``NANOCHAT_VERBOSE`` and
    ``NANOCHAT_DASHBOARD``, which the library reads), then restore the environment."""
    changes = {}
    if verbose:
        changes[VERBOSE_ENV] = "1"
    if dashboard is False:
        changes["NANOCHAT_DASHBOARD"] = "0"
    saved = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Bar:
    """Progress of ``total`` units: a tqdm bar on a terminal; elsewhere one plain line when it ends.

    ``plain_every`` (units): also print a plain line each time that many more units are done.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, plain_every: int = 0,
                 leave: bool = False, stream: TextIO | None = None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = stream or sys.stderr
        self.plain_every, self._next_line = plain_every, initial + plain_every
        self.status = ""
        self._tqdm = None
        if interactive(self.stream) and total > 0:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, file=self.stream,
                              dynamic_ncols=True)
            _bars.append(self._tqdm)

    def update(self, n: int = 1, status: str | None = None) -> None:
        """``n`` more units done; ``status``: the text after the counts (loss, speed...)."""
        self.goto(self.n + n, status)

    def goto(self, n: int, status: str | None = None) -> None:
        """Jump to ``n`` units done."""
        if status is not None:
            self.status = status
        if self._tqdm is not None:
            if status is not None:
                self._tqdm.set_postfix_str(status, refresh=False)
            self._tqdm.update(n - self.n)
        elif self.plain_every and n >= self._next_line and n < self.total:
            self._plain(n)
            self._next_line = n + self.plain_every
        self.n = n

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            with contextlib.suppress(ValueError):
                _bars.remove(self._tqdm)
            self._tqdm = None
        elif self.total > 0:
            self._plain(self.n)
        self.total = 0  # closed: a second close prints nothing

    def _plain(self, n: int) -> None:
        print(f"{self.desc}: {n}/{self.total} {self.unit}" + (f" | {self.status}" if self.status else ""),
              file=self.stream, flush=True)

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TrainProgress:
    """One training stage on the console, fed the records of its ``metrics.jsonl``.

    On a terminal: a bar of steps with loss, tokens/s and val bpb (val loss for mid/SFT) after the
    counts and tqdm's ETA.
    Elsewhere: ``line(record)`` (e.g. ``base step 40/80 | loss 5.07 | 4.5K tok/s | ...``) for every
    record, i.e. one plain line every ``report_every`` steps. Generated samples are printed either way.
    """

    def __init__(self, desc: str, total: int, start: int = 0, line: Callable[[dict], str] | None = None,
                 stream: TextIO | None = None):
        self.line = line or (lambda r: f"{desc} step {r.get('step')}/{total}")
        self.stream = stream or sys.stderr
        self.bar = Bar(total, desc, unit="step", initial=start, leave=True, stream=self.stream)
        self.loss = self.speed = self.bpb = ""

    def record(self, record: dict[str, Any]) -> None:
        """Show one report (a metrics.jsonl record: ``step``, ``train/loss``, ``train/tok_per_sec``...)."""
        if isinstance(record.get("train/loss"), int | float):
            self.loss = f"loss {record['train/loss']:.3f}"
        if isinstance(record.get("train/tok_per_sec"), int | float):
            self.speed = f"{record['train/tok_per_sec'] / 1e3:.1f}K tok/s"
        if isinstance(record.get("val/bpb"), int | float):  # pretraining's measure; mid/SFT report the loss
            self.bpb = f"val bpb {record['val/bpb']:.3f}"
        elif isinstance(record.get("val/loss"), int | float):
            self.bpb = f"val loss {record['val/loss']:.3f}"
        step = record.get("step")
        if self.bar._tqdm is None:
            write(self.line(record), self.stream)
        elif isinstance(step, int):
            self.bar.goto(step, " | ".join(s for s in (self.loss, self.speed, self.bpb) if s))
        for sample in record.get("samples") or []:
            write(f"  sample: {sample!r}", self.stream)

    def close(self) -> None:
        if self.bar._tqdm is not None:
            self.bar.close()


@contextlib.contextmanager
def follow_jsonl(path: str | Path, on_record: Callable[[dict], None], poll_s: float = 0.5) -> Iterator[None]:
    """Call ``on_record`` with every JSON line appended to ``path`` while the block runs (and the last
    lines written before it ends), from a background thread. Lines present at entry are skipped; a
    file rewritten shorter is read again from its start. ``on_record`` errors are swallowed (the
    console must never stop a run)."""
    path = Path(path)
    offset = path.stat().st_size if path.exists() else 0
    stop = threading.Event()

    def read_new() -> None:
        nonlocal offset
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        if size < offset:
            offset = 0
        if size == offset:
            return
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size - offset)
        end = data.rfind(b"\n") + 1  # whole lines only: the writer may be mid-line
        offset += end
        for raw in data[:end].splitlines():
            with contextlib.suppress(Exception):
                on_record(json.loads(raw))

    def run() -> None:
        while not stop.wait(poll_s):
            read_new()

    thread = threading.Thread(target=run, name="follow-metrics", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        read_new()


@contextlib.contextmanager
def show_training(desc: str, metrics_path: str | Path, num_iterations: int, start: int = 0,
                  line: Callable[[dict], str] | None = None,
                  also: Callable[[dict], None] | None = None) -> Iterator[None]:
    """A training stage's progress on this process's console while the block runs: the records
    appended to its ``metrics.jsonl`` (by the trainer's callback) as a :class:`TrainProgress`;
    ``also`` gets every record too (e.g. to export it as metrics)."""
    progress = TrainProgress(desc, num_iterations, start=start, line=line)

    def on_record(record: dict) -> None:
        try:
            progress.record(record)
        finally:
            if also is not None:
                also(record)

    try:
        with follow_jsonl(metrics_path, on_record):
            yield
    finally:
        progress.close()
