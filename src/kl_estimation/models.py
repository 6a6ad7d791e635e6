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


def _load_one(flag: str, name: str, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(**kw):
        return AutoTokenizer.from_pretrained(name, **kw), AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kw)

    try:
        tok, model = load(local_files_only=True)  # a local folder, or a hub id already in the cache
    except Exception as err:  # transformers raises OSError, ValueError, …: all mean "not here"
        if Path(name).exists():
            raise ValueError(f"{flag}: cannot load the local folder {name!r}: "
                             f"{str(err).splitlines()[0][:200]}") from None
        if not _hub_reachable():
            raise ValueError(f"{flag}: cannot load {name!r}: not a local folder, not in the model cache, and the "
                             f"model hub is out of reach (offline)") from None
        try:
            tok, model = load()
        except Exception as err2:
            raise ValueError(f"{flag}: cannot load {name!r} from the model hub: "
                             f"{str(err2).splitlines()[0][:200]}") from None
    return tok, model.to(device).eval()


def tokenize_prompts(tokenizer, prompts: list[str], chat_template: bool = False) -> list[list[int]]:
    """Token ids of each prompt: with `chat_template`, the prompt as one user turn of the tokenizer's chat template
    plus the generation prompt; otherwise the text with the tokenizer's BOS in front when it has one."""
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template: the tokenizer has no chat template")
    out = []
    for i, text in enumerate(prompts):
        if chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
                ids = [tokenizer.bos_token_id] + ids
        if not ids:
            raise ValueError(f"prompts: prompt {i} tokenizes to nothing")
        out.append(ids)
    return out


def pair_from_models(p, q, tokenizer, *, prompts, temperature: float, ignore_eos: bool = False,
                     chat_template: bool = False, q_tokenizer=None) -> TransformersPair:
    """A pair from two loaded causal LMs sharing `tokenizer` (checked against `q_tokenizer` when given), with
    `prompts` (a string or a list of strings) tokenized and left-padded on P's device."""
    if q_tokenizer is not None and tokenizer.get_vocab() != q_tokenizer.get_vocab():
        raise ValueError(f"q_model: its tokenizer differs from p_model's (vocabulary sizes {len(q_tokenizer)} and "
                         f"{len(tokenizer)}); KL between the two needs one shared vocabulary")
    V = len(tokenizer)
    for flag, m in (("p_model", p), ("q_model", q)):
        rows = m.get_output_embeddings().weight.shape[0]
        if rows < V:
            raise ValueError(f"{flag}: the model has {rows} logit rows but its tokenizer {V} tokens")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids, mask = pad_left(tokenize_prompts(tokenizer, prompts, chat_template), tokenizer.pad_token_id or 0)
    device = next(p.parameters()).device
    eos = None if ignore_eos else tokenizer.eos_token_id
    return TransformersPair(p, q, tokenizer, ids.to(device), mask.to(device), temperature, eos)


def load_transformers_pair(p_model: str, q_model: str, *, prompts, temperature: float, device="cpu",
                           dtype: str = "float32", ignore_eos: bool = False,
                           chat_template: bool = False) -> TransformersPair:
    """Load two causal LMs with `from_pretrained` (hub ids or local folders) that share one vocabulary, and
    tokenize `prompts` (a string or a list of strings)."""
    torch_dtype = DTYPES[dtype]
    tok_p, p = _load_one("p_model", p_model, device, torch_dtype)
    tok_q, q = _load_one("q_model", q_model, device, torch_dtype)
    return pair_from_models(p, q, tok_p, prompts=prompts, temperature=temperature, ignore_eos=ignore_eos,
                            chat_template=chat_template, q_tokenizer=tok_q)
