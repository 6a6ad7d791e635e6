"""Pairs of language models behind one small interface, so the same sampler serves transformers LMs and toy models.

A pair exposes, for a batch of sequences, each continuing one prompt of the pair's prompt set, the *tempered*
next-token log-probabilities of P and of Q (float32 or wider, whatever dtype the models run in):

    log_p, log_q, state = pair.start(prompt_rows)    # after the prompts of these rows (B,), each (B, V)
    log_p, log_q, state = pair.step(state, tokens)   # after appending tokens (B,)

plus ``vocab_size``, ``eos_token_id`` (None when EOS is ignored) and ``decode(ids)``.

``TransformersPair`` keeps a KV cache per model, so each step is one forward per model over one new token.

Big models: ``device_map="auto"`` (accelerate) shards each model over the visible GPUs (under torchrun: this rank's
share of them), optionally offloading the rest to CPU memory; the pair then moves every model's logits to one device.
Adapters: a model given as base + PEFT adapter (LoRA and other weight adapters). When P and Q share their base, it is
loaded once and each side is an :class:`AdapterView` of it — adapter off for P (or P's adapter), Q's adapter on for Q
— with its own KV cache, so P and Q cost one set of base weights.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

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


class AdapterView:
    """One side of a pair on a PEFT model whose base it shares with the other side: runs the base model with adapter
    `adapter` active, or with every adapter off when `adapter` is None. Only weight adapters (LoRA, IA³, …) can be
    switched this way; the forward is the underlying transformers model's, so the KV cache keywords stay its own."""

    def __init__(self, peft_model, adapter: str | None):
        self.peft_model, self.adapter = peft_model, adapter
        self.model = peft_model.get_base_model()

    def __call__(self, **kw):
        if self.adapter is None:
            with self.peft_model.disable_adapter():
                return self.model(**kw)
        if self.peft_model.active_adapter != self.adapter:
            self.peft_model.set_adapter(self.adapter)
        return self.model(**kw)

    def __getattr__(self, name):  # config, get_output_embeddings, …: the base model's
        return getattr(self.model, name)


def _inner(model):
    return model.model if isinstance(model, AdapterView) else model


def _forward_last(model, ids, mask, positions, cache):
    """Logits of the last position and the updated KV cache, whatever the transformers version calls it."""
    cache_kw, extra = _forward_keywords(type(_inner(model)))
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

    def batch_bytes(self, batch_size: int, max_new_tokens: int) -> int:
        """Peak memory of one forward batch, roughly: float32 (B, V) rows of logits, log-probabilities and proposal
        arithmetic (about a dozen alive at once) plus both models' KV caches over prompt + T positions."""
        B, L = batch_size, max(self.prompt_lengths) + max_new_tokens
        kv = 0
        for m in (self.p_model, self.q_model):
            c = m.config
            layers = getattr(c, "num_hidden_layers", 1)
            heads, kv_heads = getattr(c, "num_attention_heads", 1), getattr(c, "num_key_value_heads", None)
            width = c.hidden_size * (kv_heads or heads) // heads
            kv += 2 * layers * B * L * width * next(m.parameters()).element_size()
        return 12 * B * self.vocab_size * 4 + kv

    def _lp(self, logits):
        # a model sharded over devices (device_map) returns its logits where its last layer lives
        return tempered_log_softmax(logits.to(self.device), self.temperature, self.vocab_size)

    def prompt_inputs(self, prompt_rows: torch.Tensor):
        """(ids, mask, positions) of the prompts of these rows, without the columns that pad every row."""
        rows = torch.as_tensor(prompt_rows, device=self.device)
        ids, mask = self.prompt_ids[rows], self.prompt_mask[rows]
        first = int((mask.sum(0) > 0).nonzero()[0])  # drop columns that are padding in every row of this batch
        ids, mask = ids[:, first:], mask[:, first:]
        return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    @staticmethod
    def next_inputs(mask, pos):
        """The attention mask and positions after one more token per row."""
        return torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1), pos + 1

    @torch.inference_mode()
    def start(self, prompt_rows: torch.Tensor):
        ids, mask, pos = self.prompt_inputs(prompt_rows)
        lp, cp = _forward_last(self.p_model, ids, mask, pos, None)
        lq, cq = _forward_last(self.q_model, ids, mask, pos, None)
        return self._lp(lp), self._lp(lq), (cp, cq, mask, pos[:, -1])

    @torch.inference_mode()
    def step(self, state, tokens: torch.Tensor):
        cp, cq, mask, pos = state
        mask, pos = self.next_inputs(mask, pos)
        ids = tokens[:, None]
        lp, cp = _forward_last(self.p_model, ids, mask, pos[:, None], cp)
        lq, cq = _forward_last(self.q_model, ids, mask, pos[:, None], cq)
        return self._lp(lp), self._lp(lq), (cp, cq, mask, pos)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))
