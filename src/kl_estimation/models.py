"""Pairs of language models behind one small interface, so the same sampler serves transformers LMs and toy models.

A pair exposes, for a batch of sequences, each continuing one prompt of the pair's prompt set, the *tempered* next-token log-probabilities of P and
of Q (float32 or wider, whatever dtype the models run in):

    log_p, log_q, state = pair.start(prompt_rows)    # after the prompts of these rows (B,), each (B, V)
    log_p, log_q, state = pair.step(state, tokens)   # after appending tokens (B,)

plus ``vocab_size``, ``eos_token_id`` (None when EOS is ignored) and ``decode(ids)``.

``TransformersPair`` keeps a KV cache per model, so each step is one forward per model over one new token.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tempered_log_softmax(logits: torch.Tensor, temperature: float, vocab_size: int) -> torch.Tensor:
    """log softmax(logits/τ) over the tokenizer's vocabulary, in float32 even for bf16/fp16 models.

    Rows beyond the tokenizer's vocabulary (models pad their embedding matrix to a multiple of 64 or 128) are dropped:
    no tokenizer id can reach them, and keeping them would let P and Q put mass on tokens that do not exist.
    """
    return torch.log_softmax(logits[..., :vocab_size].float() / temperature, dim=-1)


@functools.lru_cache(maxsize=None)
def _forward_keywords(model_class) -> tuple[str, dict]:
    """transformers ≥ 5 takes the KV cache as `cache` (and warns on `past_key_values`, removed in 5.40); versions
    that know `logits_to_keep` skip the logits of every prompt position but the last."""
    import inspect

    params = inspect.signature(model_class.forward).parameters
    return ("cache" if "cache" in params else "past_key_values",
            {"logits_to_keep": 1} if "logits_to_keep" in params else {})


def _forward_last(model, ids, mask, positions, cache):
    """Logits of the last position and the updated KV cache, whatever the transformers version calls it."""
    cache_kw, extra = _forward_keywords(type(model))
    kw = {} if cache is None else {cache_kw: cache}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kw, **extra)
    return out.logits[:, -1], (out["cache"] if "cache" in out else out.past_key_values)


def pad_left(prompt_ids: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists → (ids, mask), both (n, L_max), left-padded so that every prompt ends in the last column."""
    L = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), L), dtype=torch.long)
    for i, p in enumerate(prompt_ids):  # once per prompt set, not per step
        if p:
            ids[i, L - len(p):] = torch.as_tensor(p)
            mask[i, L - len(p):] = 1
    return ids, mask


