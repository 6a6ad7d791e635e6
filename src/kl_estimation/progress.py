"""Progress bars for long work: tqdm's bar on a terminal, a plain line every few seconds in a log.

tqdm redraws one line with carriage returns, which a log file or a batch system's output shows as one endless line
(and ``disable=None`` shows nothing at all off a terminal). Off a terminal, ``bar`` prints complete lines instead: one
when the work starts, one every ``LOG_INTERVAL`` seconds, one when it ends. tqdm redraws only when its count moves,
so a step that takes minutes (a forward batch of a big model, a lock held by another process) would leave the screen
or the log silent: a ticker thread redraws every ``LOG_INTERVAL`` seconds whatever the count.

One convention for every area: a run function takes ``progress: bool`` and, when True, draws one ``bar`` over the
whole run (synthetic.experiment.run, toy.markov.run, llm.run.runner.run_experiment, llm.corpus.run.run_corpus, and
the API's estimate_kl / corpus_kl); the parts of a run below it report steps to that bar.
"""
from __future__ import annotations

import sys
import threading

from tqdm import tqdm

LOG_INTERVAL = 5.0  # seconds between lines in a log
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
    """Postfix updates wait for the next timed line instead of printing one each (they come once per batch)."""

    _stale = False  # a postfix set since the last line

    def set_postfix_str(self, s="", refresh=True):
        super().set_postfix_str(s, refresh=False)
        self._stale = True

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)
        self._stale = True

    def display(self, *args, **kwargs):
        self._stale = False
        return super().display(*args, **kwargs)

    def close(self):
        if getattr(self, "last_print_n", None) == self.n and not self._stale:  # the last line says it already
            self.leave = False
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
    return _ticking(_LogBar(total=total, desc=desc, unit=unit, leave=True, file=_Lines(stream),
                            mininterval=interval, bar_format=LOG_FORMAT if total else None, ascii=True, **kw),
                    interval)
