"""Every random choice derives from (seed, purpose, ids...), never from hidden global state.

That makes a run reproducible, resumable from a checkpoint without saving RNG
streams, and reproducible by another engine (Flower) that only knows the
seed, the client id and the round.
"""

from __future__ import annotations

import numpy as np
import torch

_PURPOSES = {"model_init": 1, "partition": 2, "sampling": 3, "client_train": 4, "eval_clients": 5}


def derive_seed(seed: int, purpose: str, *ids: int) -> int:
    """A 63-bit seed that depends only on ``seed``, ``purpose`` and ``ids``."""
    entropy = [int(seed), _PURPOSES[purpose], *(int(i) for i in ids)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]) & ((1 << 63) - 1)


def generator(seed: int, purpose: str, *ids: int) -> torch.Generator:
    """A CPU torch generator seeded by :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose, *ids))


def sample_clients(seed: int, round_index: int, num_clients: int, clients_per_round: int) -> list[int]:
    """Clients of round ``round_index``: uniform without replacement, sorted.

    Depends only on (seed, round, N, K): the same for every method and engine.
    """
    rng = np.random.default_rng(derive_seed(seed, "sampling", round_index))
    chosen = rng.choice(num_clients, size=clients_per_round, replace=False)
    return sorted(int(c) for c in chosen)
