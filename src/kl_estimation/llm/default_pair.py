"""The offline default model pair: a small GPT-2 trained here on the Python standard library's own sources.

P (base) learns from the top-level modules of the standard library (~4.7 MB of code and docstrings that every
Python install has); Q is P fine-tuned on a distinct slice, the ``email``, ``json``, ``http`` and ``urllib``
packages. Both are saved with ``save_pretrained`` (with a byte-level BPE tokenizer trained on the same text) in a
cache folder and loaded back through the same ``from_pretrained`` path as hub models.

Deterministic (fixed data order from a numpy Generator, initialisation inside a forked torch RNG, no dropout) with
its own fixed ``SEED`` — a run's ``--seed`` is for sampling only, so everyone gets the same pair — and built once:
later runs reuse the cache. ``KL_ESTIMATION_CACHE`` moves the cache (default ~/.cache/kl_estimation).

Concurrent first runs: a file lock beside the cache lets one process build while the others wait and then reuse its
pair. The build happens in a ``.building-*`` sibling that becomes the cache only when complete; it is removed when
the build fails or is interrupted, and one left by a killed process is removed by the next build.
"""
from __future__ import annotations

import json
import os
import shutil
import sysconfig
from pathlib import Path

import numpy as np

from kl_estimation import runio

VERSION = "v2"  # v2: trained on one thread (v1 depended on the thread count torch happened to use)
SEED = 0  # the pair's own seed: a cache built with another (by older versions, from --seed) is rebuilt
LOCK_TIMEOUT = 3600.0  # seconds to wait for another process's build
BASE_STEPS, FINETUNE_STEPS = 600, 150
BATCH, CONTEXT = 32, 64
VOCAB = 2048
FINETUNE_PACKAGES = ("email", "json", "http", "urllib")
EOS = "<|endoftext|>"


def cache_dir() -> Path:
    root = Path(os.environ.get("KL_ESTIMATION_CACHE", Path.home() / ".cache" / "kl_estimation"))
    return root / f"default-pair-{VERSION}"


def paths() -> tuple[Path, Path]:
    d = cache_dir()
    return d / "p", d / "q"


def _corpus():
    lib = Path(sysconfig.get_paths()["stdlib"])
    base = [p.read_text(encoding="utf-8", errors="ignore") for p in sorted(lib.glob("*.py"))]
    tune = [p.read_text(encoding="utf-8", errors="ignore")
            for pkg in FINETUNE_PACKAGES for p in sorted((lib / pkg).rglob("*.py"))]
    return base, tune


def _tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def _ids(tokenizer, texts) -> np.ndarray:
    eos = tokenizer.eos_token_id
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        out += ids + [eos]
    return np.asarray(out, dtype=np.int64)


def _train(model, data: np.ndarray, steps: int, lr: float, rng: np.random.Generator, bar):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        starts = rng.integers(0, data.size - CONTEXT - 1, size=BATCH)
        x = torch.from_numpy(data[starts[:, None] + np.arange(CONTEXT + 1)])
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.2f}")
    model.eval()
    return model


def build(seed: int = SEED) -> tuple[Path, Path]:
    """Train and save the pair (2 min of CPU on a 2-core EPYC, README's timings); returns the (P, Q) folders. Callers
    hold the lock (``ensure`` does). Trained on BUILD_THREADS threads whatever torch uses otherwise: float sums depend
    on the thread count. The same versions give the same pair byte for byte; other versions another one — the data
    is this Python's standard library, tokenizers trains the BPE, torch's kernels the weights — so built.json records
    them."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        return _build(seed, cache_dir())
    finally:
        torch.set_num_threads(threads)


BUILD_THREADS = 1


def _build(seed: int, folder: Path) -> tuple[Path, Path]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from kl_estimation.progress import bar as progress_bar

    with runio.replaced_folder(folder) as tmp:
        base_texts, tune_texts = _corpus()
        tokenizer = _tokenizer(base_texts + tune_texts)
        base, tune = _ids(tokenizer, base_texts), _ids(tokenizer, tune_texts)
        cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=128, n_layer=2, n_head=4,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # scoped: the caller's global torch RNG is restored on exit
            model = GPT2LMHeadModel(cfg)
        rng = np.random.default_rng(seed)
        with progress_bar(total=BASE_STEPS + FINETUNE_STEPS, desc="building the offline default pair (once)",
                          unit="step") as bar:
            _train(model, base, BASE_STEPS, 3e-3, rng, bar)
            model.save_pretrained(tmp / "p")
            tokenizer.save_pretrained(tmp / "p")
            _train(model, tune, FINETUNE_STEPS, 5e-4, rng, bar)
            model.save_pretrained(tmp / "q")
            tokenizer.save_pretrained(tmp / "q")
        (tmp / "built.json").write_text(json.dumps({
            "version": VERSION, "seed": seed, "threads": BUILD_THREADS, "base": "Python stdlib top-level modules",
            "finetune": list(FINETUNE_PACKAGES), "torch": torch.__version__, "base_tokens": int(base.size),
            "finetune_tokens": int(tune.size), **runio.versions("transformers", "tokenizers")}, indent=1))
    return paths()


def lock_path() -> Path:
    return cache_dir().parent / f".default-pair-{VERSION}.lock"


def info() -> dict | None:
    """What the cached pair records about its build (version, seed, data, torch), or None when not built."""
    try:
        return json.loads((cache_dir() / "built.json").read_text())
    except (OSError, ValueError):
        return None


def _is_current() -> bool:
    built = info()
    return built is not None and built.get("seed") == SEED and built.get("version") == VERSION


def remove_stale_builds() -> list[Path]:
    """Remove the ``.building-*`` folders of builds that died (call with the lock held: no build is running)."""
    stale = sorted(cache_dir().parent.glob(".building-*"))
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


def ensure() -> tuple[str, str]:
    """The (P, Q) folders, building them the first time: one process builds, concurrent ones wait for it."""
    if not _is_current():
        from filelock import FileLock, Timeout

        cache_dir().parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_path())
        try:
            lock.acquire(timeout=0)
        except Timeout:
            from kl_estimation.progress import bar as progress_bar

            try:  # the bar prints a line every few seconds while we wait
                with progress_bar(desc=f"waiting for another process building the offline default pair (lock "
                                       f"{lock_path()})", unit="s"):
                    lock.acquire(timeout=LOCK_TIMEOUT)
            except Timeout:
                raise ValueError(f"p_model: the offline default pair is still being built by another process after "
                                 f"{LOCK_TIMEOUT:.0f} s (lock {lock_path()}); try again later") from None
        try:
            if not _is_current():  # the process we waited for may have built it
                remove_stale_builds()
                build(SEED)
        finally:
            lock.release()
    p, q = paths()
    return str(p), str(q)
