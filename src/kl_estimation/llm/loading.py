"""Loading a pair of transformers models: hub ids (at a revision) and local folders, GGUF files (llama.cpp's format,
dequantized by transformers), dtypes, PEFT adapters, device maps, and the tokenizer checks that decide whether P and
Q can be compared at all.

A model name is one of: a local folder written by save_pretrained; a local ``.gguf`` file (loaded as
``from_pretrained(folder, gguf_file=name)``, which dequantizes every tensor to float32 and needs the gguf and
accelerate packages); a hub id, optionally at a ``revision``; or ``owner/repo/file.gguf``, one GGUF file of a hub
repository."""
from __future__ import annotations

import functools
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from kl_estimation.llm.pair import (
    DTYPES,
    AdapterView,
    TransformersPair,
    _inner,
    pad_left,
)


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


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


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


GGUF_SUFFIX = ".gguf"


def is_gguf(name) -> bool:
    return str(name).lower().endswith(GGUF_SUFFIX)


def model_source(flag: str, name: str, revision: str | None = None) -> tuple[str, dict]:
    """What from_pretrained takes for a model name, and its keywords: a ``.gguf`` file is its folder plus
    ``gguf_file=``; a hub GGUF ``owner/repo/file.gguf`` the repository plus the file; a `revision` applies to hub
    ids only."""
    name = str(name)
    rev = {} if revision is None else {"revision": revision}
    if is_gguf(name):
        path = Path(name)
        if path.is_file():
            return str(path.parent.resolve()), {"gguf_file": path.name}
        parts = name.split("/")
        if path.exists() or len(parts) < 3 or name.startswith((".", "/", "~")):
            raise ValueError(f"{flag}: no GGUF file {name!r} (a local .gguf file, or owner/repo/file.gguf on the hub)")
        return "/".join(parts[:2]), {"gguf_file": "/".join(parts[2:]), **rev}
    return name, rev


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_header(path) -> dict:
    """The metadata of a GGUF file without its tensors, fast: scalars and strings by key; arrays (the vocabulary,
    merges) are skipped and given as None. GGUF v2/v3 layout: b"GGUF", uint32 version, uint64 tensor count, uint64
    key-value count, then (string key, uint32 type, value) per pair."""
    import struct

    def read(fmt):
        return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]

    def string():
        return fh.read(read("<Q")).decode("utf-8", errors="replace")

    out = {}
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = read("<I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old (2 or later)")
        read("<Q")
        for _ in range(read("<Q")):
            key, kind = string(), read("<I")
            if kind == 8:
                out[key] = string()
            elif kind in _GGUF_SCALARS:
                out[key] = read(_GGUF_SCALARS[kind])
            elif kind == 9:
                sub, n = read("<I"), read("<Q")
                if sub == 8:
                    for _ in range(n):
                        fh.seek(read("<Q"), 1)
                elif sub in _GGUF_SCALARS:
                    fh.seek(n * struct.calcsize(_GGUF_SCALARS[sub]), 1)
                else:
                    raise ValueError(f"{path}: nested GGUF arrays under {key!r} are not read here")
                out[key] = None
            else:
                raise ValueError(f"{path}: unknown GGUF value type {kind} under {key!r}")
    return out


def gguf_facts(flag: str, name: str, transformers: bool = True) -> dict:
    """A local GGUF file's architecture and context length, read from its header at once — so that a file
    transformers cannot load (`transformers`: checked; llama.cpp's runtime reads more architectures), or a context it
    cannot take, is refused before seconds of parsing and dequantizing."""
    try:
        head = read_gguf_header(name)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{flag}: cannot read the GGUF file {name!r}: {err}") from None
    arch = head.get("general.architecture")
    known = None
    if transformers:
        try:
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES as known
        except ImportError:  # pragma: no cover - older transformers
            pass

    def norm(a):
        return str(a).lower().replace("-", "").replace("_", "")

    if known is not None and arch is not None and "t5" not in str(arch) \
            and norm(arch) not in {norm(k) for k in known}:
        raise ValueError(f"{flag}: {name}: transformers cannot load GGUF files of architecture {arch!r} (it loads: "
                         f"{', '.join(sorted(known))})")
    return {"architecture": arch, "context_length": head.get(f"{arch}.context_length"),
            "name": head.get("general.name"), "file_type": head.get("general.file_type"),
            "add_bos_token": head.get("tokenizer.ggml.add_bos_token")}


