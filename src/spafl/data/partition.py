"""Splitting a dataset over clients: Dirichlet (non-IID, SPEC §6) and IID."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from spafl.errors import UserError


@dataclass
class Partition:
    """Per-client index sets: ``train[k]`` / ``test[k]`` are sorted int64 indices into the train / test set."""

    train: list[torch.Tensor]
    test: list[torch.Tensor]

    @property
    def num_clients(self) -> int:
        return len(self.train)

    def train_sizes(self) -> list[int]:
        return [int(t.numel()) for t in self.train]

    def test_sizes(self) -> list[int]:
        return [int(t.numel()) for t in self.test]


def _labels(y, what: str) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {y.shape}")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0):
        raise ValueError(f"{what} must hold non-negative integer class labels")
    return y.astype(np.int64, copy=False)


def _check_num_clients(num_clients, num_train: int) -> int:
    """``num_clients`` as an int in 1..``num_train``: more clients than training samples is refused before any allocation."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise UserError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if num_clients > num_train:
        raise UserError(f"num_clients={num_clients} exceeds the {num_train} training samples; lower num_clients")
    return int(num_clients)


def _to_tensors(groups: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.sort(g).astype(np.int64, copy=False)) for g in groups]


def split_bounds(p: np.ndarray, n: int) -> np.ndarray:
    """Cut points that split ``n`` items by proportions ``p``: ``floor(cumsum(p) * n)``, last one forced to ``n``.

    Returns ``len(p) + 1`` non-decreasing integers from 0 to n; client k gets
    items ``bounds[k]:bounds[k+1]``.
    """
    b = np.floor(np.cumsum(p) * n).astype(np.int64)
    b = np.minimum(b, n)
    b[-1] = n
    return np.concatenate(([0], b))


def dirichlet_partition(
    train_y: torch.Tensor,
    test_y: torch.Tensor,
    num_clients: int,
    alpha: float,
    seed: int,
    min_client_samples: int = 0,
    max_draws: int = 1000,
) -> Partition:
    """Dirichlet(α) label-skew split; each client's test split follows its training class proportions.

    With ``rng = numpy.random.default_rng(seed)``, for each class c = 0..C-1:
    draw ``p ~ Dir(α·1_N)``, shuffle the training indices of class c and cut
    them at ``floor(cumsum(p)·n_c)`` (see :func:`split_bounds`), shuffle the
    test indices of class c and cut them by the same p. The whole draw is
    repeated (same rng, continuing) until every client has at least
    ``min_client_samples`` training samples, at most ``max_draws`` times.
    """
    ytr = _labels(train_y, "train_y")
    yte = _labels(test_y, "test_y")
    n_clients = _check_num_clients(num_clients, ytr.size)
    if not (isinstance(alpha, (int, float, np.floating)) and math.isfinite(alpha) and alpha > 0):
        raise UserError(f"Dirichlet alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(min_client_samples, bool) or not isinstance(min_client_samples, (int, np.integer)) or min_client_samples < 0:
        raise UserError(f"min_client_samples must be an integer >= 0, got {min_client_samples!r}")
    if not isinstance(max_draws, (int, np.integer)) or max_draws < 1:
        raise UserError(f"max_draws must be an integer >= 1, got {max_draws!r}")
    if n_clients * min_client_samples > ytr.size:
        raise UserError(
            f"cannot give {n_clients} clients at least {min_client_samples} training samples each: that needs "
            f"{n_clients * min_client_samples} but the training set has {ytr.size}; lower num_clients or min_client_samples"
        )

    num_classes = int(max(ytr.max(initial=-1), yte.max(initial=-1))) + 1
    # Indices of each class, ascending (stable starting order before each shuffle).
    train_by_class = [np.flatnonzero(ytr == c) for c in range(num_classes)]
    test_by_class = [np.flatnonzero(yte == c) for c in range(num_classes)]
    rng = np.random.default_rng(seed)
    ones = np.full(n_clients, float(alpha))

    for _ in range(max_draws):
        counts = np.zeros(n_clients, dtype=np.int64)
        draw = []  # per class: (shuffled train idx, train bounds, shuffled test idx, test bounds)
        for c in range(num_classes):
            p = rng.dirichlet(ones)
            if not np.isfinite(p).all():
                raise UserError(f"Dirichlet alpha={alpha} is too small to sample proportions; use a larger alpha")
            tr = rng.permutation(train_by_class[c])
            te = rng.permutation(test_by_class[c])
            btr = split_bounds(p, tr.size)
            bte = split_bounds(p, te.size)
            counts += np.diff(btr)
            draw.append((tr, btr, te, bte))
        if counts.min() >= min_client_samples:
            train_groups = [[] for _ in range(n_clients)]
            test_groups = [[] for _ in range(n_clients)]
            for tr, btr, te, bte in draw:
                for k in range(n_clients):
                    train_groups[k].append(tr[btr[k]:btr[k + 1]])
                    test_groups[k].append(te[bte[k]:bte[k + 1]])
            return Partition(
                train=_to_tensors([np.concatenate(g) if g else np.empty(0, np.int64) for g in train_groups]),
                test=_to_tensors([np.concatenate(g) if g else np.empty(0, np.int64) for g in test_groups]),
            )
    raise UserError(
        f"no Dirichlet(alpha={alpha}) split in {max_draws} draws gave all {n_clients} clients >= {min_client_samples} "
        "training samples; raise alpha, or lower num_clients or min_client_samples"
    )


def iid_partition(train_y: torch.Tensor, test_y: torch.Tensor, num_clients: int, seed: int) -> Partition:
    """Seeded shuffle, then near-equal contiguous chunks (sizes differ by at most one) of train and test."""
    ytr = _labels(train_y, "train_y")
    yte = _labels(test_y, "test_y")
    n_clients = _check_num_clients(num_clients, ytr.size)
    rng = np.random.default_rng(seed)
    tr = rng.permutation(ytr.size)
    te = rng.permutation(yte.size)
    return Partition(train=_to_tensors(np.array_split(tr, n_clients)), test=_to_tensors(np.array_split(te, n_clients)))
