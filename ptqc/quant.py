"""Power-of-two quantization arithmetic: integer ranges, exponent search, streamed activation histograms.

Everything here is plain numpy and independent of the graph.  A scale is always ``2.0**e`` with an integer
``e``; a quantizer is described by ``(bits, signed, e)``:

* signed b-bit:   q in [-2^(b-1), 2^(b-1)-1]
* unsigned b-bit: q in [0, 2^b-1]

and ``x_hat = 2^e * clip(round_half_even(x / 2^e), qmin, qmax)`` (ONNX QuantizeLinear semantics).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ptqc.errors import PtqcError


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integer range of a ``bits``-wide quantizer."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def is_pow2(x: float | np.ndarray) -> bool:
    """True when every element is exactly ``2**e`` for an integer ``e`` (as float32)."""
    arr = np.atleast_1d(np.asarray(x, dtype=np.float64))
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        return False
    mant, _ = np.frexp(arr)
    return bool(np.all(mant == 0.5)) and bool(np.all(arr.astype(np.float32).astype(np.float64) == arr))


def exponent_of(x: float | np.ndarray) -> np.ndarray:
    """``log2`` of exact powers of two, as integers."""
    _, exp = np.frexp(np.asarray(x, dtype=np.float64))
    return (exp - 1).astype(np.int64)


def quantize(x: np.ndarray, e: np.ndarray | int, bits: int, signed: bool) -> np.ndarray:
    """Integer codes of ``x`` on the grid ``2**e`` (``e`` broadcasts against ``x``), round half to even."""
    qmin, qmax = int_range(bits, signed)
    scaled = np.asarray(x, dtype=np.float64) * np.exp2(-np.asarray(e, dtype=np.float64))
    return np.clip(np.round(scaled), qmin, qmax).astype(np.int64)


def fake_quantize(x: np.ndarray, e: np.ndarray | int, bits: int, signed: bool) -> np.ndarray:
    return quantize(x, e, bits, signed) * np.exp2(np.asarray(e, dtype=np.float64))


#: an activation rounding border (AQuant) is a multiple of 1 / BORDER_STEPS in [0, 1]
BORDER_STEPS = 32


def border_codes(u: np.ndarray, border: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """AQuant's level-dependent rounding of ``u = x / 2^e`` (channels on axis 1) to codes in ``[lo, hi]``:
    ``k + 1[u >= k + border[c, k - lo]]`` with ``k = clip(floor(u), lo, hi - 1)``.  A border of 0.5 everywhere
    is round-half-up; ``border`` has one row per channel and one column per level ``lo .. hi - 1``."""
    k = np.clip(np.floor(u), lo, hi - 1)
    shape = (1, -1) + (1,) * (u.ndim - 2)
    channel = np.broadcast_to(np.arange(border.shape[0]).reshape(shape), u.shape)
    return (k + (u >= k + border[channel, (k - lo).astype(np.int64)])).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# Weights: one exponent per output channel, chosen by least squared error (not by rounding the max up).
# ----------------------------------------------------------------------------------------------------------

#: Exponent used for an all-zero weight row.  Any value quantizes zeros exactly; a moderate one keeps the
#: int32 bias of that channel in range.
ZERO_ROW_EXPONENT = -8


def no_clip_exponent(max_pos: np.ndarray, max_neg: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Smallest exponent whose grid covers ``[-max_neg, max_pos]`` without clipping."""
    qmin, qmax = int_range(bits, signed)
    need = max_pos / qmax
    if signed:
        need = np.maximum(need, max_neg / -qmin)
    with np.errstate(divide="ignore"):
        e = np.ceil(np.log2(need))
    return np.where(need > 0, e, ZERO_ROW_EXPONENT).astype(np.int64)


def weight_exponents(w2d: np.ndarray, bits: int, search: int = 6) -> np.ndarray:
    """Per-row power-of-two exponent of a (rows, k) weight matrix, signed symmetric ``bits``-bit.

    Tries the no-clip exponent and ``search - 1`` finer ones and keeps the one with the least squared
    error per row.
    """
    w = np.asarray(w2d, dtype=np.float64)
    e0 = no_clip_exponent(np.maximum(w.max(axis=1), 0), np.maximum(-w.min(axis=1), 0), bits, True)
    best_e = e0.copy()
    best_err = np.full(w.shape[0], np.inf)
    for delta in range(search):
        e = e0 - delta
        err = ((fake_quantize(w, e[:, None], bits, True) - w) ** 2).sum(axis=1)
        better = err < best_err
        best_err[better] = err[better]
        best_e[better] = e[better]
    return best_e