def _gguf_error(flag: str, name: str, err: Exception) -> ValueError | None:
    """transformers' failures on a GGUF file in one line: an architecture it cannot read, missing packages."""
    text = " ".join(str(err).split())
    from kl_estimation.llm.corpus.backend import unknown_gguf_type_error

    if (unknown := unknown_gguf_type_error(flag, name, text)) is not None:
        return unknown
    m = re.search(r"architecture (\S+) is not supported", text)
    if m:
        try:
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES as known
        except ImportError:  # pragma: no cover - older transformers
            known = []
        return ValueError(f"{flag}: {name}: transformers cannot load GGUF files of architecture {m[1]!r}"
                          + (f" (it loads: {', '.join(sorted(known))})" if known else ""))
    if "accelerate" in text and "required" in text:
        return ValueError(f"{flag}: loading a GGUF file needs the accelerate package (pip install accelerate, or "
                          f"pip install 'kl-estimation[gguf]')")
    if isinstance(err, ImportError) or ("gguf" in text.lower() and "install" in text.lower()):
        return ValueError(f"{flag}: loading a GGUF file needs the gguf package (pip install gguf, or pip install "
                          f"'kl-estimation[gguf]')")
    if Path(name).is_file():
        return ValueError(f"{flag}: cannot load the GGUF file {name!r}: {text[:200]}")
    return None


def _from_pretrained(flag: str, name: str, load):
    """`load(**kw)` from the local cache / a local folder first, then from the hub; every failure as one line."""
    try:
        return load(local_files_only=True)  # a local folder, or a hub id already in the cache
    except Exception as err:  # transformers raises OSError, ValueError, …: all mean "not here"
        if is_gguf(name) and (gguf_err := _gguf_error(flag, name, err)) is not None:
            raise gguf_err from None
        if Path(name).exists():
            why = missing_in_model_folder(Path(name)) or " ".join(str(err).split())
            raise ValueError(f"{flag}: cannot load the local folder {name!r}: {why}") from None
        if not _hub_reachable():
            raise ValueError(f"{flag}: cannot load {name!r}: not a local folder, not in the model cache, and the "
                             f"model hub is out of reach (offline)") from None
        try:
            return load()
        except Exception as err2:
            if is_gguf(name) and (gguf_err := _gguf_error(flag, name, err2)) is not None:
                raise gguf_err from None
            raise ValueError(f"{flag}: cannot load {name!r} from the model hub: "
                             f"{str(err2).splitlines()[0][:200]}") from None


@contextmanager
def gguf_speedups():
    """Within this block each GGUF file is parsed once. transformers parses a GGUF file's metadata — a Python loop
    over the ~100 000 vocabulary and merge entries — once for the config, once for the tokenizer and once more for the
    weights, and rebuilds gguf-py's tensor-name table for every submodule (400 times for SmolLM2): here the parsed
    reader (read-only, over a memory map) is shared by those calls and the table built once per (architecture, blocks).
    The parse itself is 3× faster: it slices a plain array over the memory map, not numpy.memmap, whose Python
    hooks ran on each of its ~3 million slices. Same fields, same weights (tests/test_real_model.py compares); the
    originals are restored on exit. Readers are not kept past the block: their fields are ~10⁶ small arrays."""
    try:
        import gguf
    except ImportError:
        yield
        return
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    class PlainSlices(reader_class):
        def _get(self, offset, dtype, count=1, override_order=None):  # gguf-py's, on a plain ndarray of the map
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            dt, count = np.dtype(dtype), int(count)
            arr = plain[offset:offset + dt.itemsize * count].view(dt)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    readers = {}

    def reader(path, *args, **kw):
        if args or kw:
            return reader_class(path, *args, **kw)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        if key not in readers:
            readers[key] = PlainSlices(path)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map
        readers.clear()


