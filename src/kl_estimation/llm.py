r"""Sequence-level KL between two language models: token-by-token sampling from a proposal, every estimator.

Target: KL(P‖Q) of the sequence process truncated at T tokens (or at EOS, whichever comes first):
KL = E_P[Σ_t log P_t(x_t)/Q_t(x_t)], where P_t, Q_t are the tempered next-token distributions given the prefix.

A *sequence proposal* draws x_t ~ r_t = proposal(P_t, Q_t) with a registry proposal applied to each step's rows,
or, for the prefix-aware variants, with |log P/Q| replaced by |L_<t + log P_t/Q_t|, L_<t = Σ_{s<t} log P/Q(x_s): the
running log-ratio of the prefix (done by handing the registry function log Q_t − L_<t). Proposal "P" is plain
Monte Carlo. Per step the sampler keeps log P_t(x_t), log Q_t(x_t), log r_t(x_t) and the exact KL(P_t‖Q_t), so every
estimator (estimators.sequence_estimates) can be recomputed later from the saved arrays alone.

Engine: batched over sequences, one forward per model per step on a KV cache, the same for every proposal. (Sampling
from P with P alone and scoring Q in one teacher-forced pass measured slower on CPU — 0.50 s against 0.41 s for
256 × 20 tokens, bench/bench_llm.py — as it holds (B, T, V) arrays; it was dropped.) A sequence that emits EOS stops
contributing: its later steps are masked out (the model still gets a token so the batch stays rectangular).
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import runio
from .diagnostics import KHAT_LIMIT
from .estimators import sequence_estimates
from .models import DTYPES
from .proposals import REGISTRY, Proposal, by_name
from .synthetic import check_int

P_NAME = "P"
PREFIX_SUFFIX = " [prefix-aware]"
# Families whose formula depends on Q only through log P/Q or a per-row constant factor: shifting log Q by the
# prefix log-ratio then means exactly "use the running sequence log-ratio".
PREFIX_FAMILIES = ("Alpha-mixture", "Exponential family", "Balanced 1", "Balanced 3", "Adaptive", "Optimal")
DEFAULT_PROPOSALS = (P_NAME, "Geometric (β=0.5)", "Fixed mixture (λ=0.9)", "Alpha-mixture (α=0.5)",
                     "Exponential family (β=0.5)", "Adaptive", "Adaptive" + PREFIX_SUFFIX)


@dataclass(frozen=True)
class SequenceProposal:
    name: str
    base: Proposal | None = None  # None: P itself
    prefix_aware: bool = False

    def __call__(self, log_p, log_q, prefix_log_ratio):
        if self.base is None:
            return log_p
        if self.prefix_aware:
            log_q = log_q - prefix_log_ratio[:, None].to(log_q.dtype)
        return self.base(log_p, log_q)


def sequence_proposal(name: str) -> SequenceProposal:
    """'P', a registry name such as 'Geometric (β=0.5)', or one with the suffix ' [prefix-aware]'."""
    if name == P_NAME:
        return SequenceProposal(P_NAME)
    prefix = name.endswith(PREFIX_SUFFIX)
    base_name = name[: -len(PREFIX_SUFFIX)] if prefix else name
    try:
        base = by_name(base_name)
    except ValueError:
        raise ValueError(f"--proposals: unknown proposal {name!r}; allowed: P, a registry name such as "
                         f"'Geometric (β=0.5)' or 'Optimal' (families: {', '.join(REGISTRY)}), optionally followed by "
                         f"'{PREFIX_SUFFIX.strip()}' for {', '.join(PREFIX_FAMILIES)}") from None
    if prefix and base.family not in PREFIX_FAMILIES:
        raise ValueError(f"--proposals: {base.family} has no prefix-aware variant; allowed for: "
                         f"{', '.join(PREFIX_FAMILIES)}")
    return SequenceProposal(name, base, prefix)


@dataclass
class Batch:
    """Per-step arrays (B, T) of one batch; steps after a sequence's EOS have mask False."""

    token_ids: np.ndarray
    log_p: np.ndarray
    log_q: np.ndarray
    log_r: np.ndarray
    kl_step: np.ndarray
    mask: np.ndarray
    uncovered: np.ndarray  # P-mass of the tokens the proposal cannot draw at that step (> 0: IS is biased)


