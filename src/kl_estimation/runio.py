"""Run folders and files, for every area (synthetic, toy --sequence, sampled LLM, corpus): the one owner of a run
folder while a run uses it (RunFolder: its lock, its cleanup), files written atomically (temp file + rename), alone
or together (files_together), a folder's earlier files removed in one place (remove)."""
from __future__ import annotations

import csv
import functools
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
LOCK = ".run.lock"  # inside the run folder while a run holds it; removed when the run ends


class RunFolderError(ValueError):
    """A folder that is not a readable run folder, or a selection that names nothing in it."""


def versions(*packages: str) -> dict:
    return dict(_versions(packages))


@functools.lru_cache(maxsize=None)
def _versions(packages: tuple) -> dict:  # a metadata lookup scans sys.path (~10 ms); installs do not change mid-run
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


# inside files_together: (temp file, final path) of each write, renamed at the block's end, then the `done` calls
_staged: list | None = None
_done: list | None = None


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide results from other users
        if _staged is None:
            os.replace(tmp, path)
        else:
            _staged.append((tmp, path))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _signals_held():
    """SIGINT and SIGTERM recorded, not acted on, during the block (main thread only: signal handlers live there);
    the first one is raised again after it, to whatever handler was in place. A signal mask would not do: a process's
    signal goes to any thread that does not block it (torch's workers), and Python then runs its handler anyway."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, lambda signum, frame: held.append(signum))
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if held:
            signal.raise_signal(held[0])


@contextmanager
def files_together(done=None):
    """The write_* calls in the block land together at its end, in the order made, or none does: an exception or a
    Ctrl-C midway leaves the folder as it was. The renames, then `done()`, run with SIGINT and SIGTERM held back, so
    a caller interrupted as they end can tell from what `done` recorded that everything was written. A block inside
    another joins it: its files land, and its `done` runs, with the outer block's."""
    global _staged, _done
    if _staged is not None:
        _done.append(done)
        yield
        return
    staged, calls = _staged, _done = [], [done]
    try:
        yield
        with _signals_held():
            while staged:
                os.replace(*staged[0])
                staged.pop(0)
            for call in calls:
                if call is not None:
                    call()
    finally:
        _staged = _done = None
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)


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


def write_text(path: Path, text: str) -> None:
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


def new_run_dir(kind: str, root: Path = Path("results")) -> Path:
    """A new timestamped folder under <root>/<kind>/ (created here, so two runs started in the same second still
    get folders of their own), for a run not given a folder."""
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


def remove(paths) -> None:
    """Remove an earlier run's files and folders (a run with `overwrite`)."""
    for f in paths:
        if Path(f).is_dir():
            shutil.rmtree(f)
        else:
            Path(f).unlink(missing_ok=True)


def remove_if_empty(folder, parents: int = 0) -> None:
    """Remove `folder` if it holds nothing (a run that wrote nothing leaves no empty folder behind), then each of its
    `parents` nearest parent folders left empty (the root new_run_dir made for it: tests2/, tests2/corpus/)."""
    folder = Path(folder) if folder is not None else None
    for _ in range(parents + 1):
        if folder is None or not folder.is_dir() or any(folder.iterdir()):
            return
        folder.rmdir()
        folder = folder.parent


class RunFolder:
    """One run's hold on its folder, as a context manager: the folder is created if needed and locked (``.run.lock``,
    a filelock that the OS drops if the process dies); a second run on a folder in use is refused with a ValueError
    naming the folder (the command line: one line, exit status 2) instead of mixing its files with the first run's.
    On exit the lock file goes, and a folder this run created and wrote nothing to is removed.

    `flag` names the setting in the error (``output_dir``); `fresh`: the caller made the folder for this run
    (new_run_dir), so it goes too if nothing was written; `resume`: the run continues one in this folder, so a
    missing folder is refused (naming ``resume``) rather than silently run from scratch. Only the process that
    writes takes the lock (under torchrun, rank 0: ``hold=False`` elsewhere)."""

    def __init__(self, path, flag: str = "output_dir", *, fresh: bool = False, resume: bool = False,
                 hold: bool = True):
        self.path, self.flag, self.hold, self.fresh, self.resume = Path(path), flag, hold, fresh, resume
        self._lock, self._created = None, False

    def __enter__(self) -> Path:
        if self.resume and not self.path.is_dir():
            raise ValueError(f"resume: {self.path} does not exist, so there is nothing to continue; give the folder "
                             f"of the run to continue, or drop `resume` to start a new run")
        if not self.hold:
            return self.path
        from filelock import FileLock, Timeout

        check_output_dir(self.path, self.flag)
        self._created = self.fresh or not self.path.exists()
        lock = None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.path / LOCK)
            while True:
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    raise ValueError(f"{self.flag}: {self.path} is in use by another run (lock {self.path / LOCK}); "
                                     f"wait for it to end, or choose another folder") from None
                if (self.path / LOCK).exists():
                    break
                lock.release()  # the run we waited on removed the file between our open and our lock: lock anew
        except BaseException:  # refused, or Ctrl-C right now: a folder made for this run goes
            if lock is not None and lock.is_locked:
                (self.path / LOCK).unlink(missing_ok=True)
                lock.release()
            self._give_up()
            raise
        self._lock = lock
        return self.path

    def _give_up(self) -> None:
        if self._created:
            remove_if_empty(self.path)

    def __exit__(self, *exc) -> None:
        if self._lock is None:
            return
        try:
            (self.path / LOCK).unlink(missing_ok=True)
            self._lock.release()
        finally:
            self._lock = None
            self._give_up()


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
