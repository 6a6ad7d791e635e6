r"""Several candidates against one base (a quant ladder, a checkpoint series): one comparison table with paired
differences, from the candidates' one-candidate results.

    res = corpus_kl(base, ["q8_0.gguf", "q5_k_m.gguf", "q4_k_m.gguf"], "wiki.txt")   # → CorpusComparison
    print(res.text)            # llama.cpp's blocks per candidate, then the table
    res.table                  # one row per candidate: mean, 99 % and 99.9 % KLD, same top-1, ln PPL ratio, CIs
    res.paired(1, 2)           # mean difference of per-token KL between two candidates, clustered paired SE

Every candidate is scored on the same tokens, so the difference of two candidates' per-token KL is a paired
quantity: what the tokens share (a hard token is hard for both) cancels, and its clustered SE is far below either
mean's. A candidate whose difference from the best has a CI covering 0 is *indistinguishable* from it on this corpus.
Percentile CIs come from the bootstrap over clusters (stats.quantile_cis), with the same draws for every candidate.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kl_estimation import runio
from kl_estimation.llm.corpus.config import CORPUS_FILES
from kl_estimation.llm.corpus.stats import TEXT_WIDTH, _wrap, format_llama, group_line, paired_difference, value_ci

CANDIDATES = "candidates"


def labels(names) -> list[str]:
    """Short names for the table: a file's stem (without the extension), a hub id or folder as given, less what
    every candidate's name starts with up to a separator (base.Q8_0, base.Q4_0 → Q8_0, Q4_0); a name that would
    repeat gets its position appended."""
    short = [Path(str(n)).stem if str(n).endswith(".gguf") else Path(str(n)).name or str(n) for n in names]
    common = os.path.commonprefix(short) if len(short) > 1 else ""
    cut = max(common.rfind(c) for c in ".-_") + 1
    if cut and all(len(s) > cut for s in short):
        short = [s[cut:] for s in short]
    return [s if short.count(s) == 1 else f"{s}#{i + 1}" for i, s in enumerate(short)]


def clusters_of(result) -> np.ndarray:
    """The cluster of every scored token of a candidate's run, as its summary used them (window or document)."""
    t = result.tokens
    mask = t["mask"]
    if result.summary["cluster_by"] == "document":
        return t["document"][mask]
    return np.broadcast_to(np.arange(mask.shape[0])[:, None], mask.shape)[mask]


def _ci(d: dict, key: str = "ci_cluster") -> list:
    return [float(d[key][0]), float(d[key][1])]


def table_rows(results, names) -> list[dict]:
    """One row per candidate in the given order, with its rank by mean KL(P‖Q) (1 = closest to the base), and its
    paired difference from the closest candidate (``vs_best``)."""
    from kl_estimation.llm.corpus.requant import gguf_size

    means = [r.summary["means"]["kl_forward"]["mean"] for r in results]
    order = np.argsort(means, kind="stable")
    rank = np.empty(len(results), dtype=int)
    rank[order] = np.arange(1, len(results) + 1)
    best = int(order[0])
    rows = []
    for i, (r, name) in enumerate(zip(results, names)):
        M, L = r.summary["means"], r.summary["llama"]
        qc = r.summary.get("kld_quantile_cis", {})
        size = gguf_size(r.config["q_model"]) if isinstance(r.config.get("q_model"), str) else None
        row = {"rank": int(rank[i]), "candidate": name, "model": r.config.get("q_model"),
               "mean_kld": M["kl_forward"]["mean"], "mean_kld_ci": _ci(M["kl_forward"]),
               "kld_99": L["kld_percentiles"]["99.0"], "kld_99_ci": list(qc.get("99.0", {}).get("ci", (math.nan,) * 2)),
               "kld_99_9": L["kld_percentiles"]["99.9"],
               "kld_99_9_ci": list(qc.get("99.9", {}).get("ci", (math.nan,) * 2)),
               "same_top": M["same_top"]["mean"], "same_top_ci": _ci(M["same_top"]),
               "ln_ppl_ratio": M["ln_ppl_ratio"]["mean"], "ln_ppl_ratio_ci": _ci(M["ln_ppl_ratio"]),
               "file_bytes": size and size["file_bytes"], "bits_per_weight": size and size["bits_per_weight"]}
        if i != best:
            d = paired(results, i, best)
            row["vs_best"] = {"minus": names[best], "mean": d["mean"], "se_cluster": d["se_cluster"],
                              "ci": _ci(d), "indistinguishable": d["indistinguishable"]}
        rows.append(row)
    sizes = [(row["bits_per_weight"], row["mean_kld"]) for row in rows]
    if all(b is not None for b, _ in sizes):
        for row, (b, k) in zip(rows, sizes):  # no other candidate is both smaller and closer
            row["pareto"] = not any(b2 <= b and k2 <= k and (b2, k2) != (b, k) for b2, k2 in sizes)
    return rows


