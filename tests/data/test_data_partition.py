"""Dirichlet and IID client partitions."""


import numpy as np
import pytest
import torch

from spafl.data import Partition, dirichlet_partition, iid_partition
from spafl.errors import UserError


@pytest.fixture(scope="module")
def labels():
    rng = np.random.default_rng(123)
    ytr = torch.from_numpy(rng.integers(0, 10, 5000))
    yte = torch.from_numpy(rng.integers(0, 10, 1000))
    return ytr, yte


def _check_disjoint_complete(parts: list[torch.Tensor], n: int) -> None:
    for t in parts:
        assert t.dtype == torch.int64 and t.dim() == 1
        assert torch.equal(t, torch.sort(t).values)
    allidx = torch.cat(parts)
    assert allidx.numel() == n
    assert torch.equal(torch.sort(allidx).values, torch.arange(n))


def _class_counts(p: Partition, y: torch.Tensor, which: str, num_classes: int) -> np.ndarray:
    parts = p.train if which == "train" else p.test
    return np.stack([np.bincount(y[t].numpy(), minlength=num_classes) for t in parts])  # [clients, classes]


@pytest.mark.parametrize("alpha", [0.1, 1.0])
def test_dirichlet_disjoint_and_complete(labels, alpha):
    ytr, yte = labels
    p = dirichlet_partition(ytr, yte, 20, alpha, seed=0)
    assert p.num_clients == 20 and len(p.test) == 20
    _check_disjoint_complete(p.train, ytr.numel())
    _check_disjoint_complete(p.test, yte.numel())


def test_dirichlet_test_follows_train_proportions(labels):
    ytr, yte = labels
    p = dirichlet_partition(ytr, yte, 15, 0.3, seed=4)
    ctr = _class_counts(p, ytr, "train", 10)
    cte = _class_counts(p, yte, "test", 10)
    ntr = np.bincount(ytr.numpy(), minlength=10)
    nte = np.bincount(yte.numpy(), minlength=10)
    # floor(cumsum(p)·n) puts each count within 1/n of p·n: fractions differ by < 1/n_train + 1/n_test.
    gap = np.abs(ctr / ntr - cte / nte)
    assert (gap < 1 / ntr + 1 / nte).all()
    # Label skew is real: with alpha=0.3 most clients miss some class.
    assert (ctr == 0).sum() > 15


def test_dirichlet_exact_boundaries(labels):
    """Replay SPEC §6 with the same rng: per class, p ~ Dir(α·1), train/test cut at floor(cumsum(p)·n)."""
    ytr, yte = labels
    n_clients, alpha, seed = 8, 0.5, 11
    p = dirichlet_partition(ytr, yte, n_clients, alpha, seed=seed)
    rng = np.random.default_rng(seed)
    for c in range(10):
        tr_c = np.flatnonzero(ytr.numpy() == c)
        te_c = np.flatnonzero(yte.numpy() == c)
        props = rng.dirichlet(np.full(n_clients, alpha))
        tr_shuffled = rng.permutation(tr_c)
        te_shuffled = rng.permutation(te_c)
        for idx, shuffled, parts in ((tr_c, tr_shuffled, p.train), (te_c, te_shuffled, p.test)):
            bounds = np.floor(np.cumsum(props) * idx.size).astype(int)
            bounds[-1] = idx.size
            starts = np.concatenate(([0], bounds[:-1]))
            for k in range(n_clients):
                got = parts[k].numpy()
                got_c = got[np.isin(got, idx)]
                np.testing.assert_array_equal(got_c, np.sort(shuffled[starts[k]:bounds[k]]))


def test_min_client_samples_redraws(labels):
    ytr, yte = labels
    first = dirichlet_partition(ytr, yte, 20, 0.1, seed=1)
    assert min(first.train_sizes()) < 50  # the first draw would not do ...
    p = dirichlet_partition(ytr, yte, 20, 0.1, seed=1, min_client_samples=50)
    assert min(p.train_sizes()) >= 50  # ... so it was redrawn
    assert not all(torch.equal(a, b) for a, b in zip(first.train, p.train))
    _check_disjoint_complete(p.train, ytr.numel())
    _check_disjoint_complete(p.test, yte.numel())


def test_impossible_request_fails_fast(labels):
    ytr, yte = labels
    # max_draws=1: the size check must come before any draw, or the error would be the give-up one
    with pytest.raises(UserError, match=r"100 clients at least 51 .* 5100 .* has 5000; lower num_clients or min_client_samples"):
        dirichlet_partition(ytr, yte, 100, 0.1, seed=0, min_client_samples=51, max_draws=1)


def test_gives_up_after_max_draws(labels):
    ytr, yte = labels
    with pytest.raises(UserError, match="in 3 draws"):
        dirichlet_partition(ytr, yte, 10, 0.01, seed=0, min_client_samples=500, max_draws=3)


def test_dirichlet_seeded(labels):
    ytr, yte = labels
    a = dirichlet_partition(ytr, yte, 10, 0.5, seed=3)
    b = dirichlet_partition(ytr, yte, 10, 0.5, seed=3)
    c = dirichlet_partition(ytr, yte, 10, 0.5, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.train + a.test, b.train + b.test))
    assert not all(torch.equal(x, y) for x, y in zip(a.train, c.train))


@pytest.mark.parametrize("kwargs,msg", [
    (dict(num_clients=0, alpha=1.0), "num_clients must be an integer >= 1"),
    (dict(num_clients=5, alpha=0.0), "alpha must be a finite number > 0"),
    (dict(num_clients=5, alpha=float("nan")), "alpha must be a finite number > 0"),
    (dict(num_clients=5, alpha=1.0, min_client_samples=-1), "min_client_samples must be an integer >= 0"),
])
def test_dirichlet_validation(labels, kwargs, msg):
    ytr, yte = labels
    with pytest.raises(UserError, match=msg):
        dirichlet_partition(ytr, yte, seed=0, **kwargs)


def test_one_client_gets_everything(labels):
    ytr, yte = labels
    p = dirichlet_partition(ytr, yte, 1, 0.1, seed=0)
    assert torch.equal(p.train[0], torch.arange(ytr.numel()))
    assert torch.equal(p.test[0], torch.arange(yte.numel()))


def test_iid(labels):
    ytr, yte = labels
    p = iid_partition(ytr, yte, 7, seed=2)
    assert p.num_clients == 7
    assert sorted(p.train_sizes()) == [714] * 5 + [715] * 2
    assert max(p.train_sizes()) - min(p.train_sizes()) <= 1 and sum(p.train_sizes()) == 5000
    assert max(p.test_sizes()) - min(p.test_sizes()) <= 1 and sum(p.test_sizes()) == 1000
    _check_disjoint_complete(p.train, 5000)
    _check_disjoint_complete(p.test, 1000)
    q = iid_partition(ytr, yte, 7, seed=2)
    r = iid_partition(ytr, yte, 7, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(p.train, q.train))
    assert not torch.equal(p.train[0], r.train[0])
    # shuffled: a client's indices are spread over the whole range, not a contiguous block
    assert p.train[0][-1] - p.train[0][0] > 4000
    with pytest.raises(UserError, match="num_clients"):
        iid_partition(ytr, yte, 0, seed=0)
