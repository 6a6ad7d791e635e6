"""Prompt sets from files or datasets: a list of strings, nothing else (the run layer tokenizes them).

Sources: a ``.txt`` file (one prompt per line; blank lines skipped), ``.jsonl`` (one JSON object per line, the text
under ``prompt_field``), ``.csv`` (a header row with a ``prompt_field`` column), or a dataset through the ``datasets``
library — a folder written by ``save_to_disk`` (read with ``load_from_disk``, offline) or a name for ``load_dataset``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

FILE_KINDS = (".txt", ".jsonl", ".csv")


def _field(row, field: str, where: str) -> str:
    if not isinstance(row, dict) or field not in row:
        keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"prompt_field: {where} has no field {field!r} (it has: {keys})")
    value = row[field]
    if not isinstance(value, str):
        raise ValueError(f"prompt_field: {where}: {field!r} is a {type(value).__name__}, not text")
    return value


def read_prompt_file(path, prompt_field: str = "prompt") -> list[str]:
    """Prompts of a .txt, .jsonl or .csv file, in file order."""
    path = Path(path)
    if path.suffix not in FILE_KINDS:
        raise ValueError(f"prompts_file: {path} is not a {', '.join(FILE_KINDS)} file")
    if not path.is_file():
        raise ValueError(f"prompts_file: no file {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"prompts_file: cannot read {path}: {err.__class__.__name__}: {err}") from None
    if path.suffix == ".txt":
        return [line for line in text.splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"prompts_file: {path} line {i} is not JSON ({err.msg})") from None
                out.append(_field(row, prompt_field, f"{path} line {i}"))
        return out
    rows = list(csv.DictReader(text.splitlines()))
    return [_field(row, prompt_field, f"{path} row {i}") for i, row in enumerate(rows, 2)]


def read_dataset(name_or_path: str, split: str = "train", prompt_field: str = "prompt") -> list[str]:
    """Prompts of a dataset: a save_to_disk folder (offline) or a `load_dataset` name."""
    try:
        import datasets
    except ImportError:
        raise ValueError("dataset: needs the `datasets` package (pip install datasets)") from None
    try:
        if Path(name_or_path).exists():
            ds = datasets.load_from_disk(name_or_path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"split: {name_or_path} has no split {split!r} (it has: {', '.join(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name_or_path, split=split)
    except ValueError:
        raise
    except Exception as err:  # datasets raises many kinds; each means "cannot load this"
        why = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ValueError(f"dataset: cannot load {name_or_path!r}: {why}") from None
    if prompt_field not in ds.column_names:
        raise ValueError(f"prompt_field: dataset {name_or_path!r} has no column {prompt_field!r} "
                         f"(it has: {', '.join(ds.column_names)})")
    return [_field({prompt_field: v}, prompt_field, f"dataset {name_or_path!r} row {i}")
            for i, v in enumerate(ds[prompt_field])]


def load_prompts(*, prompt: str | None = None, prompts_file=None, dataset: str | None = None, split: str = "train",
                 prompt_field: str = "prompt", n_prompts: int | None = None) -> list[str]:
    """The prompt set: from `prompts_file`, or `dataset`, or the single `prompt`; the first `n_prompts` of it."""
    if prompts_file is not None and dataset is not None:
        raise ValueError("dataset: give a `prompts_file` or a `dataset`, not both")
    if prompts_file is not None:
        out = read_prompt_file(prompts_file, prompt_field)
    elif dataset is not None:
        out = read_dataset(dataset, split, prompt_field)
    else:
        out = [prompt] if prompt is not None else []
    if n_prompts is not None:
        if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 1:
            raise ValueError(f"n_prompts: must be an integer ≥ 1 (got {n_prompts!r})")
        out = out[:n_prompts]
    source = ("prompts_file", f"{prompts_file} holds") if prompts_file is not None else \
        ("dataset", f"{dataset} holds") if dataset is not None else ("prompts", "the prompt set has")
    if not out:
        raise ValueError(f"{source[0]}: {source[1]} no prompt")
    for i, text in enumerate(out):
        if not text.strip():
            raise ValueError(f"{source[0]}: prompt {i} is empty")
    return out
