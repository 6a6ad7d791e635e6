"""Pairs of language models behind one small interface, so the same sampler serves transformers LMs and toy models.

A pair exposes, for a batch of sequences continuing one prompt, the *tempered* next-token log-probabilities of P and
of Q (float32 or wider, whatever dtype the models run in):

    log_p, log_q, state = pair.start(batch)          # after the prompt, each (batch, V)
    log_p, log_q, state = pair.step(state, tokens)   # after appending tokens (batch,)

plus ``vocab_size``, ``eos_token_id`` (None when EOS is ignored) and ``decode(ids)``.

``TransformersPair`` keeps a KV cache per model, so each step is one forward per model over one new token.
"""
from __future__ import annotations

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


@dataclass
class TransformersPair:
    p_model: torch.nn.Module
    q_model: torch.nn.Module
    tokenizer: object
    prompt_ids: torch.Tensor  # (L,) int64 on the models' device
    temperature: float
    eos_token_id: int | None

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def device(self) -> torch.device:
        return self.prompt_ids.device

    def _lp(self, logits):
        return tempered_log_softmax(logits[:, -1], self.temperature, self.vocab_size)

    @torch.inference_mode()
    def start(self, batch: int):
        ids = self.prompt_ids.expand(batch, -1)
        op = self.p_model(input_ids=ids, use_cache=True)
        oq = self.q_model(input_ids=ids, use_cache=True)
        return self._lp(op.logits), self._lp(oq.logits), (op.past_key_values, oq.past_key_values)

    @torch.inference_mode()
    def step(self, state, tokens: torch.Tensor):
        ids = tokens[:, None]
        op = self.p_model(input_ids=ids, past_key_values=state[0], use_cache=True)
        oq = self.q_model(input_ids=ids, past_key_values=state[1], use_cache=True)
        return self._lp(op.logits), self._lp(oq.logits), (op.past_key_values, oq.past_key_values)

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


def load_transformers_pair(p_model: str, q_model: str, *, prompt: str, temperature: float, device="cpu",
                           dtype: str = "float32", ignore_eos: bool = False) -> TransformersPair:
    """Load two causal LMs with `from_pretrained` (hub ids or local folders) that share one vocabulary."""
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
    ids = tok_p(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if tok_p.bos_token_id is not None and (len(ids) == 0 or ids[0] != tok_p.bos_token_id):
        ids = torch.cat([torch.tensor([tok_p.bos_token_id]), ids])
    if len(ids) == 0:
        raise ValueError("--prompt: the prompt tokenizes to nothing")
    eos = None if ignore_eos else tok_p.eos_token_id
    return TransformersPair(p, q, tok_p, ids.to(device), temperature, eos)
