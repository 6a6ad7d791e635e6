"""Console tables and the recommendation lines: synthetic runs (≤ 120 columns) and LLM runs (fitted to the
terminal, at least 80 columns). Pure string building; the CLI prints."""
from __future__ import annotations

import math
import shutil
import textwrap
from collections import defaultdict

from kl_estimation.core.results import as_flags, render

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
         "Fixed mixture": "Fixed mix", "Alpha-mixture": "α-mixture", " [prefix-aware]": " [prefix]"}


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


def _rule(title: str, columns: int = WIDTH) -> str:
    """`── title ───` across `columns`; a title too long for one line is wrapped (never cut), the rule after its
    last line."""
    lines = textwrap.wrap(title, columns - 5, break_on_hyphens=False) or [""]
    lines = ["── " + lines[0]] + ["   " + ln for ln in lines[1:]]
    lines[-1] += " " + "─" * max(0, columns - len(lines[-1]) - 1)
    return "\n".join(lines)


def _pack(parts, columns: int, sep: str = "   ", indent: str = "  ") -> list[str]:
    """Short phrases joined by `sep` on as few lines as fit `columns` (a phrase is never broken; a later line starts
    with `indent`)."""
    lines = [""]
    for part in parts:
        if lines[-1].strip() and len(lines[-1]) + len(sep) + len(part) > columns:
            lines.append(indent)
        lines[-1] += (sep if lines[-1].strip() else "") + part
    return lines


def _columns_table(head: str, names: list[str], cols: list[tuple[str, int, list[str]]], columns: int,
                   name_w: int = NAME_W) -> list[str]:
    """A table of rows named `names` and right-aligned columns (header, width, cells), split into several tables,
    each starting with the names, when one would be wider than `columns`; the names column is narrowed first to what
    its longest name needs."""
    name_w = min(name_w, max(len(head), *(len(n) for n in names)))
    groups, width_left = [[]], columns - name_w
    for col in cols:
        if groups[-1] and width_left < col[1] + 1:
            groups.append([])
            width_left = columns - name_w
        groups[-1].append(col)
        width_left -= col[1] + 1
    lines = []
    for g, group in enumerate(groups):
        if g:
            lines.append("")
        lines.append(f"{_name(head, name_w):<{name_w}} " + " ".join(f"{h:>{w}}" for h, w, _ in group))
        for i, n in enumerate(names):
            lines.append(f"{_name(n, name_w):<{name_w}} " + " ".join(f"{c[i]:>{w}}" for _, w, c in group))
    return lines


def pair_report(pair: dict, n_samples: int, n_repeats: int, columns: int | None = None) -> str:
    """One synthetic or toy pair: its statistics, one row per method (split into two tables below 120 columns, each
    repeating the method names), the flagged methods with their codes and first message, the top 5 of each ranking.
    Fits `columns` (default: the terminal's width, at least 80)."""
    W = width(columns)
    if "order" in pair:  # a toy sequence pair
        stats = [f"order-{pair['order']} Markov pair, V = {pair['vocab_size']} (token 0 = EOS),",
                 f"max_new_tokens T = {pair['max_new_tokens']}; exact values by DP",
                 f"oracle control-variate β* = {pair['cv_beta_star']:.4g}"]
        unit = "sequence"
    else:
        stats = [f"P: top-10 mass {pair['top10_mass_p']:.3f}, top-100 {pair['top100_mass_p']:.3f}",
                 f"Q: top-10 mass {pair['top10_mass_q']:.3f}, top-100 {pair['top100_mass_q']:.3f}",
                 f"moved mass {pair['moved_mass']:.3f}"]
        unit = "sample"
    lines = [_rule(f"{pair['family']} · divergence {pair['divergence']}", W), *_pack(stats, W),
             *_pack([f"true KL(P‖Q) = {pair['true_kl']:.6g}", f"theoretical variance Var_P[log P/Q] = "
                     f"{pair['theoretical_variance']:.6g} per {unit}", f"({n_samples} {unit}s × {n_repeats} repeats)"],
                    W), ""]
    ms = pair["methods"]
    ratio = [m["exact_variance"] / pair["theoretical_variance"]
             if m["exact_variance"] is not None and pair["theoretical_variance"] > 0 else None for m in ms]
    cols = [("mean est", 9, [num(m["mean_estimate"]) for m in ms]), ("|error|", 9, [num(m["abs_error"]) for m in ms]),
            ("rel %", 7, [num(m["rel_error_pct"], 7, 1) for m in ms]),
            ("emp var", 9, [num(m["empirical_variance"]) for m in ms]),
            ("exact var", 9, [num(m["exact_variance"]) for m in ms]), ("var/naive", 9, [num(r) for r in ratio]),
            ("ESS %", 6, [num(m["mean_ess_pct"], 6, 1) for m in ms]),
            ("max w", 9, [num(m["max_weight"] and max(m["max_weight"])) for m in ms]),
            ("k̂", 5, [num(m["mean_khat"], 5, 2) for m in ms]),
            ("score", 7, [num(m["combined_score"], 7, 3) for m in ms])]
    lines += _columns_table("method (! = flagged)", [("! " if m["flags"] else "  ") + m["name"] for m in ms], cols, W)
    flagged = [m for m in ms if m["flags"]]
    if flagged:
        lines += ["", _wrap("! flagged — ranked after every unflagged method (codes; the first flag's message; every "
                            "message is in results.json):", W)]
        for m in flagged:  # one entry per method: a toy pair's rows can carry several sample flags each
            fs = as_flags(m["flags"])
            lines.append(_wrap(f"{m['name']} — {codes(fs)}: {fs[0].message}", W, "  ", "      "))
    lines += ["", _top5(pair, W)]
    return "\n".join(lines)


