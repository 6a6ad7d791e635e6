"""Checks of user-facing settings shared by every area: one ValueError naming the parameter."""
from __future__ import annotations

import numpy as np


def check_int(flag: str, value, low: int) -> None:
    """ValueError unless `value` is an integer ≥ `low` (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{flag}: must be an integer ≥ {low} (got {value!r})")


def check_sizes(vocab: int, draws: int, n_repeats: int, n_samples: int, what: str) -> None:
    """Refuse a run that cannot fit in memory, naming the flag whose size dominates."""
    from kl_estimation.core.resources import check_memory

    if vocab >= draws:
        check_memory(vocab + draws, "vocab_size", what)
    else:
        flag = "n_repeats" if n_repeats >= n_samples else "n_samples"
        check_memory(vocab + draws, flag, f"{n_repeats} repeats × {n_samples} samples (`n_repeats` × `n_samples`)")


def check_names(given, known, what: str) -> None:
    """ValueError for the first name in `given` that is not in `known`, naming it, with the closest known one."""
    import difflib

    for name in given:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(known)}"
            raise ValueError(f"{name}: not a setting of {what}{hint}")
