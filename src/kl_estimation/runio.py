"""Run folders and files: results.json / distributions.npz / summary.csv, written atomically (temp file + rename)."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime
from importlib import metadata
from pathlib import Path

import numpy as np

RESULTS, ARRAYS, SUMMARY = "results.json", "distributions.npz", "summary.csv"


def versions(*packages: str) -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("kl-estimation", "numpy", "scipy", *packages):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def jsonable(obj):
    """Plain JSON: numpy scalars/arrays to Python, NaN and ±inf to None (strict JSON has no such numbers)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if hasattr(obj, "to_dict") and not isinstance(obj, type):  # records such as verdicts.Flag
        return jsonable(obj.to_dict())
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide results from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def replaced_folder(final: Path, prefix: str = ".building-"):
    """Build a folder in a temporary sibling that replaces `final` only if the block succeeds: never half-written."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def write_json(path: Path, obj) -> None:
    text = json.dumps(jsonable(obj), indent=1, ensure_ascii=False, allow_nan=False)
    _atomic_write(path, lambda fh: fh.write(text.encode()))


def write_npz(path: Path, arrays: dict) -> None:
    _atomic_write(path, lambda fh: np.savez(fh, **arrays))


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    # every row's fields, in first-seen order: rows may differ (a prompt with an exact head has head_* fields)
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), lineterminator="\n")
    writer.writeheader()
    writer.writerows(jsonable(rows))
    _atomic_write(path, lambda fh: fh.write(buf.getvalue().encode()))


def check_output_dir(path: str | Path | None, flag: str = "output_dir", default: Path | None = None) -> None:
    """Fail early (before any work) when `path` cannot become a writable folder; with `path` None, when the
    `default` folder used instead cannot."""
    if path is None:
        if default is not None and (why := _unwritable(Path(default))):
            raise ValueError(f"{flag}: not given, and the default folder {default} cannot be created here ({why}); "
                             f"give a writable folder with `{flag}`")
        return
    if why := _unwritable(Path(path)):
        raise ValueError(f"{flag}: cannot write to {path} ({why})")


def _unwritable(p: Path) -> str | None:
    if p.exists() and not p.is_dir():
        return f"{p} exists and is not a folder"
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe.resolve()} is not writable"
    return None


def make_run_dir(path: str | Path | None, kind: str, root: Path = Path("results")) -> Path:
    """`path` itself, or a new timestamped folder under <root>/<kind>/ (created here, so two runs started in the
    same second still get folders of their own)."""
    if path is not None:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        return p
    base = Path(root) / kind
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    for i in range(1000):
        p = base / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            p.mkdir(parents=True)
            return p
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run folder under {base}")



def append_jsonl(path: Path, obj) -> None:
    """Append one JSON line and flush it to disk: a run killed later keeps every line written before."""
    line = json.dumps(jsonable(obj), ensure_ascii=False, allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: Path) -> list:
    """Every complete line; a last line cut short by a kill is dropped."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break
            out.append(json.loads(line))
    return out
