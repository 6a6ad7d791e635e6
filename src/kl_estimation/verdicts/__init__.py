r"""One trust policy for every area: which estimates to trust, flags as records, and the one estimate to report.

The same code judges the single-token synthetic methods (synthetic.evaluation), the toy Markov pairs' sampled rows
(toy.markov: every repeat is judged as an LLM run is) and LLM runs (llm.run.runner):

* sample-only checks (verdicts.checks.sample_flags) apply everywhere, as far as a row carries the diagnostics;
* exact checks (verdicts.checks.exact_flags: bias, a sample variance far below the exact one) apply where an exact
  mean and variance exist (single-token sums, the toy DP); there the exact variance decides, not k̂ or the top
  weight share;
* the consistency checks with P, the rule that never recommends what P cannot confirm (UNCONFIRMED), and the
  recommendation (verdicts.policy) apply to any run that includes P.

What flows in and out is typed (core.results): frozen Rows, flags as records (Flag: a Code and its data), Advice and
Reason as kind + fields — words are rendered from them at the edge, in the row's direction. A row's ``flag`` is the
short string of its codes. Estimator kinds are an Enum with properties (core.kinds.Estimator), not name prefixes.
verdicts imports nothing from llm: the proposal identity lives in core.proposals.
"""
from kl_estimation.core.kinds import Estimator, kind
from kl_estimation.core.proposals import P_KEY, P_NAME
from kl_estimation.core.results import Advice, Code, Flag, Reason, Row, as_flags, codes, has, render
from kl_estimation.verdicts.checks import (
    DEGENERATE_RATIO,
    MIN_CV_SEQUENCES,
    exact_flags,
    mean_khat_flag,
    sample_flags,
)
from kl_estimation.verdicts.policy import (
    CHALLENGER_MARGIN,
    CONFIRM_RATIO,
    CONSISTENCY_Z,
    MIN_DISPUTERS,
    PAIR_Z,
    advise,
    from_records,
    judge,
    judge_repeats,
    judge_rows,
    mark_recommended,
    needed_sequences,
    rank,
    recommend,
    recommend_subset,
    reference,
    table_rows,
)

P_BASED = tuple(e.value for e in Estimator if e.p_based)  # ("MC", "RB", "RB+CV")
DEFAULT_REASON = render(Reason("default_cv"))

__all__ = [
    "CHALLENGER_MARGIN",
    "CONFIRM_RATIO",
    "CONSISTENCY_Z",
    "DEFAULT_REASON",
    "DEGENERATE_RATIO",
    "MIN_CV_SEQUENCES",
    "MIN_DISPUTERS",
    "PAIR_Z",
    "P_BASED",
    "P_KEY",
    "P_NAME",
    "Advice",
    "Code",
    "Estimator",
    "Flag",
    "Reason",
    "Row",
    "advise",
    "as_flags",
    "codes",
    "exact_flags",
    "from_records",
    "has",
    "judge",
    "judge_repeats",
    "judge_rows",
    "kind",
    "mark_recommended",
    "mean_khat_flag",
    "needed_sequences",
    "rank",
    "recommend",
    "recommend_subset",
    "reference",
    "render",
    "sample_flags",
    "table_rows",
]
