r"""kl_estimation: estimate KL(P‖Q) between language models, and know which estimate to trust.

LLM pairs (torch and transformers are imported on first use, so the single-token half starts fast):

    estimate_kl(p_model=None, q_model=None, prompts=None, *, n_samples=1000, max_new_tokens=20, temperature=0.4,
                proposals=LLMConfig's seven, sampler="iid", ...)    the same settings and defaults as LLM_experiments.py
        → KLResult: ranked rows (KLRow: estimate, std_error, ci, flag), .recommended, .per_prompt, .to_pandas()
        direction="forward" (KL(P‖Q), sequences of P) | "reverse" (KL(Q‖P), sequences of Q) | "both" (the two, and
        their sum KLResult.jeffreys); rows carry their direction, .recommended_by_direction
        q_model a list → KLComparison: one set of sequences from P scored by every candidate, paired differences
    LLMConfig        every setting of a run, with its default (the command line's flags are built from it)
    default_pair()   the folders of the offline default pair, built on first use

    corpus_kl(p_model, q_model, corpus, *, context=512, score="second-half", ...)   teacher-forced KL over a text,
        llama.cpp's windows and statistics one to one, both directions, clustered SEs
        → CorpusResult: .summary (llama.cpp's numbers, means with clustered and i.i.d. SEs), .mean(), .tokens, .text
        q_model a list → CorpusComparison: each candidate's CorpusResult, .table (ranks, CIs), .paired(a, b), .text
    CorpusConfig     every setting of a corpus run (LLM_experiments.py --corpus FILE), sharing LLMConfig's names

Training-loop terms over logits / log-probs (numpy or torch on any device; torch keeps autograd), with masks:

    exact_token_kl(logits_p, logits_q, mask)       KL(P_t‖Q_t) per position, chunked over positions
    k1, k2, k3(logp, logq, mask)                   Schulman's per-token estimators of the sampled tokens
    sequence_kl(logp, logq, token_kl=, logr=, mask=, estimator="mc"|"rb"|"rb+cv"|"k3")   one term per sequence
    token_logprobs_and_kl(logits_p, logits_q, tokens, mask)   log P, log Q of the tokens and KL_t in one chunked pass
    kl_loss(logp, logq, mask, token_kl=, estimator="rb"|"mc", logp_old=)   a loss whose gradient is ∇KL(P_θ‖Q)
    offpolicy_weights(logp, logp_old, mask) → OffPolicyWeights   ESS, ratio range, share outside PPO's clip
    kl_rewards(logp, logq, mask, token_kl=) → KLRewards(rewards, pathwise)   per-token rewards for PPO-style trainers

Building blocks: the proposal registry (REGISTRY, Proposal, proposal, by_name, build_proposals), the estimator terms
(naive_mc_terms, importance_sampling_terms, k2_terms, k3_terms, rao_blackwell_terms, rao_blackwell_is_terms,
rb_control_variate_terms, self_normalized_is, mean_estimate), exact values (exact_kl, exact_moments), weight
diagnostics (kish_ess, pareto_khat), the sampling engine (sample_batch, sequence_proposal, unit_generator) and
enumeration ground truth (enumerate_sequences).
"""
from __future__ import annotations

import importlib

from kl_estimation.core.diagnostics import kish_ess, pareto_khat
from kl_estimation.core.estimators import (
    importance_sampling_terms,
    k2_terms,
    k3_terms,
    mean_estimate,
    naive_mc_terms,
    rao_blackwell_is_terms,
    rao_blackwell_terms,
    rb_control_variate_terms,
    self_normalized_is,
)
from kl_estimation.core.proposals import (
    REGISTRY,
    Proposal,
    build_proposals,
    by_name,
    proposal,
)
from kl_estimation.synthetic.evaluation import exact_kl, exact_moments
from kl_estimation.training import (
    KLRewards,
    OffPolicyWeights,
    exact_token_kl,
    k1,
    k2,
    k3,
    kl_loss,
    kl_rewards,
    offpolicy_weights,
    sequence_kl,
    token_logprobs_and_kl,
)

_LAZY = {  # names whose modules import torch / transformers: loaded on first access
    "estimate_kl": "api", "KLResult": "api", "KLRow": "api", "default_pair": "api",
    "sample_batch": "llm.engine", "sequence_proposal": "llm.engine", "unit_generator": "llm.engine",
    "enumerate_sequences": "llm.enumeration", "LLMConfig": "llm.run.config",
    "corpus_kl": "api", "CorpusResult": "llm.corpus.run", "CorpusConfig": "llm.corpus.config",
    "CorpusComparison": "llm.corpus.compare", "KLComparison": "llm.run.candidates",
}

__all__ = sorted([
    "estimate_kl", "KLResult", "KLRow", "LLMConfig", "default_pair", "corpus_kl", "CorpusResult", "CorpusConfig",
    "CorpusComparison", "KLComparison",
    "exact_token_kl", "k1", "k2", "k3", "sequence_kl", "kl_loss", "kl_rewards", "KLRewards", "token_logprobs_and_kl",
    "offpolicy_weights", "OffPolicyWeights",
    "REGISTRY", "Proposal", "proposal", "by_name", "build_proposals",
    "naive_mc_terms", "importance_sampling_terms", "k2_terms", "k3_terms", "rao_blackwell_terms",
    "rao_blackwell_is_terms", "rb_control_variate_terms", "self_normalized_is", "mean_estimate",
    "exact_kl", "exact_moments", "kish_ess", "pareto_khat",
    "sample_batch", "sequence_proposal", "unit_generator", "enumerate_sequences",
])


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{name_mod}", __name__) if (name_mod := _LAZY[name]) else None, name)
    raise AttributeError(f"module 'kl_estimation' has no attribute {name!r}")


def __dir__():
    return __all__
