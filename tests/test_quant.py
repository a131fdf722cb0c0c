"""The quantization arithmetic: power-of-two checks, exponent search, streamed histogram error."""

import numpy as np
import pytest

from ptqc.quant import Histogram, fake_quantize, int_range, is_pow2, needs_histogram, quantize, weight_exponents


def test_int_ranges():
    assert int_range(8, True) == (-128, 127)
    assert int_range(4, False) == (0, 15)
    assert int_range(2, True) == (-2, 1)


@pytest.mark.parametrize("value,expected", [(0.25, True), (2.0**-20, True), (1.0, True), (0.3, False),
                                            (3.0, False), (0.0, False), (-0.5, False), (float("nan"), False)])
def test_is_pow2(value, expected):
    assert is_pow2(value) is expected


def test_quantize_rounds_half_to_even_and_saturates():
    x = np.array([0.5, 1.5, 2.5, -1.5, 100.0, -100.0])
    assert quantize(x, 0, 4, True).tolist() == [0, 2, 2, -2, 7, -8]


def test_weight_exponents_are_least_squares_per_row():
    rng = np.random.default_rng(0)
    w = rng.laplace(0, 0.05, (16, 72))
    for bits in (2, 4, 8):
        exps = weight_exponents(w, bits)
        for row, e in zip(w, exps):
            errs = {c: ((fake_quantize(row, c, bits, True) - row) ** 2).sum() for c in range(-16, 2)}
            assert errs[int(e)] == pytest.approx(min(errs.values()), rel=1e-12)


@pytest.mark.parametrize("bits,signed", [(8, False), (4, True), (4, False), (2, True)])
def test_histogram_mse_matches_direct_computation(bits, signed):
    rng = np.random.default_rng(1)
    x = rng.laplace(0.2, 1.0, 100_000).astype(np.float32)
    if not signed:
        x = np.maximum(x, 0)
    h = Histogram()
    for chunk in np.array_split(x, 7):  # streamed in batches
        h.add(chunk)
    for e in range(-7, 2):
        direct = ((fake_quantize(x, e, bits, signed) - x) ** 2).mean()
        assert h.mse(e, bits, signed) == pytest.approx(direct, rel=0.02, abs=1e-7)


def test_best_exponent_is_the_direct_argmin():
    rng = np.random.default_rng(2)
    x = np.maximum(rng.normal(0.5, 1.0, 50_000), 0).astype(np.float32)
    h = Histogram()
    h.add(x)
    direct = {e: ((fake_quantize(x, e, 4, False) - x) ** 2).mean() for e in range(-8, 3)}
    assert h.best_exponent(4, False, method="mse") == min(direct, key=direct.get)
    # "max" never clips: the grid covers the largest value
    e = h.best_exponent(8, False, method="max")
    assert 255 * 2.0**e >= x.max() > 255 * 2.0 ** (e - 1)


def test_auto_clips_signed_8bit_tails_and_not_unsigned_ones():
    """At 8 bits "auto" is the MSE rule for a signed tensor (a heavy-tailed one then gets a finer grid than
    no-clip) and the no-clip rule for an unsigned one; below 8 bits it is MSE for both."""
    x = np.random.default_rng(3).standard_t(2, 200_000).astype(np.float32)  # heavy tails
    signed, unsigned = Histogram(), Histogram()
    signed.add(x)
    unsigned.add(np.abs(x))
    assert signed.best_exponent(8, True, method="auto") == signed.best_exponent(8, True, method="mse")
    assert signed.best_exponent(8, True, method="auto") < signed.best_exponent(8, True, method="max")
    assert unsigned.best_exponent(8, False, method="auto") == unsigned.best_exponent(8, False, method="max")
    assert unsigned.best_exponent(4, False, method="auto") == unsigned.best_exponent(4, False, method="mse")
    assert needs_histogram("auto", 8, True) and not needs_histogram("auto", 8, False) and needs_histogram("auto", 4, False)


def test_histogram_memory_is_fixed_and_flags_nonfinite():
    h = Histogram()
    size = h.counts.nbytes
    h.add(np.ones(1_000_000, np.float32))
    assert h.counts.nbytes == size and h.total == 1_000_000
    assert h.nonfinite == 0
    h.add(np.array([np.nan, np.inf], np.float32))
    assert h.nonfinite > 0
    # a single NaN in a tensor big enough to be subsampled is still caught
    big = np.zeros(Histogram.MAX_SAMPLES * 3, np.float32)
    big[1] = np.nan
    h2 = Histogram()
    h2.add(big)
    assert h2.nonfinite > 0


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_continuous_clip_is_never_worse_than_the_best_power_of_two_range(bits):
    rng = np.random.default_rng(3)
    x = np.minimum(np.maximum(rng.normal(0.4, 1.0, 100_000), 0), 6).astype(np.float32)
    h = Histogram()
    h.add(x)
    qmax = (1 << bits) - 1
    clip = h.best_clip(bits, False, upper=6.0)
    e = h.best_exponent(bits, False, method="mse")
    direct = lambda s: float(((np.clip(np.round(x / s), 0, qmax) * s - x) ** 2).mean())  # noqa: E731
    assert direct(clip / qmax) <= direct(2.0**e) * 1.001
    assert 0 < clip <= 6.0
