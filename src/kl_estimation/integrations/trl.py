r"""TRL's GRPOTrainer and RLOOTrainer with an exact (Rao-Blackwellized) KL penalty: switch with one import line.

    from kl_estimation.integrations.trl import GRPOTrainer      # instead of: from trl import GRPOTrainer
    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(beta=0.04, ...), train_dataset=...,
                          kl_estimator="rb")
    from kl_estimation.integrations.trl import RLOOTrainer      # instead of: from trl import RLOOTrainer
    trainer = RLOOTrainer(..., args=RLOOConfig(beta=0.05, ...), kl_estimator="rb")   # "rb", "mc" or "k1" (TRL's)

``kl_estimator``:
  "rb" (default)  per token the exact KL(π_θ‖π_ref) over the whole vocabulary at that prefix, with the score term that
                  makes the gradient ∇KL of the sequences (Σ_t ∇K_t + Σ_t ∇log π(x_t)·Σ_{s>t} K_s);
  "mc"            the same gradient from the sampled tokens' log-ratios only (k1 with its score term);
  "k3"            GRPOTrainer: TRL's own term (k3, × π/π_old with ``use_bias_correction_kl``), untouched;
  "k1"            RLOOTrainer: TRL's own term (Σ_t log π_old/π_ref subtracted from the reward), untouched.

RLOOTrainer: TRL puts β × the sequence's k1 in the reward (before the leave-one-out baseline) and its loss is the mean
over sequences; here the KL leaves the reward and β × Σ_t s_t, averaged over the sequences, is added to the loss, so
``beta`` has TRL's scale (β × the sequence KL) as long as ``normalize_advantages`` is False (TRL's default; with it
TRL's KL weight becomes β / std(advantages)).

How: the reference's final hidden states are kept at rollout (B × T × H, where TRL keeps its log-probs) and the
loss runs the policy's backbone and ``fused_head_terms`` (both heads, chunked, no (B, T, V) logits) instead of TRL's
fused head (under mixed precision its products run in the autocast dtype, as TRL's do). The penalty enters as a
per-token surrogate s_t whose value is the per-token KL estimate, added in GRPO as ``beta * s_t`` to TRL's per-token
loss under TRL's ``loss_type`` aggregation, so ``beta`` has TRL's scale: β × the
token-mean KL. Aggregations that divide each sequence by its own length ("grpo", "sapo") make the gradient that of
E[Σ_t K_t / |o|], not of the KL, and are refused.

Off-policy (``num_iterations`` > 1, or generation not aligned with optimiser steps): the surrogate uses the current
policy's KL on the old policy's prefixes without prefix weights — bounded, biased by the prefixes' drift (O(KL
between π_old and π_θ), small inside PPO's clip). The logged ``kl/prefix_ess`` (effective fraction of the
sequences' prefix weights Π π_θ/π_old) and ``kl/max_ratio`` (largest per-token π_θ/π_old) say how far that drift
went.

Logged besides TRL's metrics: ``kl`` (TRL's meaning: GRPO's token-mean k3, × π/π_old with
``use_bias_correction_kl``; RLOO's token-mean k1 of the rollout policy), ``kl/rb`` (token-mean exact KL),
``kl/k3`` (token-mean k3), ``kl/se`` (standard error over the batch of the per-sequence KL, for the estimator in
use), and off-policy the two weight diagnostics.
Single process (CPU or one GPU); models whose head output is soft-capped or rescaled other than by logit_scale,
and PEFT references, are refused.
"""
from __future__ import annotations

import torch
import trl

from kl_estimation.fused_head import fused_head_terms
from kl_estimation.training import _future

KL_ESTIMATORS = ("rb", "mc", "k3")  # GRPOTrainer's
RLOO_KL_ESTIMATORS = ("rb", "mc", "k1")
# aggregations whose per-token weights do not depend on the sequence's own length
_KL_LOSS_TYPES = ("dapo", "bnpo", "dr_grpo", "luspo", "cispo", "vespo")


def _check_estimator_name(kl_estimator, allowed):
    if kl_estimator not in allowed:
        hint = "; TRL's own KL is 'k1' in RLOOTrainer, 'k3' in GRPOTrainer" if kl_estimator in ("k1", "k3") else ""
        raise ValueError(f"kl_estimator: unknown {kl_estimator!r}; allowed: {', '.join(allowed)}{hint}")


