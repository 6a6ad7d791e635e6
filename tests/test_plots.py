"""visualize_proposals.py: every figure drawn from a saved run folder alone, and each error path."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_checks import call, one_line
from kl_estimation.cli import synthetic_main, visualize_main
from kl_estimation.figures.synthetic import PAIR_FIGURES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    assert synthetic_main(["--vocab-size", "300", "--n-samples", "60", "--n-repeats", "2", "--families", "zipf",
                           "mixture", "--alpha-values", "0.5", "0.9", "--output-dir", str(out)]) == 0
    return out


def expected_files(pairs):
    return {f"{k.replace('/', '_')}_{i}_{n}.png" for k in pairs for i, n in enumerate(PAIR_FIGURES, 1)} | {
        "cross_family_8_exact-variance.png", "index.html", "captions.json"}


def test_synthetic_run_draws_every_figure(run_dir):
    plots = run_dir / "plots"
    files = {p.name for p in plots.iterdir()}
    assert files == expected_files(["zipf/medium", "mixture/medium"])
    index = (plots / "index.html").read_text()
    for f in files - {"index.html", "captions.json"}:
        data = (plots / f).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, f
        assert f"src='{f}'" in index


def test_redraw_from_folder_alone_gives_same_files(run_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("results.json", "distributions.npz"):
        (copy / name).write_bytes((run_dir / name).read_bytes())
    assert visualize_main([str(copy)]) == 0
    assert {p.name for p in (copy / "plots").iterdir()} == {p.name for p in (run_dir / "plots").iterdir()}


def test_formats_and_narrowing_keep_the_other_pairs_figures(run_dir, tmp_path):
    run_dir = Path(shutil.copytree(run_dir, tmp_path / "copy"))  # the module's folder stays as it was
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "plots").iterdir()}
    assert visualize_main([str(run_dir), "--format", "svg", "--pairs", "mixture/medium",
                           "--methods", "Optimal", "Geometric (β=0.5)"]) == 0
    files = {p.name for p in (run_dir / "plots").iterdir()}
    zipf = {f for f in expected_files(["zipf/medium"]) if f.startswith("zipf_")}
    mixture_svg = {f.replace(".png", ".svg") for f in expected_files(["mixture/medium"]) if f.startswith("mixture_")}
    # the redrawn pair's PNGs are replaced by its SVGs; zipf's PNGs stay untouched; the cross figure is redrawn
    assert files == zipf | mixture_svg | {"cross_family_8_exact-variance.svg", "index.html", "captions.json"}
    assert all((run_dir / "plots" / f).stat().st_mtime_ns == before[f] for f in zipf)
    index = (run_dir / "plots" / "index.html").read_text()
    assert all(f"src='{f}'" in index for f in zipf | mixture_svg)
    assert (run_dir / "plots" / "mixture_medium_2_weights.svg").read_text().lstrip().startswith("<?xml")
    assert visualize_main([str(run_dir), "--format", "pdf", "--pairs", "zipf/medium"]) == 0
    assert (run_dir / "plots" / "zipf_medium_6_exact-variance.pdf").read_bytes().startswith(b"%PDF")
    assert not list((run_dir / "plots").glob("zipf_*.png")) and list((run_dir / "plots").glob("mixture_*.svg"))
    assert visualize_main([str(run_dir)]) == 0  # back to the full set
    assert {p.name for p in (run_dir / "plots").iterdir()} == expected_files(["zipf/medium", "mixture/medium"])
    assert not any(p.name.startswith(".plots-") for p in run_dir.iterdir())


def one_line_error(argv, capsys, needle):
    code, _, err = call(visualize_main, argv, capsys)
    one_line(code, err, needle)


def test_error_paths(run_dir, tmp_path, capsys):
    one_line_error([str(tmp_path / "nope")], capsys, "is not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error([str(empty)], capsys, "results.json is missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    (bad / "distributions.npz").write_bytes((run_dir / "distributions.npz").read_bytes())
    one_line_error([str(bad)], capsys, "is corrupt")
    (bad / "results.json").write_text((run_dir / "results.json").read_text())
    (bad / "distributions.npz").write_bytes(b"garbage")
    one_line_error([str(bad)], capsys, "distributions.npz is corrupt")
    one_line_error([str(run_dir), "--pairs", "zipf/extreme"], capsys, "--pairs: unknown pair 'zipf/extreme'")
    one_line_error([str(run_dir), "--methods", "Nope"], capsys, "--methods: unknown method 'Nope'")
    one_line_error([str(run_dir), "--format", "gif"], capsys, "--format")
    assert not (bad / "plots").exists()
    assert not any(p.name.startswith(".plots-") for p in run_dir.iterdir())


def test_script_entry_point(run_dir):
    p = subprocess.run([sys.executable, str(ROOT / "visualize_proposals.py"), str(run_dir / "missing")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory):
    """A small LLM run folder with a prompt set, P and three proposals (one of them degenerate)."""
    from kl_estimation.llm.loading import load_transformers_pair
    from kl_estimation.llm.run.config import LLMConfig
    from kl_estimation.llm.run.runner import run_experiment
    from tiny_lms import save_pair

    root = tmp_path_factory.mktemp("llm")
    paths = save_pair(root / "m", seed=0)
    prompts = ("a b", "c", "b")
    pair = load_transformers_pair(*paths, prompts=list(prompts), temperature=1.0)
    cfg = LLMConfig(p_model="x", q_model="y", prompts=prompts, n_samples=150, max_new_tokens=4, temperature=1.0,
                    proposals=("P", "Geometric (beta=0.5)", "Exponential family (β=5)", "Adaptive [prefix-aware]"),
                    batch_size=150, output_dir=str(root / "run"))
    run_experiment(pair, cfg, {}, root / "run")
    return root / "run"


def test_llm_figures_take_every_verdict_from_the_saved_flags(llm_run, tmp_path):
    import json
    import shutil

    from kl_estimation.figures import llm as fl

    plt = fl._plt()
    run = fl.load_llm_run(llm_run)
    assert [d["proposal"] for d in run.docs][1] == "Geometric (β=0.5)"  # labelled with β, read by key
    fig, _ = fl.fig_log_weights(plt, run)
    red = {ax.get_title().splitlines()[0].lstrip("! "): ax.title.get_color() == "#d62728" for ax in fig.axes
           if ax.get_visible()}
    saved = {d["proposal"]: bool(fl._weight_flags(run, d["proposal"])) for d in run.docs if not fl._is_p(d)}
    assert red == {fl._label(k): v for k, v in saved.items()} and any(saved.values())
    plt.close(fig)
    # the same figure from a summary whose flags were removed: nothing is red — no threshold is recomputed
    copy = tmp_path / "copy"
    shutil.copytree(llm_run, copy)
    summary = json.loads((copy / "summary.json").read_text())
    for r in summary["rows"]:
        r["flag"], r["flags"] = "", []
    (copy / "summary.json").write_text(json.dumps(summary))
    fig, _ = fl.fig_log_weights(plt, fl.load_llm_run(copy))
    assert not any(ax.title.get_color() == "#d62728" for ax in fig.axes if ax.get_visible())
    plt.close(fig)


def test_llm_figures_and_index_mark_the_recommended_row(llm_run):
    import json

    from kl_estimation.figures import llm as fl

    plt = fl._plt()
    run = fl.load_llm_run(llm_run)
    summary = json.loads((llm_run / "summary.json").read_text())
    rec = summary["recommended"]
    fig, _ = fl.fig_estimates(plt, run)
    starred = [t.get_text() for t in fig.axes[0].get_yticklabels() if t.get_text().startswith("★")]
    assert starred == [f"★ {fl._label(rec['proposal'])} · {rec['estimator']}"]
    plt.close(fig)
    index = fl.draw_all(llm_run)
    html = index.read_text()
    assert "class='recommended'" in html and f"{rec['proposal']} · {rec['estimator']}" in html
    assert "Recommended per prompt" in html


def test_llm_ess_figure_shows_the_tables_percentage(llm_run):
    from kl_estimation import report
    from kl_estimation.figures import llm as fl

    run = fl.load_llm_run(llm_run)
    for d in run.docs:
        row = next(r for r in run.summary["rows"] if r["proposal"] == d["proposal"])
        assert fl.ess_pct(run, d) == pytest.approx(report.ess_pct(row))


def test_llm_per_prompt_figure_marks_the_estimates_flagged_at_each_prompt(llm_run):
    from matplotlib.colors import to_hex

    from kl_estimation.figures import llm as fl

    plt = fl._plt()
    run = fl.load_llm_run(llm_run)
    fig, _ = fl.fig_per_prompt(plt, run)
    hollow = sum(len(ln.get_xdata()) for ln in fig.axes[0].lines
                 if to_hex(ln.get_markerfacecolor()) == "#ffffff" and to_hex(ln.get_markeredgecolor()) == "#d62728")
    flagged = sum(bool(r["flag"]) for p in run.summary["per_prompt"] for r in p["rows"]
                  if r["estimator"] == fl.MAIN_ESTIMATOR[r["proposal"] == "P"])
    assert hollow == flagged and flagged > 0
    plt.close(fig)
