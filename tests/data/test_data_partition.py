"""Dirichlet, capped Dirichlet (CIFAR-100 reference) and IID client partitions."""


import math

import numpy as np
import pytest
import torch

from spafl.config import build_config
from spafl.data import Partition, dirichlet_partition, iid_partition, load_dataset
from spafl.data.partition import PARTITIONS, SAMPLED_TEST_SIZE, capped_dirichlet_partition, make_partition
from spafl.errors import UserError
from spafl.keys import choices_of

from tests.data.fakes import write_fake_cifar


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


# -- capped Dirichlet: the CIFAR-100 reference's split (main/cifar100/Split_data.py) -----------------------------


def _assert_capped_split(p: Partition, ytr: torch.Tensor, yte: torch.Tensor, num_classes: int, test_size: int) -> np.ndarray:
    """Check, from the split alone, the two rules of the reference; return the train class counts [clients, classes]."""
    _check_disjoint_complete(p.train, ytr.numel())
    ctr = _class_counts(p, ytr, "train", num_classes)
    cap = ytr.numel() / p.num_clients
    held_before = np.cumsum(ctr, axis=1) - ctr  # what each client held when class c was split
    # a client at or over the cap when class c comes gets none of it; the last client, as in the reference,
    # takes the rounding remainder of the cut (floor(cumsum(p) * n) may stop one short of n) even when capped
    capped = held_before >= cap
    assert (ctr[:-1][capped[:-1]] == 0).all()
    assert (ctr[-1][capped[-1]] <= 1).all()
    available = np.bincount(yte.numpy(), minlength=num_classes)
    for k, test in enumerate(p.test):
        assert torch.equal(test, torch.unique(test))  # sorted, no image twice within a client
        got = np.bincount(yte[test].numpy(), minlength=num_classes)
        total = ctr[k].sum()
        # the reference's share, in floating point divided first: ceil(count_c / count * test_size)
        want = np.array([min(math.ceil(ctr[k, c] / total * test_size), available[c]) for c in range(num_classes)])
        np.testing.assert_array_equal(got, want)
    return ctr


def test_capped_dirichlet_on_cifar100_sized_labels_gives_about_118_test_images_per_client():
    """50,000 / 10,000 labels as CIFAR-100 (500 / 100 per class), 100 clients, alpha 0.1, min 10: the reference's setting."""
    ytr = torch.arange(50_000) % 100
    yte = torch.arange(10_000) % 100
    p = capped_dirichlet_partition(ytr, yte, 100, 0.1, seed=0, min_client_samples=10)
    ctr = _assert_capped_split(p, ytr, yte, 100, SAMPLED_TEST_SIZE)
    sizes = np.array(p.test_sizes())
    # one rounded-up share per class held: at least 100 each, about 118 on average
    assert sizes.min() >= 100 and 110 < sizes.mean() < 126
    # 11,800-odd draws from 10,000 images: clients' test sets overlap
    assert sizes.sum() > 10_000 and torch.unique(torch.cat(p.test)).numel() < sizes.sum()
    # the cap binds: clients reach 500 before the last class and are then passed over (checked above)
    assert min(p.train_sizes()) >= 10
    assert ((np.cumsum(ctr, axis=1) - ctr)[:, :-1] >= 500).any(axis=1).sum() >= 10


def test_capped_dirichlet_test_share_uses_the_references_float_rounding():
    """One client takes all: 11 of class 0 and 9 of class 1. 11/20*100 is 55.000000000000007 in floating point,
    so the reference draws ceil = 56 test images of class 0 (exact arithmetic would give 55), and 45 of class 1."""
    ytr = torch.tensor([0] * 11 + [1] * 9)
    yte = torch.tensor([0, 1] * 60 + [2] * 5)
    p = capped_dirichlet_partition(ytr, yte, 1, 0.1, seed=0)
    assert torch.equal(p.train[0], torch.arange(20))
    assert np.bincount(yte[p.test[0]].numpy(), minlength=3).tolist() == [56, 45, 0]
    # with a smaller test_size the share shrinks: ceil(11/20*10) = 6, ceil(9/20*10) = ceil(4.5) = 5
    q = capped_dirichlet_partition(ytr, yte, 1, 0.1, seed=0, test_size=10)
    assert np.bincount(yte[q.test[0]].numpy(), minlength=3).tolist() == [6, 5, 0]


def test_capped_dirichlet_on_official_format_cifar100_files(tmp_path):
    write_fake_cifar(tmp_path, "cifar100", num_train=600, num_test=300, seed=2)
    data = load_dataset("cifar100", tmp_path, download=False)
    p = make_partition("dirichlet_capped", data.train_y, data.test_y, 6, 0.1, seed=5, min_client_samples=10)
    assert p.num_clients == 6 and min(p.train_sizes()) >= 10
    _assert_capped_split(p, data.train_y, data.test_y, 100, SAMPLED_TEST_SIZE)
    # 3 test images per class here: a client holding c classes can draw at most 3c of them
    assert all(size <= 3 * int((np.bincount(data.train_y[t].numpy(), minlength=100) > 0).sum())
               for size, t in zip(p.test_sizes(), p.train))
    again = make_partition("dirichlet_capped", data.train_y, data.test_y, 6, 0.1, seed=5, min_client_samples=10)
    assert all(torch.equal(a, b) for a, b in zip(p.train + p.test, again.train + again.test))


def test_capped_dirichlet_redraws_and_validates(labels):
    ytr, yte = labels
    first = capped_dirichlet_partition(ytr, yte, 20, 0.1, seed=3)
    assert min(first.train_sizes()) < 30  # the first draw would not do ...
    p = capped_dirichlet_partition(ytr, yte, 20, 0.1, seed=3, min_client_samples=30)
    assert min(p.train_sizes()) >= 30  # ... so it was redrawn
    _assert_capped_split(p, ytr, yte, 10, SAMPLED_TEST_SIZE)
    with pytest.raises(UserError, match="no capped Dirichlet.alpha=0.01. split in 2 draws gave all 10 clients >= 499"):
        capped_dirichlet_partition(ytr, yte, 10, 0.01, seed=0, min_client_samples=499, max_draws=2)
    with pytest.raises(UserError, match="^test_size must be an integer >= 1, got 0$"):
        capped_dirichlet_partition(ytr, yte, 10, 0.1, seed=0, test_size=0)
    with pytest.raises(UserError, match="alpha must be a finite number > 0"):
        capped_dirichlet_partition(ytr, yte, 10, -1.0, seed=0)


def test_make_partition_names_match_the_partition_key():
    assert PARTITIONS == choices_of("partition") == ("dirichlet", "dirichlet_capped", "iid")
    assert build_config("cifar100-paper").partition == "dirichlet_capped"
    assert build_config("cifar10-paper").partition == build_config("fmnist-paper").partition == "dirichlet"
    with pytest.raises(UserError, match="^partition must be one of dirichlet, dirichlet_capped, iid; got 'capped'$"):
        build_config("cifar100-paper", overrides={"partition": "capped"})
    ytr, yte = torch.arange(40) % 4, torch.arange(8) % 4
    with pytest.raises(UserError, match="^partition must be one of dirichlet, dirichlet_capped, iid; got 'capped'$"):
        make_partition("capped", ytr, yte, 2, 0.1, seed=0)
    plain = make_partition("dirichlet", ytr, yte, 2, 0.5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(plain.train, dirichlet_partition(ytr, yte, 2, 0.5, seed=3).train))
    iid = make_partition("iid", ytr, yte, 2, 0.5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(iid.train, iid_partition(ytr, yte, 2, seed=3).train))