@contextmanager
def _quiet_gguf():
    """transformers draws two bars per GGUF load — "Converting and de-quantizing GGUF tensors" (tqdm.auto, called
    directly, so its logging switch does not reach it) and "Loading weights" (its logging's tqdm) — and logs what it
    converts: not the user's concern on a run's console, where our own bar gives the time left (errors still raise).
    Both are silenced for the block and restored after it, so a caller's own transformers use is left as it was."""
    from transformers import modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging as hf_logging

    bars, level, dequantizing = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity(), gguf_loading.tqdm
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    gguf_loading.tqdm = functools.partial(dequantizing, disable=True)
    try:
        yield
    finally:
        gguf_loading.tqdm = dequantizing
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(flag: str, name: str, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of a model name (folder, hub id at `revision`, .gguf file); errors in one line naming `flag`."""
    from transformers import AutoTokenizer

    where, kw = model_source(flag, name, revision)
    extra = {"trust_remote_code": True} if trust_remote_code else {}
    with _quiet_gguf():
        return _from_pretrained(flag, name, lambda **lk: AutoTokenizer.from_pretrained(where, **kw, **extra, **lk))


def load_config(flag: str, name: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model config alone (cheap: no weights), for checks that should fail before loading them."""
    from transformers import AutoConfig

    where, kw = model_source(flag, name, revision)
    extra = {"trust_remote_code": True} if trust_remote_code else {}
    with _quiet_gguf():
        return _from_pretrained(flag, name, lambda **lk: AutoConfig.from_pretrained(where, **kw, **extra, **lk))


def load_model(flag: str, name: str, device, dtype, device_map=None, offload: bool = False,
               revision: str | None = None, trust_remote_code: bool = False):
    """A causal LM in eval mode on `device` (or sharded by `device_map`); errors in one line naming `flag`."""
    from transformers import AutoModelForCausalLM

    where, kw = model_source(flag, name, revision)
    placement = {} if device_map is None else {"device_map": device_map, "max_memory": max_memory(offload)}
    extra = {"trust_remote_code": True} if trust_remote_code else {}

    def load(**lk):
        return AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **placement, **kw, **extra, **lk)

    try:
        with _quiet_gguf():
            model = _from_pretrained(flag, name, load)
    except ValueError as err:
        if device_map is not None and "offload" in str(err) and not offload:
            raise ValueError(f"{flag}: {name!r} does not fit on the visible GPUs; add offload (`offload`) to keep "
                             f"the rest in CPU memory") from None
        raise
    return (model if device_map is not None else model.to(device)).eval()


def max_memory(offload: bool) -> dict | None:
    """accelerate's budget per device for device_map='auto': every visible GPU (under torchrun, this rank's share),
    plus CPU memory only with `offload` — without it a model too big for the GPUs is an error, not a slow run."""
    from accelerate.utils import get_max_memory

    from kl_estimation.llm.run import distributed

    budget = get_max_memory()
    if not torch.cuda.is_available():
        return budget  # CPU only: nothing to shard, all in CPU memory
    gpus = distributed.local_gpus(torch.cuda.device_count()) if distributed.launched() else None
    return {k: v for k, v in budget.items()
            if (isinstance(k, int) and (gpus is None or k in gpus)) or (offload and k == "cpu")}


def main_device(model) -> torch.device:
    """Where a model takes its input ids: its first device in a device map, else its parameters' device."""
    m = _inner(model)
    for dev in getattr(m, "hf_device_map", {}).values():
        if dev not in ("cpu", "disk"):
            return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    if getattr(m, "hf_device_map", None):
        return torch.device("cpu")
    return next(m.parameters()).device


def _needs(flag: str, package: str, why: str, extra: str = "scale"):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise ValueError(f"{flag}: {why} needs the {package} package, which is not installed (pip install "
                         f"'kl-estimation[{extra}]' or pip install {package})") from None


