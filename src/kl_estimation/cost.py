"""The cost of a long run, said before it is spent: a probe of the run's own first steps, scaled by its work plan.

A run counts its work in units that cost about the same each — sequence-tokens for a sampled LLM run (one row of a
forward batch for one decoding step), windows for a corpus run — and draws one progress bar over all of them, so that
the time left is there from the first seconds. The probe is nothing but the first ``probe`` units of that work,
timed: nothing is drawn for it alone, no stream is touched, no number changes (the random streams are per unit of
the run's plan, engine.unit_generator). Once they are done the run's cost is known to within what the plan cannot
see (a model loaded later, an exact head's search, sequences that end early at EOS), and a run expected to take
longer than ``COST_LINE_SECONDS`` says so in one line, with the cheapest reduction that keeps the question:

    about 38 min: 7 proposals × 2 directions × 4 prompts × 64 sequences; --proposals P ≈ 6 min

The same estimate is on the result (``KLResult.cost_estimate``, ``CorpusResult.timing["cost_estimate"]``).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

COST_LINE_SECONDS = 180.0  # runs expected to take longer say so before they start in earnest
PROBE_STEPS = 4  # decoding steps of the first forward batch timed for a sampled run, after its first
WIDTH = 80  # the line fits a terminal of this many columns
SHORT = (("sequences", "seqs"), ("directions", "dirs"), ("model passes", "passes"), ("proposals", "props"))


def duration(seconds: float) -> str:
    """A duration as people say it: 40 s, 6 min, 2.5 h."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class CostEstimate:
    """What a run is expected to take on this machine: ``seconds`` for the whole plan (``plan``: (count, what)
    factors, e.g. (7, "proposals")), measured by timing its first ``probe_work`` units of ``work`` (``unit``) in
    ``probe_seconds``; ``reduction``: the cheapest change that keeps the question — (setting, value as typed,
    seconds) — or None."""

    seconds: float
    plan: tuple
    work: int
    unit: str
    probe_work: int
    probe_seconds: float
    reduction: tuple | None = None
    announced: bool = field(default=False)

    def line(self, flags: bool = True, width: int = WIDTH) -> str:
        """One line, at most `width` columns where it can be: `flags` names the reduction as a flag (--proposals P),
        else as the API's keyword (proposals='P')."""
        red = ""
        if self.reduction is not None:
            name, value, s = self.reduction
            said = f"--{name.replace('_', '-')} {value}" if flags else f"{name}={value!r}"
            red = f"; {said} ≈ {duration(s)}"
        names = {w: w for _, w in self.plan}
        tiers = [(" on this machine", names, red), ("", names, red)]
        for long, short in SHORT:  # the words of the plan shortened one by one, as far as needed
            if long in names:
                names = {**names, long: short}
                tiers.append(("", names, red))
        tiers.append(("", names, ""))
        for where, names, tail in tiers:
            plan = " × ".join(f"{n} {names[w]}" for n, w in self.plan)
            text = f"about {duration(self.seconds)}{where}: {plan}{tail}"
            if len(text) <= width:
                return text
        return text

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "plan": [list(f) for f in self.plan], "work": self.work, "unit": self.unit,
                "probe_work": self.probe_work, "probe_seconds": self.probe_seconds,
                "reduction": None if self.reduction is None else
                {"setting": self.reduction[0], "value": self.reduction[1], "seconds": self.reduction[2]},
                "line": self.line(flags=False)}


class Meter:
    """A run's work in units on one progress bar (None: no bar), and the probe: the `probe` units after the first
    `warmup` ones (the first step of the first batch reads the prompt and pays for every first call: timed, it
    would double the estimate of a short run), timed, give the estimate of the whole (`estimate`, a CostEstimate
    built by ``make(seconds_per_unit, units_timed, seconds)``); `say` receives it when it exceeds COST_LINE_SECONDS
    (the command line prints its line on stderr). A plan too small for both times from ``begin()``."""

    def __init__(self, bar, total: int, probe: int, make, say=None, warmup: int = 0):
        self.bar, self.total, self.probe, self.make, self.say = bar, total, max(1, min(probe, total)), make, say
        self.warmup = warmup if warmup + self.probe <= total else 0
        self.done, self.t0, self.start, self.estimate = 0, None, None, None

    def begin(self) -> None:
        """The measured work starts now (after what the plan does not count: loading, an exact head's search)."""
        if self.t0 is None:
            self.t0 = time.perf_counter()
            if not self.warmup:
                self.start = (self.t0, 0)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
        self.done += n
        if self.estimate is not None or self.t0 is None:
            return
        if self.start is None:
            if self.done >= self.warmup:
                self.start = (time.perf_counter(), self.done)
            return
        t, d = self.start
        if self.done - d >= self.probe:
            spent = time.perf_counter() - t
            self.estimate = self.make(spent / (self.done - d), self.done - d, spent)
            if self.say is not None and self.estimate.seconds >= COST_LINE_SECONDS:
                self.estimate.announced = True
                self.say(self.estimate)


def say_on_stderr(flags: bool):
    """The announcer of the scripts and the API: the estimate's line on stderr, above the bar (tqdm.write keeps the
    bar whole on a terminal)."""
    def say(estimate: CostEstimate) -> None:
        from tqdm import tqdm

        tqdm.write(estimate.line(flags=flags), file=sys.stderr)
        sys.stderr.flush()

    return say
