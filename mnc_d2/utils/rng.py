"""Seeding python's, numpy's and torch's global RNGs: the data stream (per sample) and the training hooks (per
iteration) derive their seeds here, so that a resumed run draws what the uninterrupted one drew."""
import contextlib
import random

import numpy as np
import torch

__all__ = ["derive_seed", "preserved_rngs", "seeded_rngs", "seed_all_rngs"]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integers (e.g. run seed, position), well mixed by numpy's SeedSequence."""
    words = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_all_rngs(seed: int) -> None:
    """Seed python's, numpy's and torch's (all devices) global RNGs from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_rngs():
    """Run a block without changing the python/numpy/torch (CPU) RNG states seen after it."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Run a block with python/numpy/torch (CPU) RNGs seeded from ``seed``; restore their states after."""
    with preserved_rngs():
        seed_all_rngs(seed)
        yield