def _same_model(a: str, b: str) -> bool:
    """Whether an adapter's recorded base and a given model name the same model: the same id, the same folder, or
    a local copy under the hub id's name (…/Qwen2-0.5B for Qwen/Qwen2-0.5B)."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/").rsplit("/", 1)[-1].lower() == b.rstrip("/").rsplit("/", 1)[-1].lower()


def _adapter_config(flag: str, path: str):
    peft = _needs(flag, "peft", "an adapter")
    try:
        cfg = peft.PeftConfig.from_pretrained(path)
    except Exception as err:
        raise ValueError(f"{flag}: cannot load the adapter {path!r}: {str(err).splitlines()[0][:200]}") from None
    if cfg.is_prompt_learning:
        raise ValueError(f"{flag}: {path!r} is a {cfg.peft_type} adapter (prompt learning); only adapters that "
                         f"change weights (LoRA, IA3, …) are supported")
    return cfg


def _other_base_warning(flag: str, path: str, cfg, base: str) -> None:
    """An adapter trained on another name may be applied to a quantized (GGUF) or merged variant of its base: allowed
    once its weights have loaded (every shape fit), with a warning, because only the user knows they are one model."""
    recorded = cfg.base_model_name_or_path
    if recorded and not _same_model(recorded, base):
        warnings.warn(f"{flag}: the adapter {path!r} was made for {recorded!r}, not for the given model {base!r}; "
                      f"it is applied because every weight shape fits (a quantized or merged variant of the same "
                      f"base?) — if {base!r} is another model, the KL is not that of base vs fine-tune", UserWarning,
                      stacklevel=4)


def _with_adapters(model, adapters: dict, base: str):
    """`model` with the adapters {name: (flag, path)} loaded into one PeftModel (adapter weights on the devices of
    the layers they change)."""
    from peft import PeftModel

    peft_model = None
    for name, (flag, path) in adapters.items():
        cfg = _adapter_config(flag, path)
        try:
            with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x: not the user's concern
                warnings.filterwarnings("ignore", category=FutureWarning, message=".*checkpointing")
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(model, path, adapter_name=name, config=cfg)
                else:
                    peft_model.load_adapter(path, adapter_name=name)
        except Exception as err:  # missing target modules, shape mismatches: the adapter is for another model
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
            why = next((ln for ln in lines if "size mismatch" in ln), lines[0])
            made_for = cfg.base_model_name_or_path
            other = f" (it was made for {made_for!r})" if made_for and not _same_model(made_for, base) else ""
            raise ValueError(f"{flag}: the adapter {path!r} does not fit the given model {base!r}{other}: "
                             f"{why[:200]}") from None
        _other_base_warning(flag, path, cfg, base)
    return peft_model.eval()


def check_loading_options(cfg) -> None:
    """The loading options of an LLMConfig, before anything runs: dtypes, --device-map and adapters (with the
    packages they need installed)."""
    for flag, value in (("p_dtype", cfg.p_dtype), ("q_dtype", cfg.q_dtype)):
        if value is not None and value != "auto" and value not in DTYPES:
            raise ValueError(f"{flag}: unknown dtype {value!r}; allowed: auto, {', '.join(DTYPES)}")
    if cfg.device_map not in (None, "auto"):
        raise ValueError(f"device_map: unknown device map {cfg.device_map!r}; allowed: auto")
    if cfg.offload and cfg.device_map is None:
        raise ValueError("offload: only with `device_map` auto (it lets accelerate keep layers in CPU memory)")
    if cfg.device_map is not None:
        _needs("device_map", "accelerate", "sharding a model over devices")
    for flag, path in (("p_adapter", cfg.p_adapter), ("q_adapter", cfg.q_adapter)):
        if path is not None:
            if cfg.p_model is None:
                raise ValueError(f"{flag}: give `p_model` (and `q_model` unless it is P's base) with an adapter")
            _needs(flag, "peft", "an adapter")
    check_sources(cfg)


def check_sources(cfg) -> None:
    """Model names with their revisions: a revision names a version on the hub, so it needs a hub id; a GGUF file
    needs the gguf and accelerate packages."""
    for side in ("p", "q"):
        name, rev = getattr(cfg, f"{side}_model"), getattr(cfg, f"{side}_revision", None)
        if rev is not None:
            if not isinstance(rev, str) or not rev.strip():
                raise ValueError(f"{side}_revision: must be a branch, tag or commit of the hub repository "
                                 f"(got {rev!r})")
            if name is None:
                raise ValueError(f"{side}_revision: give `{side}_model` (a hub id) with a revision")
            if Path(str(name)).exists():
                raise ValueError(f"{side}_revision: `{side}_model` {name} is a local path; a revision applies to "
                                 f"hub ids")
        if name is not None and is_gguf(name):
            model_source(f"{side}_model", name, rev)  # the file exists, or names owner/repo/file.gguf
            _needs(f"{side}_model", "gguf", "a GGUF file", "gguf")
            _needs(f"{side}_model", "accelerate", "a GGUF file (transformers' loader)", "gguf")


def check_tokenizers(tok_p, tok_q, *, ignore_eos: bool = False, chat_template: bool = False) -> None:
    """Raise when P's and Q's tokenizers differ in a way that changes the KL: the vocabulary (ids would name
    different tokens), BOS (Q would read P's), EOS (sequences end at P's EOS; not with ignore_eos), the chat template
    when prompts go through it."""
    if tok_p.get_vocab() != tok_q.get_vocab():
        raise ValueError(f"q_model: its tokenizer differs from `p_model`'s (vocabulary sizes {len(tok_q)} and "
                         f"{len(tok_p)}); KL between the two needs one shared vocabulary")
    if tok_p.bos_token_id != tok_q.bos_token_id:
        raise ValueError(f"q_model: its BOS token (id {tok_q.bos_token_id}) differs from `p_model`'s (id "
                         f"{tok_p.bos_token_id}): prompts start with P's, which Q was not trained on")
    if not ignore_eos and tok_p.eos_token_id != tok_q.eos_token_id:
        raise ValueError(f"q_model: its EOS token (id {tok_q.eos_token_id}) differs from `p_model`'s (id "
                         f"{tok_p.eos_token_id}): the two would end sequences at different tokens; pass "
                         f"ignore_eos (`ignore_eos`) to compare fixed-length continuations")
    if chat_template and getattr(tok_p, "chat_template", None) != getattr(tok_q, "chat_template", None):
        raise ValueError("q_model: its chat template differs from `p_model`'s: prompts are wrapped in P's, a "
                         "format Q was not trained on")


def check_logit_rows(p, q, vocab_size: int) -> None:
    """Each model needs a logit row per token; rows beyond the tokenizer (padding) are dropped, so models that only
    pad differently get a warning, not an error."""
    rows = {}
    for flag, m in (("p_model", p), ("q_model", q)):
        rows[flag] = _inner(m).get_output_embeddings().weight.shape[0]
        if rows[flag] < vocab_size:
            raise ValueError(f"{flag}: the model has {rows[flag]} logit rows but its tokenizer {vocab_size} tokens")
    if rows["p_model"] != rows["q_model"]:
        warnings.warn(f"P has {rows['p_model']} logit rows and Q {rows['q_model']}: only the first {vocab_size} "
                      f"(the tokenizer's) are used, the rest are padding", stacklevel=3)


_PROBE = "Hello world"


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds around a text by itself (``tokenizer(text)`` against ``add_special_tokens=False``):
    (before, after). Llama-style tokenizers put BOS before; GPT-2, Qwen and SmolLM2 (whose BOS ``<|im_start|>`` is a
    chat marker) add nothing; a few append EOS."""
    full = list(tokenizer(_PROBE)["input_ids"])
    plain = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    n = len(plain)
    for i in range(len(full) - n + 1):
        if full[i:i + n] == plain:
            return full[:i], full[i + n:]
    return [], []  # the special tokens change the text's own tokens: add none rather than guess


