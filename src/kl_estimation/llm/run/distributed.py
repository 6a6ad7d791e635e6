r"""Data parallel under torchrun: each rank draws whole forward batches of the run's units, rank 0 writes the files.

``torchrun --nproc-per-node N LLM_experiments.py …`` sets WORLD_SIZE / RANK / LOCAL_RANK; :func:`from_env` then joins
the process group (nccl when the run is on CUDA, gloo otherwise) and returns a :class:`Shard` for this rank. Without
those variables it returns :data:`ONE` and imports nothing: a plain run never touches torch.distributed.

Why the records do not depend on N: every unit (prompt × proposal × batch) has its own random stream, and the units
still to draw are packed into forward batches exactly as a one-process run packs them (llm.pack); rank k then takes
batches k, k + N, k + 2N, … So every batch has the same rows, padding and shapes as in the one-process run, and draws
the same records. Each rank appends its finished batches to ``<slug>.rank<k>.partial.jsonl``; a resumed run reads
every partial file of the proposal (any earlier N, or a one-process run's ``<slug>.partial.jsonl``), so a kill loses
at most the batches in flight. The ranks exchange their records at the end of each proposal (all_gather_object), so
every rank returns the whole run; only rank 0 writes the final files.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from pathlib import Path

ENV = ("WORLD_SIZE", "RANK")


@dataclass(frozen=True)
class Shard:
    """This process's part of the run: rank `rank` of `world_size`. ``ONE`` is the whole run in one process."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or _initialised()

    @property
    def writes_final(self) -> bool:
        return self.rank == 0

    def mine(self, batches: list) -> list:
        """This rank's forward batches (round robin over the one-process packing)."""
        return batches[self.rank::self.world_size]

    def partial(self, folder, slug: str) -> Path:
        """Where this rank appends its finished batches."""
        name = f"{slug}.rank{self.rank}.partial.jsonl" if self.distributed else f"{slug}.partial.jsonl"
        return Path(folder) / name

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, done: dict) -> dict:
        """Every rank's newly drawn {unit: records}, merged, on every rank."""
        if not self.distributed:
            return dict(done)
        import torch.distributed as dist

        parts = [None] * self.world_size
        dist.all_gather_object(parts, done)
        merged = {}
        for part in parts:
            merged.update(part)
        return merged


ONE = Shard()


def partial_files(folder, slug: str) -> list[Path]:
    """Every partial file of a proposal: a one-process run's and each rank's of any earlier world size."""
    folder = Path(folder)
    return sorted(p for p in [folder / f"{slug}.partial.jsonl", *folder.glob(f"{slug}.rank*.partial.jsonl")]
                  if p.exists())


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE and RANK)."""
    return all(k in os.environ for k in ENV)


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 without a launcher), before any process group is joined."""
    return _int_env("RANK") if launched() else 0


def _initialised() -> bool:
    if not launched():
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _int_env(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: the launcher set {name}={value!r}, not an integer") from None


def local_gpus(n_visible: int) -> list[int]:
    """The GPUs of this rank: one per process (LOCAL_RANK) or, when there are more GPUs than processes on the node,
    an equal contiguous slice (for --device-map auto inside each rank). Raises when there are fewer GPUs than ranks."""
    local_rank = _int_env("LOCAL_RANK", 0)
    local_world = _int_env("LOCAL_WORLD_SIZE", 1)
    if n_visible < local_world:
        raise ValueError(f"device: torchrun started {local_world} processes on this node but "
                         f"{'no GPU is' if n_visible == 0 else f'only {n_visible} GPUs are'} visible; nccl needs one "
                         f"GPU per process: use `device` cpu (gloo), or --nproc-per-node {max(n_visible, 1)}")
    per = n_visible // local_world
    return list(range(local_rank * per, (local_rank + 1) * per))


def from_env(device: str = "auto") -> Shard:
    """This process's Shard: ONE without torchrun (nothing imported, nothing initialised); under torchrun, join the
    process group — nccl when `device` is CUDA ('auto' with GPUs visible, 'cuda'), gloo otherwise — after pinning
    this rank to its GPU, and wait until every rank is there (so no rank writes while another still checks)."""
    if not launched():
        return ONE
    import torch
    import torch.distributed as dist

    rank, world = _int_env("RANK"), _int_env("WORLD_SIZE")
    if not dist.is_available():
        raise ValueError("device: torchrun launched this run but this torch build has no torch.distributed")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"device: torchrun with `device` {device} (backend nccl) but CUDA is not available on this "
                         f"machine; use `device` cpu (backend gloo)")
    if cuda and device in ("auto", "cuda"):
        torch.cuda.set_device(local_gpus(torch.cuda.device_count())[0])
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
        # a rank that exits while others still write (rank 0: summary, figures) must take its group down itself:
        # left to the interpreter's teardown, gloo's threads can abort the process ("terminate called without an
        # active exception"), and torchrun then kills the ranks still working
        atexit.register(_leave, dist)
    dist.barrier()
    return Shard(dist.get_rank(), dist.get_world_size())


def _leave(dist) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def current() -> Shard:
    """The Shard of an already joined process group (under torchrun), else ONE; never initialises anything."""
    if not _initialised():
        return ONE
    import torch.distributed as dist

    return Shard(dist.get_rank(), dist.get_world_size())
