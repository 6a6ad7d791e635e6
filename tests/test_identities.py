"""Proposals as typed identities: a stable ASCII key (random streams, file names, run keys) apart from the label
people read, and strict parsing with "did you mean"."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from kl_estimation.core import proposals as props
from kl_estimation.core.proposals import REGISTRY, build_proposals, by_name
from kl_estimation.llm import engine
from kl_estimation.llm.run import store


def test_every_registry_member_has_an_ascii_key_and_a_label_that_parse_back():
    names = [p.label for p in build_proposals()]
    keys = [p.key for p in build_proposals()]
    assert len(set(keys)) == len(keys)
    for p in build_proposals():
        assert p.key.isascii() and " " not in p.key and p.key == p.key.lower()
        assert by_name(p.label) == p and by_name(p.key) == p and p.name == p.label
    assert "Geometric (β=0.5)" in names and "geometric_beta-0.5" in keys and "optimal" in keys
    assert by_name("Exponential family (β=5)").key == "exponential-family_beta-5"
    assert by_name("Cross-entropy tilted (t=0.3)").key == "cross-entropy-tilted_t-0.3"


@pytest.mark.parametrize("name,key,label", [
    ("P", "p", "P"),
    ("Geometric (β=0.5)", "geometric_beta-0.5", "Geometric (β=0.5)"),
    ("Geometric (beta=0.5)", "geometric_beta-0.5", "Geometric (β=0.5)"),  # the ASCII alias, labelled with β
    ("geometric_beta-0.5", "geometric_beta-0.5", "Geometric (β=0.5)"),
    ("Fixed mixture (lambda=0.9)", "fixed-mixture_lambda-0.9", "Fixed mixture (λ=0.9)"),
    ("Adaptive [prefix-aware]", "adaptive_prefix-aware", "Adaptive [prefix-aware]"),
    ("adaptive_prefix-aware", "adaptive_prefix-aware", "Adaptive [prefix-aware]"),
    ("Alpha-mixture (alpha=0.5) [prefix-aware]", "alpha-mixture_alpha-0.5_prefix-aware",
     "Alpha-mixture (α=0.5) [prefix-aware]"),
])
def test_sequence_proposals_parse_to_one_identity(name, key, label):
    prop = engine.sequence_proposal(name)
    assert (prop.key, prop.label) == (key, label)
    assert engine.sequence_proposal(prop.key) == prop == engine.sequence_proposal(prop.label)
    assert store.slug(name) == key  # file names come from the key


@pytest.mark.parametrize("name,needle", [
    ("Geometric (λ=0.5)", "Geometric's parameter is β (beta), not 'λ'"),
    ("Geometric (λ=0.5)", "did you mean 'Geometric (β=0.5)'?"),
    ("Geometrc (β=0.5)", "did you mean 'Geometric (β=0.5)'?"),
    ("Optmal", "unknown proposal 'Optmal'; did you mean 'Optimal'?"),
    ("Geometrc", "did you mean 'Geometric (β=0.3)'?"),
    ("Geometric", "Geometric needs its parameter β (beta)"),
    ("Optimal (β=1)", "Optimal takes no parameter"),
    ("Geometric (β=x)", "must be a number"),
    ("Geometric (β=-1)", "Geometric β must be in [0, ∞)"),
    ("Adaptive [prefix aware]", "did you mean 'Adaptive [prefix-aware]'?"),
    ("Geometric (β=0.5) [prefix-aware]", "Geometric has no prefix-aware variant"),
    ("mc", "did you mean 'P'?"),
])
def test_bad_names_are_refused_with_the_parameter_name_and_a_suggestion(name, needle):
    with pytest.raises(ValueError) as err:
        engine.sequence_proposal(name)
    assert str(err.value).startswith("proposals: ") and needle in str(err.value), str(err.value)


def test_two_spellings_of_one_proposal_are_refused():
    assert [p.key for p in engine.parse_proposals(["P", "Geometric (β=0.5)"])] == ["p", "geometric_beta-0.5"]
    with pytest.raises(ValueError, match="^proposals: 'Geometric \\(β=0.5\\)' and 'Geometric \\(beta=0.5\\)' are "
                                         "the same proposal"):
        engine.parse_proposals(["Geometric (β=0.5)", "Geometric (beta=0.5)"])


def test_renaming_a_label_does_not_change_the_random_stream_or_the_files(monkeypatch):
    prop = engine.sequence_proposal("Geometric (β=0.5)")
    before = torch.rand(5, generator=engine.unit_generator(0, prop, 2, "cpu", 1))
    # a new display symbol for Geometric's parameter (what "changing how a name prints" means)
    monkeypatch.setitem(REGISTRY, "Geometric", dataclasses.replace(REGISTRY["Geometric"], symbol="γ"))
    assert prop.label == "Geometric (γ=0.5)" and prop.key == "geometric_beta-0.5"
    after = torch.rand(5, generator=engine.unit_generator(0, prop, 2, "cpu", 1))
    assert torch.equal(before, after)
    assert store.slug(prop) == "geometric_beta-0.5"
    # and the label is what a typed identity records, the key what names things
    assert prop.record() == dict(key="geometric_beta-0.5", label="Geometric (γ=0.5)", family="Geometric", param=0.5,
                                 prefix_aware=False)


def test_the_stream_follows_the_key_not_the_label_string():
    prop = engine.sequence_proposal("Geometric (beta=0.5)")
    by_key = torch.rand(4, generator=engine.unit_generator(3, prop, 0, "cpu"))
    assert torch.equal(by_key, torch.rand(4, generator=engine.unit_generator(3, "geometric_beta-0.5", 0, "cpu")))
    assert not torch.equal(by_key, torch.rand(4, generator=engine.unit_generator(3, "Geometric (β=0.5)", 0, "cpu")))


def test_synthetic_draws_are_named_by_keys():
    """The single-token experiment's draws come from streams named by each proposal's key."""
    from kl_estimation.synthetic.experiment import methods_for

    P = np.array([0.5, 0.3, 0.2])
    Q = np.array([0.2, 0.3, 0.5])
    draws = {m.name: m.draws for m in methods_for(P, Q, (0.5,), rb_top_k=1)}
    assert draws["Geometric (β=0.5)"] == "geometric_beta-0.5" and draws["Optimal"] == "optimal"


def test_an_llm_run_uses_keys_for_files_and_run_keys_and_labels_for_people(tmp_path):
    from kl_estimation.llm.loading import load_transformers_pair
    from kl_estimation.llm.run.config import LLMConfig
    from kl_estimation.llm.run.runner import run_experiment
    from tiny_lms import save_pair

    paths = save_pair(tmp_path / "m", seed=3)
    pair = load_transformers_pair(*paths, prompts="a b", temperature=1.0)
    cfg = LLMConfig(p_model="x", q_model="y", prompt="a b", n_samples=16, max_new_tokens=2, temperature=1.0,
                    proposals=("P", "Geometric (beta=0.5)"), batch_size=8, output_dir=str(tmp_path / "o"))
    run = run_experiment(pair, cfg, {}, tmp_path / "o")
    doc = json.loads((tmp_path / "o" / "geometric_beta-0.5.json").read_text())
    assert doc["proposal"] == "Geometric (β=0.5)" and doc["proposal_key"] == "geometric_beta-0.5"
    assert doc["run_key"]["proposal"] == "geometric_beta-0.5"
    assert {r["proposal"] for r in run["rows"]} == {"P", "Geometric (β=0.5)"}
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [p["key"] for p in summary["proposals"]] == ["p", "geometric_beta-0.5"]
    assert [p["label"] for p in summary["proposals"]] == ["P", "Geometric (β=0.5)"]


def test_core_parse_errors_name_the_parameter():
    with pytest.raises(ValueError, match="^proposals: unknown proposal family 'Nope'"):
        props.proposal("Nope", 0.5)
    with pytest.raises(ValueError, match="^proposals: unknown proposal 'Optmal'; did you mean 'Optimal'"):
        by_name("Optmal")