def exact_step_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P_t‖Q_t) per row, accumulated in float64; 0·log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1, dtype=torch.float64)


def sample_categorical(log_r: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row from exp(log_r) by inverting a float64 CDF: one uniform per row, where torch.multinomial
    draws V exponentials per row (a third of the sampler's time at V = 2048). side='right' never picks a zero."""
    cdf = log_r.double().exp().cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device, dtype=torch.float64)
    return torch.searchsorted(cdf, u * cdf[..., -1:], right=True)[..., 0].clamp_(max=cdf.shape[-1] - 1)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, idx[..., None])[..., 0].double()


def batch_generator(seed: int, proposal: str, batch_index: int, device) -> torch.Generator:
    """The stream of one batch, derived from names and positions only: a resumed run redraws nothing it kept."""
    ss = np.random.SeedSequence(seed, spawn_key=(zlib.crc32(proposal.encode()), batch_index))
    return torch.Generator(device=device).manual_seed(int(ss.generate_state(1, np.uint64)[0] >> 1))


@torch.inference_mode()
def sample_batch(pair, proposal: SequenceProposal, batch: int, t_length: int, generator: torch.Generator) -> Batch:
    """Draw `batch` sequences of up to `t_length` tokens from the proposal; one Python iteration per step."""
    log_p, log_q, state = pair.start(batch)
    dev = log_p.device
    alive = torch.ones(batch, dtype=torch.bool, device=dev)
    prefix = torch.zeros(batch, dtype=torch.float64, device=dev)
    cols = {k: [] for k in ("token_ids", "log_p", "log_q", "log_r", "kl_step", "mask", "uncovered")}
    for t in range(t_length):
        log_r = proposal(log_p, log_q, prefix)
        x = sample_categorical(log_r, generator)
        lp_x, lq_x = _gather(log_p, x), _gather(log_q, x)
        cols["token_ids"].append(x)
        cols["log_p"].append(lp_x)
        cols["log_q"].append(lq_x)
        cols["log_r"].append(lp_x if proposal.base is None else _gather(log_r, x))
        cols["kl_step"].append(exact_step_kl(log_p, log_q))
        cols["mask"].append(alive.clone())
        cols["uncovered"].append(torch.zeros_like(prefix) if proposal.base is None else  # r = P misses nothing
                                 torch.where(log_r == -math.inf, log_p.exp(), 0.0).sum(-1, dtype=torch.float64))
        prefix += torch.where(alive, lp_x - lq_x, 0.0)
        if pair.eos_token_id is not None:
            alive &= x != pair.eos_token_id
        if t + 1 < t_length and alive.any():
            log_p, log_q, state = pair.step(state, x)
        elif t + 1 < t_length:  # every sequence ended: the remaining steps are masked out
            for k in cols:
                cols[k] += [torch.zeros_like(cols[k][-1])] * (t_length - t - 1)
            break
    return Batch(**{k: torch.stack(v, dim=1).cpu().numpy() for k, v in cols.items()})


def batch_records(b: Batch, decode) -> list[dict]:
    """One JSON-ready record per sequence, per-step lists cut at EOS (only the steps that count)."""
    out = []
    for i in range(b.token_ids.shape[0]):
        n = int(b.mask[i].sum())
        lp, lq, lr = b.log_p[i, :n], b.log_q[i, :n], b.log_r[i, :n]
        ids = b.token_ids[i, :n].tolist()
        out.append(dict(text=decode(ids), token_ids=ids, log_p=lp.tolist(), log_q=lq.tolist(), log_r=lr.tolist(),
                        kl_step=b.kl_step[i, :n].tolist(), log_weight=float(np.sum(lp - lr)),
                        log_ratio=float(np.sum(lp - lq)), uncovered_mass=float(b.uncovered[i, :n].max(initial=0.0))))
    return out