def _check_kl_estimator(kl_estimator, args, model_config, allowed=KL_ESTIMATORS):
    _check_estimator_name(kl_estimator, allowed)
    if kl_estimator == allowed[-1] or args.beta == 0.0:
        return
    if hasattr(args, "loss_type") and args.loss_type not in _KL_LOSS_TYPES:
        raise ValueError(f"loss_type: {args.loss_type!r} divides each sequence by its own length, so the gradient of "
                         f"kl_estimator={kl_estimator!r} would not be ∇KL; use one of {', '.join(_KL_LOSS_TYPES)}, or "
                         "kl_estimator='k3'")
    text = model_config.get_text_config()
    # transforms of the head's output that TRL's fused head applies and fused_head_terms does not (logit_scale it does)
    for name in ("final_logit_softcapping", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(text, name, None) is not None:
            raise ValueError(f"kl_estimator: {kl_estimator!r} does not support models with {name}; use "
                             f"{allowed[-1]!r}")


def _surrogate(kind, lp, lq, kl, mask):
    """Per-token terms whose value is the per-token KL estimate and whose gradient, summed over a sequence drawn from
    π_θ, is that of KL(π_θ‖π_ref) (the score of x_t times the KL still to come)."""
    score = torch.where(mask, lp - lp.detach(), 0.0)
    if kind == "rb":
        return kl + score * _future(kl.detach(), inclusive=False)
    f = torch.where(mask, (lp - lq).detach(), 0.0)
    return f + score * _future(f, inclusive=True)


class _FusedKL:
    """What GRPOTrainer and RLOOTrainer share: the reference's hidden states, the fused head in the loss, the logs.
    Subclasses define ``_own`` (TRL's own estimator's name) and ``_trl_kl`` (TRL's ``kl`` metric, per token)."""

    _allowed = KL_ESTIMATORS
    # True: the reference's final hidden states are kept at rollout (one reference forward per generation batch);
    # False: the reference's backbone runs in each loss call (once per num_iterations pass). Measured equal at
    # num_iterations 1 (bench/bench_grpo.py, estimator "rb-refloss"); the rollout way is never dearer.
    ref_hidden_at_rollout = True

    def __init__(self, *args, kl_estimator: str = "rb", **kwargs):
        allowed = self._allowed
        config = kwargs.get("args") if "args" in kwargs else (args[2] if len(args) > 2 else None)
        model = kwargs.get("model", args[0] if args else None)
        _check_estimator_name(kl_estimator, allowed)
        if config is not None and not isinstance(model, str):
            _check_kl_estimator(kl_estimator, config, model.config, allowed)
        super().__init__(*args, **kwargs)
        _check_kl_estimator(kl_estimator, self.args, self.model.config, allowed)
        if kl_estimator != allowed[-1] and self.beta != 0.0 and self.ref_model is None:
            raise ValueError(f"kl_estimator: {kl_estimator!r} needs a separate reference model (not a PEFT adapter's "
                             f"base); use {allowed[-1]!r}")
        self.kl_estimator = kl_estimator
        self._fused = kl_estimator != allowed[-1] and self.beta != 0.0
        self._ref_hidden = self._loss_ref_hidden = self._head_out = None

    def _hidden_states(self, model, input_ids, attention_mask, logits_to_keep):
        """The final hidden states that score the last `logits_to_keep` tokens (row t scores input_ids[:, t])."""
        base = self.accelerator.unwrap_model(model)
        with self.accelerator.autocast():
            out = getattr(base, base.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask,
                                                        use_cache=False)
        return out.last_hidden_state[:, -logits_to_keep - 1:-1]

    def _ref_hidden_states(self, input_ids, attention_mask, logits_to_keep, batch_size):
        step = batch_size or input_ids.size(0)
        with torch.no_grad():
            return torch.cat([self._hidden_states(self.ref_model, input_ids[i:i + step], attention_mask[i:i + step],
                                                  logits_to_keep) for i in range(0, input_ids.size(0), step)])

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):
        if (not self._fused or self._loss_ref_hidden is None or model is self.ref_model or compute_aux_loss
                or any(v is not None for v in kwargs.values())):
            # rollout (the old policy's log-probs: TRL's own head), or not ours
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              batch_size, compute_entropy, compute_aux_loss, **kwargs)
        hp = self._hidden_states(model, input_ids, attention_mask, logits_to_keep)
        hq = self._loss_ref_hidden
        if hq is True:  # ref_hidden_at_rollout False: the reference's backbone runs here
            hq = self._ref_hidden_states(input_ids, attention_mask, logits_to_keep, None)
        policy, ref = self.accelerator.unwrap_model(model), self.ref_model
        tokens, mask = input_ids[:, -logits_to_keep:], attention_mask[:, -logits_to_keep:].bool()
        wp, wq = policy.get_output_embeddings(), ref.get_output_embeddings()
        scale = getattr(policy.config.get_text_config(), "logit_scale", None) or 1.0
        with self.accelerator.autocast():  # TRL's head multiplies in the autocast dtype (bf16 on CPU by default)
            dev = hp.device.type
            cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        out = fused_head_terms(hp.to(wp.weight.dtype), wp.weight, hq.to(wq.weight.dtype), wq.weight, tokens, mask,
                               bias_p=wp.bias, bias_q=wq.bias, logit_scale=scale, temperature=self.temperature,
                               compute_dtype=cdt)
        self._head_out = out, mask
        return out.logp, out.entropy, None

    def _fused_loss(self, model, inputs):
        """TRL's loss with its own KL off, the fused head's outputs and the mask of the scored tokens."""
        self._loss_ref_hidden = inputs["ref_hidden_states"] if self.ref_hidden_at_rollout else True
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._loss_ref_hidden = None
        (out, mask), self._head_out = self._head_out, None
        mask = mask & inputs["completion_mask"].bool()
        return loss, out, mask, _surrogate(self.kl_estimator, out.logp, out.logq, out.kl, mask)

    def _off_policy(self):
        return self.num_iterations > 1 or self.args.steps_per_generation > self.args.gradient_accumulation_steps

    def _log_kl(self, out, mask, old):
        """Logs ``kl`` (TRL's meaning), kl/rb, kl/k3, kl/se and, when `old` is given, the prefix weights' ESS and the
        largest per-token ratio."""
        mode = "train" if self.model.training else "eval"
        m = mask.float()
        d = (out.logq - out.logp).detach()
        k3 = torch.where(mask, torch.exp(d) - d - 1, 0.0)
        lw = torch.where(mask, out.logp.detach() - old, 0.0) if old is not None else None
        per_seq = (out.kl.detach() * m).sum(-1) if self.kl_estimator == "rb" else -(d * m).sum(-1)
        sums = [(x * m).sum() for x in (self._trl_kl(out, mask, k3, lw), out.kl.detach(), k3)] + [m.sum()]
        tot = self.accelerator.reduce(torch.stack(sums), reduction="sum")
        n = tot[-1].clamp(min=1.0)
        for name, v in zip(("kl", "kl/rb", "kl/k3"), tot[:3]):
            self._metrics[mode][name].append((v / n).item())
        B = per_seq.numel()
        se = per_seq.std() / B ** 0.5 if B > 1 else torch.tensor(float("nan"))
        self._metrics[mode]["kl/se"].append(se.item())
        if lw is not None and self._off_policy():
            w = torch.exp(lw.sum(-1) - lw.sum(-1).max())
            self._metrics[mode]["kl/prefix_ess"].append((w.sum() ** 2 / (w ** 2).sum() / B).item())
            self._metrics[mode]["kl/max_ratio"].append(torch.exp(lw.max()).item())