@dataclass
class TransformersPair:
    """Two causal LMs and a tokenized prompt set. ``start(prompt_rows)`` runs the (left-padded) prompts of the given
    rows through both models with attention masks and position ids, so a padded prompt gives the next-token
    distributions it gives alone (to float32 rounding); ``step`` appends one token per row on the KV caches."""

    p_model: torch.nn.Module
    q_model: torch.nn.Module
    tokenizer: object
    prompt_ids: torch.Tensor  # (n_prompts, L) int64, left-padded, on the models' device
    prompt_mask: torch.Tensor  # (n_prompts, L) 1 on prompt tokens
    temperature: float
    eos_token_id: int | None

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def device(self) -> torch.device:
        return self.prompt_ids.device

    @property
    def n_prompts(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def prompt_lengths(self) -> list[int]:
        return self.prompt_mask.sum(-1).tolist()

    @property
    def context_length(self) -> int | None:
        """Positions both models can take (their configs' max_position_embeddings); None when neither sets one."""
        sizes = [getattr(m.config, "max_position_embeddings", None) for m in (self.p_model, self.q_model)]
        sizes = [s for s in sizes if isinstance(s, int) and s > 0]
        return min(sizes) if sizes else None

    def batch_bytes(self, batch_size: int, t_length: int) -> int:
        """Peak memory of one forward batch, roughly: float32 (B, V) rows of logits, log-probabilities and proposal
        arithmetic (about a dozen alive at once) plus both models' KV caches over prompt + T positions."""
        B, L = batch_size, max(self.prompt_lengths) + t_length
        kv = 0
        for m in (self.p_model, self.q_model):
            c = m.config
            layers = getattr(c, "num_hidden_layers", 1)
            heads, kv_heads = getattr(c, "num_attention_heads", 1), getattr(c, "num_key_value_heads", None)
            width = c.hidden_size * (kv_heads or heads) // heads
            kv += 2 * layers * B * L * width * next(m.parameters()).element_size()
        return 12 * B * self.vocab_size * 4 + kv

    def _lp(self, logits):
        return tempered_log_softmax(logits, self.temperature, self.vocab_size)

    @torch.inference_mode()
    def start(self, prompt_rows: torch.Tensor):
        rows = torch.as_tensor(prompt_rows, device=self.device)
        ids, mask = self.prompt_ids[rows], self.prompt_mask[rows]
        first = int((mask.sum(0) > 0).nonzero()[0])  # drop columns that are padding in every row of this batch
        ids, mask = ids[:, first:], mask[:, first:]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        lp, cp = _forward_last(self.p_model, ids, mask, pos, None)
        lq, cq = _forward_last(self.q_model, ids, mask, pos, None)
        return self._lp(lp), self._lp(lq), (cp, cq, mask, pos[:, -1])

    @torch.inference_mode()
    def step(self, state, tokens: torch.Tensor):
        cp, cq, mask, pos = state
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        pos = pos + 1
        ids = tokens[:, None]
        lp, cp = _forward_last(self.p_model, ids, mask, pos[:, None], cp)
        lq, cq = _forward_last(self.q_model, ids, mask, pos[:, None], cq)
        return self._lp(lp), self._lp(lq), (cp, cq, mask, pos)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick connect test, so an offline machine gets its one-line error at once instead of after the hub
    client's retries (about 50 s per model)."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def missing_in_model_folder(path: Path) -> str | None:
    """What a local folder lacks to be a model saved with save_pretrained, in words; None if nothing obvious."""
    if not path.is_dir():
        return "it is a file, not a folder (give the folder save_pretrained wrote)"
    names = {p.name for p in path.iterdir()}
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not names & set(WEIGHT_FILES):
        missing.append("the weights (model.safetensors or pytorch_model.bin)")
    if not names & set(TOKENIZER_FILES):
        missing.append("the tokenizer files (tokenizer.json or tokenizer_config.json)")
    if not missing:
        return None
    return (f"it is not a model folder: {' and '.join(missing)} missing (save_pretrained writes config.json and the "
            f"weights, the tokenizer's save_pretrained its files)")


def _load_one(flag: str, name: str, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(**kw):
        return AutoTokenizer.from_pretrained(name, **kw), AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kw)

    try:
        tok, model = load(local_files_only=True)  # a local folder, or a hub id already in the cache
    except Exception as err:  # transformers raises OSError, ValueError, …: all mean "not here"
        if Path(name).exists():
            why = missing_in_model_folder(Path(name)) or " ".join(str(err).split())
            raise ValueError(f"{flag}: cannot load the local folder {name!r}: {why}") from None
        if not _hub_reachable():
            raise ValueError(f"{flag}: cannot load {name!r}: not a local folder, not in the model cache, and the "
                             f"model hub is out of reach (offline)") from None
        try:
            tok, model = load()
        except Exception as err2:
            raise ValueError(f"{flag}: cannot load {name!r} from the model hub: "
                             f"{str(err2).splitlines()[0][:200]}") from None
    return tok, model.to(device).eval()


def tokenize_prompts(tokenizer, prompts: list[str], flag: str = "--prompt") -> list[list[int]]:
    """Token ids of each prompt, with the tokenizer's BOS in front when it has one (as the models were trained)."""
    out = []
    for i, text in enumerate(prompts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
            ids = [tokenizer.bos_token_id] + ids
        if not ids:
            raise ValueError(f"{flag}: prompt {i} tokenizes to nothing")
        out.append(ids)
    return out


def load_transformers_pair(p_model: str, q_model: str, *, prompts, temperature: float, device="cpu",
                           dtype: str = "float32", ignore_eos: bool = False) -> TransformersPair:
    """Load two causal LMs with `from_pretrained` (hub ids or local folders) that share one vocabulary, and
    tokenize `prompts` (a string or a list of strings)."""
    torch_dtype = DTYPES[dtype]
    tok_p, p = _load_one("--p-model", p_model, device, torch_dtype)
    tok_q, q = _load_one("--q-model", q_model, device, torch_dtype)
    if tok_p.get_vocab() != tok_q.get_vocab():
        raise ValueError(f"--q-model: its tokenizer differs from --p-model's (vocabulary sizes {len(tok_q)} and "
                         f"{len(tok_p)}); KL between the two needs one shared vocabulary")
    V = len(tok_p)
    for flag, m in (("--p-model", p), ("--q-model", q)):
        rows = m.get_output_embeddings().weight.shape[0]
        if rows < V:
            raise ValueError(f"{flag}: the model has {rows} logit rows but its tokenizer {V} tokens")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids, mask = pad_left(tokenize_prompts(tok_p, prompts), tok_p.pad_token_id or 0)
    eos = None if ignore_eos else tok_p.eos_token_id
    return TransformersPair(p, q, tok_p, ids.to(device), mask.to(device), temperature, eos)
