"""Loading a pair of transformers models: hub ids and local folders, dtypes, PEFT adapters, device maps, and the
tokenizer checks that decide whether P and Q can be compared at all."""
from __future__ import annotations

import warnings
from pathlib import Path

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


def _from_pretrained(flag: str, name: str, load):
    """`load(**kw)` from the local cache / a local folder first, then from the hub; every failure as one line."""
    try:
        return load(local_files_only=True)  # a local folder, or a hub id already in the cache
    except Exception as err:  # transformers raises OSError, ValueError, …: all mean "not here"
        if Path(name).exists():
            why = missing_in_model_folder(Path(name)) or " ".join(str(err).split())
            raise ValueError(f"{flag}: cannot load the local folder {name!r}: {why}") from None
        if not _hub_reachable():
            raise ValueError(f"{flag}: cannot load {name!r}: not a local folder, not in the model cache, and the "
                             f"model hub is out of reach (offline)") from None
        try:
            return load()
        except Exception as err2:
            raise ValueError(f"{flag}: cannot load {name!r} from the model hub: "
                             f"{str(err2).splitlines()[0][:200]}") from None


def _load_one(flag: str, name: str, device, dtype, device_map=None, offload: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = {} if device_map is None else {"device_map": device_map, "max_memory": max_memory(offload)}

    def load(**kw):
        return (AutoTokenizer.from_pretrained(name, **kw),
                AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **placement, **kw))

    try:
        tok, model = _from_pretrained(flag, name, load)
    except ValueError as err:
        if device_map is not None and "offload" in str(err) and not offload:
            raise ValueError(f"{flag}: {name!r} does not fit on the visible GPUs; add offload (`offload`) to keep the rest in "
                             f"CPU memory") from None
        raise
    return tok, (model if device_map is not None else model.to(device)).eval()


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