def text_start(tokenizer, chat_template: bool = False) -> dict:
    """What a run puts before each text and records (models.text_start in summary.json): the ids and tokens the
    tokenizer adds in front, and those it would append but a run drops (a continuation never follows EOS)."""
    if chat_template:
        return {"chat_template": True, "prepended_ids": None, "prepended": "the chat template's user turn"}
    before, after = special_tokens(tokenizer)
    return {"prepended_ids": before, "prepended": tokenizer.convert_ids_to_tokens(before),
            "dropped_ids": after, "dropped": tokenizer.convert_ids_to_tokens(after),
            "bos_token": getattr(tokenizer, "bos_token", None),
            "rule": "the tokenizer's own add_special_tokens behaviour: what tokenizer(text) puts in front"}


def tokenize_prompts(tokenizer, prompts: list[str], chat_template: bool = False) -> list[list[int]]:
    """Token ids of each prompt: with `chat_template`, the prompt as one user turn of the tokenizer's chat template
    plus the generation prompt; otherwise the text as the tokenizer tokenizes it by itself — with the special tokens
    it puts in front (BOS for Llama-style tokenizers, nothing for GPT-2 or SmolLM2, whose ``bos_token`` is a chat
    marker that would change the target) and without any it would append (EOS)."""
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template: the tokenizer has no chat template")
    before = None if chat_template else special_tokens(tokenizer)[0]
    out = []
    for i, text in enumerate(prompts):
        if chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        else:
            ids = before + list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"prompts: prompt {i} tokenizes to nothing")
        out.append(ids)
    return out


