"""Tiny randomly initialised causal LMs saved with save_pretrained, for tests (no training, no hub)."""
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging


def tokenizer(words=("<eos>", "a", "b", "c"), bos=None, adds_bos=False):
    """Word-level tokenizer; `bos` names its BOS token (one of `words`), which it puts in front of every text by itself
    (Llama-style) when `adds_bos`, and only declares otherwise (SmolLM2-style)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, words.index(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<eos>",
                                   **({"bos_token": bos} if bos else {}))


def save_pair(folder: Path, words=("<eos>", "a", "b", "c"), extra_rows: int = 3, seed: int = 0, noise: float = 0.4,
              n_layer: int = 1, n_embd: int = 8, n_positions: int = 64, bos=None, adds_bos=False):
    """P random, Q = P with Gaussian noise on every weight; logit rows = len(words) + extra_rows (padding rows)."""
    tok = tokenizer(words, bos, adds_bos)
    cfg = GPT2Config(vocab_size=len(words) + extra_rows, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=2, initializer_range=0.6, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    gen = torch.Generator().manual_seed(seed)
    p = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for prm in p.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen) * 0.6)
    q = GPT2LMHeadModel(cfg).eval()
    q.load_state_dict(p.state_dict())
    with torch.no_grad():
        for prm in q.parameters():
            prm.add_(torch.randn(prm.shape, generator=gen) * noise)
    paths = []
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" is no output of the code under test
    try:
        for name, m in (("p", p), ("q", q)):
            d = Path(folder) / name
            m.save_pretrained(d)
            tok.save_pretrained(d)
            paths.append(str(d))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return tuple(paths)


def save_candidates(folder: Path, noises=(0.2, 0.3, 0.5), seed: int = 0, **kw):
    """P (save_pair's, `seed`) and one candidate Q per noise level, each P plus its own Gaussian noise (independent
    directions): (P's folder, [Q folders])."""
    p_path, _ = save_pair(Path(folder) / "base", seed=seed, noise=0.0, **kw)
    p = GPT2LMHeadModel.from_pretrained(p_path)
    tok = PreTrainedTokenizerFast.from_pretrained(p_path)
    out = []
    for i, noise in enumerate(noises):
        q = GPT2LMHeadModel.from_pretrained(p_path).eval()
        gen = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for prm in q.parameters():
                prm.add_(torch.randn(prm.shape, generator=gen) * noise)
        d = Path(folder) / f"ckpt-{i + 1}"
        q.save_pretrained(d)
        tok.save_pretrained(d)
        out.append(str(d))
    del p
    return p_path, out
