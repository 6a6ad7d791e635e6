"""llm/run/aggregate.py: the estimate over a prompt set is the mean of the per-prompt estimates, with the fixed-set
SE √(Σ SE_i²)/m and the population SE s/√m with a Student-t interval; one prompt is exactly that prompt. The
population SE is checked against its definition by simulation: prompts drawn from a population of known mean."""
import math

import numpy as np
import pytest

from kl_estimation.core.estimators import Z95, sequence_estimates, t95
from kl_estimation.llm.run.aggregate import prompt_set_estimates
from kl_estimation.llm.run.store import records_to_arrays

T = 4


def records(rng, n, prompt, shift=0.0):
    """Sequences of P (r = P) with per-step log-ratios of mean `shift` + 0.1: what a run of proposal P records."""
    out = []
    for _ in range(n):
        t = int(rng.integers(1, T + 1))
        lp = rng.normal(-1.0, 0.3, t)
        lq = lp - (shift + 0.1 + rng.normal(0, 0.2, t))
        out.append({"prompt": prompt, "log_p": lp.tolist(), "log_q": lq.tolist(), "log_r": lp.tolist(),
                    "kl_step": rng.uniform(0, 0.3, t).tolist()})
    return out


def per_prompt(recs):
    a = records_to_arrays(recs, T)
    return sequence_estimates(a["log_p"], a["log_q"], a["log_r"], a["kl_step"], a["mask"], True)


def test_one_prompt_is_that_prompt():
    recs = records(np.random.default_rng(0), 50, 0)
    out = prompt_set_estimates(recs, T, 1, True)
    assert "per_prompt" not in out
    for name, est in per_prompt(recs).items():
        got = out["estimates"][name]
        assert got["estimate"] == est["estimate"] and got["std_error"] == est["std_error"]
        assert math.isnan(got["std_error_population"])


def test_several_prompts_mean_and_both_standard_errors():
    rng = np.random.default_rng(1)
    recs = [r for i in range(3) for r in records(rng, 40, i, shift=0.5 * i)]
    rng.shuffle(recs)  # the records of a run mix prompts (forward batches pack units of several prompts)
    out = prompt_set_estimates(recs, T, 3, True)
    per = [per_prompt([r for r in recs if r["prompt"] == i]) for i in range(3)]
    assert [p["n_sequences"] for p in out["per_prompt"]] == [40, 40, 40]
    for name, got in out["estimates"].items():
        e = np.array([p[name]["estimate"] for p in per])
        se = np.array([p[name]["std_error"] for p in per])
        assert got["estimate"] == pytest.approx(e.mean(), rel=1e-12)
        assert got["std_error"] == pytest.approx(math.sqrt(np.sum(se ** 2)) / 3, rel=1e-12)
        assert got["std_error_population"] == pytest.approx(e.std(ddof=1) / math.sqrt(3), rel=1e-12)
        half = got["ci_population_high"] - got["estimate"]
        assert half == pytest.approx(t95(2) * got["std_error_population"], rel=1e-9)
        assert got["ci_high"] - got["estimate"] == pytest.approx(Z95 * got["std_error"], rel=1e-9)
        assert got["n"] == 120


@pytest.mark.slow
def test_population_interval_covers_the_population_mean():
    """Prompts drawn from a population (shift ~ N(0, 0.5²)): the t interval on m − 1 df covers the population's
    mean KL about 95 % of the time (a normal interval covers about 0.86 at m = 4). 150 prompt sets: the 4-sigma
    bound on a binomial 0.95 is ± 0.071."""
    rng = np.random.default_rng(2)
    truth = 0.1 * (T + 1) / 2  # E[length] × E[shift + 0.1], lengths uniform on 1..T
    covered = 0
    for _ in range(150):
        m = 4
        recs = [r for i in range(m) for r in records(rng, 20, i, shift=rng.normal(0, 0.5))]
        mc = prompt_set_estimates(recs, T, m, True)["estimates"]["MC"]
        covered += mc["ci_population_low"] <= truth <= mc["ci_population_high"]
    assert abs(covered / 150 - 0.95) < 0.071
