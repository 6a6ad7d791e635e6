"""Units of work — (direction, prompt, proposal, batch), each with its own random stream — packed into forward
batches, and the records a batch yields."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kl_estimation.llm.engine import FORWARD, sample_batch, unit_generator


@dataclass(frozen=True)
class Unit:
    """Sequences `rows` of batch `batch` after prompt `prompt`, for one proposal: one random stream."""

    prompt: int
    batch: int
    rows: int


def batch_records(b, decode, **tags) -> list[dict]:
    """One JSON-ready record per sequence, per-step lists cut at EOS (only the steps that count); `tags`: arrays of
    one integer per sequence stored under their names (the unit: prompt, batch)."""
    out = []
    for i in range(b.token_ids.shape[0]):
        n = int(b.mask[i].sum())
        lp, lq, lr = b.log_p[i, :n], b.log_q[i, :n], b.log_r[i, :n]
        ids = b.token_ids[i, :n].tolist()
        rec = dict(text=decode(ids), token_ids=ids, log_p=lp.tolist(), log_q=lq.tolist(), log_r=lr.tolist(),
                   kl_step=b.kl_step[i, :n].tolist(), log_weight=float(np.sum(lp - lr)),
                   log_ratio=float(np.sum(lp - lq)), uncovered_mass=float(b.uncovered[i, :n].max(initial=0.0)))
        if b.log_p_cond is not None:  # drawn from the remainder of an exact head (llm/head.py)
            rec["log_p_cond"] = b.log_p_cond[i, :n].tolist()
        rec.update({k: int(v[i]) for k, v in tags.items()})
        out.append(rec)
    return out


def plan_units(n_prompts: int, n_samples: int, batch_size: int) -> list[Unit]:
    """Every unit of one proposal, in record order: per prompt, ⌈n_samples / batch_size⌉ batches."""
    return [Unit(i, j, min(batch_size, n_samples - j * batch_size))
            for i in range(n_prompts) for j in range(math.ceil(n_samples / batch_size))]


def pack(units: list[Unit], batch_size: int) -> list[list[Unit]]:
    """Consecutive units into forward batches of at most batch_size sequences."""
    out, rows = [], batch_size
    for u in units:
        if rows + u.rows > batch_size:
            out.append([])
            rows = 0
        out[-1].append(u)
        rows += u.rows
    return out


def sample_units(pair, prop, units: list[Unit], cfg, direction: str = FORWARD, heads=None, on_work=None) -> list[dict]:
    """One forward batch of units (drawn with cfg.sampler) → their records, each tagged with its unit (prompt and
    batch index). `pair` is the direction's view of the pair (engine.pair_view); `direction` keys the streams.
    `heads` {prompt: head.Head}: the units of those prompts draw from the remainder of their head, one forward
    batch per prompt (a head conditions the rows of its own prompt). `on_work(n)`: n sequence-tokens done (a row for
    a step), as they are done (cost.Meter)."""
    if heads and any(u.prompt in heads for u in units):
        groups = [[u for u in units if u.prompt == i] for i in dict.fromkeys(u.prompt for u in units)]
        return [r for g in groups for r in _sample(pair, prop, g, cfg, direction, heads.get(g[0].prompt), on_work)]
    return _sample(pair, prop, units, cfg, direction, None, on_work)


def _sample(pair, prop, units, cfg, direction, head, on_work=None) -> list[dict]:
    streams = [(unit_generator(cfg.seed, prop, u.batch, pair.device, u.prompt, direction), u.rows) for u in units]
    sizes = [u.rows for u in units]
    rows, batch = np.repeat([u.prompt for u in units], sizes), np.repeat([u.batch for u in units], sizes)
    n = len(rows)
    b = sample_batch(pair, prop, n, cfg.max_new_tokens, streams, prompt_rows=torch.as_tensor(rows),
                     sampler=cfg.sampler, exclude=head, on_step=None if on_work is None else lambda k: on_work(n * k))
    return batch_records(b, pair.decode, prompt=rows, batch=batch)


def split_by_unit(units: list[Unit], records: list[dict]) -> dict[Unit, list[dict]]:
    """A forward batch's (or a partial line's) records, in unit order, back to their units."""
    it = iter(records)
    return {u: [next(it) for _ in range(u.rows)] for u in units}


def unit_groups(units: list[Unit], sampler: str):
    """Each record's unit index when the sampler's rows are dependent (their SE must come from units), else None."""
    from kl_estimation.core.draws import DRAWS

    return None if DRAWS[sampler].independent_rows else np.repeat(np.arange(len(units)), [u.rows for u in units])
