r"""Single-token synthetic experiments: every method on every (family, divergence) pair, against exact values.

A *method* is a sampling distribution r over the vocabulary plus a per-sample term g(x); its estimate over n draws is
the mean of g, and its exact mean and variance are sums over the vocabulary
(``synthetic.evaluation.exact_moments``). Naive MC, Schulman's k2/k3, sum-and-sample Rao-Blackwell and importance
sampling with every registry proposal are all of this shape, so one vectorised sampler serves them all: for R
repeats × n draws it inverts the CDF of r with one ``searchsorted`` call — no Python loop over samples or repeats.

Random streams: each (family, divergence) pair and each method's draws get their own numpy Generator derived from
``seed`` and the names (not positions), so narrowing ``--families`` or ``--alpha-values`` leaves every other number
unchanged. Naive MC, k2 and k3 share one set of draws from P.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from kl_estimation import runio
from kl_estimation.core import estimators as est
from kl_estimation.core.diagnostics import kish_ess, pareto_khat
from kl_estimation.core.kinds import Estimator
from kl_estimation.core.proposals import (
    DEFAULT_ALPHA_VALUES,
    build_proposals,
    log_ratio,
)
from kl_estimation.core.streams import named_stream
from kl_estimation.core.validation import check_int, check_sizes
from kl_estimation.progress import bar as progress_bar
from kl_estimation.settings import Settings, setting
from kl_estimation.synthetic.distributions import (
    DIVERGENCES,
    FAMILIES,
    ModelPair,
    check_family,
    model_pair,
    top_mass,
)
from kl_estimation.synthetic.evaluation import (
    exact_kl,
    exact_moments,
    method_metrics,
    rankings,
)
from kl_estimation.verdicts import codes

DEFAULT_RB_TOP_K = 100


@dataclass
class SyntheticConfig(Settings):
    """Every setting of a single-token synthetic run; each is a flag of Synthetic_tests.py (``--`` + the name with
    dashes) with this default."""

    RUN = "a synthetic run"
    RUNS = "single-token synthetic runs"
    NATURE = " of single tokens"

    vocab_size: int = setting(3000, "vocabulary size V", type=int)
    n_samples: int = setting(300, "samples (sequences) per method and repeat", type=int)
    n_repeats: int = setting(2, "independent repeats per method", type=int)
    divergence: str = setting("medium", f"one of {', '.join(DIVERGENCES)}, all")
    families: Sequence[str] = setting(FAMILIES, f"any of {', '.join(FAMILIES)}", nargs="+")
    alpha_values: Sequence[float] = setting(DEFAULT_ALPHA_VALUES, "grid in [0, 1] for the α / β / λ / t of the "
                                            "mixture, geometric, chi-square and cross-entropy proposals",
                                            nargs="+", type=float)
    rb_top_k: int = setting(DEFAULT_RB_TOP_K, "Rao-Blackwell: top-k tokens of P summed exactly, the rest sampled "
                                              "(0 = naive MC)", type=int)
    seed: int = setting(0, "seed of every random stream", type=int)

    @property
    def divergences(self) -> tuple[str, ...]:
        return DIVERGENCES if self.divergence == "all" else (self.divergence,)

    def validate(self) -> "SyntheticConfig":
        """Raise ValueError naming the flag and what is allowed; returns self for chaining."""
        check_int("vocab_size", self.vocab_size, 2)
        check_run(self.n_samples, self.n_repeats, self.divergence, self.alpha_values, self.seed)
        if not self.families:
            raise ValueError(f"families: give at least one of {', '.join(FAMILIES)}")
        for fam in self.families:
            check_family(fam, self.vocab_size)
        if isinstance(self.rb_top_k, bool) or not isinstance(self.rb_top_k, (int, np.integer)) \
                or not 0 <= self.rb_top_k < self.vocab_size:
            raise ValueError(f"rb_top_k: must be an integer in [0, vocab size {self.vocab_size}) "
                             f"(got {self.rb_top_k!r}; 0 is naive MC)")
        vocab, draws = memory_needed(self)
        check_sizes(vocab, draws, self.n_repeats, self.n_samples, f"V = {self.vocab_size} tokens × "
                    f"{n_steps(self)} (pair, method) arrays")
        return self


def memory_needed(cfg: "SyntheticConfig") -> tuple[int, int]:
    """Peak bytes of a run, (vocabulary part, draws part): every pair keeps P, Q and each method's r for the npz;
    the pair being run holds each method's log r, g and log w (float64) and about four more temporaries; each method's
    draws are an (R, n) int64 array kept for the pair, with about six float64 (R, n) temporaries while evaluated."""
    methods = n_steps(cfg) // (len(cfg.divergences) * len(cfg.families))
    pairs = len(cfg.divergences) * len(cfg.families)
    vocab = 8 * cfg.vocab_size * (pairs * (methods + 2) + 7 * methods)
    draws = 8 * cfg.n_repeats * cfg.n_samples * (methods + 6)
    return vocab, draws


def check_run(n_samples, n_repeats, divergence: str, alpha_values, seed) -> None:
    """The settings the single-token and the sequence experiments share."""
    check_int("n_samples", n_samples, 2)
    check_int("n_repeats", n_repeats, 1)
    check_int("seed", seed, 0)
    if divergence not in (*DIVERGENCES, "all"):
        raise ValueError(f"divergence: unknown level {divergence!r}; allowed: {', '.join(DIVERGENCES)}, all")
    if not alpha_values:
        raise ValueError("alpha_values: give at least one value in [0, 1]")
    for a in alpha_values:
        if not isinstance(a, (int, float)) or not 0 <= a <= 1:  # NaN fails too
            raise ValueError(f"alpha_values: each value must be in [0, 1] (it sets α, β, λ and t of the "
                             f"mixture, geometric, chi-square and cross-entropy proposals); got {a!r}")


@dataclass
class Method:
    """Sampling distribution r, per-sample term g and log-weight log P/r, all over the vocabulary."""

    name: str
    group: str  # colour family in figures: "Naive MC", "Rao-Blackwell", "Schulman", or the proposal family
    estimator: Estimator
    log_r: np.ndarray
    g: np.ndarray
    log_w: np.ndarray
    draws: str  # methods with the same key reuse the same draws
    is_weighted: bool = False


def make_pair(family: str, divergence: str, cfg: SyntheticConfig) -> ModelPair:
    return model_pair(family, divergence, cfg.vocab_size, named_stream(cfg.seed, "pair", family, divergence))


def methods_for(P: np.ndarray, Q: np.ndarray, alpha_values=DEFAULT_ALPHA_VALUES, rb_top_k=DEFAULT_RB_TOP_K):
    """Every method of the synthetic comparison for the pair (P, Q)."""
    with np.errstate(divide="ignore"):
        log_p, log_q = np.log(P), np.log(Q)
    f = log_ratio(log_p, log_q)
    zeros = np.zeros_like(P)
    out = [
        Method("Naive MC (k1)", "Naive MC", Estimator.MC, log_p, f, zeros, "P"),
        Method("Schulman k2 (biased)", "Schulman", Estimator.K2, log_p, est.k2_terms(f), zeros, "P"),
        Method("Schulman k3", "Schulman", Estimator.K3, log_p, est.k3_terms(f), zeros, "P"),
    ]
    if rb_top_k > 0:
        head = np.argsort(-P, kind="stable")[:rb_top_k]
        in_head = np.zeros(P.size, dtype=bool)
        in_head[head] = True
        head_kl = float(np.sum(P[head] * f[head]))
        tail_mass = float(P[~in_head].sum())
        log_tail = np.where(in_head, -np.inf, log_p - np.log(tail_mass))
        out.append(Method(f"Rao-Blackwell (top-{rb_top_k})", "Rao-Blackwell", Estimator.RB, log_tail,
                          est.rao_blackwell_terms(head_kl, tail_mass, f), zeros, "RB"))
    for prop in build_proposals(alpha_values):
        log_r = prop(log_p, log_q)
        with np.errstate(invalid="ignore"):
            log_w = np.where(np.isneginf(log_r), -np.inf, log_p - log_r)
        out.append(Method(prop.name, prop.family, Estimator.IS, log_r, est.importance_sampling_terms(f, log_w), log_w,
                          prop.key, is_weighted=True))  # draws named by the stable key, not the label
    return out


def sample_indices(log_r: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """i.i.d. draws from exp(log_r) by inverting its CDF; side='right' never lands on a zero-probability token.

    Each row (the last axis) comes out sorted by token CDF: sorted uniforms make searchsorted about twice as fast,
    and every statistic of a repeat (mean, variance, ESS, k̂) is symmetric in its draws. A caller that needs a
    sub-sample must take a random subset, not a prefix.
    """
    cdf = np.cumsum(np.exp(log_r))
    u = np.sort(rng.random(shape), axis=-1) * cdf[-1]
    return np.minimum(np.searchsorted(cdf, u, side="right"), log_r.size - 1)


def _finite_or_none(x):
    return [None if v is None or not np.isfinite(v) else float(v) for v in np.atleast_1d(x)]


def evaluate_method(m: Method, idx: np.ndarray) -> dict:
    """Per-repeat numbers for one method from its draws idx (R, n)."""
    r = np.exp(m.log_r)
    exact_mean, exact_var = exact_moments(r, m.g)
    e = est.mean_estimate(m.g[idx])
    n = idx.shape[-1]
    if m.is_weighted:
        lw = m.log_w[idx]
        ess = 100 * kish_ess(lw) / n
        max_w = np.exp(lw.max(axis=-1))
        khat = pareto_khat(lw)
    else:
        ess, max_w, khat = np.full(idx.shape[0], 100.0), np.ones(idx.shape[0]), np.full(idx.shape[0], np.nan)
    return dict(name=m.name, family=m.group, estimator=m.estimator, exact_mean=exact_mean, exact_variance=exact_var,
                estimates=e.estimate.tolist(), sample_variances=e.variance.tolist(), std_errors=e.std_error.tolist(),
                ess_pct=_finite_or_none(ess), max_weight=_finite_or_none(max_w), khat=_finite_or_none(khat))


def pair_stats(pair: ModelPair) -> dict:
    with np.errstate(divide="ignore", invalid="ignore"):  # Q = 0 < P: KL is inf, reported by the caller
        f = log_ratio(np.log(pair.P), np.log(pair.Q))
        kl = float(exact_kl(pair.P, pair.Q))
        var = float(np.sum(pair.P * np.square(f - kl)))
    return dict(
        family=pair.family, divergence=pair.divergence, true_kl=kl, theoretical_variance=var,
        moved_mass=pair.moved_mass,
        top10_mass_p=top_mass(pair.P, 10), top100_mass_p=top_mass(pair.P, 100),
        top10_mass_q=top_mass(pair.Q, 10), top100_mass_q=top_mass(pair.Q, 100),
    )


def run_pair(pair: ModelPair, cfg: SyntheticConfig, on_method: Callable[[], None] | None = None):
    """All methods on one pair. Returns (the pair's results entry, {method name: r}) ."""
    stats = pair_stats(pair)
    if not math.isfinite(stats["true_kl"]):
        bad = int(np.sum((pair.P > 0) & (pair.Q == 0)))
        raise ValueError(f"true KL(P‖Q) is infinite for {pair.family}/{pair.divergence}: Q = 0 on {bad} tokens "
                         f"where P > 0, so no estimator can converge")
    draws: dict[str, np.ndarray] = {}
    entries, rs = [], {}
    for m in methods_for(pair.P, pair.Q, cfg.alpha_values, cfg.rb_top_k):
        if m.draws not in draws:
            rng = named_stream(cfg.seed, "draws", pair.family, pair.divergence, m.draws)
            draws[m.draws] = sample_indices(m.log_r, (cfg.n_repeats, cfg.n_samples), rng)
        entries.append(evaluate_method(m, draws[m.draws]))
        rs[m.name] = np.exp(m.log_r)
        if on_method:
            on_method()
    naive_emp_var = float(np.mean(entries[0]["sample_variances"]))
    methods = [method_metrics(e, stats["true_kl"], stats["theoretical_variance"], naive_emp_var) for e in entries]
    return dict(stats, methods=methods, rankings=rankings(methods)), rs


def n_steps(cfg: SyntheticConfig) -> int:
    """Progress-bar steps of a run: one per (pair, method)."""
    per_pair = 3 + (cfg.rb_top_k > 0) + len(build_proposals(cfg.alpha_values))
    return len(cfg.divergences) * len(cfg.families) * per_pair


def run(cfg: SyntheticConfig, progress: bool = False):
    """Every (family, divergence) pair of the config. Returns (pairs, arrays) with arrays keyed as in the npz.
    `progress`: a bar with one step per (pair, method)."""
    cfg.validate()
    pairs, arrays = [], {}
    with progress_bar(total=n_steps(cfg), desc="synthetic run", unit="step", disable=not progress) as bar:
        for divergence in cfg.divergences:
            for family in cfg.families:
                pair = make_pair(family, divergence, cfg)
                entry, rs = run_pair(pair, cfg, bar.update)
                pairs.append(entry)
                key = f"{family}/{divergence}"
                arrays[f"{key}/P"], arrays[f"{key}/Q"] = pair.P, pair.Q
                arrays.update({f"{key}/r/{name}": r for name, r in rs.items()})
    return pairs, arrays


def config_dict(cfg) -> dict:
    d = asdict(cfg)
    d["families"], d["alpha_values"] = list(cfg.families), [float(a) for a in cfg.alpha_values]
    return d


@dataclass
class SyntheticResult:
    """A synthetic or sequence run: ``results`` (``config`` with ``kind`` and ``versions``, ``pairs``) and
    ``arrays`` (the distributions, keyed as in distributions.npz); ``path``, the run folder (None: not saved). The one
    owner of the folder's files: ``save`` writes them, ``load`` reads them back (for figures too)."""

    path: Path | None
    results: dict
    arrays: dict

    @classmethod
    def of(cls, cfg, kind: str, pairs: list[dict], arrays: dict, versions: dict) -> SyntheticResult:
        return cls(None, {"config": {"kind": kind, **config_dict(cfg), "versions": versions}, "pairs": pairs}, arrays)

    @property
    def kind(self) -> str:
        """'synthetic' (single-token) or 'sequence' (toy Markov pairs)."""
        return self.results.get("config", {}).get("kind", "synthetic")

    def pair(self, key: str) -> dict:
        return next(p for p in self.results["pairs"] if f"{p['family']}/{p['divergence']}" == key)

    def save(self, folder) -> Path:
        """distributions.npz, summary.csv and results.json, written together (runio.files_together): all or none.
        Sets ``path`` once they are written (None if they were not) and returns the folder."""
        folder, self.path = Path(folder), None
        with runio.files_together(done=lambda: setattr(self, "path", folder)):
            runio.write_npz(folder / runio.ARRAYS, self.arrays)
            runio.write_csv(folder / runio.SUMMARY, summary_rows(self.results["pairs"]))
            runio.write_json(folder / runio.RESULTS, self.results)
        return folder

    @classmethod
    def load(cls, path) -> SyntheticResult:
        """A run folder read back; runio.RunFolderError (a ValueError) says what is missing or corrupt."""
        import json
        import zipfile

        path = Path(path)
        if not path.is_dir():
            raise runio.RunFolderError(f"{path} is not a folder (give a run folder holding {runio.RESULTS})")
        res_path, npz_path = path / runio.RESULTS, path / runio.ARRAYS
        for p in (res_path, npz_path):
            if not p.is_file():
                raise runio.RunFolderError(f"{path} is not a run folder: {p.name} is missing")
        try:
            results = json.loads(res_path.read_text())
            pairs = results["pairs"]
            for p in pairs:
                p["family"], p["divergence"], p["methods"], p["rankings"]  # a key check
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise runio.RunFolderError(f"{res_path} is corrupt or not a synthetic results file "
                                       f"({type(err).__name__}: {err})") from None
        try:
            with np.load(npz_path) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise runio.RunFolderError(f"{npz_path} is corrupt ({type(err).__name__}: {err})") from None
        run = cls(path, results, arrays)
        for p in pairs:
            for suffix in (("log_P", "log_Q") if run.kind == "sequence" else ("P", "Q")):
                if f"{p['family']}/{p['divergence']}/{suffix}" not in arrays:
                    raise runio.RunFolderError(f"{npz_path} lacks {p['family']}/{p['divergence']}/{suffix}")
        return run


SUMMARY_FIELDS = ("exact_mean", "exact_variance", "mean_estimate", "bias", "mse", "abs_error", "rel_error_pct",
                  "empirical_variance", "variance_reduction_exact_pct", "variance_reduction_empirical_pct",
                  "combined_score", "mean_ess_pct", "mean_khat")


def summary_rows(pairs: list[dict]) -> list[dict]:
    """One flat row per (pair, method) for summary.csv."""
    rows = []
    for p in pairs:
        exact_rank = {n: i + 1 for i, n in enumerate(p["rankings"]["by_exact_variance"])}
        for m in p["methods"]:
            rows.append(dict(family=p["family"], divergence=p["divergence"], true_kl=p["true_kl"],
                             theoretical_variance=p["theoretical_variance"], method=m["name"], group=m["family"],
                             **{k: m[k] for k in SUMMARY_FIELDS}, rank_exact_variance=exact_rank[m["name"]],
                             flag=codes(m["flags"])))
    return rows