class GRPOTrainer(_FusedKL, trl.GRPOTrainer):
    """trl.GRPOTrainer with the keyword argument ``kl_estimator`` ("rb" default, "mc", "k3" = TRL's own)."""

    # -- rollout: keep the reference's hidden states instead of its log-probs ------------------------------------
    def _generate_and_score_completions(self, inputs):
        self._ref_hidden = []
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            ref_hidden, self._ref_hidden = self._ref_hidden, None
        if self._fused and self.ref_hidden_at_rollout:
            output["ref_hidden_states"] = torch.cat(ref_hidden)
        return output

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):
        if self._fused and model is self.ref_model and self._ref_hidden is not None and not compute_aux_loss \
                and all(v is None for v in kwargs.values()):
            if self.ref_hidden_at_rollout:
                self._ref_hidden.append(self._ref_hidden_states(input_ids, attention_mask, logits_to_keep,
                                                                batch_size))
            return None, None, None  # TRL's k3 is not computed: the loss uses the hidden states
        return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                          batch_size, compute_entropy, compute_aux_loss, **kwargs)

    # -- loss: TRL's policy loss with β = 0, plus β × the surrogate under the same aggregation ------------------------
    def _compute_loss(self, model, inputs):
        if not self._fused:
            return super()._compute_loss(model, inputs)
        beta, self.beta = self.beta, 0.0
        try:
            loss, out, mask, s = self._fused_loss(model, inputs)
        finally:
            self.beta = beta
        loss = loss + beta * self._aggregate(s, mask, inputs.get("num_items_in_batch"))
        self._log_kl(out, mask, inputs.get("old_per_token_logps"))
        return loss

    def _trl_kl(self, out, mask, k3, lw):
        """TRL GRPO's ``kl``: k3, × π_θ/π_old with ``use_bias_correction_kl``."""
        return k3 * torch.exp(lw) if (lw is not None and self.args.use_bias_correction_kl) else k3

    def _aggregate(self, per_token, mask, num_items):
        """TRL's loss_type aggregation of a per-token term (grpo_trainer._compute_loss, trl 1.16)."""
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        total = (per_token * mask).sum()
        if self.loss_type == "bnpo":
            return total / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return total / (per_token.size(0) * self.max_completion_length) / accumulation
        if self.loss_type == "luspo":
            return (per_token * mask).sum(-1).mean() / accumulation
        # dapo, cispo, vespo: the generation batch's token count, rescaled to one accumulation window
        normalizer = num_items.clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return total / normalizer


