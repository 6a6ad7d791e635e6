"""The settings of an LLM run (LLMConfig) and their validation: every check raises ValueError naming its parameter;
the device and dtype a setting resolves to."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from kl_estimation.core.resources import check_memory
from kl_estimation.core.validation import check_int
from kl_estimation.llm.engine import DIRECTIONS, P_NAME, PREFIX_SUFFIX, parse_proposals
from kl_estimation.llm.loading import check_loading_options
from kl_estimation.llm.pair import DTYPES
from kl_estimation.llm.run.directions import BOTH
from kl_estimation.settings import Settings, setting

DIRECTION_SETTINGS = DIRECTIONS + (BOTH,)
DEFAULT_PROPOSALS = (P_NAME, "Geometric (β=0.5)", "Fixed mixture (λ=0.9)", "Alpha-mixture (α=0.5)",
                     "Exponential family (β=0.5)", "Adaptive", "Adaptive" + PREFIX_SUFFIX)


class ModelPairSettings(Settings):
    """What the two LLM configs (LLMConfig, CorpusConfig) share about loading their models, written once: Q from
    P's base plus an adapter, and the checks of the dtypes, the device and the loading options."""

    def __post_init__(self):
        if isinstance(self.q_model, list):  # the command line's --q-model A [B …]: one name is a one-candidate run
            self.q_model = self.q_model[0] if len(self.q_model) == 1 else tuple(self.q_model)
        if self.q_adapter and self.q_model is None:  # Q = P's base, at P's revision, + the adapter
            self.q_model, self.q_revision = self.p_model, self.q_revision or self.p_revision

    def check_loading(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype: unknown dtype {self.dtype!r}; allowed: auto, {', '.join(DTYPES)}")
        resolve_device(self.device)
        check_loading_options(self)


@dataclass
class LLMConfig(ModelPairSettings):
    """Every setting of an LLM run, under the one name it has as an API keyword (estimate_kl), a config field and a
    JSON key in summary.json; its command-line flag is ``--`` + the name with dashes (older spellings are accepted
    aliases). The defaults are the same for LLM_experiments.py and estimate_kl."""

    p_model: str | None = setting(None, "base model P: a transformers hub id, a local folder or a .gguf file (local, "
                                  "or owner/repo/file.gguf on the hub) (default with `q_model` unset: the offline "
                                  "default pair, built once on this machine)")
    q_model: str | tuple | None = setting(None, "fine-tuned model Q: a hub id, a local folder or a .gguf file "
                                          "(default: the offline default pair's Q); several (a quant ladder, a "
                                          "checkpoint series): one set of sequences from P scored by every "
                                          "candidate, with paired differences (docs/llm.md)", nargs="+")
    prompt: str = setting("An interesting fact is that", "the text every sequence continues (a prompt set of one) "
                          "when no `prompts_file` / `dataset` is given")
    prompts: tuple | None = setting(None, "a prompt set given as texts", flag=False)
    prompts_file: str | None = setting(None, "a prompt set: .txt (one prompt per line), .jsonl or .csv (text under "
                                       "`prompt_field`)", aliases=("--prompts",))
    dataset: str | None = setting(None, "a prompt set from the datasets library: a folder written by save_to_disk "
                                  "(offline) or a load_dataset name")
    split: str = setting("train", "`dataset`: the split")
    prompt_field: str = setting("prompt", "`prompts_file` .jsonl/.csv and `dataset`: the field holding the prompt text")
    n_prompts: int | None = setting(None, "only the first N prompts of the set (default: all)", type=int)
    chat_template: bool = setting(False, "wrap each prompt as a user turn of the tokenizer's chat template")
    n_samples: int = setting(1000, "sequences drawn per proposal and prompt", aliases=("--n-reps",), type=int)
    max_new_tokens: int = setting(20, "new tokens per sequence T (the KL is that of the process truncated there, or "
                                  "at EOS); prompt + T must fit the models' context", aliases=("--t-length",),
                                  type=int)
    temperature: float = setting(0.4, "applied to both P and Q", type=float)
    direction: str = setting("forward", "forward: KL(P‖Q) from sequences of P; reverse: KL(Q‖P) from sequences of Q "
                             "(the fine-tuned model first, as in RLHF), every proposal then built from Q and P with "
                             "the roles swapped; both: the two in one run, plus their sum (the Jeffreys divergence)")
    proposals: tuple = setting(DEFAULT_PROPOSALS, "'P' (plain MC) and/or registry proposals such as "
                               "'Geometric (β=0.5)', optionally + ' [prefix-aware]'", nargs="+")
    sampler: str = setting("iid", "how sequences are drawn: iid, stratified, sobol, array, array-kl "
                           "(experimental, docs/samplers.md; other than iid: each "
                           "batch of `batch_size` sequences is one randomization; standard errors come from the "
                           "spread between batches)")
    batch_size: int = setting(64, "sequences per forward batch", type=int)
    head: int | None = setting(None, "an exact head (docs/head.md): the most probable sequences after each prompt, "
                               "found by best-first search within this budget of forward positions, summed exactly; "
                               "the sampled sequences then come from the rest, for every proposal (0: never; "
                               "default: auto, a budget of 256 for P at prompts where its draws would be nearly all "
                               "one sequence)", type=int)
    seed: int = setting(0, "seed of the sampling streams (the offline default pair has its own fixed seed)", type=int)
    ignore_eos: bool = setting(False, "keep sampling after EOS (always `max_new_tokens` tokens)")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = setting("auto", "auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16; log-softmax "
                         "is float32 whatever this is")
    threads: int | None = setting(None, "CPU threads for torch (default: the cores not already busy, at least 1; "
                                  "recorded in the run)", type=int)
    output_dir: str | None = setting(None, "folder of the run's files (default: the API writes nothing; "
                                     "LLM_experiments.py a new folder under tests2/)", aliases=("--output-folder",))
    resume: bool = setting(False, "continue an interrupted run in `output_dir`, reusing what it kept")
    overwrite: bool = setting(False, "replace every earlier result in `output_dir`")
    # loading big models (llm/loading.py): per-model dtypes, PEFT adapters, sharding over GPUs with accelerate
    p_dtype: str | None = setting(None, "P's dtype, overriding `dtype` (default: `dtype`)")
    q_dtype: str | None = setting(None, "Q's dtype, overriding `dtype` (default: `dtype`)")
    p_adapter: str | None = setting(None, "a PEFT adapter (folder or hub id) applied to `p_model` (default: none)")
    q_adapter: str | None = setting(None, "a PEFT adapter applied to `q_model`; without `q_model`, to `p_model`'s "
                                    "base, loaded once (adapter off for P, on for Q) (default: none)")
    device_map: str | None = setting(None, "auto: shard each model over the visible GPUs with accelerate (default: "
                                     "none, each model whole on `device`)")
    offload: bool = setting(False, "with `device_map` auto: keep what does not fit on the GPUs in CPU memory")
    p_revision: str | None = setting(None, "`p_model` from the hub at this branch, tag or commit (default: its main "
                                     "branch); `p_model` may also be a .gguf file or owner/repo/file.gguf")
    q_revision: str | None = setting(None, "`q_model` from the hub at this branch, tag or commit (default: its main "
                                     "branch; with `q_adapter` alone: `p_revision`)")
    trust_remote_code: bool = setting(False, "let transformers run the model code a hub repository ships (only for "
                                      "repositories you trust)")

    RUN = "an LLM run"
    RUNS = "sampled runs"
    NATURE = ", which samples sequences after prompts"

    @classmethod
    def from_settings(cls, **settings) -> "LLMConfig":
        """An LLMConfig from keyword settings; an unknown name is a ValueError naming it (a corpus setting says that
        it belongs to corpus runs)."""
        from kl_estimation.llm.corpus.config import CorpusConfig
        from kl_estimation.settings import other_mode

        for name in settings:
            if (message := other_mode(name, cls, CorpusConfig)) is not None:
                raise ValueError(message)
        return super().from_settings(**settings)

    @property
    def prompt_set(self) -> tuple:
        return tuple(self.prompts) if self.prompts is not None else (self.prompt,)

    @property
    def candidates(self) -> tuple:
        """The candidate Qs: one name (or none: the default pair), or the several of a comparison run."""
        return (self.q_model,) if not isinstance(self.q_model, tuple) else self.q_model

    @property
    def several(self) -> bool:
        """Several candidates against one P (llm.run.candidates)."""
        return isinstance(self.q_model, tuple)

    @property
    def directions(self) -> tuple:
        """The directions this run estimates, in run order: ("forward",), ("reverse",) or both."""
        return DIRECTIONS if self.direction == BOTH else (self.direction,)

    def validate(self) -> "LLMConfig":
        """Check every setting (errors name the flag); returns a resolved copy: the prompt set read from its file or
        dataset, each proposal under its label. The config itself is left as it is."""
        check_int("n_samples", self.n_samples, 2)  # an SE needs two
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0)
        if self.head is not None:
            check_int("head", self.head, 0)
            if self.head and self.sampler != "iid":
                raise ValueError(f"head: needs `sampler` iid (got {self.sampler}): the remainder's SE is an i.i.d. one")
        if self.threads is not None:
            check_int("threads", self.threads, 1)
        if self.n_prompts is not None:
            check_int("n_prompts", self.n_prompts, 1)
        if self.resume and self.output_dir is None:
            raise ValueError("resume: give the `output_dir` of the run to continue")
        t = self.temperature
        if not (isinstance(t, (int, float)) and t > 0 and math.isfinite(t)):
            raise ValueError(f"temperature: must be a finite number > 0 (got {self.temperature!r})")
        prompts = self.prompts
        if prompts is None and (self.prompts_file or self.dataset or self.n_prompts is not None):
            from kl_estimation.llm.prompts import load_prompts

            prompts = tuple(load_prompts(prompt=self.prompt, prompts_file=self.prompts_file, dataset=self.dataset,
                                         split=self.split, prompt_field=self.prompt_field, n_prompts=self.n_prompts))
        if prompts is not None and not prompts:
            raise ValueError("prompts: the prompt set is empty")
        for i, text in enumerate((self.prompt,) if prompts is None else prompts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError("prompt: must not be empty" if prompts is None else f"prompts: prompt {i} is empty")
        if (self.p_model is None) != (self.q_model is None):
            raise ValueError("q_model: give both `p_model` and `q_model`, or neither for the offline default pair")
        if self.direction not in DIRECTION_SETTINGS:
            raise ValueError(f"direction: unknown direction {self.direction!r}; allowed: "
                             f"{', '.join(DIRECTION_SETTINGS)}")
        if not self.proposals:
            raise ValueError("proposals: give at least one proposal (P is plain Monte Carlo)")
        if len(set(self.proposals)) != len(self.proposals):
            raise ValueError("proposals: a proposal is listed twice")
        # each spelling ('Geometric (beta=0.5)') becomes the label people read, once (errors name `proposals`)
        resolved = replace(self, prompts=prompts, proposals=tuple(p.label for p in parse_proposals(self.proposals)))
        if self.resume and self.overwrite:
            raise ValueError("resume: cannot be combined with `overwrite`")
        if self.several:
            if not self.q_model or not all(isinstance(n, str) and n for n in self.q_model):
                raise ValueError(f"q_model: a model name or a list of them (got {self.q_model!r})")
            if len(set(self.q_model)) < len(self.q_model):
                raise ValueError("q_model: a candidate is named twice")
            if self.q_adapter or self.q_revision or self.q_dtype:
                flag = "q_adapter" if self.q_adapter else "q_revision" if self.q_revision else "q_dtype"
                raise ValueError(f"{flag}: applies to one `q_model`; with several candidates give each as a model "
                                 f"name (a folder, hub id or .gguf file)")
            for name in self.q_model:  # each candidate's source, as its own run would check it
                replace(self, q_model=name).check_loading()
        else:
            self.check_loading()
        check_sampler(self.sampler, self.n_samples, self.batch_size)
        both = " × 2 directions" if len(self.directions) > 1 else ""
        check_memory(records_bytes(resolved), "n_samples", f"keeping {self.n_samples} sequences × "
                     f"{len(resolved.prompt_set)} prompts × {len(self.proposals)} proposals{both} of up to "
                     f"{self.max_new_tokens} tokens (`max_new_tokens`)")
        return resolved


def check_sampler(name: str, n_samples: int, batch_size: int) -> None:
    from kl_estimation.core.draws import DRAWS

    if name not in DRAWS:
        raise ValueError(f"sampler: unknown sampler {name!r}; allowed: {', '.join(DRAWS)}")
    if not DRAWS[name].independent_rows and math.ceil(n_samples / batch_size) < 2:
        raise ValueError(f"batch_size: with `sampler` {name} each batch is one randomization and the standard "
                         f"error needs at least 2 per prompt; use `batch_size` ≤ {max(1, n_samples // 2)} for "
                         f"`n_samples` {n_samples}")


def records_bytes(cfg: "LLMConfig") -> int:
    """Memory the records of a run take while it runs: every proposal's records stay in memory as Python lists (about
    200 bytes per token and 1.5 kB per sequence), and writing one document copies it twice more."""
    per_sequence = 200 * cfg.max_new_tokens + 1500
    n = cfg.n_samples * len(cfg.prompt_set)
    return n * per_sequence * (len(cfg.proposals) * len(cfg.directions) + 2)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"device: unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device: {name} requested but MPS is not available on this machine")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.type == "cuda" else "float32"
