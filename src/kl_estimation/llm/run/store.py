"""The run folder of an LLM run: file names, the run key a resumed run must match, reading partial and final
files back into units, and records back to arrays.

Directions: the forward direction's files sit in the run folder itself (as before directions existed, so a forward
run's folder resumes into a run of both directions), the reverse direction's in its ``reverse/`` subfolder, named
after the proposal's label there (plain Monte Carlo from Q: ``reverse/q.json``); summary files stay at the top."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kl_estimation import runio
from kl_estimation.llm.engine import FORWARD, SAMPLED_FROM, sequence_proposal
from kl_estimation.llm.run import distributed
from kl_estimation.llm.run.config import LLMConfig
from kl_estimation.llm.run.units import Unit, split_by_unit
from kl_estimation.verdicts import table_rows

SUMMARY_JSON, SUMMARY_CSV, PER_PROMPT_CSV = "summary.json", "summary.csv", "summary_per_prompt.csv"


def records_to_arrays(records: list[dict], max_new_tokens: int) -> dict[str, np.ndarray]:
    """Saved records back to padded (N, T) arrays plus mask: what the estimators take."""
    lengths = np.array([len(r["log_p"]) for r in records])
    mask = np.arange(max_new_tokens) < lengths[:, None]
    out = {"mask": mask}
    for k in ("log_p", "log_q", "log_r", "kl_step") + (("log_p_cond",) if "log_p_cond" in records[0] else ()):
        out[k] = np.zeros(mask.shape)
        out[k][mask] = np.concatenate([r[k] for r in records])  # row-major fill matches the records' order
    return out


def slug(name) -> str:
    """File name stem of a proposal: its stable key ('Alpha-mixture (α=0.5) [prefix-aware]' →
    'alpha-mixture_alpha-0.5_prefix-aware', 'P' → 'p'), whatever spelling named it."""
    return sequence_proposal(name).key


REVERSE_FOLDER = "reverse"


def direction_folder(folder, direction: str = FORWARD) -> Path:
    """Where a direction's per-proposal files go: the run folder (forward) or its ``reverse/`` subfolder."""
    return Path(folder) if direction == FORWARD else Path(folder) / REVERSE_FOLDER


def proposal_slug(name, direction: str = FORWARD) -> str:
    """File name stem of a proposal in a direction: its stable key; plain Monte Carlo in reverse draws from Q and is
    'q' (reverse/q.json)."""
    prop = sequence_proposal(name)
    return SAMPLED_FROM[direction].lower() if prop.is_p else prop.key


def check_folder(cfg: LLMConfig) -> None:
    """Before any work: the output folder can be written, and holds no results unless resuming or overwriting; a
    resumed folder exists and holds files of this run's proposals (their settings are checked when they are read)."""
    runio.check_output_dir(cfg.output_dir, "`output_dir`")
    folder = Path(cfg.output_dir)
    earlier = existing_outputs(folder, cfg.proposals, cfg.directions)
    if cfg.resume:
        if not any(f.name != SUMMARY_JSON for f in earlier):
            raise ValueError(f"resume: {cfg.output_dir} holds no files of this run's proposals, so there is nothing "
                             f"to continue; give the folder of the run to continue, or drop `resume` to start a new "
                             f"run")
    elif earlier and not cfg.overwrite:
        first = earlier[0].relative_to(folder)
        raise ValueError(f"output_dir: {cfg.output_dir} already holds results ({first}); pass "
                         f"`resume` to continue or reuse them, `overwrite` to replace them, or choose another folder")


def drop_unfinished(folder, parts: list[tuple[str, str]]) -> None:
    """After an interrupted run: partial files that hold no finished batch (a header only) go, and an empty
    ``reverse/`` folder, so a run that kept nothing leaves nothing that a new run would take for results."""
    for d, name in parts:
        for f in ProposalFiles(direction_folder(folder, d), proposal_slug(name, d)).earlier_partials():
            if len(runio.read_jsonl(f)) <= 1:
                f.unlink(missing_ok=True)
    runio.remove_if_empty(Path(folder) / REVERSE_FOLDER)


def existing_outputs(folder, proposals, directions=(FORWARD,)) -> list:
    folder = Path(folder)
    files = [direction_folder(folder, d) / f"{proposal_slug(p, d)}.json" for d in directions for p in proposals]
    return [f for f in files + [folder / SUMMARY_JSON] if f.exists()] + [
        f for d in directions for p in proposals
        for f in distributed.partial_files(direction_folder(folder, d), proposal_slug(p, d))]