def records_to_arrays(records: list[dict], t_length: int) -> dict[str, np.ndarray]:
    """Saved records back to padded (N, T) arrays plus mask: what the estimators take."""
    lengths = np.array([len(r["log_p"]) for r in records])
    mask = np.arange(t_length) < lengths[:, None]
    out = {"mask": mask}
    for k in ("log_p", "log_q", "log_r", "kl_step"):
        out[k] = np.zeros(mask.shape)
        out[k][mask] = np.concatenate([r[k] for r in records])  # row-major fill matches the records' order
    return out


# ------------------------------------------------------------------------------------------------ runs

ESTIMATOR_ORDER = ("RB", "MC", "SNIS", "k3", "RB-IS", "IS", "k3-IS")


@dataclass
class LLMConfig:
    p_model: str | None = None  # None (with q_model None): the offline default pair
    q_model: str | None = None
    prompt: str = "An interesting fact is that"
    n_reps: int = 1000
    t_length: int = 20
    temperature: float = 0.4
    proposals: tuple = DEFAULT_PROPOSALS
    batch_size: int = 64
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    output_folder: str = "tests2/"
    resume: bool = False
    overwrite: bool = False
    ignore_eos: bool = False

    def validate(self) -> "LLMConfig":
        check_int("--n-reps", self.n_reps, 1)
        check_int("--t-length", self.t_length, 1)
        check_int("--batch-size", self.batch_size, 1)
        check_int("--seed", self.seed, 0)
        t = self.temperature
        if not (isinstance(t, (int, float)) and t > 0 and math.isfinite(t)):
            raise ValueError(f"--temperature: must be a number > 0 (got {self.temperature!r})")
        if not self.prompt or not self.prompt.strip():
            raise ValueError("--prompt: must not be empty")
        if (self.p_model is None) != (self.q_model is None):
            raise ValueError("--q-model: give both --p-model and --q-model, or neither for the offline default pair")
        if not self.proposals:
            raise ValueError("--proposals: give at least one proposal (P is plain Monte Carlo)")
        if len(set(self.proposals)) != len(self.proposals):
            raise ValueError("--proposals: a proposal is listed twice")
        for name in self.proposals:
            sequence_proposal(name)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype: unknown dtype {self.dtype!r}; allowed: auto, {', '.join(DTYPES)}")
        resolve_device(self.device)
        if self.resume and self.overwrite:
            raise ValueError("--resume: cannot be combined with --overwrite")
        return self


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device: {name} requested but MPS is not available on this machine")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.type == "cuda" else "float32"


def slug(name: str) -> str:
    """File name of a proposal: 'Alpha-mixture (α=0.5) [prefix-aware]' → 'alpha-mixture_alpha-0.5_prefix-aware'."""
    s = name.lower()
    for greek, latin in (("α", "alpha"), ("β", "beta"), ("λ", "lambda")):
        s = s.replace(greek, latin)
    out = []
    for part in s.replace("[", " ").replace("]", " ").replace("(", " ").replace(")", " ").split():
        out.append("".join(c if c.isalnum() or c in ".-" else "-" for c in part.replace("=", "-")))
    return "_".join(out)


def existing_outputs(folder, proposals) -> list:
    folder = Path(folder)
    names = [f"{slug(p)}{ext}" for p in proposals for ext in (".json", ".partial.jsonl")] + ["summary.json"]
    return [folder / n for n in names if (folder / n).exists()]


def run_key(cfg: LLMConfig, proposal: str, models: dict) -> dict:
    """Everything that fixes the records of a batch: a resumed run must match it exactly."""
    return dict(models=models, prompt=cfg.prompt, t_length=cfg.t_length, temperature=cfg.temperature,
                seed=cfg.seed, batch_size=cfg.batch_size, ignore_eos=cfg.ignore_eos, proposal=proposal)


