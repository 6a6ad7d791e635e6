"""llm/run/units.py: planning units, packing them into forward batches and splitting a batch's records back; the
order of records never depends on the packing (a resumed run redraws nothing it kept)."""
import itertools

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from kl_estimation.llm.run.units import Unit, pack, plan_units, split_by_unit, unit_groups


@given(st.integers(1, 4), st.integers(2, 60), st.integers(1, 25))
def test_plan_units_covers_every_sequence_once(n_prompts, n_samples, batch_size):
    units = plan_units(n_prompts, n_samples, batch_size)
    for i in range(n_prompts):
        mine = [u for u in units if u.prompt == i]
        assert [u.batch for u in mine] == list(range(len(mine)))
        assert sum(u.rows for u in mine) == n_samples and all(1 <= u.rows <= batch_size for u in mine)
    assert [(u.prompt, u.batch) for u in units] == sorted((u.prompt, u.batch) for u in units)  # record order


@given(st.integers(1, 4), st.integers(2, 60), st.integers(1, 25), st.integers(1, 40))
def test_pack_keeps_order_and_the_batch_size(n_prompts, n_samples, unit_rows, batch_size):
    units = plan_units(n_prompts, n_samples, min(unit_rows, batch_size))
    batches = pack(units, batch_size)
    assert [u for b in batches for u in b] == units
    assert all(b and sum(u.rows for u in b) <= batch_size for b in batches)
    # greedy: a batch ends only when the next unit would not fit
    for b, nxt in itertools.pairwise(batches):
        assert sum(u.rows for u in b) + nxt[0].rows > batch_size


def test_split_by_unit_gives_each_unit_its_records():
    units = [Unit(0, 0, 2), Unit(1, 0, 3), Unit(0, 1, 1)]
    records = [{"i": i} for i in range(6)]
    out = split_by_unit(units, records)
    assert [[r["i"] for r in out[u]] for u in units] == [[0, 1], [2, 3, 4], [5]]


def test_unit_groups_only_for_dependent_rows():
    units = [Unit(0, 0, 2), Unit(0, 1, 3)]
    assert unit_groups(units, "iid") is None
    np.testing.assert_array_equal(unit_groups(units, "sobol"), [0, 0, 1, 1, 1])
