"""Golden tests: the deterministic tables of the docs are what the code computes (exact values, no sampling).

Each table is read from its page, so a change that moves a number fails here until the page says the new one."""
import re
from pathlib import Path

import numpy as np
import pytest

from kl_estimation.core.streams import named_stream
from kl_estimation.synthetic.evaluation import exact_moments
from kl_estimation.synthetic.experiment import SyntheticConfig, make_pair, methods_for
from kl_estimation.toy import markov

DOCS = Path(__file__).resolve().parents[1] / "docs"
FAMILIES = ("zipf", "zipf-cutoff", "mixture")


def table_after(page: str, heading: str) -> dict[str, list[float]]:
    """The first markdown table after the line containing `heading`: {first cell: numeric cells}."""
    lines = (DOCS / page).read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if heading in ln)
    rows, seen = {}, False
    for ln in lines[start + 1:]:
        if ln.startswith("|"):
            seen = True
            cells = [c.strip() for c in ln.strip("|").split("|")]
            if all(re.fullmatch(r"[\d.]+", c) for c in cells[1:]):
                rows[cells[0]] = [float(c) for c in cells[1:]]
        elif seen:
            break
    return rows


def test_synthetic_exact_variance_table():
    cfg = SyntheticConfig()
    table = table_after("synthetic.md", "Exact per-sample variance relative to naive MC")
    assert len(table) == 4
    for j, family in enumerate(FAMILIES):
        pair = make_pair(family, "medium", cfg)
        methods = {m.name: m for m in methods_for(pair.P, pair.Q, cfg.alpha_values, cfg.rb_top_k)}
        mc = exact_moments(np.exp(methods["Naive MC (k1)"].log_r), methods["Naive MC (k1)"].g)[1]
        for label, name in (("Rao-Blackwell (top-100)", "Rao-Blackwell (top-100)"),
                            ("Optimal (ceiling)", "Optimal"), ("Alpha-mixture (α=0.9)", "Alpha-mixture (α=0.9)")):
            var = exact_moments(np.exp(methods[name].log_r), methods[name].g)[1]
            assert var / mc == pytest.approx(table[label][j], abs=6e-5), (family, label)


def test_sequence_exact_variance_table_rb_row():
    cfg = markov.SequenceConfig()
    table = table_after("toy.md", "Default run, exact variance relative to MC")
    for j, family in enumerate(FAMILIES):
        tables = markov.markov_pair(family, "medium", cfg.vocab_size, cfg.order, cfg.max_new_tokens,
                                    named_stream(cfg.seed, "markov", family, "medium"))
        ex = markov.exact_values(tables)
        assert np.isfinite(ex.is_variance)
        assert ex.rbis_variance / ex.is_variance == pytest.approx(table["RB"][j], abs=6e-5), family


def test_ci_runs_the_readme_test_command_and_the_readme_stays_short():
    root = DOCS.parent
    readme = (root / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    tests = next(b for b in blocks if "pytest" in b)
    assert tests in (root / ".ci" / "run").read_text()
    assert any("Synthetic_tests.py" in b for b in blocks)
    assert len(readme.splitlines()) <= 200