def earlier_run_files(folder) -> list[Path]:
    """Every file an earlier run left in `folder`, whatever its proposals: summary files, figures, partial files and
    the per-proposal documents (JSON files holding a run_key); a user's other files are not touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = [folder / n for n in (SUMMARY_JSON, SUMMARY_CSV, PER_PROMPT_CSV, "plots")
           if (folder / n).exists()]
    out += _proposal_files(folder)
    reverse = folder / REVERSE_FOLDER
    if reverse.is_dir():
        inside = _proposal_files(reverse)
        out += [reverse] if set(inside) == set(reverse.iterdir()) else inside  # a user's file there stays
    return out


def _proposal_files(folder: Path) -> list[Path]:
    """The partial files and per-proposal documents (JSON holding a run_key) directly in `folder`."""
    out = sorted(folder.glob("*.partial.jsonl"))
    for f in sorted(folder.glob("*.json")):
        if f.name != SUMMARY_JSON:
            try:
                with open(f, encoding="utf-8") as fh:
                    if '"run_key"' in fh.read():
                        out.append(f)
            except (OSError, UnicodeDecodeError):
                pass
    return out


def prompt_set_digest(prompts) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()[:16]


def run_key(cfg: LLMConfig, proposal: str, models: dict, direction: str = FORWARD) -> dict:
    """Everything that fixes the records of a unit: a resumed run must match it exactly. A forward key is the one
    of a run before directions existed (no `direction` entry), so such a run's files resume."""
    prompts = cfg.prompt_set
    return dict(models=models, prompts=prompts[0] if len(prompts) == 1 else f"{len(prompts)} prompts, sha256 "
                f"{prompt_set_digest(prompts)}", chat_template=cfg.chat_template, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, seed=cfg.seed, batch_size=cfg.batch_size, ignore_eos=cfg.ignore_eos,
                proposal=sequence_proposal(proposal).key,  # the stable key, never the label
                **({} if cfg.sampler == "iid" else {"sampler": cfg.sampler}),
                **({} if direction == FORWARD else {"direction": direction}),
                **({} if cfg.head is None else {"head": cfg.head}))


def _read_partial(partial: Path, key: dict) -> dict:
    lines = runio.read_jsonl(partial)
    if not lines or lines[0].get("run_key") != key:
        raise ValueError(f"resume: {partial} was written with other settings "
                         f"({_diff(lines[0].get('run_key') if lines else None, key)})")
    done = {}
    for ln in lines[1:]:
        done.update(split_by_unit([Unit(*u) for u in ln["units"]], ln["sequences"]))
    return done


def _read_final(final: Path, key: dict, units: list[Unit]) -> dict:
    doc = json.loads(final.read_text())
    if doc.get("run_key") != key:
        raise ValueError(f"resume: {final} was written with other settings ({_diff(doc.get('run_key'), key)})")
    done, by_unit = {}, {}
    for rec in doc["sequences"]:
        by_unit.setdefault((rec.get("prompt", 0), rec.get("batch", 0)), []).append(rec)
    for u in units:
        recs = by_unit.get((u.prompt, u.batch), [])
        if len(recs) >= u.rows:  # a unit of a run with more --n-reps ends in the same records
            done[u] = recs[: u.rows]
    return done


@dataclass
class ProposalFiles:
    """One proposal's files in a run folder: ``<slug>.partial.jsonl`` (``.rank<k>.partial.jsonl`` under torchrun)
    while it runs — a header with the run key, then one line per finished forward batch — and ``<slug>.json`` when
    it is done. Under torchrun every rank appends to its own partial file and rank 0 alone writes the final one."""

    folder: Path
    slug: str
    shard: distributed.Shard = distributed.ONE

    @property
    def final(self) -> Path:
        return Path(self.folder) / f"{self.slug}.json"

    @property
    def partial(self) -> Path:
        return self.shard.partial(self.folder, self.slug)

    def earlier_partials(self) -> list[Path]:
        return distributed.partial_files(self.folder, self.slug)  # any earlier world size's

    def read_done(self, key: dict, units: list[Unit], resume: bool) -> dict[Unit, list[dict]]:
        """The units an earlier run finished (with `resume`; else none). Every rank reads before any appends."""
        done = {}
        if resume and self.final.exists():
            done = _read_final(self.final, key, units)
        elif resume:
            for f in self.earlier_partials():
                done.update(_read_partial(f, key))
        self.shard.barrier()
        return done

    def start(self, key: dict, carried: dict[Unit, list[dict]], resume: bool) -> None:
        """Before new batches: an earlier run's partial files go (unless resuming), a fresh partial file gets the
        header and the units carried over from a finished run with fewer `n_samples`."""
        if not resume and self.shard.writes_final:
            for f in self.earlier_partials():
                f.unlink(missing_ok=True)
        self.shard.barrier()
        if resume and self.partial.exists():
            return
        self.partial.unlink(missing_ok=True)
        runio.append_jsonl(self.partial, {"run_key": key})
        if carried and self.shard.writes_final:
            self.append(list(carried), [r for recs in carried.values() for r in recs])

    def append(self, units: list[Unit], records: list[dict]) -> None:
        runio.append_jsonl(self.partial, {"units": [[u.prompt, u.batch, u.rows] for u in units],
                                          "sequences": records})

    def finish(self, doc: dict) -> None:
        if self.shard.writes_final:
            runio.write_json(self.final, doc)
            for f in self.earlier_partials():
                f.unlink(missing_ok=True)