def paired(results, i: int, j: int, key: str = "kl_forward") -> dict:
    """Candidate i minus candidate j: the mean over the shared scored tokens of the per-token `key` difference, with
    its SE clustered as the runs were (stats.paired_difference)."""
    a, b = results[i], results[j]
    if not np.array_equal(a.tokens["mask"], b.tokens["mask"]) or not np.array_equal(a.tokens["windows"],
                                                                                     b.tokens["windows"]):
        raise ValueError("results: the two candidates were not scored on the same tokens")
    m = a.tokens["mask"]
    return paired_difference(a.tokens[key][m], b.tokens[key][m], clusters_of(a),
                             confidence=a.summary["confidence"])


def table_text(rows, results) -> str:
    """The comparison table within 80 columns (split into two tables of the same candidates when one does not fit),
    every value to the decimals its interval supports (stats.value_ci), then the paired differences, the groups and
    the Pareto front."""
    from kl_estimation.report import _columns_table, estimate_text

    s = results[0].summary
    pc = f"{100 * s['confidence']:g}%"
    ranked = sorted(rows, key=lambda r: r["rank"])
    out = [f"====== kl_estimation: {len(rows)} candidates against one base ======",
           _wrap(f"{pc} CIs — means: clustered by {s['cluster_by']} ({s['n_clusters']} clusters); percentiles: "
                 f"bootstrap over them. ln PPL ratio = ln(perplexity of Q / perplexity of the base); MiB and BPW: "
                 f"the GGUF file's size and bits per weight.")]
    cols = []
    for head, key, scale in (("mean KLD", "mean_kld", 1.0), ("same top-1 %", "same_top", 100.0),
                             ("ln PPL ratio", "ln_ppl_ratio", 1.0), ("99% KLD", "kld_99", 1.0),
                             ("99.9% KLD", "kld_99_9", 1.0)):
        cells = [value_ci(r[key], r[key + "_ci"], scale=scale) for r in ranked]
        cols.append((head, max(len(head), *map(len, cells)), cells))
    cols.append(("MiB", 6, [f"{r['file_bytes'] / 2**20:.1f}" if r["file_bytes"] else "-" for r in ranked]))
    cols.append(("BPW", 6, [f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] else "-" for r in ranked]))
    out += _columns_table("rank candidate", [f"{r['rank']:>4} {r['candidate']}" for r in ranked], cols, TEXT_WIDTH)
    out.append(_wrap(f"paired differences of per-token KL(base||Q) against the closest candidate, mean (SE clustered "
                     f"by {s['cluster_by']}) [{pc} CI]:"))
    for row in ranked:
        d = row.get("vs_best")
        if d is None:
            continue
        verdict = "indistinguishable" if d["indistinguishable"] else "farther from the base"
        text = value_ci(d["mean"], d["ci"], d["se_cluster"], sign=True)
        mean, ci = text.split(" [", 1)
        se = estimate_text(d["mean"], d["se_cluster"])[1]
        out.append(_wrap(f"{row['candidate']} - {d['minus']} = {mean} (SE {se}) [{ci}: {verdict}", "  ", "    "))
    groups = s.get("groups", {})
    for name in groups:
        out.append(_wrap(f"group {name} ({groups[name]['kl_forward']['n']} tokens), by rank:"))
        for row in ranked:
            g = results[[r["candidate"] for r in rows].index(row["candidate"])].summary["groups"].get(name)
            if g is not None:
                out.append(_wrap(f"{row['candidate']}: " + group_line(g, pc), "  ", "    "))
    if any("pareto" in r for r in rows):
        out.append(_wrap("Pareto front (no other candidate both smaller and closer): "
                         + ", ".join(r["candidate"] for r in sorted(rows, key=lambda r: r["bits_per_weight"])
                                     if r["pareto"])))
    return "\n".join(out) + "\n"


