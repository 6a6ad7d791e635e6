"""The settings of an LLM run (LLMConfig) and their validation: every check raises ValueError naming its parameter;
the device and dtype a setting resolves to."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kl_estimation.core.resources import check_memory
from kl_estimation.core.validation import check_int
from kl_estimation.llm.engine import P_NAME, PREFIX_SUFFIX, sequence_proposal
from kl_estimation.llm.loading import check_loading_options
from kl_estimation.llm.pair import DTYPES

DEFAULT_PROPOSALS = (P_NAME, "Geometric (β=0.5)", "Fixed mixture (λ=0.9)", "Alpha-mixture (α=0.5)",
                     "Exponential family (β=0.5)", "Adaptive", "Adaptive" + PREFIX_SUFFIX)


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
    prompts: tuple | None = None  # a prompt set (texts); None: read from prompts_file / dataset, else `prompt`
    prompts_file: str | None = None
    dataset: str | None = None
    split: str = "train"
    prompt_field: str = "prompt"
    n_prompts: int | None = None
    chat_template: bool = False
    sampler: str = "iid"  # draws.DRAWS: how sequences are drawn (non-i.i.d.: SEs from independent units)
    # loading big models (llm/loading.py): per-model dtypes, PEFT adapters, sharding over GPUs with accelerate
    p_dtype: str | None = None
    q_dtype: str | None = None
    p_adapter: str | None = None
    q_adapter: str | None = None
    device_map: str | None = None
    offload: bool = False

    @property
    def prompt_set(self) -> tuple:
        return tuple(self.prompts) if self.prompts is not None else (self.prompt,)

    def validate(self) -> "LLMConfig":
        """Check every setting (errors name the flag) and read the prompt set from its file or dataset."""
        check_int("--n-reps", self.n_reps, 1)
        check_int("--t-length", self.t_length, 1)
        check_int("--batch-size", self.batch_size, 1)
        check_int("--seed", self.seed, 0)
        t = self.temperature
        if not (isinstance(t, (int, float)) and t > 0 and math.isfinite(t)):
            raise ValueError(f"--temperature: must be a number > 0 (got {self.temperature!r})")
        if self.prompts is None and (self.prompts_file or self.dataset or self.n_prompts is not None):
            from kl_estimation.llm.prompts import load_prompts

            self.prompts = tuple(load_prompts(prompt=self.prompt, prompts_file=self.prompts_file,
                                              dataset=self.dataset, split=self.split, prompt_field=self.prompt_field,
                                              n_prompts=self.n_prompts))
        if self.prompts is not None and not self.prompts:
            raise ValueError("--prompts: the prompt set is empty")
        for i, text in enumerate(self.prompt_set):
            if not isinstance(text, str) or not text.strip():
                raise ValueError("--prompt: must not be empty" if self.prompts is None else
                                 f"--prompts: prompt {i} is empty")
        if (self.p_model is None) != (self.q_model is None):
            raise ValueError("--q-model: give both --p-model and --q-model, or neither for the offline default pair")
        if not self.proposals:
            raise ValueError("--proposals: give at least one proposal (P is plain Monte Carlo)")
        if len(set(self.proposals)) != len(self.proposals):
            raise ValueError("--proposals: a proposal is listed twice")
        for name in self.proposals:
            try:
                sequence_proposal(name)
            except ValueError as err:
                raise ValueError(f"--{err}") from None
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype: unknown dtype {self.dtype!r}; allowed: auto, {', '.join(DTYPES)}")
        resolve_device(self.device)
        if self.resume and self.overwrite:
            raise ValueError("--resume: cannot be combined with --overwrite")
        check_loading_options(self)
        check_sampler(self.sampler, self.n_reps, self.batch_size)
        check_memory(records_bytes(self), "--n-reps", f"keeping {self.n_reps} sequences × {len(self.prompt_set)} "
                     f"prompts × {len(self.proposals)} proposals of up to {self.t_length} tokens (--t-length)")
        return self


def check_sampler(name: str, n_reps: int, batch_size: int) -> None:
    from kl_estimation.core.draws import DRAWS

    if name not in DRAWS:
        raise ValueError(f"--sampler: unknown sampler {name!r}; allowed: {', '.join(DRAWS)}")
    if not DRAWS[name].independent_rows and math.ceil(n_reps / batch_size) < 2:
        raise ValueError(f"--batch-size: with --sampler {name} each batch is one randomization and the standard "
                         f"error needs at least 2 per prompt; use --batch-size ≤ {max(1, n_reps // 2)} for --n-reps "
                         f"{n_reps}")


def records_bytes(cfg: "LLMConfig") -> int:
    """Memory the records of a run take while it runs: every proposal's records stay in memory as Python lists (about
    200 bytes per token and 1.5 kB per sequence), and writing one document copies it twice more."""
    per_sequence = 200 * cfg.t_length + 1500
    n = cfg.n_reps * len(cfg.prompt_set)
    return n * per_sequence * (len(cfg.proposals) + 2)


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