def write_summary(folder, meta: dict, verdict: dict) -> None:
    """summary.json (meta and the verdict), summary.csv (every row, the direction first, then the Jeffreys row) and,
    for prompt sets, summary_per_prompt.csv."""
    folder = Path(folder)
    kept = {k: v for k, v in verdict.items() if k != "by_direction"}
    runio.write_json(folder / SUMMARY_JSON, dict(meta, **said(kept)))
    runio.write_csv(folder / SUMMARY_CSV, _csv_rows(verdict))
    if verdict["per_prompt"]:
        runio.write_csv(folder / PER_PROMPT_CSV, [r for p in verdict["per_prompt"]
                                                  for r in _csv_rows(p, prompt=p["prompt"])])


def _csv_rows(verdict: dict, **tags) -> list[dict]:
    """Every row, then the Jeffreys row (if any) with the columns of the other rows (empty where it has none)."""
    rows = table_rows(verdict["rows"], **tags)
    if "jeffreys" in verdict:
        rows.append({k: {**tags, **verdict["jeffreys"]}[k] for k in rows[0] if k in {**tags, **verdict["jeffreys"]}})
    return rows


def said(verdict: dict) -> dict:
    """The verdict with its advice in words (summary.json keeps the advice a line of text, as readers read it)."""
    def words(x):
        return None if x is None else str(x)

    def one(v: dict) -> dict:
        out = dict(v)
        if "advice" in v:
            out["advice"] = words(v["advice"])
        if "advice_by_direction" in v:
            out["advice_by_direction"] = {d: words(a) for d, a in v["advice_by_direction"].items()}
        return out

    return dict(one(verdict), per_prompt=[one(p) for p in verdict.get("per_prompt", [])])


def load_run(folder) -> dict:
    """An LLM run folder read back as run_experiment returned it: the meta and verdict of summary.json and the
    documents of every (direction, proposal), in run order. Folders of runs before directions existed load too."""
    from kl_estimation.llm.run.config import BOTH, DIRECTIONS

    folder = Path(folder)
    try:
        summary = json.loads((folder / SUMMARY_JSON).read_text())
        config = summary["config"]
        direction = config.get("direction", FORWARD)
        docs = [json.loads((direction_folder(folder, d) / f"{proposal_slug(name, d)}.json").read_text())
                for d in (DIRECTIONS if direction == BOTH else (direction,)) for name in config["proposals"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"folder: {folder} is not a complete LLM run folder ({type(err).__name__}: {err})") from None
    return dict(summary, meta={k: summary[k] for k in ("config", "models", "versions", "seed", "truncation", "exact_kl")
                               if k in summary}, docs=docs)


def kept(folder, parts: list[tuple[str, str]]) -> tuple[list, int, int]:
    """What an interrupted run left in `folder` of its (direction, proposal) parts: those whose documents are
    complete, and the finished forward batches and their sequences in the partial files of the others."""
    done, batches, sequences = [], 0, 0
    for d, name in parts:
        files = ProposalFiles(direction_folder(folder, d), proposal_slug(name, d))
        partials = files.earlier_partials()
        if files.final.exists() and not partials:
            done.append((d, name))
        for partial in partials:
            lines = runio.read_jsonl(partial)[1:]
            batches += len(lines)
            sequences += sum(len(ln.get("sequences", [])) for ln in lines)
    return done, batches, sequences


def _diff(old, new) -> str:
    if not isinstance(old, dict):
        return "no settings recorded"
    keys = [k for k in new if old.get(k) != new[k]]
    return ", ".join(f"{k}: {old.get(k)!r} then, {new[k]!r} now" for k in keys) or "unknown difference"
