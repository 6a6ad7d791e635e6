"""kl_estimation.audit: every library option's expected gradient, exact by enumeration, against its claim — one
test per line of docs/audit.md's table (with and without EOS, on- and off-policy)."""
import json
from functools import cache

import pytest
import torch

from kl_estimation import audit

pytestmark = pytest.mark.usefixtures("one_thread")


@cache
def chain_and_targets(eos):
    ch = audit.make_chain(eos=eos)
    return ch, audit.exact_targets(ch)


CASES = [(o, eos, on) for o in audit.OPTIONS for eos in (True, False) for on in (True, False)]


def case_id(case):
    o, eos, on = case
    return f"{o.library}:{o.option}:{'eos' if eos else 'no-eos'}:{'on' if on else 'off'}".replace(" ", "_")


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_option_has_its_stated_gradient(case):
    option, eos, on_policy = case
    ch, targets = chain_and_targets(eos)
    g = audit.expected_gradient(ch, option, on_policy)
    claim = option.on_policy if on_policy else option.off_policy
    assert audit.matching_target(g, targets) == claim, (claim, {k: audit.relative_bias(g, v)
                                                                for k, v in targets.items() if k != "zero"})
    if claim is None:  # biased against every target by a visible margin, not by rounding
        assert min(audit.relative_bias(g, targets[k]) for k in audit.TARGETS if k != "zero") > 0.02
        assert g.norm() > 0.05 * targets["reverse"].norm()


def test_targets_differ_and_the_issue_reference_points():
    """TRL 1.16's default has the frozen-reverse gradient and plain k3 the frozen-forward one (the issue: relative
    bias 0.13 and 0.41 on its bigram policy); on these chains 0.07–0.15 and 0.42–0.50."""
    for eos, rev, fwd in ((True, 0.071, 0.495), (False, 0.149, 0.425)):
        _, t = chain_and_targets(eos)
        assert audit.relative_bias(t["frozen reverse"], t["reverse"]) == pytest.approx(rev, abs=1e-3)
        assert audit.relative_bias(t["frozen forward"], t["reverse"]) == pytest.approx(fwd, abs=1e-3)
        for a in audit.TARGETS:
            for b in audit.TARGETS:
                assert a == b or not torch.allclose(t[a], t[b], rtol=0.02), (a, b)


def test_clamps_are_the_libraries():
    """verl's low_var_kl clamps log Q/P to ±20 and the KL to ±10 (no gradient past either); OpenRLHF's
    unbiased_gradient clamps its detached weight at 10."""
    lp = torch.tensor([0.0, -30.0, 0.0], dtype=torch.float64, requires_grad=True)
    lq = torch.tensor([-1.0, 0.0, -12.5], dtype=torch.float64)
    k = audit.verl_forward(lp, lq, "low_var_kl")
    assert k[1] == 10 and k[2] == 10  # e^20 − 21 and 12.5 − 1 + e^−12.5 both over the output clamp
    (g,) = torch.autograd.grad(k.sum(), lp)
    assert g[0] != 0 and g[1] == 0 and g[2] == 0
    old = torch.tensor([0.0, -40.0, 0.0], dtype=torch.float64)
    v = audit.openrlhf_kl(lp, lq, "k2", old, unbiased_gradient=True)
    (g,) = torch.autograd.grad(v.sum(), lp)
    torch.testing.assert_close(g, torch.tensor([1.0, -30.0 * 10, 12.5], dtype=torch.float64))  # w = min(e^10, 10)


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "a.json"
    assert audit.main(["--vocab", "3", "--horizon", "2", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 80 and sum("frozen reverse" in ln for ln in lines) >= 16
    doc = json.loads(out.read_text())
    assert doc["config"]["vocab"] == 3 and doc["versions"]["torch"] and len(doc["rows"]) == 4 * len(audit.OPTIONS)
    assert audit.main(["--horizon", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "python -m kl_estimation.audit: error: --horizon: must be an integer from 1 to 6 (got 9)"