@dataclass
class CorpusComparison:
    """Several candidates Q scored against one base P on the same windows: ``results`` (each candidate's
    CorpusResult, equal to its one-candidate run), ``names`` (short labels), ``table`` (table_rows), ``timing``
    (the whole run; each result has its own), the run ``folder``."""

    results: list
    names: list[str]
    table: list[dict]
    config: dict = field(repr=False)
    timing: dict = field(repr=False)
    folder: Path | None = None

    @classmethod
    def build(cls, results, cfg, timing: dict) -> CorpusComparison:
        names = labels(cfg.candidates)
        return cls(results, names, table_rows(results, names), cfg.to_dict(), timing)

    def __getitem__(self, name_or_index):
        i = self.names.index(name_or_index) if isinstance(name_or_index, str) else name_or_index
        return self.results[i]

    def paired(self, a, b, key: str = "kl_forward") -> dict:
        """Candidate `a` minus candidate `b` (names or positions): mean per-token difference, clustered paired SE, CI,
        and whether the CI covers 0."""
        ia, ib = (self.names.index(x) if isinstance(x, str) else x for x in (a, b))
        return paired(self.results, ia, ib, key)

    @property
    def text(self) -> str:
        """The comparison as llama.txt holds it: llama.cpp's blocks per candidate, then the table."""
        return self.console(None)

    def console(self, columns: int | None = 0) -> str:
        """The text for a terminal of `columns` (0, the default: report.terminal_columns; None: llama.txt's text,
        with llama.cpp's per-window tables), as CorpusResult.console."""
        from kl_estimation.llm.corpus.run import CHUNK_TABLE_MAX, CHUNK_WIDTH, console_text
        from kl_estimation.report import terminal_columns

        columns = terminal_columns() if columns == 0 else columns
        blocks = []
        for i, (name, r) in enumerate(zip(self.names, self.results)):
            # llama.cpp's parsers read the blocks below each header as one run's output
            W = r.summary["n_windows"]
            text = console_text(r.summary, r.corpus, r.models, r.config, columns) if i == 0 else (
                _wrap(f"corpus KL: P = {r.models.get('p')}, Q = {r.models.get('q')}") + "\n\n"
                + format_llama(r.summary, chunks=W <= CHUNK_TABLE_MAX and (columns is None or columns >= CHUNK_WIDTH)))
            blocks.append(f"###### candidate {i + 1}/{len(self.results)}: {name}\n{text}")
        return "\n".join(blocks) + "\n" + table_text(self.table, self.results)

    def __str__(self) -> str:
        return self.text

    def to_dict(self) -> dict:
        return {"kind": "corpus-comparison", "config": self.config, "candidates": self.names, "table": self.table,
                "timing": self.timing, "base": self.results[0].models.get("base"),
                "corpus": self.results[0].corpus}

    def write(self, folder, overwrite: bool = False) -> Path:
        """comparison.json, comparison.csv, llama.txt, and each candidate's run folder under candidates/NN-name/,
        written together (all or none). Sets ``folder`` once they are written and returns it."""
        folder = Path(folder)
        if overwrite:
            for name in CORPUS_FILES:
                f = folder / name
                if f.is_dir():
                    shutil.rmtree(f)
                elif f.exists():
                    f.unlink()
        vs = ("minus", "mean", "se_cluster", "ci", "indistinguishable")
        with runio.files_together(done=lambda: setattr(self, "folder", folder)):
            for i, (name, r) in enumerate(zip(self.names, self.results)):
                r.save(folder / CANDIDATES / f"{i + 1:02d}-{name}")
            runio.write_json(folder / "comparison.json", dict(self.to_dict(), versions=runio.versions(
                "torch", "transformers", "tokenizers", "gguf")))
            runio.write_csv(folder / "comparison.csv", [
                {k: v for k, v in row.items() if k != "vs_best"}
                | {f"vs_best_{k}": row.get("vs_best", {}).get(k) for k in vs} for row in self.table])
            runio.write_text(folder / "llama.txt", self.text)
        return folder
