"""Several candidates against one P in a sampled run (llm/run/candidates.py): one set of sequences from P scored by
every candidate gives each candidate its one-candidate run's numbers, and paired differences that are unbiased
against enumeration with SEs that match the exact variance of the per-sequence difference."""
import math

import numpy as np
import pytest

from kl_estimation import estimate_kl
from kl_estimation.cli import llm_main
from kl_estimation.llm import engine, enumeration
from kl_estimation.llm.loading import load_transformers_pair
from tiny_lms import save_candidates

T, TEMP = 3, 0.8
KW = dict(max_new_tokens=T, temperature=TEMP, progress=False, batch_size=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_candidates(tmp_path_factory.mktemp("cands"), noises=(0.2, 0.35, 0.5))


def _numbers(result):
    return [(r.direction, r.proposal, str(r.estimator), r.estimate, r.std_error, r.flag) for r in result.rows]


def test_each_candidate_is_its_one_candidate_run_bit_for_bit(models):
    """Three candidates from one P pass, a proposal built from P and Q beside P (drawn per candidate), an exact head
    at one prompt of two (auto would put none here; budget 8), a prompt set: every row equals the one-candidate
    run's, bit for bit (CPU, float32); the sequences of P are the same for every candidate."""
    p, qs = models
    kw = dict(KW, n_samples=64, proposals=("P", "Geometric (β=0.5)"), head=8)
    comp = estimate_kl(p, qs, ["a b", "c"], **kw)
    assert comp.shared["p_rows_bit_exact"] and comp.shared["p_hidden_bytes"] > 0
    assert comp.shared["per_candidate"] == ["forward Geometric (β=0.5)"]
    for i, q in enumerate(qs):
        one = estimate_kl(p, q, ["a b", "c"], **kw)
        assert _numbers(comp.results[i]) == _numbers(one)
    seqs = [[r["token_ids"] for r in d["sequences"]] for res in comp.results for d in res.docs
            if d["proposal_key"] == "p"]
    assert all(s == seqs[0] for s in seqs)
    for est in ("MC", "RB", "RB+CV"):  # at a prompt with a head too: the difference of the rows, a finite SE
        d = comp.paired(2, 0, est)
        assert d.estimate == pytest.approx(comp.row(2, est).estimate - comp.row(0, est).estimate, abs=1e-12)
        assert 0 < d.std_error < math.inf


def test_paired_difference_unbiased_and_its_se_exact(models):
    """Against enumeration: the paired MC, RB and RB+CV differences of candidates 3 and 1 lie within 4 SE of the
    exact KL difference; the MC difference's SE is within 15 % of the exact √(Var_P(f_3 − f_1)/n)."""
    p, qs = models
    n = 2000
    comp = estimate_kl(p, qs, "a b", **KW, n_samples=n, proposals=("P",), head=0)
    leaves = [enumeration.enumerate_sequences(load_transformers_pair(p, q, prompts="a b", temperature=TEMP),
                                              engine.sequence_proposal("P"), T) for q in (qs[2], qs[0])]
    exact = leaves[0]["kl"] - leaves[1]["kl"]
    assert np.array_equal(leaves[0]["log_p"], leaves[1]["log_p"])  # the same leaves in the same order
    w = np.exp(leaves[0]["log_p"])
    d = (leaves[0]["log_p"] - leaves[0]["log_q"]) - (leaves[1]["log_p"] - leaves[1]["log_q"])
    se_exact = math.sqrt((np.sum(w * d * d) - np.sum(w * d) ** 2) / n)
    for est in ("MC", "RB", "RB+CV"):
        row = comp.paired(2, 0, est)
        assert row.proposal == f"{comp.names[2]} − {comp.names[0]}"
        assert abs(row.estimate - exact) < 4 * row.std_error, est
        assert row.ci[0] < row.estimate < row.ci[1]
    mc = comp.paired(2, 0, "MC")
    assert mc.std_error == pytest.approx(se_exact, rel=0.15)
    assert mc.estimate == comp.row(2, "MC").estimate - comp.row(0, "MC").estimate


def test_series_ranks_and_identical_candidates_are_indistinguishable(models):
    """A candidate listed as P's own folder has KL 0 and ranks first; two candidates that are the same model are
    indistinguishable (difference exactly 0); the series keeps the order given."""
    p, qs = models
    comp = estimate_kl(p, [qs[1], p, qs[0]], "a b", **KW, n_samples=64, proposals=("P",), head=0)
    assert comp.ranks[1] == 1 and comp.row(1).estimate == 0.0
    assert [r.estimate for r in comp.series()] == [r.estimate for r in comp.table]
    few = estimate_kl(p, qs[:2], "a b", **KW, n_samples=8, proposals=("P",), head=0)
    assert str(few.estimator) == "RB" and str(few.table[0].estimator) == "RB"  # RB+CV cannot be fitted on 8
    same = estimate_kl(p, [qs[0], qs[0] + "/"], "a b", **KW, n_samples=64, proposals=("P",), head=0)
    d = same.paired(0, 1)
    assert d.estimate == 0.0 and d.details["indistinguishable"]


def test_command_line_writes_each_candidates_folder_and_the_comparison(models, tmp_path, capsys):
    p, qs = models
    out = tmp_path / "run"
    assert llm_main(["--p-model", p, "--q-model", *qs, "--prompt", "a b", "--n-samples", "32",
                     "--max-new-tokens", "2", "--proposals", "P", "--head", "0", "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 candidates against one P" in text and "3 − 1 = " in text
    assert (out / "comparison.json").is_file() and (out / "plots" / "candidates.png").is_file()
    assert sorted(f.name for f in (out / "candidates").iterdir()) == ["01-1", "02-2", "03-3"]
    from kl_estimation.llm.run.candidates import KLComparison

    back = KLComparison.load(out)
    assert [r.estimate for r in back.table] == pytest.approx([
        r["estimate"] for r in __import__("json").loads((out / "comparison.json").read_text())["table"]])


def test_bad_input_names_the_parameter(models, capsys):
    p, qs = models
    assert llm_main(["--q-model", *qs[:2], "--n-samples", "8"]) == 2  # no P: one line, nothing run
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "q-model" in err[0]
    with pytest.raises(ValueError, match="^q_model: a candidate is named twice"):
        estimate_kl(p, [qs[0], qs[0]], "a b", **KW, n_samples=8)
    with pytest.raises(ValueError, match="^proposals: .*needs P"):
        estimate_kl(p, qs, "a b", **KW, n_samples=8, proposals=("Geometric (β=0.5)",))
    with pytest.raises(ValueError, match="^q_adapter: applies to one"):
        estimate_kl(p, qs, "a b", **KW, n_samples=8, q_adapter="x")


def test_a_p_whose_head_does_not_reproduce_its_logits_runs_again(models, monkeypatch):
    """Where P's head applied again to the kept hidden states does not give P's logits bit for bit (soft-capping
    after the head, say), every candidate runs P again: the numbers stay the one-candidate runs', and the run says
    so."""
    from kl_estimation.llm.run import candidates

    p, qs = models
    real = candidates.SharedDraws.logits
    monkeypatch.setattr(candidates.SharedDraws, "logits", lambda self, h, device: real(self, h, device) + 1e-3)
    kw = dict(KW, n_samples=16, proposals=("P",), head=0)
    comp = estimate_kl(p, qs[:2], "a b", **kw)
    assert comp.shared["p_rows_bit_exact"] is False and comp.shared["p_rows"].startswith("P run again")
    assert _numbers(comp.results[1]) == _numbers(estimate_kl(p, qs[1], "a b", **kw))