def pair_from_models(p, q, tokenizer, *, prompts, temperature: float, ignore_eos: bool = False,
                     chat_template: bool = False, q_tokenizer=None) -> TransformersPair:
    """A pair from two loaded causal LMs (or AdapterViews) sharing `tokenizer` (checked against `q_tokenizer` when
    given: check_tokenizers), with `prompts` (a string or a list of strings) tokenized and left-padded on the device
    where P takes its inputs (the first device of a sharded P)."""
    if q_tokenizer is not None:
        check_tokenizers(tokenizer, q_tokenizer, ignore_eos=ignore_eos, chat_template=chat_template)
    V = len(tokenizer)
    check_logit_rows(p, q, V)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids, mask = pad_left(tokenize_prompts(tokenizer, prompts, chat_template), tokenizer.pad_token_id or 0)
    device = main_device(p)
    eos = None if ignore_eos else tokenizer.eos_token_id
    return TransformersPair(p, q, tokenizer, ids.to(device), mask.to(device), temperature, eos)


def load_tokenizers(p_model: str, q_model: str | None, *, p_revision: str | None = None,
                    q_revision: str | None = None, trust_remote_code: bool = False, ignore_eos: bool = False,
                    chat_template: bool = False):
    """P's and Q's tokenizers (one load when both name the same model), checked to be interchangeable
    (check_tokenizers) before any weights are loaded."""
    if q_model is None:
        q_model, q_revision = p_model, p_revision
    for flag, name in (("p_model", p_model), ("q_model", q_model)):
        if is_gguf(name) and Path(str(name)).is_file():
            gguf_facts(flag, str(name))  # an architecture transformers cannot load: refused now
        elif Path(str(name)).is_dir() and (why := missing_in_model_folder(Path(str(name)))):
            # transformers builds a tokenizer from a bare config.json: say what is missing before it does
            raise ValueError(f"{flag}: cannot load the local folder {str(name)!r}: {why}")
    tok_p = load_tokenizer("p_model", p_model, p_revision, trust_remote_code)
    same = q_model == p_model and q_revision == p_revision
    tok_q = tok_p if same else load_tokenizer("q_model", q_model, q_revision, trust_remote_code)
    if not same:
        check_tokenizers(tok_p, tok_q, ignore_eos=ignore_eos, chat_template=chat_template)
    return tok_p, tok_q


