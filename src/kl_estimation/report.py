"""Console tables (≤ 120 columns) for synthetic runs. Pure string building; the CLI prints."""
from __future__ import annotations

from collections import defaultdict

WIDTH = 120
NAME_W = 30


def num(x, width: int = 9, digits: int = 3) -> str:
    """Right-aligned fixed point when it fits and is not ~0, else the longest scientific form that fits."""
    if x is None or x != x:  # None or NaN
        return "—".rjust(width)
    text = f"{x:.{digits}f}"
    if len(text) > width or (x != 0 and abs(x) < 10 ** -digits):
        for p in range(max(digits - 1, 1), -1, -1):
            text = f"{x:.{p}e}"
            if len(text) <= width:
                break
    return text.rjust(width)


SHORT = {"Cross-entropy tilted": "CE-tilted", "Exponential family": "Exp family", "Chi-square aware": "χ²-aware",
         " [prefix-aware]": " [prefix]"}


def _name(n: str, w: int = NAME_W) -> str:
    """Display name within w columns: common long words abbreviated, then the middle elided so that both the
    estimator (start) and the parameter (end) stay readable."""
    if len(n) <= w:
        return n
    for long, short in SHORT.items():
        n = n.replace(long, short)
    if len(n) <= w:
        return n
    head = (w - 1) // 2
    return n[:head] + "…" + n[len(n) - (w - 1 - head):]


def _rule(title: str) -> str:
    return f"── {title} " + "─" * max(0, WIDTH - len(title) - 4)


def pair_report(pair: dict, n_samples: int, n_repeats: int) -> str:
    if "order" in pair:  # a toy sequence pair
        stats = (f"order-{pair['order']} Markov pair, V = {pair['vocab_size']} (token 0 = EOS), max_new_tokens T = "
                 f"{pair['max_new_tokens']}; exact values by DP   oracle control-variate β* = {pair['cv_beta_star']:.4g}")
        unit = "sequence"
    else:
        stats = (f"P: top-10 mass {pair['top10_mass_p']:.3f}, top-100 {pair['top100_mass_p']:.3f}   "
                 f"Q: top-10 mass {pair['top10_mass_q']:.3f}, top-100 {pair['top100_mass_q']:.3f}   "
                 f"moved mass {pair['moved_mass']:.3f}")
        unit = "sample"
    lines = [
        _rule(f"{pair['family']} · divergence {pair['divergence']}"),
        stats,
        f"true KL(P‖Q) = {pair['true_kl']:.6g}   theoretical variance Var_P[log P/Q] = "
        f"{pair['theoretical_variance']:.6g} per {unit}   ({n_samples} {unit}s × {n_repeats} repeats)",
        "",
        f"{'method (! = flagged)':<{NAME_W}} {'mean est':>9} {'|error|':>9} {'rel %':>7} {'emp var':>9} "
        f"{'exact var':>9} {'var/naive':>9} {'ESS %':>6} {'max w':>9} {'k̂':>5} {'score':>7}",
    ]
    for m in pair["methods"]:
        ratio = (m["exact_variance"] / pair["theoretical_variance"]
                 if m["exact_variance"] is not None and pair["theoretical_variance"] > 0 else None)
        lines.append(
            f"{_name(('! ' if m['flags'] else '  ') + m['name']):<{NAME_W}} {num(m['mean_estimate'])} "
            f"{num(m['abs_error'])} {num(m['rel_error_pct'], 7, 1)} {num(m['empirical_variance'])} "
            f"{num(m['exact_variance'])} {num(ratio)} {num(m['mean_ess_pct'], 6, 1)} "
            f"{num(m['max_weight'] and max(m['max_weight']))} {num(m['mean_khat'], 5, 2)} "
            f"{num(m['combined_score'], 7, 3)}")
    flagged = [m for m in pair["methods"] if m["flags"]]
    if flagged:
        lines += ["", "! flagged — ranked after every unflagged method:"]
        lines += [f"  {m['name']}: {flag}" for m in flagged for flag in m["flags"]]
    lines += ["", _top5(pair)]
    return "\n".join(lines)


TITLES = {"by_exact_variance": "exact variance", "by_accuracy": "accuracy |error|",
          "by_variance": "sample variance", "by_combined": "combined score"}


def _top5(pair: dict) -> str:
    w = WIDTH // len(TITLES) - 1
    flagged = {m["name"] for m in pair["methods"] if m["flags"]}
    head = " ".join(f"{_name('top 5: ' + t, w):<{w}}" for t in TITLES.values())
    rows = []
    for i in range(5):
        cells = []
        for key in TITLES:
            names = pair["rankings"][key]
            cell = f"{i + 1}. {names[i]}{' !' if names[i] in flagged else ''}" if i < len(names) else ""
            cells.append(f"{_name(cell, w):<{w}}")
        rows.append(" ".join(cells))
    return "\n".join([head, *rows])