class RLOOTrainer(_FusedKL, trl.RLOOTrainer):
    """trl.RLOOTrainer with the keyword argument ``kl_estimator`` ("rb" default, "mc", "k1" = TRL's own: k1 in the
    reward). With "rb"/"mc" the KL leaves the reward and β × Σ_t s_t (mean over sequences) joins TRL's loss."""

    _allowed = RLOO_KL_ESTIMATORS

    # -- rollout: TRL's with β = 0 (no reference pass, no KL in the reward); the reference's hidden states and the
    #    old policy's per-token log-probs (TRL keeps only their sums) are kept for the loss --------------------------
    def _generate_and_score_completions(self, inputs):
        if not self._fused:
            return super()._generate_and_score_completions(inputs)
        beta, self.beta, self._ref_hidden = self.beta, 0.0, []
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self.beta, (old,), self._ref_hidden = beta, self._ref_hidden or (None,), None
        output["old_per_token_logps"] = old
        if self.ref_hidden_at_rollout:
            ids = torch.cat([output["prompt_ids"], output["completion_ids"]], 1)
            attention = torch.cat([output["prompt_mask"], output["completion_mask"]], 1)
            mode = "train" if self.model.training else "eval"
            batch = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
            output["ref_hidden_states"] = self._ref_hidden_states(ids, attention, output["completion_ids"].size(1),
                                                                  batch)
        return output

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):
        out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                         batch_size, compute_entropy, compute_aux_loss, **kwargs)
        if self._ref_hidden is not None and model is not self.ref_model:  # the old policy at rollout
            self._ref_hidden.append(out[0])
        return out

    def _compute_loss(self, model, inputs):
        if not self._fused:
            return super()._compute_loss(model, inputs)
        loss, out, mask, s = self._fused_loss(model, inputs)
        # TRL's loss is the mean over sequences of per-sequence terms (the Trainer divides by accumulation)
        loss = loss + self.beta * (s * mask).sum(-1).mean()
        self._log_kl(out, mask, inputs["old_per_token_logps"])
        return loss

    def _trl_kl(self, out, mask, k3, lw):
        """TRL RLOO's ``kl``: k1 = log π_old − log π_ref, the term it puts in the reward."""
        return torch.where(mask, out.logp.detach() - lw - out.logq, 0.0)
