"""uint8 batch -> model input: raw / normalized values, vectorized crop + flip against a per-sample reference."""

import pytest
import torch
import torch.nn.functional as F

from spafl.data import Preprocess, preprocess_for
from spafl.data.transforms import CROP_PADDING, crop_flip, draw_crop_flip
from spafl.errors import UserError


@pytest.fixture
def batch():
    # 2 images, 3 channels, 2x2: hand-chosen values
    return torch.tensor(
        [[[[0, 255], [128, 64]], [[10, 20], [30, 40]], [[255, 255], [0, 0]]],
         [[[1, 2], [3, 4]], [[5, 6], [7, 8]], [[9, 10], [11, 12]]]],
        dtype=torch.uint8,
    )


def test_raw_is_plain_float(batch):
    pre = preprocess_for("fmnist", "raw")
    out = pre(batch[:, :1])
    assert out.dtype == torch.float32
    assert out[0, 0].tolist() == [[0.0, 255.0], [128.0, 64.0]]
    assert out[1, 0].tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_normalized_per_channel(batch):
    pre = preprocess_for("cifar10", "normalized", augment=False)
    out = pre(batch)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 2)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    assert out[0, 0, 0, 1].item() == pytest.approx((1.0 - 0.4914) / 0.2470, rel=1e-6)
    assert out[0, 0, 0, 0].item() == pytest.approx(-0.4914 / 0.2470, rel=1e-6)
    assert out[0, 1, 1, 0].item() == pytest.approx((30 / 255 - 0.4822) / 0.2435, rel=1e-6)
    assert out[1, 2, 1, 1].item() == pytest.approx((12 / 255 - 0.4465) / 0.2616, rel=1e-6)
    expect = torch.stack([(batch[:, c].double() / 255 - mean[c]) / std[c] for c in range(3)], 1)
    torch.testing.assert_close(out.double(), expect, rtol=1e-6, atol=1e-6)


def test_fmnist_stats_and_single_channel(batch):
    out = preprocess_for("fmnist", "normalized")(batch[:, :1])
    assert out[0, 0, 0, 1].item() == pytest.approx((1.0 - 0.2860) / 0.3530, rel=1e-6)


def test_defaults_and_no_augmentation_at_eval(batch):
    assert preprocess_for("cifar10", "normalized").augment is True
    assert preprocess_for("cifar100", "raw").augment is True
    assert preprocess_for("fmnist", "raw").augment is False
    assert preprocess_for("synthetic", "raw").augment is False
    assert preprocess_for("cifar10", "raw", augment=False).augment is False
    pre = preprocess_for("cifar10", "raw")
    g = torch.Generator().manual_seed(0)
    assert torch.equal(pre(batch, g, train=False), batch.float())  # eval: no augmentation
    assert torch.equal(preprocess_for("cifar10", "raw", augment=False)(batch, g, train=True), batch.float())


def test_bad_arguments():
    with pytest.raises(UserError, match="pixels must be one of raw, normalized"):
        preprocess_for("fmnist", "scaled")
    with pytest.raises(UserError, match="unknown dataset 'svhn'"):
        preprocess_for("svhn", "raw")
    with pytest.raises(UserError, match="std values must be > 0"):
        Preprocess(pixels="raw", mean=(0.5,), std=(0.0,), augment=False)


def _reference(x, rows, cols, flip, padding):
    """Per-sample crop/flip, the slow obvious way."""
    h, w = x.shape[2:]
    out = []
    for i in range(x.shape[0]):
        img = F.pad(x[i], (padding, padding, padding, padding))
        img = img[:, int(rows[i]):int(rows[i]) + h, int(cols[i]):int(cols[i]) + w]
        if flip[i]:
            img = img.flip(-1)
        out.append(img)
    return torch.stack(out)


@pytest.mark.parametrize("padding,shape", [(4, (9, 3, 8, 8)), (2, (6, 1, 5, 7))])
def test_crop_flip_matches_reference(padding, shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, shape, generator=g).to(torch.uint8)
    rows, cols, flip = draw_crop_flip(shape[0], padding, g)
    assert flip.any() and not flip.all()
    assert torch.equal(crop_flip(x, rows, cols, flip, padding), _reference(x, rows, cols, flip, padding))


def test_crop_flip_known_offsets():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.int64).reshape(2, 1, 6, 6).to(torch.uint8)
    p = CROP_PADDING
    centre = crop_flip(x, torch.tensor([p, p]), torch.tensor([p, p]), torch.tensor([False, True]), p)
    assert torch.equal(centre[0], x[0]) and torch.equal(centre[1], x[1].flip(-1))
    corner = crop_flip(x, torch.tensor([0, 2 * p]), torch.tensor([0, 2 * p]), torch.tensor([False, False]), p)
    assert corner[0, 0, :4].eq(0).all() and corner[0, 0, :, :4].eq(0).all()
    assert torch.equal(corner[0, 0, 4:, 4:], x[0, 0, :2, :2])  # window shifted up-left: pixel (0,0) lands at (4,4)
    assert torch.equal(corner[1, 0, :2, :2], x[1, 0, 4:, 4:]) and corner[1, 0, 2:].eq(0).all()


def test_preprocess_augment_uses_generator_only():
    x = torch.randint(0, 256, (16, 3, 32, 32), generator=torch.Generator().manual_seed(5)).to(torch.uint8)
    pre = preprocess_for("cifar10", "normalized")
    a = pre(x, torch.Generator().manual_seed(42), train=True)
    torch.manual_seed(0)  # global RNG state must not matter
    b = pre(x, torch.Generator().manual_seed(42), train=True)
    c = pre(x, torch.Generator().manual_seed(43), train=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # same offsets drawn from a generator with the same seed -> the per-sample reference
    rows, cols, flip = draw_crop_flip(16, CROP_PADDING, torch.Generator().manual_seed(42))
    expect = preprocess_for("cifar10", "normalized", augment=False)(_reference(x, rows, cols, flip, CROP_PADDING))
    assert torch.equal(a, expect)


def test_offsets_cover_range():
    rows, cols, flip = draw_crop_flip(4000, 4, torch.Generator().manual_seed(0))
    assert sorted(rows.unique().tolist()) == list(range(9)) and sorted(cols.unique().tolist()) == list(range(9))
    assert 0.45 < flip.float().mean().item() < 0.55
    assert rows.dtype == torch.int64 and flip.dtype == torch.bool