def _needs(flag: str, package: str, why: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise ValueError(f"{flag}: {why} needs the {package} package, which is not installed (pip install "
                         f"'kl-estimation[scale]' or pip install {package})") from None


def _same_model(a: str, b: str) -> bool:
    """Whether an adapter's recorded base and a given model name the same model: the same id, the same folder, or
    a local copy under the hub id's name (…/Qwen2-0.5B for Qwen/Qwen2-0.5B)."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/").rsplit("/", 1)[-1].lower() == b.rstrip("/").rsplit("/", 1)[-1].lower()


def _adapter_config(flag: str, path: str, base: str):
    peft = _needs(flag, "peft", "an adapter")
    try:
        cfg = peft.PeftConfig.from_pretrained(path)
    except Exception as err:
        raise ValueError(f"{flag}: cannot load the adapter {path!r}: {str(err).splitlines()[0][:200]}") from None
    if cfg.is_prompt_learning:
        raise ValueError(f"{flag}: {path!r} is a {cfg.peft_type} adapter (prompt learning); only adapters that "
                         f"change weights (LoRA, IA3, …) are supported")
    recorded = cfg.base_model_name_or_path
    if recorded and not _same_model(recorded, base):
        raise ValueError(f"{flag}: the adapter {path!r} was made for {recorded!r}, not for the given model "
                         f"{base!r}; give its base model")
    return cfg


def _with_adapters(model, adapters: dict, base: str):
    """`model` with the adapters {name: (flag, path)} loaded into one PeftModel (adapter weights on the devices of
    the layers they change)."""
    from peft import PeftModel

    peft_model = None
    for name, (flag, path) in adapters.items():
        cfg = _adapter_config(flag, path, base)
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
            raise ValueError(f"{flag}: the adapter {path!r} does not fit the given model {base!r}: "
                             f"{why[:200]}") from None
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
        raise ValueError("offload: only with device_map auto (it lets accelerate keep layers in CPU memory)")
    if cfg.device_map is not None:
        _needs("device_map", "accelerate", "sharding a model over devices")
    for flag, path in (("p_adapter", cfg.p_adapter), ("q_adapter", cfg.q_adapter)):
        if path is not None:
            if cfg.p_model is None:
                raise ValueError(f"{flag}: give p_model (and q_model unless it is P's base) with an adapter")
            _needs(flag, "peft", "an adapter")


def check_tokenizers(tok_p, tok_q, *, ignore_eos: bool = False, chat_template: bool = False) -> None:
    """Raise when P's and Q's tokenizers differ in a way that changes the KL: the vocabulary (ids would name
    different tokens), BOS (Q would read P's), EOS (sequences end at P's EOS; not with ignore_eos), the chat template
    when prompts go through it."""
    if tok_p.get_vocab() != tok_q.get_vocab():
        raise ValueError(f"q_model: its tokenizer differs from p_model's (vocabulary sizes {len(tok_q)} and "
                         f"{len(tok_p)}); KL between the two needs one shared vocabulary")
    if tok_p.bos_token_id != tok_q.bos_token_id:
        raise ValueError(f"q_model: its BOS token (id {tok_q.bos_token_id}) differs from p_model's (id "
                         f"{tok_p.bos_token_id}): prompts start with P's, which Q was not trained on")
    if not ignore_eos and tok_p.eos_token_id != tok_q.eos_token_id:
        raise ValueError(f"q_model: its EOS token (id {tok_q.eos_token_id}) differs from p_model's (id "
                         f"{tok_p.eos_token_id}): the two would end sequences at different tokens; pass "
                         f"ignore_eos (`ignore_eos`) to compare fixed-length continuations")
    if chat_template and getattr(tok_p, "chat_template", None) != getattr(tok_q, "chat_template", None):
        raise ValueError("q_model: its chat template differs from p_model's: prompts are wrapped in P's, a "
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


def load_transformers_pair(p_model: str, q_model: str | None, *, prompts, temperature: float, device="cpu",
                           dtype: str = "float32", ignore_eos: bool = False, p_dtype: str | None = None,
                           q_dtype: str | None = None, p_adapter: str | None = None, q_adapter: str | None = None,
                           device_map: str | None = None, offload: bool = False,
                           chat_template: bool = False) -> TransformersPair:
    """Load two causal LMs with `from_pretrained` (hub ids or local folders) that share one vocabulary, and
    tokenize `prompts` (a string or a list of strings).

    `p_dtype` / `q_dtype` override `dtype` per model. `p_adapter` / `q_adapter`: a PEFT adapter (folder or hub id)
    on top of that model; `q_model` None means Q's base is P's. When both sides have the same base and dtype, the base
    is loaded once (Q = P + adapter: adapter off for P, on for Q). `device_map="auto"` shards each model over the
    visible GPUs with accelerate (`offload`: the rest in CPU memory) instead of moving it to `device`."""
    q_model = p_model if q_model is None else q_model
    dt_p, dt_q = DTYPES[p_dtype or dtype], DTYPES[q_dtype or dtype]
    if device_map is not None:
        _needs("device_map", "accelerate", "sharding a model over devices")
    if p_adapter or q_adapter:
        _needs("q_adapter" if q_adapter else "p_adapter", "peft", "an adapter")
    shared = q_model == p_model and dt_p == dt_q and (p_adapter is None or p_adapter != q_adapter)
    tok_p, p = _load_one("p_model", p_model, device, dt_p, device_map, offload)
    if shared:
        tok_q = tok_p
        adapters = {k: v for k, v in (("p", ("p_adapter", p_adapter)), ("q", ("q_adapter", q_adapter)))
                    if v[1] is not None}
        if adapters:
            both = _with_adapters(p, adapters, p_model)
            p, q = AdapterView(both, "p" if p_adapter else None), AdapterView(both, "q" if q_adapter else None)
        else:
            q = p
    else:
        tok_q, q = _load_one("q_model", q_model, device, dt_q, device_map, offload)
        if p_adapter:
            p = AdapterView(_with_adapters(p, {"p": ("p_adapter", p_adapter)}, p_model), "p")
        if q_adapter:
            q = AdapterView(_with_adapters(q, {"q": ("q_adapter", q_adapter)}, q_model), "q")
    return pair_from_models(p, q, tok_p, prompts=prompts, temperature=temperature, ignore_eos=ignore_eos,
                            chat_template=chat_template, q_tokenizer=tok_q)
