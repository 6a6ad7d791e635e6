"""bench/study_real_samplers.py --merge: runs of one setting drawn with different seeds pool into exactly the table
that one run holding all their randomizations computes; runs whose settings differ, or that share a seed, are
refused with one line."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import study_real_samplers as study  # noqa: E402

CONFIG = dict(q=["q4_0"], p_gguf="P.gguf", q_gguf="Q.gguf", q_adapter=None, lora_steps=30, temperatures=[1.0],
              max_new_tokens=[16], prompts=["a", "b"], ns=[4], samplers=["iid", "array-kl"], units_per_batch=1,
              every=["iid=3"], threads=1, dtype="float32", device="cpu", max_seconds=60.0, reanalyse=False, out="o")


@pytest.fixture(autouse=True)
def fewer_bootstrap_replicates(monkeypatch):
    monkeypatch.setattr(study.ratio_ci, "__defaults__", (50, 0))  # boot, seed: a fast test, still deterministic


def run(seed, R, **config):
    """A study.json document as the study writes it: R randomizations of array-kl, every third block i.i.d."""
    rng = np.random.default_rng(seed)
    cells = {}
    for prompt in ("a", "b"):
        r_iid = -(-R // 3)
        terms = rng.gamma(2.0, 1.0, (r_iid, 4))
        cells[f"q4_0|1.0|16|{prompt}|4"] = dict(
            q="q4_0", temperature=1.0, T=16, prompt=prompt, n=4,
            iid=dict(rb=terms.mean(1).tolist(), mc=rng.normal(2, 1, r_iid).tolist(), seconds=1.5 * r_iid,
                     tokens=60.0 * r_iid, rb_terms=terms.ravel().tolist()),
            **{"array-kl": dict(rb=rng.normal(2, 0.4, R).tolist(), mc=rng.normal(2, 1, R).tolist(), seconds=1.7 * R,
                                tokens=61.0 * R)})
    return dict(config=dict(CONFIG, seed=seed, randomizations=R, **config), randomizations=R, seconds=9.0 * R,
                cells=cells)


def concatenated(*docs):
    """The cells one run would hold with all these randomizations (in this order)."""
    cells = {}
    for key in docs[0]["cells"]:
        c = dict(docs[0]["cells"][key])
        for s in ("iid", "array-kl"):
            c[s] = {f: sum((d["cells"][key][s][f] for d in docs), [] if f in ("rb", "mc", "rb_terms") else 0.0)
                    for f in docs[0]["cells"][key][s]}
        cells[key] = c
    return cells


def test_merge_is_one_run_with_all_randomizations():
    a, b, c = run(26, 9), run(27, 6), run(28, 5)
    merged = study.merge_studies([b, a], ["B/study.json", "A/study.json"])
    one_run = study.public(study.analyse(concatenated(a, b), CONFIG["samplers"]))
    assert merged["rows"] == one_run  # ratio, χ² + δ CI, bootstrap CI, R, N_iid, cost: all equal
    assert merged == study.merge_studies([a, b], ["A/study.json", "B/study.json"])  # the arguments' order: none
    row = next(r for r in merged["rows"] if r["prompt"] == "a" and r["sampler"] == "array-kl")
    rb = a["cells"]["q4_0|1.0|16|a|4"]["array-kl"]["rb"] + b["cells"]["q4_0|1.0|16|a|4"]["array-kl"]["rb"]
    terms = a["cells"]["q4_0|1.0|16|a|4"]["iid"]["rb_terms"] + b["cells"]["q4_0|1.0|16|a|4"]["iid"]["rb_terms"]
    assert row["R"] == 15 and row["N_iid"] == 4 * (3 + 2) == len(terms)
    assert row["ratio"] == pytest.approx(4 * np.var(rb, ddof=1) / np.var(terms, ddof=1), rel=1e-12)
    assert row["ci_low"] < row["ratio"] < row["ci_high"]
    assert row["cost_ratio"] == pytest.approx((1.7 * 15 / (61.0 * 15)) / (1.5 * 5 / (60.0 * 5)))
    pooled = {p["sampler"]: p for p in merged["pooled"]}
    assert pooled["array-kl"]["R"] == 30 and pooled["iid"]["R"] == 10
    assert merged["config"]["seeds"] == [26, 27] and "seed" not in merged["config"]
    assert [r["seed"] for r in merged["config"]["runs"]] == [26, 27] and merged["randomizations"] == 15
    # a merged file merges again, as if all runs were merged at once
    again = study.merge_studies([merged, c], ["AB/study.json", "C/study.json"])
    assert again["rows"] == study.merge_studies([a, b, c], ["A", "B", "C"])["rows"]
    assert again["config"]["seeds"] == [26, 27, 28]


def test_merge_refuses_other_settings_and_shared_seeds(tmp_path):
    a = run(26, 9)
    for other, needle in ((run(26, 6), "both drawn with seed 26"),
                          (run(27, 6, temperatures=[0.7]), "differ in --temperatures"),
                          (run(27, 6, every=["iid=2"]), "differ in --every"),
                          (run(27, 6, q_gguf="elsewhere/Q.gguf"), "differ in --q-gguf")):
        with pytest.raises(ValueError, match=needle) as e:
            study.merge_studies([a, other], ["A/study.json", "B/study.json"])
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="seed 27"):
        study.merge_studies([study.merge_studies([a, run(27, 6)], ["A", "B"]), run(27, 3)], ["AB", "B2"])
    with pytest.raises(ValueError, match="two or more"):
        study.merge_studies([a], ["A"])
    # the same model file at two paths (a cache copy) is the same setting; other bytes are not
    (tmp_path / "x").mkdir()
    for name, data in (("Q.gguf", b"q4_0"), ("x/Q.gguf", b"q4_0"), ("x/R.gguf", b"q4_1")):
        (tmp_path / name).write_bytes(data)
    same = [run(26, 9, q_gguf=str(tmp_path / "Q.gguf")), run(27, 6, q_gguf=str(tmp_path / "x/Q.gguf"))]
    assert study.merge_studies(same, ["A", "B"])["config"]["q_gguf"] == str(tmp_path / "Q.gguf")
    with pytest.raises(ValueError, match="differ in --q-gguf"):
        study.merge_studies([same[0], run(27, 6, q_gguf=str(tmp_path / "x/R.gguf"))], ["A", "B"])
