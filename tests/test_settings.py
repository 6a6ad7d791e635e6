"""settings.py: one configuration mechanism — the synthetic parser generated from its configs like the LLM ones,
the loading spec the two LLM configs share, and validate() returning a resolved copy without changing the config."""
from dataclasses import asdict

import pytest

from kl_estimation.cli import synthetic_parser
from kl_estimation.synthetic.experiment import SyntheticConfig
from kl_estimation.toy.markov import SequenceConfig


def test_synthetic_parser_is_built_from_the_configs():
    args = synthetic_parser("prog", {}).parse_args([])
    syn, seq = SyntheticConfig(), SequenceConfig()
    for name, f in {**SequenceConfig.settings(), **SyntheticConfig.settings()}.items():
        value = getattr(args, name)
        if name in ("vocab_size", "n_samples", "n_repeats"):  # the default depends on --sequence
            assert value is None and getattr(syn, name) != getattr(seq, name), name
            continue
        expect = getattr(syn, name) if name in SyntheticConfig.settings() else f.default
        assert value == (list(expect) if isinstance(expect, tuple) else expect), name
    text = synthetic_parser("prog", {"rb_top_k": 7}).format_help()
    assert "(default 3000; with --sequence 201)" in text and "(default: 7)" in text  # a script's override
    args = synthetic_parser("prog", {}).parse_args(["--sampler", "stratified", "--horizon", "5", "--sequence"])
    assert args.samplers == ["stratified"] and args.max_new_tokens == 5 and args.sequence
    assert SequenceConfig.settings()["n_samples"].metadata == SyntheticConfig.settings()["n_samples"].metadata


def test_unknown_setting_names_the_run_and_the_closest_name():
    with pytest.raises(ValueError, match="^vocab_sise: not a setting of a synthetic run; did you mean 'vocab_size'"):
        SyntheticConfig.from_settings(vocab_sise=10)


def test_llm_validate_returns_a_resolved_copy_and_changes_nothing(tmp_path):
    from kl_estimation.llm.run.config import LLMConfig

    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    cfg = LLMConfig(prompts_file=str(prompts), proposals=("P", "Geometric (beta=0.5)"), n_samples=10)
    before = asdict(cfg)
    out = cfg.validate()
    assert asdict(cfg) == before and out is not cfg
    assert out.prompts == ("one", "two") and out.proposals == ("P", "Geometric (β=0.5)")
    assert out.validate() == out  # resolved once: validating again changes nothing either


def test_the_two_llm_configs_share_the_loading_spec(tmp_path):
    from kl_estimation.llm.corpus.config import CorpusConfig
    from kl_estimation.llm.run.config import LLMConfig, ModelPairSettings

    text = tmp_path / "c.txt"
    text.write_text("some text")
    for cls, extra in ((LLMConfig, {}), (CorpusConfig, {"corpus": str(text)})):
        assert issubclass(cls, ModelPairSettings)
        cfg = cls(p_model="org/base", p_revision="v1", q_adapter="org/lora", **extra)
        assert (cfg.q_model, cfg.q_revision) == ("org/base", "v1")  # Q = P's base at P's revision + the adapter
        with pytest.raises(ValueError, match="^dtype: unknown dtype 'fp8'; allowed: auto, "):
            cls(p_model="a", q_model="b", dtype="fp8", **extra).validate()
    cfg = CorpusConfig(p_model="a", q_model="b", corpus=str(text))
    out = cfg.validate()
    assert out == cfg and out is not cfg
