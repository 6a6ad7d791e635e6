r"""One trust policy for every area: which estimates to trust, flags as records, and the one estimate to report.

The same code judges the single-token synthetic methods (synthetic.evaluation), the toy Markov pairs' sampled rows
(toy.markov: every repeat is judged as an LLM run is) and LLM runs (llm.run.runner):

* sample-only checks (verdicts.checks.sample_flags) apply everywhere, as far as a row carries the diagnostics;
* exact checks (verdicts.checks.exact_flags: bias, a sample variance far below the exact one) apply where an exact
  mean and variance exist (single-token sums, the toy DP); there the exact variance decides, not k̂ or the top
  weight share;
* the consistency checks with P, the rule that never recommends what P cannot confirm (UNCONFIRMED), and the
  recommendation (verdicts.policy) apply to any run that includes P.

Flags are records (verdicts.flags.Flag: a Code and a message); a row's ``flag`` is the short string of its codes.
Estimator kinds are an Enum with properties (verdicts.kinds.Estimator), not name prefixes.
"""
from kl_estimation.verdicts.checks import (
    DEGENERATE_RATIO,
    MIN_CV_SEQUENCES,
    exact_flags,
    mean_khat_flag,
    sample_flags,
)
from kl_estimation.verdicts.flags import Code, Flag, as_flags, codes, has
from kl_estimation.verdicts.kinds import Estimator, kind
from kl_estimation.verdicts.policy import (
    CHALLENGER_MARGIN,
    CONFIRM_RATIO,
    CONSISTENCY_Z,
    DEFAULT_REASON,
    MIN_DISPUTERS,
    P_KEY,
    P_NAME,
    PAIR_Z,
    advise,
    flagged_counts,
    from_records,
    is_p_row,
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

__all__ = ["CHALLENGER_MARGIN", "CONFIRM_RATIO", "CONSISTENCY_Z", "Code", "MIN_DISPUTERS", "PAIR_Z", "advise",
           "needed_sequences", "recommend_subset", "DEFAULT_REASON", "DEGENERATE_RATIO", "Estimator", "Flag",
           "MIN_CV_SEQUENCES", "P_BASED", "P_KEY", "P_NAME", "as_flags", "codes", "exact_flags", "flagged_counts",
           "from_records", "has", "is_p_row", "judge", "judge_repeats", "judge_rows", "kind", "mark_recommended",
           "mean_khat_flag", "rank", "recommend", "reference", "sample_flags", "table_rows"]