#: Per-channel weight grid offsets ptqc chooses from (``QuantConfig.weight_offsets``; inner layers of at most 6
#: bits): a row's values are ``2^e * (k + z)`` with integer codes ``k`` in the signed b-bit range, i.e. a zero
#: point of ``-z`` steps.  z = 1/2 is the midrise grid (levels +-1/2, +-3/2 ... steps, symmetric around zero), z = 1 and
#: z = -1/2 shift the lopsided window [-2^(b-1), 2^(b-1) - 1] the other way.  A half-integer z is stored at
#: half the step, as the odd integer ``2k + 2z`` at scale ``2^(e-1)``, so every scale stays a power of two.
WEIGHT_OFFSETS = (0.0, 0.5, 1.0, -0.5)


def offset_factor(z: np.ndarray) -> np.ndarray:
    """How many container units one grid step is: 2 for a half-integer offset, else 1."""
    return np.where(np.mod(np.asarray(z, dtype=np.float64), 1.0) != 0, 2, 1).astype(np.int64)


def container_window(bits: int, z: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row (lo, hi, step) of the container integers a ``bits``-wide row with offset ``z`` may hold: the
    values ``lo, lo + step, ..., hi``.  Without offsets, the signed b-bit range in steps of 1."""
    qmin, qmax = int_range(bits, True)
    if z is None:
        return np.array([qmin]), np.array([qmax]), np.array([1])
    m = offset_factor(z)
    return np.round(m * (qmin + z)).astype(np.int64), np.round(m * (qmax + z)).astype(np.int64), m


def bad_weight_codes(codes: np.ndarray, bits: int, offsets: np.ndarray | None, axis: int = 0) -> np.ndarray:
    """Mask of the container integers outside what a ``bits``-wide row with grid ``offsets`` (per channel along
    ``axis``, None = no offsets) may hold: outside ``[lo, hi]`` or off its step (an even value in a midrise row)."""
    lo, hi, step = container_window(bits, offsets)
    shape = [1] * codes.ndim
    shape[axis] = -1
    lo, hi, step = (a.reshape(shape) if offsets is not None else a.reshape([1] * codes.ndim) for a in (lo, hi, step))
    c = np.asarray(codes, np.int64)
    return (c < lo) | (c > hi) | ((c - lo) % step != 0)


def parse_offsets(text: str | None) -> np.ndarray | None:
    """The ``ptqc.offset`` metadata of a weight DequantizeLinear (per channel, space-separated) as an array."""
    return None if not text else np.array([float(t) for t in text.split()])


def quantize_offset(x: np.ndarray, e: np.ndarray, z: np.ndarray, bits: int) -> np.ndarray:
    """Codes k of ``x`` on the grid ``2^e * (k + z)``, nearest (ties to even), clipped to the signed range."""
    qmin, qmax = int_range(bits, True)
    u = np.asarray(x, dtype=np.float64) * np.exp2(-np.asarray(e, dtype=np.float64)) - z
    return np.clip(np.round(u), qmin, qmax).astype(np.int64)


def weight_grids(w2d: np.ndarray, bits: int, offsets=(0.0,), search: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (exponent, offset) of a (rows, k) weight matrix: the pair with the least squared error among the
    no-clip exponent and ``search - 1`` finer ones, and ``offsets``."""
    w = np.asarray(w2d, dtype=np.float64)
    e0 = no_clip_exponent(np.maximum(w.max(axis=1), 0), np.maximum(-w.min(axis=1), 0), bits, True)
    best_e, best_z = e0.copy(), np.zeros(w.shape[0])
    best_err = np.full(w.shape[0], np.inf)
    for delta in range(-1 if len(offsets) > 1 else 0, search):
        e = e0 - delta
        for z in offsets:
            k = quantize_offset(w, e[:, None], z, bits)
            err = (((k + z) * np.exp2(e[:, None].astype(np.float64)) - w) ** 2).sum(axis=1)
            better = err < best_err
            best_err[better] = err[better]
            best_e[better] = e[better]
            best_z[better] = z
    return best_e, best_z


# ----------------------------------------------------------------------------------------------------------
# Activations: a streamed histogram keyed by the float32 bit pattern.
# ----------------------------------------------------------------------------------------------------------

#: Mantissa bits kept per bin: 32 linear bins per octave (about 3% relative width).
MANT_BITS = 5
_SHIFT = 23 - MANT_BITS
_NBINS = 1 << (32 - _SHIFT)
_HALF = _NBINS // 2


def _bin_edges() -> tuple[np.ndarray, np.ndarray]:
    """Lower edge and width of every magnitude bin (the sign bit is handled separately)."""
    idx = np.arange(_HALF, dtype=np.int64)
    exp_field = idx >> MANT_BITS
    mant = idx & ((1 << MANT_BITS) - 1)
    octave = np.exp2(exp_field.astype(np.float64) - 127.0)
    lower = octave * (1.0 + mant / (1 << MANT_BITS))
    width = octave / (1 << MANT_BITS)
    # exponent field 0 holds zero and denormals: treat as exact zeros
    lower[exp_field == 0] = 0.0
    width[exp_field == 0] = 0.0
    return lower, width


_LOWER, _WIDTH = _bin_edges()
_NONFINITE = (np.arange(_HALF) >> MANT_BITS) == 255


@dataclasses.dataclass
class Histogram:
    """Counts of a tensor's values in float32-bit-pattern bins.

    Memory is fixed (16384 int64 counters) whatever the number of calibration images, and adding a batch is
    one shift and one ``bincount``.  Positive magnitudes live in ``counts[:8192]``, negative in the rest.
    """

    counts: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(_NBINS, dtype=np.int64))
    #: exact extremes of everything added (the bins alone would round them up to a bin edge)
    max_value: float = 0.0
    min_value: float = 0.0
    nonfinite_calls: int = 0

    #: Above this many values per call, a strided subsample is binned and its counts weighted back.
    MAX_SAMPLES = 1 << 22

    def add(self, x: np.ndarray, bins: bool = True, signed: bool = True) -> None:
        """Add a batch; ``bins=False`` tracks only the exact extremes (all the no-clip rule needs), and
        ``signed=False`` skips the minimum (a tensor the graph proves non-negative; max still catches NaN)."""
        flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        if flat.size == 0:
            return
        hi = float(flat.max())
        lo = float(flat.min()) if signed else 0.0
        if not (math.isfinite(hi) and math.isfinite(lo)):  # max/min propagate NaN: caught even if not sampled
            self.nonfinite_calls += 1
            return
        self.max_value = max(self.max_value, hi)
        self.min_value = min(self.min_value, lo)
        if not bins:
            return
        step = -(-flat.size // self.MAX_SAMPLES)
        sample = flat[::step] if step > 1 else flat
        counts = np.bincount(sample.view(np.uint32) >> _SHIFT, minlength=_NBINS)
        self.counts += counts * step if step > 1 else counts

    def add_extremes(self, hi: np.ndarray, lo: np.ndarray | None, check: np.ndarray) -> None:
        """Add the extremes of a batch reduced elsewhere (per-image maxima, minima or None for an unsigned
        tensor); ``check`` is any reduction of the same values that NaN and Inf propagate through (a mean),
        since max/min kernels need not propagate NaN."""
        hi_v = float(np.max(hi))
        lo_v = float(np.min(lo)) if lo is not None else 0.0
        if not (math.isfinite(hi_v) and math.isfinite(lo_v) and np.isfinite(check).all()):
            self.nonfinite_calls += 1
            return
        self.max_value = max(self.max_value, hi_v)
        self.min_value = min(self.min_value, lo_v)

    def merge(self, other: Histogram) -> Histogram:
        return Histogram(self.counts + other.counts, max(self.max_value, other.max_value),
                         min(self.min_value, other.min_value))

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def nonfinite(self) -> int:
        return self.nonfinite_calls + int(self.counts[:_HALF][_NONFINITE].sum() + self.counts[_HALF:][_NONFINITE].sum())

    def max_abs(self, negative: bool = False) -> float:
        """Largest magnitude seen on one side (exact)."""
        return max(-self.min_value, 0.0) if negative else max(self.max_value, 0.0)

    def mse(self, e: int, bits: int, signed: bool) -> float:
        """Mean squared quantization error of the histogrammed values on grid ``2**e``.

        Values are taken as uniform inside each bin; both the rounding error (exact per bin where the bin is
        narrower than a step, s^2/12 otherwise) and the clipping error are integrated.
        """
        qmin, qmax = int_range(bits, signed)
        s = 2.0 ** e
        total = self.total
        if total == 0:
            return 0.0
        err = _side_error(self.counts[:_HALF], s, qmax * s)
        err += _side_error(self.counts[_HALF:], s, -qmin * s)
        return err / total

    def mse_scale(self, s: float, bits: int, signed: bool) -> float:
        """Mean squared error on an arbitrary (not power-of-two) grid ``s``; bins are assigned by centre,
        so it is approximate where a bin straddles a rounding midpoint."""
        qmin, qmax = int_range(bits, signed)
        total = self.total
        if total == 0:
            return 0.0
        return (_side_error(self.counts[:_HALF], s, qmax * s) + _side_error(self.counts[_HALF:], s, -qmin * s)) / total

    def best_clip(self, bits: int, signed: bool, upper: float | None = None, steps: int = 48) -> float:
        """The clipping threshold (top of the grid) with the least squared error, searched continuously
        between 20% and 100% of the largest value (or ``upper``, when smaller)."""
        qmax = int_range(bits, signed)[1]
        top = self.max_abs(False) if not signed else max(self.max_abs(False), self.max_abs(True))
        if upper is not None:
            top = min(top, upper)
        if top <= 0:
            return top
        candidates = top * np.linspace(0.2, 1.0, steps)
        errs = [self.mse_scale(c / qmax, bits, signed) for c in candidates]
        return float(candidates[int(np.argmin(errs))])

    def best_exponent(self, bits: int, signed: bool, search: int = 10, method: str = "mse") -> int:
        """MSE-optimal power-of-two exponent, searched from the no-clip exponent downwards.

        ``method="max"`` returns the no-clip exponent itself; ``"auto"`` is :func:`resolve_method`'s choice.
        """
        method = resolve_method(method, bits, signed)
        if self.nonfinite:
            raise PtqcError("NaN or Inf values in calibration data")
        max_pos = self.max_abs(False)
        max_neg = self.max_abs(True)
        e0 = int(no_clip_exponent(np.array([max_pos]), np.array([max_neg if signed else 0.0]), bits, signed)[0])
        if (max_pos == 0 and max_neg == 0) or method == "max":
            return e0
        errs = {e: self.mse(e, bits, signed) for e in range(e0 - search + 1, e0 + 2)}
        return min(errs, key=lambda e: (errs[e], -e))


def _side_error(counts: np.ndarray, s: float, clip: float) -> float:
    """Summed squared error of one sign's magnitudes quantized on grid ``s`` and clipped at ``clip``."""
    nz = np.nonzero(counts * (~_NONFINITE))[0]
    if nz.size == 0:
        return 0.0
    n = counts[nz].astype(np.float64)
    a = _LOWER[nz]
    w = _WIDTH[nz]
    zero = w == 0
    b = a + w
    safe_w = np.where(zero, 1.0, w)
    # clipping: values above `clip`
    c0 = np.maximum(a, clip)
    clip_err = np.where(b > clip, n / safe_w * ((b - clip) ** 3 - (c0 - clip) ** 3) / 3.0, 0.0)
    # rounding: values below `clip`
    inside = np.clip(np.minimum(b, clip) - a, 0.0, None)
    frac = inside / safe_w
    g = s * np.round((a + w / 2) / s)
    d = a - g
    fine = n * (d * d + d * w + w * w / 3.0)
    coarse = n * frac * (s * s / 12.0)
    round_err = np.where(w >= s, coarse, np.where(inside > 0, fine, 0.0))
    total = np.where(zero, 0.0, clip_err + round_err)
    if clip <= 0:  # unsigned quantizer, negative side: everything clips to zero
        total = np.where(zero, 0.0, n * (a * a + a * w + w * w / 3.0))
    return float(total.sum())


def resolve_method(method: str, bits: int, signed: bool) -> str:
    """The exponent rule ``"auto"`` stands for: no clipping ("max") for unsigned 8-bit tensors, least squared
    error ("mse") for signed 8-bit tensors and everything below 8 bits.

    Signed 8-bit tensors (linear-bottleneck outputs and residual sums) are heavy-tailed: clipping their rare
    extremes buys a finer grid for the bulk.  w8a8, top-1 agreement with FP32 and logit SNR on 744 held-back
    calibration images (bench/fidelity.py), no clipping at 8 bits -> this rule: MobileNetV2 95.97 -> 97.18%,
    17.1 -> 20.0 dB; EfficientNet-Lite0 98.39 -> 98.79%, 19.4 -> 22.3 dB; MobileNetV1 97.04 -> 96.91%,
    22.6 -> 23.3 dB.  MSE on every 8-bit tensor as well did no better (97.45 / 98.92 / 96.77%) and histogramming
    the unsigned ones (mostly ReLU6 outputs, whose exponent absorb_clip_range fixes anyway) cost up to 3x the
    compile time (MobileNetV2 8.5 -> 25 s; this rule 12.9 s).
    """
    if method != "auto":
        return method
    return "max" if bits >= 8 and not signed else "mse"


def needs_histogram(method: str, bits: int, signed: bool) -> bool:
    """Whether an exponent rule reads the histogram (the no-clip rule needs only min/max)."""
    return resolve_method(method, bits, signed) != "max"
