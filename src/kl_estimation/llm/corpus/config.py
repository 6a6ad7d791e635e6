"""The settings of a corpus run (CorpusConfig): teacher-forced KL(P‖Q) over a text, llama.cpp's windows by default.

The vocabulary is LLMConfig's: a setting both runs have (p_model, q_model, device, dtype, p_dtype, q_dtype,
batch_size, output_dir, threads, overwrite, p_revision, q_revision, trust_remote_code, the adapters, device_map, …)
is *the same* setting — its name, default and help are taken from LLMConfig — and the corpus settings are declared
with the same ``setting()`` metadata, so ``LLM_experiments.py --corpus FILE`` builds its flags the same way
(``--`` + the name with dashes). A corpus run never samples: LLMConfig's sampling settings are not part of it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from kl_estimation import settings
from kl_estimation.core.validation import check_int
from kl_estimation.llm.corpus.backend import BACKENDS, is_llama_base_file
from kl_estimation.llm.corpus.stats import BASE_STORAGE, SCORE_MODES
from kl_estimation.llm.run.config import LLMConfig, ModelPairSettings
from kl_estimation.settings import other_mode, setting

CLUSTERS = ("window", "document")
CORPUS_FILES = ("summary.json", "tokens.npz", "windows.csv", "llama.txt", "plots", "comparison.json", "comparison.csv",
                "candidates")
CORPUS_KINDS = (".txt", ".jsonl")


def shared(name: str, help: str | None = None, default=..., nargs=None):
    """LLMConfig's setting `name` for the corpus run (its help may be reworded where the corpus run uses it
    otherwise, e.g. batch_size counts windows; `nargs` where it takes several)."""
    return settings.shared(LLMConfig, name, help, default, nargs)


@dataclass
class CorpusConfig(ModelPairSettings):
    """Every setting of a corpus run, under the one name it has as an API keyword (corpus_kl), a config field and a
    JSON key in summary.json; the flag is ``--`` + the name with dashes."""

    p_model: str | None = shared("p_model", "base model P (llama.cpp's base): a hub id, a local folder or a .gguf file")
    q_model: str | tuple | None = shared("q_model", "the other model Q (e.g. a quantized P): a hub id, a local folder "
                                                    "or a .gguf file (default with `q_adapter`: `p_model`); several "
                                                    "(a quant ladder, a checkpoint series): each scored against one "
                                                    "pass of P, loaded one at a time, then compared in one table",
                                         nargs="+")
    corpus: str | None = setting(None, "the text: a .txt file (one document, tokenized whole as llama.cpp does) or a "
                                       ".jsonl file (one document per line, its text under `text_field`); this flag "
                                       "switches LLM_experiments.py to a corpus run")
    texts: tuple | None = setting(None, "the corpus given as texts, one per document", flag=False)
    dataset: str | None = shared("dataset", "a corpus from the datasets library: a save_to_disk folder (offline) or "
                                            "a load_dataset name, one document per row (text under `text_field`)")
    split: str = shared("split")
    text_field: str = setting("text", "`corpus` .jsonl and `dataset`: the field holding each document's text")
    group_field: str | None = setting(None, "`corpus` .jsonl: the field naming each document's group (e.g. "
                                            "category: code, chat, math): the statistics per group, with SEs "
                                            "clustered within it")
    n_documents: int | None = setting(None, "only the first N documents (default: all)", type=int)
    token_ids: str | None = setting(None, "score these token ids instead of tokenizing a text: llama.cpp's "
                                          "--kl-divergence-base file (its header holds them) or a .npy array "
                                          "(default: tokenize `corpus` / `dataset`)")
    context: int = setting(512, "tokens per window n_ctx (llama.cpp's -c); must fit both models' context", type=int)
    score: str = setting("second-half", "second-half: llama.cpp's scoring, the last n_ctx - 1 - n_ctx/2 tokens of "
                                        "each window (numbers compare one to one); all: every token after the "
                                        "first of each window")
    n_windows: int | None = setting(None, "only the first N windows (llama.cpp's --chunks) (default: all)", type=int)
    cluster_by: str = setting("window", "clusters of the clustered standard errors: window (llama.cpp's "
                                        "windows, independent forward passes) or document")
    base_storage: str = setting("exact", "exact: P's distributions in float32; llama-uint16: P stored as llama.cpp's "
                                         "--kl-divergence-base stores it (16-bit log-probs, tokens below max − 16 "
                                         "dropped), to reproduce its arithmetic")
    n_bootstrap: int = setting(1000, "cluster resamples of the bootstrap behind the percentile CIs", type=int)
    seed: int = shared("seed", "seed of the cluster bootstrap (the same draws for every candidate)")
    n_worst: int = setting(20, "tokens with the largest KL(P‖Q) kept with their context for the figures", type=int)
    save_base: str | None = setting(None, "also store P's side of the run in this folder (its final hidden states "
                                          "in P's dtype, hidden size × bytes per scored token; P's output head is "
                                          "read again from P's file, recorded with a checksum; `backend` "
                                          "llama.cpp: its hidden states, its head applied in ggml); without "
                                          "`q_model`, P alone is run")
    save_base_dtype: str | None = setting(None, "`save_base`: store the hidden states in this dtype "
                                                "(bfloat16, float16: half the size of float32; P's logits are then "
                                                "recomputed from rounded values) (default: P's dtype, exact)")
    base: str | None = setting(None, "score the candidates against a folder written by `save_base` instead of P (P's "
                                     "file is read for its output head only, its body released before any candidate "
                                     "loads), or against llama.cpp's --kl-divergence-base file (P as llama.cpp "
                                     "evaluated it); the text, windows and clusters are the cache's")
    backend: str = setting("transformers", "what computes the logits: transformers (the weights: a GGUF dequantized, "
                                           "run in `dtype`) or llama.cpp (llama.cpp's runtime through "
                                           "llama-cpp-python: the GGUF as deployed, its kernels and tokenizer)")
    runtime_floor: bool = setting(False, "`backend` llama.cpp: also each candidate's weights-only KL (transformers) "
                                         "and the runtime's floor (P in llama.cpp against P in transformers), "
                                         "beside the runtime's KL")
    batch_size: int | None = shared("batch_size", "windows per forward batch (default: 1 on a CPU, where larger "
                                                  "batches save no time and each window adds n_ctx/2 × vocabulary "
                                                  "floats of logits per model; 4 on a GPU; `backend` llama.cpp: "
                                                  "llama-perplexity's 2048 / n_ctx, always)", default=None)
    device: str = shared("device")
    dtype: str = shared("dtype")
    threads: int | None = shared("threads")
    output_dir: str | None = shared("output_dir", "folder of the run's files (default: the API writes nothing; "
                                                  "LLM_experiments.py a new folder under tests2/corpus/)")
    overwrite: bool = shared("overwrite", "replace an earlier corpus run's files in `output_dir`")
    p_dtype: str | None = shared("p_dtype")
    q_dtype: str | None = shared("q_dtype")
    p_adapter: str | None = shared("p_adapter")
    q_adapter: str | None = shared("q_adapter")
    device_map: str | None = shared("device_map")
    offload: bool = shared("offload")
    p_revision: str | None = shared("p_revision")
    q_revision: str | None = shared("q_revision")
    trust_remote_code: bool = shared("trust_remote_code")

    RUN = "a corpus run"
    RUNS = "corpus runs"
    NATURE = ", which scores the text teacher-forced and never samples"

    @classmethod
    def from_settings(cls, **settings) -> CorpusConfig:
        """A CorpusConfig from keyword settings; an unknown name is a ValueError naming it (a sampling setting says
        that a corpus run does not sample)."""
        for name in settings:
            if (message := other_mode(name, cls, LLMConfig)) is not None:
                raise ValueError(message)
        return super().from_settings(**settings)

    @property
    def candidates(self) -> tuple:
        """The candidate Qs: one name, or the several of a comparison run."""
        return (self.q_model,) if isinstance(self.q_model, str) else tuple(self.q_model or ())

    def __post_init__(self):
        if isinstance(self.q_model, list):  # the command line's --q-model A [B …]: one name is a one-candidate run
            self.q_model = self.q_model[0] if len(self.q_model) == 1 else tuple(self.q_model)
        super().__post_init__()
        if self.texts is not None and not isinstance(self.texts, tuple):
            self.texts = (self.texts,) if isinstance(self.texts, str) else tuple(self.texts)

    def validate(self) -> CorpusConfig:
        """Check every setting (errors name the parameter) before anything is loaded; returns a copy (nothing
        needs resolving yet), the config itself is left as it is."""
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: one of {', '.join(BACKENDS)} (got {self.backend!r})")
        if self.runtime_floor and self.backend != "llama.cpp":
            raise ValueError("runtime_floor: only with `backend` llama.cpp")
        if self.backend == "llama.cpp":
            self._check_llama_cpp()
        if self.base is not None:
            from kl_estimation.llm.corpus.basecache import read_record

            if not is_llama_base_file(self.base):
                read_record(self.base)
            given = [n for n in ("p_model", "save_base", "p_adapter", "corpus", "texts", "dataset", "token_ids")
                     if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{given[0]}: the base cache {self.base} holds P and the text; leave out "
                                 f"`{given[0]}` with `base`")
            if self.q_model is None:
                raise ValueError("q_model: give the candidates to score against the base cache")
        elif self.p_model is None or (self.q_model is None and self.save_base is None):
            raise ValueError("q_model: a corpus run needs `p_model` and `q_model` (or `p_model` with `q_adapter`, or "
                             "`p_model` with `save_base`)")
        if self.save_base_dtype is not None and self.save_base_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"save_base_dtype: one of float32, bfloat16, float16 (got {self.save_base_dtype!r})")
        if self.save_base_dtype is not None and self.save_base is None:
            raise ValueError("save_base_dtype: only with `save_base`")
        if self.save_base is not None:
            from kl_estimation.llm.corpus.basecache import check_base_folder

            check_base_folder(self.save_base, self.overwrite)
        if self.q_model is not None and (not self.candidates
                                         or not all(isinstance(n, str) and n for n in self.candidates)):
            raise ValueError(f"q_model: a model name or a list of them (got {self.q_model!r})")
        if len(set(self.candidates)) < len(self.candidates):
            raise ValueError("q_model: a candidate is named twice")
        check_int("context", self.context, 3 if self.score == "second-half" else 2)
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, 1)
        check_int("n_worst", self.n_worst, 0)
        check_int("n_bootstrap", self.n_bootstrap, 1)
        check_int("seed", self.seed, 0)
        for name in ("n_windows", "n_documents", "threads"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.score not in SCORE_MODES:
            raise ValueError(f"score: one of {', '.join(SCORE_MODES)} (got {self.score!r})")
        if self.cluster_by not in CLUSTERS:
            raise ValueError(f"cluster_by: one of {', '.join(CLUSTERS)} (got {self.cluster_by!r})")
        if self.base_storage not in BASE_STORAGE:
            raise ValueError(f"base_storage: one of {', '.join(BASE_STORAGE)} (got {self.base_storage!r})")
        given = [n for n in ("corpus", "texts", "dataset", "token_ids") if getattr(self, n) is not None]
        if not given and self.base is None:
            raise ValueError("corpus: give the text to score: `corpus` FILE, `dataset` NAME or `token_ids` FILE")
        if len(given) > 1:
            raise ValueError(f"{given[1]}: give one source of text, not both `{given[0]}` and `{given[1]}`")
        for name in ("corpus", "token_ids"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: no file {path}")
        if self.corpus is not None and Path(self.corpus).suffix not in CORPUS_KINDS:
            raise ValueError(f"corpus: {self.corpus} is not a {' or '.join(CORPUS_KINDS)} file")
        if self.corpus is not None or self.texts is not None:  # an empty text is refused before any model loads
            from kl_estimation.llm.corpus.text import read_documents

            read_documents(self.corpus, self.texts, None, self.split, self.text_field, self.n_documents,
                           self.group_field)
        if self.token_ids is not None and self.cluster_by == "document":
            raise ValueError("cluster_by: token ids carry no documents; cluster by window")
        for name in self.candidates or (None,):  # each candidate's source, as its own run would check it
            replace(self, q_model=name).check_loading()
        if self.output_dir is not None:
            check_corpus_folder(self.output_dir, self.overwrite)
        return replace(self)

    def _check_llama_cpp(self) -> None:
        """The llama.cpp backend runs local .gguf files, without adapters, and needs the binding."""
        from kl_estimation.llm.corpus.backend import import_llama_cpp
        from kl_estimation.llm.loading import is_gguf

        for side in ("p", "q"):
            if getattr(self, f"{side}_adapter"):
                raise ValueError(f"{side}_adapter: adapters run in transformers; leave out `backend` llama.cpp")
        for flag, name in [("p_model", self.p_model)] + [("q_model", n) for n in self.candidates]:
            if name is not None and not (is_gguf(name) and Path(name).is_file()):
                raise ValueError(f"{flag}: the llama.cpp backend runs local .gguf files (got {name!r})")
        if self.base is not None and not is_llama_base_file(self.base) and self.runtime_floor:
            raise ValueError("runtime_floor: needs P's GGUF (`p_model`), not a base cache")
        import_llama_cpp()

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def check_corpus_folder(folder, overwrite: bool) -> None:
    """The folder can be written and holds no earlier run unless `overwrite`."""
    from kl_estimation import runio

    runio.check_output_dir(folder, "output_dir")
    earlier = [Path(folder) / n for n in CORPUS_FILES if (Path(folder) / n).exists()]
    if earlier and not overwrite:
        raise ValueError(f"output_dir: {folder} already holds a run ({earlier[0].name}); pass `overwrite` to replace "
                         f"it, or choose another folder")