def run_proposal(pair, cfg: LLMConfig, name: str, folder, meta: dict, bar_factory=None) -> dict:
    """Sample cfg.n_reps sequences from proposal `name` (resuming finished batches), write <slug>.json atomically."""
    folder = Path(folder)
    prop = sequence_proposal(name)
    final, partial = folder / f"{slug(name)}.json", folder / f"{slug(name)}.partial.jsonl"
    key = run_key(cfg, name, meta["models"])
    batches: list[list[dict]] = []
    if cfg.resume and final.exists():
        doc = json.loads(final.read_text())
        if doc.get("run_key") != key:
            raise ValueError(f"--resume: {final} was written with other settings ({_diff(doc.get('run_key'), key)})")
        recs = doc["sequences"]
        if len(recs) >= cfg.n_reps or len(recs) % cfg.batch_size:
            if len(recs) < cfg.n_reps:
                raise ValueError(f"--resume: {final} ends in a short batch and cannot be extended to --n-reps "
                                 f"{cfg.n_reps}")
            batches = [recs[: cfg.n_reps]]
        else:
            batches = [recs[i:i + cfg.batch_size] for i in range(0, len(recs), cfg.batch_size)]
    elif cfg.resume and partial.exists():
        lines = runio.read_jsonl(partial)
        if not lines or lines[0].get("run_key") != key:
            raise ValueError(f"--resume: {partial} was written with other settings "
                             f"({_diff(lines[0].get('run_key') if lines else None, key)})")
        batches = [ln["sequences"] for ln in lines[1:]]
    n_done = sum(len(b) for b in batches)
    if n_done < cfg.n_reps:
        if not partial.exists() or not cfg.resume:
            partial.unlink(missing_ok=True)
            runio.append_jsonl(partial, {"run_key": key})
            for i, b in enumerate(batches):  # sequences carried over from a shorter finished run
                runio.append_jsonl(partial, {"batch": i, "sequences": b})
        total = math.ceil(cfg.n_reps / cfg.batch_size)
        bar = bar_factory(total=total, initial=len(batches), desc=name) if bar_factory else None
        while n_done < cfg.n_reps:
            size = min(cfg.batch_size, cfg.n_reps - n_done)
            gen = batch_generator(cfg.seed, name, len(batches), pair.device)
            recs = batch_records(sample_batch(pair, prop, size, cfg.t_length, gen), pair.decode)
            runio.append_jsonl(partial, {"batch": len(batches), "sequences": recs})
            batches.append(recs)
            n_done += size
            if bar:
                bar.update(1)
                bar.set_postfix_str(_running(batches, prop.base is None))
        if bar:
            bar.close()
    records = [r for b in batches for r in b][: cfg.n_reps]
    arrays = records_to_arrays(records, cfg.t_length)
    estimates = sequence_estimates(arrays["log_p"], arrays["log_q"], arrays["log_r"], arrays["kl_step"],
                                   arrays["mask"], prop.base is None)
    uncovered = max(r.get("uncovered_mass", 0.0) for r in records)
    doc = dict(meta, proposal=name, run_key=key, n_sequences=len(records), max_uncovered_mass=uncovered,
               estimates=estimates, sequences=records)
    runio.write_json(final, doc)
    partial.unlink(missing_ok=True)
    return doc


def _running(batches: list[list[dict]], is_p: bool) -> str:
    """The running MC / IS estimate shown on the progress bar."""
    lw, f = np.array([(r["log_weight"], r["log_ratio"]) for b in batches for r in b]).T
    return f"{'MC' if is_p else 'IS'} {np.mean(np.exp(lw) * f):.4g} (n={lw.size})"


def _diff(old, new) -> str:
    if not isinstance(old, dict):
        return "no settings recorded"
    keys = [k for k in new if old.get(k) != new[k]]
    return ", ".join(f"{k}: {old.get(k)!r} then, {new[k]!r} now" for k in keys) or "unknown difference"


