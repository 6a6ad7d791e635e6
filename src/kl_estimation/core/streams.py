"""Random streams derived from a seed and names (never positions in a loop): narrowing a run, re-packing its work
or resuming it leaves every other stream, and so every other number, unchanged."""
from __future__ import annotations

import zlib

import numpy as np


def _key(name) -> int:
    return zlib.crc32(name.encode()) if isinstance(name, str) else int(name)


def named_stream(seed: int, *names) -> np.random.Generator:
    """A numpy Generator for (seed, *names); names are strings (hashed) or non-negative integers."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=tuple(_key(n) for n in names)))


def torch_stream(seed: int, *names, device="cpu"):
    """A torch.Generator on `device` for (seed, *names), seeded from the same SeedSequence as named_stream."""
    import torch

    ss = np.random.SeedSequence(seed, spawn_key=tuple(_key(n) for n in names))
    return torch.Generator(device=device).manual_seed(int(ss.generate_state(1, np.uint64)[0] >> 1))
