"""Progress bars for long work: tqdm's bar on a terminal, a plain line every few seconds in a log.

tqdm redraws one line with carriage returns, which a log file or a batch system's output shows as one endless line
(and ``disable=None`` shows nothing at all off a terminal). Off a terminal, ``bar`` prints complete lines instead: one
when the work starts, then one when the count has moved by a tenth of the total or ``LOG_INTERVAL`` seconds have
passed with something new to say — never two lines for one state — and one when it ends. tqdm redraws only when its
count moves, so a step that takes minutes (a forward batch of a big model, a lock held by another process) would leave
the screen or the log silent: a ticker thread redraws every ``LOG_INTERVAL`` seconds whatever the count (in a log, a
state already printed is repeated only every ``HEARTBEAT`` intervals).

One convention for every area: a run function takes ``progress: bool`` and, when True, draws one ``bar`` over the
whole run (synthetic.experiment.run, toy.markov.run, llm.run.runner.run_experiment, llm.corpus.run.run_corpus, and
the API's estimate_kl / corpus_kl); the parts of a run below it report steps to that bar.
"""
from __future__ import annotations

import sys
import threading
import time

from tqdm import tqdm

LOG_INTERVAL = 5.0  # seconds between lines in a log (at least, unless the count moved by LOG_STEP)
LOG_STEP = 0.1     # … or this fraction of the total
HEARTBEAT = 12     # intervals between two lines of one state (a step that takes minutes)
_clock = time.monotonic  # when a line is due (a test may set its own)
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:3.0f}%) [{elapsed} elapsed, {remaining} left]{postfix}"


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        text = s.replace("\r", "").rstrip()
        if text:  # wrapped to the terminal's width (a log read in one: COLUMNS), never cut
            from kl_estimation.report import prose

            self.stream.write(prose(text, rest="    ") + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """Off a terminal, a line only when something new can be said: the count moved by ≥ LOG_STEP of the total, or
    ``interval`` seconds passed since the last line and the state (count, description, postfix) changed; never two
    lines for one state, except a heartbeat every HEARTBEAT intervals while a step takes minutes (a big model's
    batch, a lock held elsewhere), so that a log is never silent for long. tqdm's own timing is off (mininterval 0):
    every redraw comes here and this decides."""

    _last = None     # (state, time, count) of the last line

    def __init__(self, *args, interval: float = LOG_INTERVAL, **kwargs):
        self.interval = interval  # before tqdm's __init__, which draws the first line
        super().__init__(*args, **kwargs)

    def _state(self):
        return self.n, self.desc, self.postfix

    def display(self, *args, **kwargs):
        now, state = _clock(), self._state()
        if self._last is not None and not getattr(self, "_closing", False):
            last_state, last_t, last_n = self._last
            moved = self.total and self.n - last_n >= LOG_STEP * self.total
            if state == last_state:
                if now - last_t < HEARTBEAT * self.interval:
                    return None
            elif not moved and now - last_t < self.interval:
                return None
        elif self._last is not None and state == self._last[0]:  # closing: the last line says it already
            return None
        self._last = (state, now, self.n)
        return super().display(*args, **kwargs)

    def close(self):
        self._closing = True
        super().close()


class _Ticker(threading.Thread):
    """Redraws `bar` every `interval` seconds until the bar closes."""

    def __init__(self, bar: tqdm, interval: float):
        super().__init__(daemon=True)
        self.bar, self.interval, self.stopped = bar, interval, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.bar.get_lock():
                if not self.bar.disable:
                    self.bar.refresh()


def _ticking(b: tqdm, interval: float) -> tqdm:
    ticker = _Ticker(b, max(interval, 0.05))
    close = b.close

    def closing():
        ticker.stopped.set()
        close()

    b.close = closing
    ticker.start()
    return b


def bar(total=None, desc: str | None = None, unit: str = "it", *, interval: float | None = None, **kw) -> tqdm:
    """A progress bar on stderr, redrawn at least every `interval` seconds (default LOG_INTERVAL): tqdm's own on a
    terminal, timed lines otherwise."""
    interval = LOG_INTERVAL if interval is None else interval
    stream = sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return _ticking(tqdm(total=total, desc=desc, unit=unit, leave=False, file=stream, **kw), min(interval, 1.0))
    return _ticking(_LogBar(total=total, desc=desc, unit=unit, leave=True, file=_Lines(stream), mininterval=0,
                            miniters=1, bar_format=LOG_FORMAT if total else None, ascii=True, interval=interval, **kw),
                    interval)
