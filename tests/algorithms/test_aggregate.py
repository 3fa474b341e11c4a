"""The server's weighted mean: hand-computed values, one rounding at the end, dtype, degenerate weights."""

import pytest
import torch

from spafl.algorithms.aggregate import weighted_mean


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def test_uniform_weights_give_the_plain_mean():
    assert torch.equal(weighted_mean([t(1.0, 2.0), t(3.0, 6.0)], [1.0, 1.0]), t(2.0, 4.0))
    assert torch.equal(weighted_mean([t(0.0), t(3.0), t(9.0)], [1.0, 1.0, 1.0]), t(4.0))


def test_sample_weights():
    # (3 * 0 + 1 * 4) / 4 = 1, (3 * 10 + 1 * 2) / 4 = 8
    assert torch.equal(weighted_mean([t(0.0, 10.0), t(4.0, 2.0)], [3.0, 1.0]), t(1.0, 8.0))
    # (100 * 1 + 300 * -1) / 400 = -0.5; a client with weight 0 counts for nothing
    assert torch.equal(weighted_mean([t(1.0), t(-1.0), t(123.0)], [100.0, 300.0, 0.0]), t(-0.5))
    # weights need not sum to 1, and only their ratios matter
    assert torch.equal(weighted_mean([t(2.0), t(8.0)], [0.5, 1.5]), weighted_mean([t(2.0), t(8.0)], [1.0, 3.0]))


def test_weights_summing_to_zero_count_as_equal():
    assert torch.equal(weighted_mean([t(1.0, -2.0), t(5.0, 4.0)], [0.0, 0.0]), t(3.0, 1.0))


def test_one_tensor_comes_back_unchanged():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(weighted_mean([x], [17.0]), x)


def test_rounded_once_at_the_end():
    # Equal tensors average to themselves exactly. Summing float32 products with
    # float32 coefficients w / sum(w) does not: ten 1.0s give 1 + 2**-23, seven
    # 3.0s give 3 + 2**-22.
    assert torch.equal(weighted_mean([t(1.0)] * 10, [1.0] * 10), t(1.0))
    assert torch.equal(weighted_mean([t(3.0)] * 7, [1.0] * 7), t(3.0))
    # 1/3 rounded once to float32
    assert torch.equal(weighted_mean([t(1.0), t(0.0), t(0.0)], [1.0, 1.0, 1.0]), t(1 / 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_result_has_the_tensors_shape_and_dtype(dtype):
    tensors = [torch.full((2, 3), 2.0, dtype=dtype), torch.full((2, 3), 4.0, dtype=dtype)]
    mean = weighted_mean(tensors, [1.0, 3.0])
    assert mean.dtype == dtype and mean.shape == (2, 3)
    assert torch.equal(mean, torch.full((2, 3), 3.5, dtype=dtype))


def test_inputs_are_not_changed():
    a, b = t(1.0, 2.0), t(3.0, 4.0)
    weighted_mean([a, b], [1.0, 1.0])
    assert torch.equal(a, t(1.0, 2.0)) and torch.equal(b, t(3.0, 4.0))


def test_no_tensors_or_a_weight_per_tensor_missing_is_an_error():
    with pytest.raises(ValueError, match="one weight per tensor"):
        weighted_mean([], [])
    with pytest.raises(ValueError, match="one weight per tensor"):
        weighted_mean([t(1.0), t(2.0)], [1.0])


def test_stacked_mean_sums_in_the_tensors_dtype_as_the_reference_does():
    from spafl.algorithms.aggregate import stacked_mean

    thirds = [torch.full((4,), value) for value in (0.1, 0.2, 0.3)]
    # each term x/3 rounded to float32 and summed in float32, against float64 terms rounded once at the end
    assert stacked_mean(thirds, [1.0] * 3).tolist() == [0.20000001788139343] * 4
    assert weighted_mean(thirds, [1.0] * 3).tolist() == [0.20000000298023224] * 4  # float32(0.2)
    assert stacked_mean([torch.tensor([2.0]), torch.tensor([5.0])], [1.0, 3.0]).item() == 4.25  # (2 + 15) / 4