def cross_family_report(pairs: list[dict], top: int = 3) -> str:
    """Per divergence: the methods that make the top `top` by exact variance in any family, with their
    exact variance relative to naive MC in every family (lower is better; 1 = naive MC)."""
    out = []
    by_div = defaultdict(list)
    for p in pairs:
        by_div[p["divergence"]].append(p)
    for div, ps in by_div.items():
        names = []
        for p in ps:
            names += [n for n in p["rankings"]["by_exact_variance"][:top] if n not in names]
        for ref in tuple(n for n in ps[0]["rankings"]["by_exact_variance"]
                         if n.startswith(("Naive MC", "MC", "Rao-Blackwell", "RB")) and "·" not in n):
            if ref not in names:
                names.append(ref)
        fams = [p["family"] for p in ps]
        out += [_rule(f"cross-family · divergence {div} · exact variance / naive MC variance (lower is better)"),
                f"{'method':<{NAME_W}} " + " ".join(f"{f:>14}" for f in fams)]
        for n in names:
            cells = []
            for p in ps:
                m = next((m for m in p["methods"] if m["name"] == n), None)
                ok = m is not None and m["exact_variance"] is not None
                cells.append(num(m["exact_variance"] / p["theoretical_variance"], 14, 4) if ok else "—".rjust(14))
            out.append(f"{_name(n):<{NAME_W}} " + " ".join(cells))
        out.append("")
    return "\n".join(out)


def llm_table(rows: list[dict], title: str) -> str:
    """Ranked (proposal, estimator) rows of an LLM run (verdicts.judge): trusted rows first by standard error, then
    the flagged ones (!) with what went wrong. An SE that is not informative shows as 'n/i', never as a zero-width
    interval."""
    w = 34
    lines = [_rule(title),
             f"{'rank':>4} {'proposal':<{w}} {'estim.':<8} {'estimate':>10} {'std err':>9} {'95% CI':>21} "
             f"{'var/seq':>9} {'ESS':>7} {'k̂':>5}",]
    for i, r in enumerate(rows, 1):
        informative = r.get("se_informative", True) and r["ci_low"] == r["ci_low"]
        ci = f"[{r['ci_low']:.4g}, {r['ci_high']:.4g}]" if informative else "SE not informative"
        se = num(r["std_error"]) if informative else "n/i".rjust(9)
        lines.append(f"{i:>4} {_name(r['proposal'], w):<{w}} {r['estimator']:<8} {num(r['estimate'], 10, 4)} "
                     f"{se} {ci:>21} {num(r['variance'])} {num(r['ess'], 7, 1)} "
                     f"{num(r['khat'], 5, 2)}{'  !' if r['flag'] else ''}")
    flagged = [r for r in rows if r["flag"]]
    if flagged:
        lines += ["", "! flagged rows (ranked last):"]
        by_reason: dict = {}
        for r in flagged:  # one line per (proposal, reason), naming the estimators it applies to
            for reason in r["flag"].split("; "):
                by_reason.setdefault((r["proposal"], reason), []).append(r["estimator"])
        lines += [f"  {p} · {'/'.join(ests)}: {reason}" for (p, reason), ests in by_reason.items()]
    return "\n".join(lines)


def recommendation_line(rec: dict | None, scope: str = "") -> str:
    """The one line that says which estimate to report (verdicts.recommend), or that none can be."""
    where = f" {scope}" if scope else ""
    if rec is None:
        return (f"Recommended{where}: none — every row is flagged (see above); draw more sequences or raise the "
                f"temperature (a proposal whose weights degenerate needs P in the run to be judged).")
    population = ""
    if rec.get("std_error_population") is not None and rec["std_error_population"] == rec["std_error_population"]:
        population = (f"; for the prompt population ± {rec['std_error_population']:.2g} (95% CI "
                      f"[{rec['ci_population_low']:.4g}, {rec['ci_population_high']:.4g}])")
    fixed = " for this prompt set" if population else ""
    return (f"Recommended{where}: {rec['proposal']} {rec['estimator']} = {rec['estimate']:.6g} ± "
            f"{rec['std_error']:.2g} (95% CI [{rec['ci_low']:.4g}, {rec['ci_high']:.4g}]{fixed}{population}) — "
            f"{rec['reason']}.")


def jeffreys_line(j: dict, scope: str = "") -> str:
    """The line of the Jeffreys row of a run of both directions (llm.run.directions.jeffreys_row)."""
    where = f" {scope}" if scope else ""
    target = j.get("target", "KL(P‖Q) + KL(Q‖P)")
    if j["estimate"] != j["estimate"]:  # NaN: a direction has no row to add
        return f"Jeffreys {target}{where}: none — {j['flag']}."
    population = ""
    if j.get("std_error_population") is not None and j["std_error_population"] == j["std_error_population"]:
        population = (f"; for the prompt population ± {j['std_error_population']:.2g} (95% CI "
                      f"[{j['ci_population_low']:.4g}, {j['ci_population_high']:.4g}])")
    flag = f" ! flagged: {j['flag']}" if j.get("flag") else ""
    parts = " + ".join(f"{d} {j[d]['proposal']} {j[d]['estimator']}" for d in ("forward", "reverse") if j.get(d))
    return (f"Jeffreys {target}{where} = {j['estimate']:.6g} ± {j['std_error']:.2g} {j.get('unit', '')} (95% CI "
            f"[{j['ci_low']:.4g}, {j['ci_high']:.4g}]{population}) — {parts}; SE = √(SE_forward² + SE_reverse²), "
            f"the directions' sequences being independent.{flag}")
