r"""Sequence-level ground truth: toy autoregressive pairs with exact KL and exact estimator variances.

Toy pair: Markov models of order k ∈ {1, 2} over V tokens (token 0 is EOS). The state is the last k symbols (a
start symbol V fills the history at t = 0), so there are S = (V+1)^k states and the next-token rows
P_t(·|s), Q_t(·|s) are full tables of shape (T, S, V): they depend on the position and the state. Each P row is a
long-tailed family row (distributions.base_weights over the V−1 ordinary tokens, ranks randomly permuted per row,
EOS probability ``EOS_PROB``); each Q row is that P row with mass moved as in the single-token experiments
(distributions.shift_mass, low / medium / high).

Exact values by backward dynamic programming over (position, state) — never by listing the V^T sequences. For a
token-local proposal r_t(·|s) with w = P/r, f = log P/Q and K_t(s) = KL(P_t(·|s)‖Q_t(·|s)), writing ′ for the value
at the next state (1 for A and 0 for the others when the sequence ends: EOS or t = T−1):

    D  = K + Σ_v P·D′                                  E[RB-IS suffix]         (= suffix KL; D at t = 0 is the KL)
    A  = Σ_v P²/r·A′                                   E[W²]
    B  = Σ_v P²/r·(f·A′ + B′)                          E[W²·F]
    C  = Σ_v P²/r·(f²·A′ + 2f·B′ + C′)                 E[W²·F²]                (IS second moment)
    E2 = K² + 2K·Σ_v P·D′ + Σ_v P²/r·E2′               E[G²], G = Σ_t W_<t K_t (RB-IS second moment)
    H  = K² + K·Σ_v P·D′ + Σ_v P·f·D′ + Σ_v P·H′       E[G·F] under r = P      (for the control variate)

so Var(IS) = C − KL², Var(RB-IS) = E2 − KL², SNIS's asymptotic n·Var = C − 2KL·B + KL²·A, and with r = P
(plain MC and RB) Cov(RB, MC) = H − KL². A proposal that puts r = 0 on a token with P > 0 (the token-level Optimal
and Balanced 1/2 proposals do, wherever P_t = Q_t on a token) loses the sequences through it: the DP sums only
over r > 0, so the exact mean it reports shows that bias.

Prefix-aware proposals carry the running log-ratio as state (unbounded): their exact values come from enumeration
(enumeration.enumerate_sequences) on small cases, and from comparison with the exact KL empirically otherwise.

Size limit: tables of T·S·V ≤ ``MAX_CELLS`` entries (e.g. order 2, V = 50, T = 20: 2.6 M), refused above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kl_estimation.core.exact import kl_rows
from kl_estimation.core.kinds import Estimator as E
from kl_estimation.core.proposals import log_ratio
from kl_estimation.core.streams import named_stream
from kl_estimation.core.validation import check_int, check_sizes
from kl_estimation.progress import bar as progress_bar
from kl_estimation.settings import Settings, setting, shared
from kl_estimation.synthetic.distributions import (
    DIVERGENCES,
    FAMILIES,
    HIGH_EXPONENT,
    MIN_VOCAB,
    SHIFTS,
    base_weights,
    shift_mass,
)
from kl_estimation.synthetic.experiment import SyntheticConfig, check_run

EOS = 0
EOS_PROB = 0.02
MAX_CELLS = 20_000_000
ORDERS = (1, 2)
# draws.DRAWS, named here so that the CLI need not load torch
SAMPLERS = ("iid", "stratified", "sobol", "array", "array-kl")


@dataclass(frozen=True)
class MarkovTables:
    """log P and log Q of shape (T, S, V); state index = last `order` symbols in base V+1 (V = start symbol)."""

    log_p: np.ndarray
    log_q: np.ndarray
    order: int
    family: str = ""
    divergence: str = ""

    @property
    def shape(self):
        return self.log_p.shape

    @property
    def vocab_size(self) -> int:
        return self.log_p.shape[-1]

    @property
    def start_state(self) -> int:
        return (self.vocab_size + 1) ** self.order - 1  # all start symbols

    def next_state(self, s, v):
        return (s * (self.vocab_size + 1) + v) % (self.vocab_size + 1) ** self.order


def check_size(vocab_size: int, order: int, max_new_tokens: int, family: str | None = None) -> None:
    if order not in ORDERS:
        raise ValueError(f"order: must be 1 or 2 (got {order!r})")
    check_int("max_new_tokens", max_new_tokens, 1)
    if vocab_size < 3:
        raise ValueError(f"vocab_size: a toy sequence model needs at least 3 tokens, EOS included (got {vocab_size})")
    if family is not None and vocab_size - 1 < MIN_VOCAB[family]:
        raise ValueError(f"vocab_size: family {family} needs at least {MIN_VOCAB[family] + 1} tokens in a sequence "
                         f"model, EOS included (got {vocab_size})")
    cells = max_new_tokens * (vocab_size + 1) ** order * vocab_size
    if cells > MAX_CELLS:
        raise ValueError(f"vocab_size: an order-{order} model with V={vocab_size}, T={max_new_tokens} needs "
                         f"{cells:,} table entries; the exact DP is limited to {MAX_CELLS:,} "
                         f"(e.g. order 2 with V ≤ 77 at T = 20, order 1 with V ≤ 1000)")


def markov_pair(family: str, divergence: str, vocab_size: int, order: int, max_new_tokens: int,
                rng: np.random.Generator) -> MarkovTables:
    """A random order-`order` pair whose rows are long-tailed `family` rows, Q shifted at `divergence`."""
    if family not in FAMILIES:
        raise ValueError(f"families: unknown family {family!r}; allowed: {', '.join(FAMILIES)}")
    if divergence not in SHIFTS:
        raise ValueError(f"divergence: unknown level {divergence!r}; allowed: {', '.join(DIVERGENCES)}, all")
    check_size(vocab_size, order, max_new_tokens, family)
    S, W = (vocab_size + 1) ** order, vocab_size - 1
    shape = (max_new_tokens, S, W)

    def rows(exponent):
        noise = rng.lognormal(0.0, 0.5, size=shape) if family == "mixture" else None
        w = np.broadcast_to(base_weights(family, W, exponent), shape) * (1 if noise is None else noise)
        w = rng.permuted(w, axis=-1)  # each (t, s) prefers its own tokens
        return w / w.sum(-1, keepdims=True)

    def with_eos(r):
        return np.concatenate([np.full(r.shape[:-1] + (1,), EOS_PROB), (1 - EOS_PROB) * r], axis=-1)

    p = with_eos(rows(None))
    q0 = with_eos(rows(HIGH_EXPONENT)) if divergence == "high" else p
    q, _ = shift_mass(q0, SHIFTS[divergence], rng)
    return MarkovTables(np.log(p), np.log(q), order, family, divergence)


class MarkovPair:
    """The toy pair behind the sampling engine's interface (llm/pair.py): start(prompt_rows) and step(state, tokens).
    It has one (empty) prompt: every row starts in the start state."""

    def __init__(self, tables: MarkovTables, device="cpu"):
        import torch  # here, not at import: single-token runs never pay for loading torch

        self.tables = tables
        self.log_p = torch.as_tensor(tables.log_p, device=device)
        self.log_q = torch.as_tensor(tables.log_q, device=device)
        self.eos_token_id = EOS
        self.vocab_size = tables.vocab_size
        self.device = torch.device(device)

    def start(self, prompt_rows):
        s = self.log_p.new_full((len(prompt_rows),), self.tables.start_state, dtype=int)
        return self.log_p[0, s], self.log_q[0, s], (0, s)

    def step(self, state, tokens):
        t, s = state
        s = self.tables.next_state(s, tokens)
        return self.log_p[t + 1, s], self.log_q[t + 1, s], (t + 1, s)

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


@dataclass(frozen=True)
class ExactValues:
    kl: float
    coverage: float  # E_r[W]: the P-probability of the sequences r can draw (1 when r covers P)
    is_mean: float  # E_r[W·F]: equals kl when r covers P
    snis_mean: float  # the limit of SNIS, E_r[W·F]/E_r[W]
    is_variance: float
    snis_variance: float  # asymptotic n·Var
    rbis_mean: float
    rbis_variance: float
    rb_mc_covariance: float | None  # Cov(RB, MC) under r = P (None for other proposals)


def exact_values(tables: MarkovTables, log_r: np.ndarray | None = None,
                 max_new_tokens: int | None = None) -> ExactValues:
    """Exact KL of the process truncated at `max_new_tokens` (default: the tables' T) and the exact mean and
    per-sequence variance of IS, SNIS and RB-IS with the token-local proposal `log_r` (same shape as the tables;
    None = P)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _exact_values(tables, log_r, max_new_tokens or tables.shape[0])


def _exact_values(tables, log_r, T) -> ExactValues:
    S, V = tables.shape[1], tables.shape[2]
    nxt = tables.next_state(np.arange(S)[:, None], np.arange(V)[None, :])
    ends = np.arange(V) == EOS
    one, zero = np.ones(S), np.zeros(S)
    A, B, C, D, E2, H, Dr, Mis, Z = one, zero, zero, zero, zero, zero, zero, zero, one
    for t in reversed(range(T)):
        lp, lq = tables.log_p[t], tables.log_q[t]
        p, f = np.exp(lp), log_ratio(lp, lq)
        K = kl_rows(lp, lq)
        stop = ends[None, :] | (t == T - 1)

        def nx(X, terminal, stop=stop):
            return np.where(stop, terminal, X[nxt])

        An, Bn, Cn, Dn, E2n, Hn, Drn, Misn, Zn = (nx(A, 1.0), nx(B, 0.0), nx(C, 0.0), nx(D, 0.0), nx(E2, 0.0),
                                                   nx(H, 0.0), nx(Dr, 0.0), nx(Mis, 0.0), nx(Z, 1.0))
        if log_r is None:
            w2r, cover = p, np.ones_like(p, dtype=bool)
        else:
            lr = log_r[t]
            cover = lr > -np.inf
            with np.errstate(over="ignore", invalid="ignore"):
                w2r = np.where(cover, np.exp(2 * lp - lr), 0.0)
        pc = np.where(cover, p, 0.0)  # P restricted to what r can draw
        A = np.sum(w2r * An, -1)
        B = np.sum(w2r * (f * An + Bn), -1)
        C = np.sum(w2r * (f * f * An + 2 * f * Bn + Cn), -1)
        D = K + np.sum(p * Dn, -1)
        Dr = K + np.sum(pc * Drn, -1)  # RB-IS mean (the prefix's KL terms count only on reachable prefixes)
        Mis = np.sum(pc * (f * Zn + Misn), -1)  # IS mean E_r[W·F]: only what r can reach counts
        Z = np.sum(pc * Zn, -1)  # E_r[W]: the P-mass r can reach
        E2 = K * K + 2 * K * np.sum(pc * Drn, -1) + np.sum(w2r * E2n, -1)
        H = K * K + K * np.sum(p * Dn, -1) + np.sum(p * f * Dn, -1) + np.sum(p * Hn, -1)
    s0 = tables.start_state
    kl = float(D[s0])
    z, mu = float(Z[s0]), float(Mis[s0] / Z[s0])

    def var(x):  # second moments beyond float64 (W² of a 20-step sequence can exceed 1e308) are +inf, not NaN
        return float(x) if np.isfinite(x) else math.inf

    return ExactValues(
        kl=kl, coverage=z, is_mean=float(Mis[s0]), snis_mean=mu, is_variance=var(C[s0] - Mis[s0] ** 2),
        snis_variance=var((C[s0] - 2 * mu * B[s0] + mu * mu * A[s0]) / z ** 2),
        rbis_mean=float(Dr[s0]), rbis_variance=var(E2[s0] - Dr[s0] ** 2),
        rb_mc_covariance=float(H[s0] - kl * kl) if log_r is None else None)


def proposal_table(tables: MarkovTables, proposal) -> np.ndarray:
    """A registry proposal applied to every row of the tables at once (the array-API functions take (T, S, V))."""
    return proposal(tables.log_p, tables.log_q)


# ------------------------------------------------------------------------------------------------ experiment

@dataclass
class SequenceConfig(Settings):
    """Every setting of a sequence run (Synthetic_tests.py --sequence): the synthetic run's settings with their own
    defaults, and the ones only a sequence run has."""

    RUN = "a sequence run"
    RUNS = "sequence runs"

    vocab_size: int = shared(SyntheticConfig, "vocab_size", default=201)  # 200 ordinary tokens + EOS
    order: int = setting(1, "Markov order, 1 or 2", type=int)
    max_new_tokens: int = setting(20, "tokens per sequence T", aliases=("--horizon",), type=int)
    n_samples: int = shared(SyntheticConfig, "n_samples", default=200)  # sequences per repeat
    n_repeats: int = shared(SyntheticConfig, "n_repeats", default=10)
    divergence: str = shared(SyntheticConfig, "divergence")
    families: tuple = shared(SyntheticConfig, "families")
    alpha_values: tuple = shared(SyntheticConfig, "alpha_values")
    seed: int = shared(SyntheticConfig, "seed")
    samplers: tuple = setting(("iid",), "how sequences are drawn; samplers other than iid add MC / RB / RB+CV rows "
                                        "(variance over repeats, each repeat one randomization); one of "
                                        + ", ".join(SAMPLERS), flag="sampler", nargs="+")

    @property
    def divergences(self):
        return DIVERGENCES if self.divergence == "all" else (self.divergence,)

    def validate(self) -> "SequenceConfig":
        check_run(self.n_samples, self.n_repeats, self.divergence, self.alpha_values, self.seed)
        for fam in self.families:
            if fam not in FAMILIES:
                raise ValueError(f"families: unknown family {fam!r}; allowed: {', '.join(FAMILIES)}")
            check_size(self.vocab_size, self.order, self.max_new_tokens, fam)
        if not self.families:
            raise ValueError(f"families: give at least one of {', '.join(FAMILIES)}")
        check_sizes(*memory_needed(self), self.n_repeats, self.n_samples,
                    f"order-{self.order} tables with V = {self.vocab_size}, T = {self.max_new_tokens}")
        for s in self.samplers:
            if s not in SAMPLERS:
                raise ValueError(f"sampler: unknown sampler {s!r}; allowed: {', '.join(SAMPLERS)}")
        if self.extra_samplers and self.n_repeats < 2:
            raise ValueError(f"n_repeats: samplers other than iid need at least 2 repeats (independent "
                             f"randomizations) for a variance; got {self.n_repeats}")
        return self

    @property
    def extra_samplers(self) -> tuple:
        return tuple(s for s in self.samplers if s != "iid")


def memory_needed(cfg: "SequenceConfig") -> tuple[int, int]:
    """Peak bytes, (tables part, sequences part): P and Q tables with the DP's arrays (about six table-sized float64
    arrays); all R·n sequences are drawn in one batch, holding about ten (R·n, V) float64 rows per step (log P, log Q,
    the proposal's arithmetic) and some twenty (R·n, T) float64 arrays of per-step values and estimator terms."""
    cells = cfg.max_new_tokens * (cfg.vocab_size + 1) ** cfg.order * cfg.vocab_size
    rows = cfg.n_repeats * cfg.n_samples
    return 8 * 6 * cells, 8 * rows * (10 * cfg.vocab_size + 20 * cfg.max_new_tokens)


def sequence_proposals(alpha_values) -> list:
    """Every token-local registry proposal, then the prefix-aware variants of the families that have one."""
    from kl_estimation.core.proposals import build_proposals
    from kl_estimation.llm.engine import (
        PREFIX_FAMILIES,
        PREFIX_SUFFIX,
        sequence_proposal,
    )

    local = build_proposals(alpha_values)
    names = [p.name for p in local] + [p.name + PREFIX_SUFFIX for p in local if p.family in PREFIX_FAMILIES]
    return [sequence_proposal(n) for n in names]


def _exact_for(tables: MarkovTables, prop) -> dict[str, tuple[float, float] | None]:
    """{estimator: (exact mean, exact per-sequence variance)}; None where no DP exists (prefix-aware)."""
    if prop.prefix_aware:
        return {E.IS: None, E.SNIS: None, E.RB_IS: None}
    ex = exact_values(tables, proposal_table(tables, prop.base))
    return {E.IS: (ex.is_mean, ex.is_variance), E.SNIS: (ex.snis_mean, ex.snis_variance),
            E.RB_IS: (ex.rbis_mean, ex.rbis_variance)}


def run_pair(tables: MarkovTables, cfg: SequenceConfig, progress=None) -> dict:
    """Every proposal × estimator on one toy pair: exact values by DP, estimates from the LLM sampler, and flags from
    the one trust policy — each repeat's sampled rows judged exactly as an LLM run's (verdicts.judge_repeats: weight
    identities, distinct draws, consistency with P, …), plus the exact checks (bias, sample variance far below the
    exact one) where the DP gives exact values."""
    from kl_estimation.core.estimators import sequence_estimates
    from kl_estimation.llm.engine import sample_batch, sequence_proposal, unit_generator
    from kl_estimation.synthetic.evaluation import method_metrics, rankings
    from kl_estimation.verdicts import judge_repeats

    pair = MarkovPair(tables)
    ex_p = exact_values(tables)
    kl, var_mc = ex_p.kl, ex_p.is_variance
    var_rb, cov = ex_p.rbis_variance, ex_p.rb_mc_covariance
    var_d = var_mc - 2 * cov + var_rb  # Var(MC − RB)
    cov_ad = cov - var_rb  # Cov(RB, MC − RB)
    beta_star = -cov_ad / var_d if var_d > 0 else 0.0
    R, n = cfg.n_repeats, cfg.n_samples
    judged = []  # one verdict entry per proposal: every repeat is one run of all proposals

    def draw(prop, exact_known=()):
        b = sample_batch(pair, prop, R * n, cfg.max_new_tokens, unit_generator(cfg.seed, f"{tables.family}/"
                                                                      f"{tables.divergence}/{prop.key}", 0, "cpu"))
        a = {k: getattr(b, k).reshape(R, n, -1) for k in ("log_p", "log_q", "log_r", "kl_step", "mask")}
        est = sequence_estimates(a["log_p"], a["log_q"], a["log_r"], a["kl_step"], a["mask"], prop.base is None)
        judged.append(dict(proposal=prop, estimates=est, uncovered=float(b.uncovered.max(initial=0.0)),
                           exact_known=exact_known))
        return est

    def entry(name, group, e, exact, weighted, prop, estimator):
        mean, var = exact if exact else (None, None)
        return dict(name=name, family=group, estimator=estimator, proposal=prop.label, proposal_key=prop.key,
                    exact_mean=mean, exact_variance=var, estimates=e["estimate"],
                    sample_variances=e["variance"], std_errors=e["std_error"],
                    ess_pct=[100 * x / n for x in e["ess"]], khat=e["khat"] if weighted else [None] * R,
                    max_weight=e["max_weight"])

    p_prop = sequence_proposal("P")
    est_p = draw(p_prop, exact_known=(E.MC, E.RB, E.RB_CV))
    entries = []
    for sampler in cfg.extra_samplers:  # one randomization per repeat: variances and SEs over repeats only
        reps = sampler_repeats(tables, sampler, n, R, cfg.seed, control_variate=True)
        for est_name, group in ((E.MC, "Naive MC"), (E.RB, "Rao-Blackwell"), (E.RB_CV, "Rao-Blackwell")):
            e = reps[est_name]
            sd = float(e.std(ddof=1))
            entries.append(dict(name=f"{est_name} [{sampler}]", family=group, estimator=est_name, proposal="P",
                                proposal_key=f"p_{sampler}", sampler=sampler, exact_mean=kl,
                                exact_variance=None, estimates=e.tolist(), sample_variances=[n * sd * sd] * R,
                                std_errors=[sd] * R, ess_pct=[100.0] * R, khat=[None] * R, max_weight=[1.0] * R,
                                variance_ratio_iid_rb=n * sd * sd / var_rb if var_rb > 0 else None))
        if progress:
            progress()
    entries[:0] = [
        entry("MC", "Naive MC", est_p[E.MC], (kl, var_mc), False, p_prop, E.MC),
        entry("RB", "Rao-Blackwell", est_p[E.RB], (ex_p.rbis_mean, var_rb), False, p_prop, E.RB),
        entry("RB+CV (cross-fitted β)", "Rao-Blackwell", est_p[E.RB_CV],
              (kl, var_rb - cov_ad ** 2 / var_d if var_d > 0 else var_rb), False, p_prop, E.RB_CV),
    ]
    if progress:
        progress()
    for prop in sequence_proposals(cfg.alpha_values):
        exact = _exact_for(tables, prop)
        e = draw(prop, exact_known=tuple(k for k, v in exact.items() if v is not None))
        group = prop.base.family
        for est_name in (E.IS, E.SNIS, E.RB_IS):
            entries.append(entry(f"{est_name} · {prop.name}", group, e[est_name], exact[est_name], True, prop,
                                 est_name))
        if progress:
            progress()
    sampled = judge_repeats(judged, R)  # {(proposal key, estimator): [Flag]}
    naive = float(np.mean(entries[0]["sample_variances"]))
    methods = [method_metrics(m, kl, var_mc, naive, sample_flags=sampled.get((m["proposal_key"], m["estimator"]), []))
               for m in entries]
    return dict(family=tables.family, divergence=tables.divergence, true_kl=kl, theoretical_variance=var_mc,
                cv_beta_star=beta_star, order=tables.order, max_new_tokens=cfg.max_new_tokens,
                vocab_size=tables.vocab_size, methods=methods, rankings=rankings(methods))


def n_steps(cfg: SequenceConfig) -> int:
    return len(cfg.divergences) * len(cfg.families) * (1 + len(sequence_proposals(cfg.alpha_values))
                                                        + len(cfg.extra_samplers))


def run(cfg: SequenceConfig, progress: bool = False):
    """All (family, divergence) pairs. Returns (pairs, arrays) like synthetic.run; arrays hold the tables.
    `progress`: a bar with one step per (pair, proposal or sampler)."""
    cfg.validate()
    pairs, arrays = [], {}
    with progress_bar(total=n_steps(cfg), desc="sequence run", unit="step", disable=not progress) as bar:
        for divergence in cfg.divergences:
            for family in cfg.families:
                tables = markov_pair(family, divergence, cfg.vocab_size, cfg.order, cfg.max_new_tokens,
                                     named_stream(cfg.seed, "markov", family, divergence))
                pairs.append(run_pair(tables, cfg, bar.update))
                arrays[f"{family}/{divergence}/log_P"] = tables.log_p
                arrays[f"{family}/{divergence}/log_Q"] = tables.log_q
    return pairs, arrays


# ------------------------------------------------------------------------------------------------ samplers

def temper(tables: MarkovTables, temperature: float) -> MarkovTables:
    """Both tables at temperature τ: log-softmax(log P/τ), log-softmax(log Q/τ) — what an LM's sampler does."""
    from scipy.special import log_softmax

    return MarkovTables(log_softmax(tables.log_p / temperature, -1), log_softmax(tables.log_q / temperature, -1),
                        tables.order, tables.family, tables.divergence)


def sampler_rb_repeats(tables: MarkovTables, sampler: str, n: int, repeats: int, seed: int = 0,
                       max_rows: int = 32768) -> dict[str, np.ndarray]:
    """sampler_repeats' MC and RB estimates through the same draw source, with the per-step KL looked up in a
    (T, S) table instead of computed over the vocabulary per row: several times faster, for long studies."""
    import torch

    from kl_estimation.core.draws import draw_step, make_source
    from kl_estimation.llm.engine import unit_generator

    T, S, V = tables.shape
    lp, lq = torch.as_tensor(tables.log_p), torch.as_tensor(tables.log_q)
    kl = kl_rows(lp, lq)  # (T, S)
    per = max(1, max_rows // n)
    out = {E.MC: [], E.RB: []}
    for start in range(0, repeats, per):
        reps = range(start, min(repeats, start + per))
        streams = [(unit_generator(seed, f"{tables.family}/{tables.divergence}/{sampler}/{n}", r, "cpu"), n)
                   for r in reps]
        src = make_source(sampler, streams, T, "cpu")
        s = torch.full((n * len(reps),), tables.start_state, dtype=torch.long)
        alive = torch.ones(s.shape, dtype=torch.bool)
        mc, rb = torch.zeros(s.shape, dtype=torch.float64), torch.zeros(s.shape, dtype=torch.float64)
        for t in range(T):
            kl_t = torch.where(alive, kl[t, s], 0.0)
            x = draw_step(src, t, lp[t, s], kl_t)
            rb += kl_t
            mc += torch.where(alive, lp[t, s, x] - lq[t, s, x], 0.0)
            alive &= x != EOS
            s = torch.as_tensor(tables.next_state(s, x))
        out[E.MC].append(mc.numpy().reshape(len(reps), n).mean(-1))
        out[E.RB].append(rb.numpy().reshape(len(reps), n).mean(-1))
    return {k: np.concatenate(v) for k, v in out.items()}


def sampler_repeats(tables: MarkovTables, sampler: str, n: int, repeats: int, seed: int = 0,
                    control_variate: bool = False, max_rows: int = 32768) -> dict[str, np.ndarray]:
    """`repeats` independent randomizations (one unit each) of n sequences from P drawn with `sampler`: the MC,
    RB (and with `control_variate`, RB+CV with β cross-fitted between repeats) estimate of each, arrays
    (repeats,). Without the control variate, units are drawn in forward batches of ≤ max_rows sequences."""
    from kl_estimation.core.estimators import (
        rao_blackwell_is_terms,
        rb_control_variate_terms,
    )
    from kl_estimation.llm.engine import sample_batch, sequence_proposal, unit_generator

    pair, prop = MarkovPair(tables), sequence_proposal("P")
    T = tables.shape[0]
    per = repeats if control_variate else max(1, max_rows // n)
    out = {E.MC: [], E.RB: [], E.RB_CV: []}
    for start in range(0, repeats, per):
        reps = range(start, min(repeats, start + per))
        streams = [(unit_generator(seed, f"{tables.family}/{tables.divergence}/{sampler}/{n}", r, "cpu"), n)
                   for r in reps]
        b = sample_batch(pair, prop, n * len(reps), T, streams, sampler=sampler)
        f_step = np.where(b.mask, b.log_p - b.log_q, 0.0)
        zero = np.zeros_like(b.log_p)
        out[E.MC].append(f_step.sum(-1).reshape(len(reps), n).mean(-1))
        out[E.RB].append(rao_blackwell_is_terms(b.kl_step, zero, b.mask).reshape(len(reps), n).mean(-1))
        if control_variate:
            cv = rb_control_variate_terms(b.kl_step, f_step, zero, b.mask, fold=np.repeat(np.arange(len(reps)) % 2, n))
            out[E.RB_CV].append(cv.reshape(len(reps), n).mean(-1))
    return {k: np.concatenate(v) for k, v in out.items() if v}