TITLES = {"by_exact_variance": "exact variance", "by_accuracy": "accuracy |error|",
          "by_variance": "sample variance", "by_combined": "combined score"}
RANK_CELL = 30  # columns a ranking's cell needs ("5. Alpha-mixture (α=0.9) !")


def _top5(pair: dict, columns: int = WIDTH) -> str:
    """The top 5 of each ranking side by side, as many rankings per block as fit `columns` (four at 120, two at 80)."""
    per = max(1, min(len(TITLES), columns // RANK_CELL))
    w = columns // per - 1
    flagged = {m["name"] for m in pair["methods"] if m["flags"]}
    keys = list(TITLES)
    blocks = []
    for b in range(0, len(keys), per):
        part = keys[b:b + per]
        rows = [" ".join(f"{_name('top 5: ' + TITLES[k], w):<{w}}" for k in part).rstrip()]
        for i in range(5):
            cells = []
            for key in part:
                names = pair["rankings"][key]
                cell = f"{i + 1}. {names[i]}{' !' if names[i] in flagged else ''}" if i < len(names) else ""
                cells.append(f"{_name(cell, w):<{w}}")
            rows.append(" ".join(cells).rstrip())
        blocks.append("\n".join(rows))
    return "\n\n".join(blocks)


def cross_family_report(pairs: list[dict], top: int = 3, columns: int | None = None) -> str:
    """Per divergence: the methods that make the top `top` by exact variance in any family, with their
    exact variance relative to naive MC in every family (lower is better; 1 = naive MC). Fits `columns` (default:
    the terminal's width, at least 80): families beyond it go to a second table."""
    W = width(columns)
    out = []
    by_div = defaultdict(list)
    for p in pairs:
        by_div[p["divergence"]].append(p)
    for div, ps in by_div.items():
        names = []
        for p in ps:
            names += [n for n in p["rankings"]["by_exact_variance"][:top] if n not in names]
        group = {m["name"]: m for m in ps[0]["methods"]}
        for ref in tuple(n for n in ps[0]["rankings"]["by_exact_variance"]  # P's own MC and RB rows (i.i.d.)
                         if group[n]["family"] in ("Naive MC", "Rao-Blackwell") and not group[n].get("sampler")):
            if ref not in names:
                names.append(ref)
        cols = []
        for p in ps:
            cells = []
            for n in names:
                m = next((m for m in p["methods"] if m["name"] == n), None)
                ok = m is not None and m["exact_variance"] is not None
                cells.append(num(m["exact_variance"] / p["theoretical_variance"], 14, 4) if ok else "—".rjust(14))
            cols.append((p["family"], max(14, len(p["family"])), cells))
        out += [_rule(f"cross-family · divergence {div} · exact variance / naive MC variance (lower is better)", W),
                *_columns_table("method", names, cols, W), ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ LLM runs

MIN_WIDTH = 80


def width(columns: int | None = None) -> int:
    """The width to fit: `columns`, else the terminal's (shutil.get_terminal_size; 120 off a terminal), at least
    MIN_WIDTH."""
    return max(MIN_WIDTH, columns if columns is not None else shutil.get_terminal_size((120, 24)).columns)


def terminal_columns() -> int | None:
    """The width of the terminal the console goes to — COLUMNS when set, else stdout's terminal — or None when
    there is neither (output piped to a file or a parser: no width to honour)."""
    import os
    import sys

    if os.environ.get("COLUMNS", "").isdigit() or getattr(sys.stdout, "isatty", lambda: False)():
        return width()
    return None


def se_decimals(se) -> int | None:
    """Decimals that show a standard error to its significant digits (the Particle Data Group rule: two
    significant digits when its three leading digits are 100–354, one for 355–949, and 950–999 round up to two of
    the next power of ten) — estimate and interval are then shown to the same decimals. None for a missing, zero or
    non-finite SE. At most 10 decimals."""
    if se is None or not math.isfinite(se) or se <= 0:
        return None
    e = math.floor(math.log10(se))
    lead = round(se / 10 ** (e - 2))
    if lead >= 1000:  # 999.6 → 1000
        lead, e = lead // 10, e + 1
    if lead < 355:
        sig = 2
    elif lead < 950:
        sig = 1
    else:
        sig, e = 2, e + 1
    return min(max(sig - 1 - e, 0), 10)


def fixed(x, decimals: int | None, fallback_digits: int = 4) -> str:
    """x to `decimals` decimals (None: `fallback_digits` significant digits); '—' for a missing value."""
    if x is None or x != x:
        return "—"
    if x in (math.inf, -math.inf):
        return "∞" if x > 0 else "−∞"
    text = f"{x:.{decimals}f}" if decimals is not None else f"{x:.{fallback_digits}g}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000"


def estimate_text(est, se) -> tuple[str, str]:
    """(estimate, SE) as text, the estimate to the decimals its SE supports (se_decimals)."""
    d = se_decimals(se)
    se_text = "n/a" if se is None or se != se else ("0" if se == 0 else fixed(se, d))
    if se_text.strip("0.") == "" and se_text != "0":  # below 10 decimals (an exact sum's rounding): 4.5e-14
        se_text = f"{se:.2g}"
    return fixed(est, d), se_text


BELOW_ZERO = "lower bound < 0 as computed, not clipped: a KL is ≥ 0"


def _ci_text(lo, hi, se) -> tuple[str, bool]:
    """'[lo, hi]' to the SE's decimals, the bounds as stored (summary.json, summary.csv and to_pandas hold the same
    numbers): a negative lower bound is shown, not clipped at 0. Returns (text, whether the lower bound is < 0)."""
    d = se_decimals(se)
    return f"[{fixed(lo, d)}, {fixed(hi, d)}]", lo is not None and lo == lo and lo < 0


def codes(flags) -> str:
    from kl_estimation.verdicts import codes as _codes

    return _codes(flags).replace(",", ", ")


def ess_pct(r: dict):
    """ESS as a percentage of the sequences drawn (the unit used in tables and figures alike)."""
    ess, n = r.get("ess"), r.get("n")
    if ess is None or not n or ess != ess:
        return None
    return 100.0 * ess / n


def llm_table(rows: list, title: str, columns: int | None = None) -> str:
    """Ranked (proposal, estimator) Rows of an LLM run (core.results.Row): trusted rows first by
    standard error, then the flagged ones (!, with their codes) and, below, what went wrong in words.

    Fits `columns` (default: the terminal's width, at least 80): proposal names are shortened and flag codes cut (each
    is written out in full below), then var/seq, ESS and k̂, and if need be the interval, move to a second table of
    the same rows (rank, proposal and estimator repeated). Estimate and 95% CI are shown to the decimals
    their SE supports (se_decimals); an SE that is not informative shows as 'n/i', never as a zero-width interval;
    ESS is a percentage of the sequences drawn; * marks the recommended row."""
    W = width(columns)
    cells = []
    for i, r in enumerate(rows, 1):
        informative = r.get("se_informative", True) and r.get("ci_low") == r.get("ci_low") \
            and r.get("ci_low") is not None
        est, se = estimate_text(r.get("estimate"), r.get("std_error"))
        if not informative:
            se = "n/i" if not r.get("se_informative", True) else se
        ci = _ci_text(r.get("ci_low"), r.get("ci_high"), r.get("std_error"))[0] if informative else (
            "n/i" if not r.get("se_informative", True) else "n/a")
        pct = ess_pct(r)
        cells.append(dict(rank=f"{i}{'*' if r.get('recommended') else ''}", proposal=r["proposal"],
                          estimator=r["estimator"], estimate=est, se=se, ci=ci,
                          variance=num(r.get("variance"), 9).strip(), ess="—" if pct is None else f"{pct:.0f}%",
                          khat=num(r.get("khat"), 5, 2).strip(), flag=("! " + r["flag"]) if r.get("flag") else ""))
    heads = dict(rank="rank", proposal="proposal", estimator="estim.", estimate="estimate", se="SE", ci="95% CI",
                 variance="var/seq", ess="ESS", khat="k̂", flag="flag")
    right = {"rank", "estimate", "se", "ci", "variance", "ess", "khat"}
    shown = list(heads)

    def natural(k):
        return max([len(heads[k])] + [len(c[k]) for c in cells])

    widths = {k: natural(k) for k in heads}
    widths["proposal"] = min(widths["proposal"], 44)
    widths["flag"] = min(widths["flag"], 40)
    detail = []  # columns moved to a second table (rank, proposal and estimator repeated) when one does not fit

    def total():
        return sum(widths[k] for k in shown) + len(shown) - 1

    def shrink(k, floor):
        widths[k] = max(min(widths[k], floor), widths[k] - max(0, total() - W))

    shrink("flag", 20)  # first shorten the codes (each is written out below) and the names a little
    shrink("proposal", 26)
    if total() > W:
        detail = ["variance", "ess", "khat"]
        shown = [k for k in shown if k not in detail]
    shrink("proposal", 20)
    shrink("flag", 10)
    if total() > W:
        detail.insert(0, "ci")
        shown.remove("ci")
    shrink("proposal", 16)
    shrink("flag", 2)

    def cell(k, text):
        if k == "proposal":
            text = _name(text, widths[k])
        elif k == "flag" and len(text) > widths[k]:
            text = _codes_within(text, widths[k])
        elif len(text) > widths[k]:
            text = text[: widths[k] - 1] + "…"
        return text.rjust(widths[k]) if k in right else text.ljust(widths[k])

    lines = [_rule(title, W), " ".join(cell(k, heads[k]) for k in shown).rstrip()]
    lines += [" ".join(cell(k, c[k]) for k in shown).rstrip() for c in cells]
    if detail:
        second = ["rank", "proposal", "estimator", *detail]
        widths["proposal"] = max(widths["proposal"], min(natural("proposal"), W - sum(
            widths[k] + 1 for k in second if k != "proposal")))
        lines += ["", " ".join(cell(k, heads[k]) for k in second).rstrip()]
        lines += [" ".join(cell(k, c[k]) for k in second).rstrip() for c in cells]
    notes = []
    if any(r.get("recommended") for r in rows):
        notes.append("* recommended")
    notes.append("ESS: Kish effective sample size, % of the sequences drawn")
    if notes:
        lines.append(_wrap("; ".join(notes), W))
    flagged = [r for r in rows if r.get("flag")]
    if flagged:
        lines += ["", "! flagged rows (ranked last):"]
        by_reason: dict = {}
        for r in flagged:  # one line per (proposal, code, message), naming the estimators it applies to
            for f in r.flags or [None]:  # the message in the row's own direction's names
                key = (r.proposal, f.code.value if f else r.flag, render(f, r.direction) if f else "")
                by_reason.setdefault(key, []).append(r["estimator"])
        for (p, code, message), ests in by_reason.items():
            lines.append(_wrap(f"{p} · {'/'.join(ests)} — {code}{': ' + message if message else ''}", W, "  ",
                               "      "))
    return "\n".join(lines)


def _codes_within(flag: str, w: int) -> str:
    """'! A,B,C' in w columns: the whole codes that fit and '+n' for the rest (every code is written out below the
    table); the first code shortened only when not even it fits."""
    codes_ = flag.removeprefix("! ").split(",")
    for k in range(len(codes_) - 1, 0, -1):
        text = f"! {','.join(codes_[:k])} +{len(codes_) - k}"
        if len(text) <= w:
            return text
    more = f" +{len(codes_) - 1}" if len(codes_) > 1 else ""
    return flag[: max(w - len(more) - 1, 1)] + "…" + more if w > len(more) + 2 else flag[: w - 1] + "…"


def _wrap(text: str, columns: int, first: str = "", rest: str = "  ") -> str:
    return textwrap.fill(text, columns, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False,
                         break_long_words=False)  # a path longer than a line stays whole


def path_line(label: str, path, columns: int | None = None) -> str:
    """`label path` on one line when it fits `columns` (default: the terminal's width, at least 80), else the path on
    a line of its own, whole (a path is never broken: it is copied as it is)."""
    text = f"{label} {path}"
    return text if len(text) <= width(columns) else f"{label}\n  {path}"


def prose(text: str, columns: int | None = None, rest: str = "  ") -> str:
    """A console paragraph wrapped to `columns` (default: the terminal's width, at least 80), later lines indented
    by `rest`; a leading blank line (a paragraph break) is kept."""
    lead = len(text) - len(text.lstrip("\n"))
    return "\n" * lead + _wrap(text[lead:], width(columns), "", rest)


def _horizon(rec: dict, max_new_tokens=None) -> str:
    t = max_new_tokens if max_new_tokens is not None else rec.get("max_new_tokens")
    if t is None:
        return ""
    eos = rec.get("eos")
    return f"; a sequence is up to {t} new tokens{', cut at EOS' if eos else ''}"


def recommendation_line(rec, scope: str = "", *, max_new_tokens: int | None = None, unit: str | None = None,
                        advice: str | None = None) -> str:
    """The one line that says which estimate to report (verdicts.recommend: a Row), in its unit,
    or that none can be (with `advice`: what to change).

    ``Recommended: P · RB+CV = 10.70 nats/sequence (SE 0.08, 95% CI [10.55, 10.86]; a sequence is up to 20 new
    tokens, cut at EOS) — <reason>.`` The unit is nats per sequence (``unit`` overrides it), the horizon comes from
    `max_new_tokens` or the recommendation's own ``max_new_tokens`` / ``eos`` (verdicts.judge records them).
    Estimate and CI are shown to the decimals the SE supports; a negative lower bound is shown as computed, and said
    to be (BELOW_ZERO)."""
    where = f" {scope}" if scope else ""
    if rec is None:
        return f"Recommended{where}: none — " + (render(advice) or "every row is flagged (see above); draw more "
                                                  "sequences or raise the temperature (a proposal whose weights "
                                                  "degenerate needs P in the run to be judged).")
    unit = unit or rec.get("unit") or "nats/sequence"
    est, se = estimate_text(rec["estimate"], rec["std_error"])
    ci, negative = _ci_text(rec.get("ci_low"), rec.get("ci_high"), rec["std_error"])
    reason = rec.get("reason")
    return (f"Recommended{where}: {rec['proposal']} · {rec['estimator']} = {est} {unit} (SE {se}, 95% CI {ci}"
            f"{f', {BELOW_ZERO}' if negative else ''}{_horizon(rec, max_new_tokens)})"
            f"{f' — {reason}' if reason else ''}.")


def jeffreys_line(j: dict, scope: str = "", columns: int | None = None) -> str:
    """The Jeffreys row of a run of both directions (llm.run.directions.jeffreys_row), wrapped to `columns` (default:
    the terminal's width, at least 80); estimate, SE and CI to the digits the SE supports (estimate_text), the
    population's to its own SE's."""
    W = width(columns)
    where = f" {scope}" if scope else ""
    target = j.get("target", "KL(P‖Q) + KL(Q‖P)")
    if j["estimate"] != j["estimate"]:  # NaN: a direction has no row to add
        return _wrap(f"Jeffreys {target}{where}: none — {j['flag']}.", W)
    population = ""
    se_pop = j.get("std_error_population")
    if se_pop is not None and se_pop == se_pop:
        pop_ci, pop_negative = _ci_text(j["ci_population_low"], j["ci_population_high"], se_pop)
        population = (f"; for the prompt population SE {estimate_text(j['estimate'], se_pop)[1]}, 95% CI {pop_ci}"
                      f"{f', {BELOW_ZERO}' if pop_negative else ''}")
    flag = f" ! flagged: {j['flag']}" if j.get("flag") else ""
    parts = " + ".join(f"{d} {j[d]['proposal']} {j[d]['estimator']}" for d in ("forward", "reverse") if j.get(d))
    est, se = estimate_text(j["estimate"], j["std_error"])
    ci, negative = _ci_text(j["ci_low"], j["ci_high"], j["std_error"])
    return _wrap(f"Jeffreys {target}{where} = {est} {j.get('unit', '')} (SE {se}, 95% CI {ci}"
                 f"{f', {BELOW_ZERO}' if negative else ''}{population}) — {parts}; SE = √(SE_forward² + "
                 f"SE_reverse²), the directions' sequences being independent.{flag}", W)


def recommendation_block(result, max_new_tokens: int | None = None, columns: int | None = None,
                         scope: str = "") -> str:
    """What to report from a run, as the console's last lines: `result` is one direction's verdict (verdicts.judge's
    output, api.KLResult.view(direction), or a saved summary read back with its Rows: figures.llm).

    One prompt: recommendation_line. A prompt set: one short line per prompt (no repeated justification), then one
    overall line giving both intervals and when to use which — the fixed-set interval (within-prompt noise only:
    these prompts are the target) and the population interval (the prompts as a random sample of a population:
    between-prompt spread included, Student t on m − 1 degrees of freedom) — and the reason once. Intervals are the
    stored ones: a negative lower bound is shown as computed and the line says so (BELOW_ZERO)."""
    W = width(columns)
    per_prompt = result.get("per_prompt") or []
    rec = result.get("recommended")
    advice = result.get("advice")
    if not per_prompt:
        return _wrap(recommendation_line(rec, scope, max_new_tokens=max_new_tokens, advice=advice), W, "", "  ")
    m = len(per_prompt)
    unit = (rec or {}).get("unit") or (result.get("unit") or {}).get("unit") or "nats/sequence"
    head = rec if rec is not None else (result.get("unit") or {})
    where = f" {scope}" if scope else ""
    lines = [_wrap(f"Recommended{where} per prompt ({unit}{_horizon(head, max_new_tokens)}):", W)]
    for p in per_prompt:
        r = p["recommended"]
        text = (p.get("text") or "").replace("\n", " ")
        label = f"  prompt {p['prompt']}" + (f" ({text[:24]}{'…' if len(text) > 24 else ''})" if text else "")
        if r is None:
            lines.append(_wrap(f"{label}: none — {render(p.get('advice')) or 'every row is flagged'}", W, "",
                               "      "))
            continue
        est, se = estimate_text(r["estimate"], r["std_error"])
        ci, negative = _ci_text(r.get("ci_low"), r.get("ci_high"), r["std_error"])
        lines.append(_wrap(f"{label}: {r['proposal']} · {r['estimator']} = {est} (SE {se}, 95% CI {ci}"
                           f"{', lower bound < 0' if negative else ''})", W, "", "      "))
    if rec is None:
        lines.append(_wrap(recommendation_line(None, f"{scope} over the {m} prompts".strip(), advice=advice), W, "",
                           "  "))
        return "\n".join(lines)
    est, se = estimate_text(rec["estimate"], rec["std_error"])
    ci, negative = _ci_text(rec.get("ci_low"), rec.get("ci_high"), rec["std_error"])
    se_pop = rec.get("std_error_population")
    if se_pop is not None and se_pop == se_pop:
        _, pop_se = estimate_text(rec["estimate"], se_pop)
        pop_ci, pop_negative = _ci_text(rec.get("ci_population_low"), rec.get("ci_population_high"), se_pop)
        k = len(rec.get("prompts_covered") or range(m))
        population = (f"; for the population the prompts were drawn from SE {pop_se}, 95% CI {pop_ci} (Student t, "
                      f"{k - 1} df{f'; {BELOW_ZERO}' if pop_negative else ''})")
    else:
        population = ""
    covers = rec.get("covers")
    use = "Report the first for this prompt set" + (", the second to generalise to new prompts" if population else "")
    reason = f" {rec['reason']}." if rec.get("reason") else ""
    overall = (f"Recommended{where} over {covers or f'the {m} prompts'}: {rec['proposal']} · {rec['estimator']} = "
               f"{est} {unit} (the mean of the per-prompt estimates); for these prompts SE {se}, 95% CI {ci}"
               f"{f' ({BELOW_ZERO})' if negative else ''}{population}. {use}.{reason}")
    lines.append(_wrap(overall, W, "", "  "))
    return "\n".join(lines)
