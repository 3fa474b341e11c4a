"""Splitting a dataset over clients: Dirichlet (non-IID, SPEC §6), the CIFAR-100 reference's capped Dirichlet, and IID.

:func:`make_partition` picks one by the name the ``partition`` key holds
(:data:`PARTITIONS`).
"""

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


def _check_dirichlet(train_y, test_y, num_clients, alpha, min_client_samples, max_draws) -> tuple[np.ndarray, np.ndarray, int]:
    """The labels as arrays and the number of clients, once the arguments of a Dirichlet split are checked."""
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
    return ytr, yte, n_clients


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
    ytr, yte, n_clients = _check_dirichlet(train_y, test_y, num_clients, alpha, min_client_samples, max_draws)
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


#: Test images a client draws under ``partition=dirichlet_capped`` (the CIFAR-100 reference's constant).
SAMPLED_TEST_SIZE = 100


def capped_dirichlet_partition(
    train_y: torch.Tensor,
    test_y: torch.Tensor,
    num_clients: int,
    alpha: float,
    seed: int,
    min_client_samples: int = 0,
    test_size: int = SAMPLED_TEST_SIZE,
    max_draws: int = 1000,
) -> Partition:
    """The CIFAR-100 reference's split (``partition_data`` and ``load_partition_data_cifar100``, ``Split_data.py``).

    Training set, for each class c = 0..C-1 in turn: draw ``p ~ Dir(α·1_N)``,
    set ``p_k = 0`` for every client k that already holds at least
    ``n_train / N`` samples (the cap), renormalize, and cut the shuffled
    indices of class c at ``floor(cumsum(p)·n_c)``. The whole draw is repeated
    until every client holds ``min_client_samples``. A client may end above
    the cap: it is checked before a class is split, not during. As in the
    reference, the rounding remainder of a class (at most one sample) goes
    to the last client, capped or not.

    Test set, drawn for each client on its own: for each class c it holds,
    ``ceil(count_c / count · test_size)`` test images of class c (all of them
    if the class has fewer), sampled without replacement. Clients' test sets
    overlap (every one is a sample of the same test set), and each holds a
    little over ``test_size`` images, one rounded-up share per class: about
    118 for CIFAR-100 with α = 0.1. The share is computed as the reference
    does, in floating point, divided first.
    """
    ytr, yte, n_clients = _check_dirichlet(train_y, test_y, num_clients, alpha, min_client_samples, max_draws)
    if isinstance(test_size, bool) or not isinstance(test_size, (int, np.integer)) or test_size < 1:
        raise UserError(f"test_size must be an integer >= 1, got {test_size!r}")
    num_classes = int(max(ytr.max(initial=-1), yte.max(initial=-1))) + 1
    train_by_class = [np.flatnonzero(ytr == c) for c in range(num_classes)]
    test_by_class = [np.flatnonzero(yte == c) for c in range(num_classes)]
    rng = np.random.default_rng(seed)
    ones = np.full(n_clients, float(alpha))
    cap = ytr.size / n_clients
    for _ in range(max_draws):
        counts = np.zeros((n_clients, num_classes), dtype=np.int64)
        train_groups: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for c in range(num_classes):
            p = rng.dirichlet(ones) * (counts.sum(axis=1) < cap)
            idx = rng.permutation(train_by_class[c])
            if idx.size == 0:
                continue
            if not (np.isfinite(p).all() and p.sum() > 0):
                raise UserError(f"Dirichlet alpha={alpha} is too small to sample proportions; use a larger alpha")
            bounds = split_bounds(p / p.sum(), idx.size)
            counts[:, c] = np.diff(bounds)
            for k in range(n_clients):
                train_groups[k].append(idx[bounds[k]:bounds[k + 1]])
        if counts.sum(axis=1).min() >= min_client_samples:
            break
    else:
        raise UserError(
            f"no capped Dirichlet(alpha={alpha}) split in {max_draws} draws gave all {n_clients} clients >= "
            f"{min_client_samples} training samples; raise alpha, or lower num_clients or min_client_samples"
        )
    test_groups: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for k in range(n_clients):
        total = counts[k].sum()
        for c in np.flatnonzero(counts[k]):
            take = math.ceil(counts[k, c] / total * test_size)
            test_groups[k].append(rng.permutation(test_by_class[c])[:take])
    return Partition(
        train=_to_tensors([np.concatenate(g) if g else np.empty(0, np.int64) for g in train_groups]),
        test=_to_tensors([np.concatenate(g) if g else np.empty(0, np.int64) for g in test_groups]),
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


#: The values of the ``partition`` key, each the name of a split :func:`make_partition` makes.
PARTITIONS = ("dirichlet", "dirichlet_capped", "iid")


def make_partition(
    name: str, train_y: torch.Tensor, test_y: torch.Tensor, num_clients: int, alpha: float, seed: int, min_client_samples: int = 0,
) -> Partition:
    """The split named ``name`` (one of :data:`PARTITIONS`); ``alpha`` and ``min_client_samples`` are unused by ``iid``."""
    if name == "dirichlet":
        return dirichlet_partition(train_y, test_y, num_clients, alpha, seed, min_client_samples=min_client_samples)
    if name == "dirichlet_capped":
        return capped_dirichlet_partition(train_y, test_y, num_clients, alpha, seed, min_client_samples=min_client_samples)
    if name == "iid":
        return iid_partition(train_y, test_y, num_clients, seed)
    raise UserError(f"partition must be one of {', '.join(PARTITIONS)}; got {name!r}")
