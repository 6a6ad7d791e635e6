"""The run folder of an LLM run: file names, the run key a resumed run must match, reading partial and final
files back into units, and records back to arrays."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from kl_estimation import runio
from kl_estimation.llm.engine import sequence_proposal
from kl_estimation.llm.run import distributed
from kl_estimation.llm.run.config import LLMConfig
from kl_estimation.llm.run.units import Unit, split_by_unit


def records_to_arrays(records: list[dict], t_length: int) -> dict[str, np.ndarray]:
    """Saved records back to padded (N, T) arrays plus mask: what the estimators take."""
    lengths = np.array([len(r["log_p"]) for r in records])
    mask = np.arange(t_length) < lengths[:, None]
    out = {"mask": mask}
    for k in ("log_p", "log_q", "log_r", "kl_step"):
        out[k] = np.zeros(mask.shape)
        out[k][mask] = np.concatenate([r[k] for r in records])  # row-major fill matches the records' order
    return out


def slug(name) -> str:
    """File name stem of a proposal: its stable key ('Alpha-mixture (α=0.5) [prefix-aware]' →
    'alpha-mixture_alpha-0.5_prefix-aware', 'P' → 'p'), whatever spelling named it."""
    return sequence_proposal(name).key


def check_folder(cfg: LLMConfig) -> None:
    """Before any work: the output folder can be written, and holds no results unless resuming or overwriting."""
    runio.check_output_dir(cfg.output_folder, "--output-folder")
    earlier = existing_outputs(cfg.output_folder, cfg.proposals)
    if earlier and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"--output-folder: {cfg.output_folder} already holds results ({earlier[0].name}); pass "
                         f"--resume to continue or reuse them, --overwrite to replace them, or choose another folder")


def existing_outputs(folder, proposals) -> list:
    folder = Path(folder)
    names = [f"{slug(p)}.json" for p in proposals] + ["summary.json"]
    return [folder / n for n in names if (folder / n).exists()] + [
        f for p in proposals for f in distributed.partial_files(folder, slug(p))]


def earlier_run_files(folder) -> list[Path]:
    """Every file an earlier run left in `folder`, whatever its proposals: summary files, figures, partial files and
    the per-proposal documents (JSON files holding a run_key); a user's other files are not touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = [folder / n for n in ("summary.json", "summary.csv", "summary_per_prompt.csv", "plots")
           if (folder / n).exists()]
    out += sorted(folder.glob("*.partial.jsonl"))
    for f in sorted(folder.glob("*.json")):
        if f.name != "summary.json":
            try:
                with open(f, encoding="utf-8") as fh:
                    if '"run_key"' in fh.read():
                        out.append(f)
            except (OSError, UnicodeDecodeError):
                pass
    return out


def prompt_set_digest(prompts) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()[:16]


def run_key(cfg: LLMConfig, proposal: str, models: dict) -> dict:
    """Everything that fixes the records of a unit: a resumed run must match it exactly."""
    prompts = cfg.prompt_set
    return dict(models=models, prompts=prompts[0] if len(prompts) == 1 else f"{len(prompts)} prompts, sha256 "
                f"{prompt_set_digest(prompts)}", chat_template=cfg.chat_template, t_length=cfg.t_length,
                temperature=cfg.temperature, seed=cfg.seed, batch_size=cfg.batch_size, ignore_eos=cfg.ignore_eos,
                proposal=sequence_proposal(proposal).key,  # the stable key, never the label
                **({} if cfg.sampler == "iid" else {"sampler": cfg.sampler}))


def _read_partial(partial: Path, key: dict) -> dict:
    lines = runio.read_jsonl(partial)
    if not lines or lines[0].get("run_key") != key:
        raise ValueError(f"--resume: {partial} was written with other settings "
                         f"({_diff(lines[0].get('run_key') if lines else None, key)})")
    done = {}
    for ln in lines[1:]:
        done.update(split_by_unit([Unit(*u) for u in ln["units"]], ln["sequences"]))
    return done


def _read_final(final: Path, key: dict, units: list[Unit]) -> dict:
    doc = json.loads(final.read_text())
    if doc.get("run_key") != key:
        raise ValueError(f"--resume: {final} was written with other settings ({_diff(doc.get('run_key'), key)})")
    done, by_unit = {}, {}
    for rec in doc["sequences"]:
        by_unit.setdefault((rec.get("prompt", 0), rec.get("batch", 0)), []).append(rec)
    for u in units:
        recs = by_unit.get((u.prompt, u.batch), [])
        if len(recs) >= u.rows:  # a unit of a run with more --n-reps ends in the same records
            done[u] = recs[: u.rows]
    return done


def _diff(old, new) -> str:
    if not isinstance(old, dict):
        return "no settings recorded"
    keys = [k for k in new if old.get(k) != new[k]]
    return ", ".join(f"{k}: {old.get(k)!r} then, {new[k]!r} now" for k in keys) or "unknown difference"