def load_model_pair(p_model: str, q_model: str | None, *, device="cpu", dtype: str = "float32",
                    p_dtype: str | None = None, q_dtype: str | None = None, p_adapter: str | None = None,
                    q_adapter: str | None = None, device_map: str | None = None, offload: bool = False,
                    p_revision: str | None = None, q_revision: str | None = None, trust_remote_code: bool = False):
    """(P, Q) causal LMs in eval mode: see load_transformers_pair. When both sides have the same base, revision and
    dtype, the base is loaded once (adapters switched per forward: AdapterView)."""
    if q_model is None:
        q_model, q_revision = p_model, p_revision
    dt_p, dt_q = DTYPES[p_dtype or dtype], DTYPES[q_dtype or dtype]
    if device_map is not None:
        _needs("device_map", "accelerate", "sharding a model over devices")
    if p_adapter or q_adapter:
        _needs("q_adapter" if q_adapter else "p_adapter", "peft", "an adapter")
    shared = (q_model == p_model and q_revision == p_revision and dt_p == dt_q
              and (p_adapter is None or p_adapter != q_adapter))
    p = load_model("p_model", p_model, device, dt_p, device_map, offload, p_revision, trust_remote_code)
    if shared:
        adapters = {k: v for k, v in (("p", ("p_adapter", p_adapter)), ("q", ("q_adapter", q_adapter)))
                    if v[1] is not None}
        if adapters:
            both = _with_adapters(p, adapters, p_model)
            p, q = AdapterView(both, "p" if p_adapter else None), AdapterView(both, "q" if q_adapter else None)
        else:
            q = p
    else:
        q = load_model("q_model", q_model, device, dt_q, device_map, offload, q_revision, trust_remote_code)
        if p_adapter:
            p = AdapterView(_with_adapters(p, {"p": ("p_adapter", p_adapter)}, p_model), "p")
        if q_adapter:
            q = AdapterView(_with_adapters(q, {"q": ("q_adapter", q_adapter)}, q_model), "q")
    return p, q


def load_transformers_pair(p_model: str, q_model: str | None, *, prompts, temperature: float, device="cpu",
                           dtype: str = "float32", ignore_eos: bool = False, p_dtype: str | None = None,
                           q_dtype: str | None = None, p_adapter: str | None = None, q_adapter: str | None = None,
                           device_map: str | None = None, offload: bool = False,
                           chat_template: bool = False, p_revision: str | None = None,
                           q_revision: str | None = None, trust_remote_code: bool = False) -> TransformersPair:
    """Load two causal LMs with `from_pretrained` (hub ids at `p_revision` / `q_revision`, local folders or .gguf
    files) that share one vocabulary, and tokenize `prompts` (a string or a list of strings).

    `p_dtype` / `q_dtype` override `dtype` per model. `p_adapter` / `q_adapter`: a PEFT adapter (folder or hub id)
    on top of that model; `q_model` None means Q's base is P's. When both sides have the same base and dtype, the base
    is loaded once (Q = P + adapter: adapter off for P, on for Q). An adapter whose recorded base has another name (a
    quantized or merged variant of it) is applied with a warning when its weights fit. `device_map="auto"` shards each
    model over the visible GPUs with accelerate (`offload`: the rest in CPU memory) instead of moving it to
    `device`. The tokenizers are loaded and checked first, so a pair that cannot be compared fails before its
    weights load."""
    with gguf_speedups():
        tok_p, _ = load_tokenizers(p_model, q_model, p_revision=p_revision, q_revision=q_revision,
                                   trust_remote_code=trust_remote_code, ignore_eos=ignore_eos,
                                   chat_template=chat_template)
        p, q = load_model_pair(p_model, q_model, device=device, dtype=dtype, p_dtype=p_dtype, q_dtype=q_dtype,
                               p_adapter=p_adapter, q_adapter=q_adapter, device_map=device_map, offload=offload,
                               p_revision=p_revision, q_revision=q_revision, trust_remote_code=trust_remote_code)
    return pair_from_models(p, q, tok_p, prompts=prompts, temperature=temperature, ignore_eos=ignore_eos,
                            chat_template=chat_template)