def summary_rows(docs: list[dict]) -> list[dict]:
    """One row per (proposal, estimator), best standard error first among trustworthy rows."""
    rows = []
    for d in docs:
        for est_name, e in d["estimates"].items():
            flag = ""
            if d.get("max_uncovered_mass", 0.0) > 0:
                flag = (f"biased: the proposal gives r = 0 to tokens with P > 0 (up to {d['max_uncovered_mass']:.2g} "
                        f"of P's mass at a step): sequences through them are never drawn")
            elif e["khat"] is not None and np.isfinite(e["khat"]) and e["khat"] > KHAT_LIMIT:
                flag = f"k̂ {e['khat']:.2f} > {KHAT_LIMIT}: weights too heavy-tailed to trust"
            elif est_name == "SNIS" and d["proposal"] != P_NAME:
                flag = "self-normalised: biased at O(1/n)"
            rows.append(dict(proposal=d["proposal"], estimator=est_name, **e, flag=flag))
    rows.sort(key=lambda r: (bool(r["flag"]), r["std_error"] if np.isfinite(r["std_error"]) else math.inf))
    return rows



# ------------------------------------------------------------------------------------------------ ground truth

@torch.inference_mode()
def enumerate_sequences(pair, proposal: SequenceProposal, t_length: int, max_sequences: int = 1_000_000) -> dict:
    """Every complete sequence of a small pair (a leaf: EOS or t_length tokens) with its exact values.

    Returns float64 arrays over leaves — ``log_p``, ``log_q``, ``log_r`` (sequence log-probabilities under P, Q and
    the proposal), ``rb`` (Σ_t w_<t·KL_t along the sequence) — and ``kl``, the exact KL of the truncated process
    summed over prefixes (Σ_prefix P(prefix)·KL(P_t‖Q_t)). Any estimator's exact mean and variance under the
    proposal follow as sums Σ_x r(x)·g(x). Prefixes are replayed from the prompt at each depth (no cache reuse):
    fine for the tiny models this is for.
    """
    V = pair.vocab_size
    prefixes = torch.zeros((1, 0), dtype=torch.long, device=pair.device)
    acc = {k: torch.zeros(1, dtype=torch.float64, device=pair.device) for k in ("log_p", "log_q", "log_r", "rb")}
    leaves = {k: [] for k in acc}
    kl = 0.0
    for t in range(t_length):
        n = prefixes.shape[0]
        if n * V > max_sequences:
            raise ValueError(f"enumeration would visit more than {max_sequences} sequences (V={V}, T={t_length})")
        log_p, log_q, state = pair.start(n)
        for s in range(t):
            log_p, log_q, state = pair.step(state, prefixes[:, s])
        # renormalised in float64, so that the exact sums hold to ~1e-15 rather than float32's ~1e-7
        log_p = log_p.double() - torch.logsumexp(log_p.double(), -1, keepdim=True)
        log_q = log_q.double() - torch.logsumexp(log_q.double(), -1, keepdim=True)
        log_r = proposal(log_p, log_q, acc["log_p"] - acc["log_q"]).double()
        kl_t = exact_step_kl(log_p, log_q)
        kl += float((acc["log_p"].exp() * kl_t).sum())
        rb = acc["rb"] + torch.exp(acc["log_p"] - acc["log_r"]) * kl_t
        child = {"log_p": acc["log_p"][:, None] + log_p, "log_q": acc["log_q"][:, None] + log_q,
                 "log_r": acc["log_r"][:, None] + log_r, "rb": rb[:, None].expand(n, V)}
        reachable = (child["log_p"] > -math.inf) | (child["log_r"] > -math.inf)
        tokens = torch.arange(V, device=pair.device).expand(n, V)
        ends = reachable & ((tokens == pair.eos_token_id) if pair.eos_token_id is not None else False)
        if t + 1 == t_length:
            ends = reachable
        for k in leaves:
            leaves[k].append(child[k][ends])
        go = reachable & ~ends
        rows, cols = go.nonzero(as_tuple=True)
        prefixes = torch.cat([prefixes[rows], cols[:, None]], dim=1)
        acc = {k: child[k][rows, cols] for k in acc}
        if prefixes.shape[0] == 0:
            break
    out = {k: torch.cat(v).cpu().numpy() for k, v in leaves.items()}
    out["kl"] = kl
    return out
