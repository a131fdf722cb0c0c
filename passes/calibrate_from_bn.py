"""Data-free calibration: activation statistics from the BatchNorm parameters the model carries.

A BatchNormalization output has, per channel, mean ``beta`` and standard deviation ``|gamma|`` on the data
it was trained on.  The pass propagates a per-channel Gaussian (mean, standard deviation) and hard bounds
through the folded graph, in topological order:

* graph input: ImageNet's pixel mean and standard deviation (123.7/116.3/103.5 and 58.4/57.1/57.4) pushed
  through the preprocessing, bounded by the preprocessed 0 and 255;
* a Conv/Gemm that absorbed a BatchNorm: ``N(beta, gamma^2)`` per channel; without one, the mean and
  variance of the linear map under independent inputs;
* Relu/Clip: the exact mean and variance of the clipped Gaussian, and the clip bounds;
* Add: means and variances add (inputs taken as independent); Concat stacks channels; pooling and shape ops
  keep the channel statistics (a spatial sum multiplies by the window area, its spread by ``SUM_SPREAD``).

Guarantees after the pass:

* Every planned activation has ``meta[HIST]``: extremes ``max_c min(mean_c + SIGMAS * sd_c, bound)`` (and the
  matching minimum) of the Gaussian that generates it (for a Relu/Clip output, the pre-activation one, cut
  at the clip bounds), and a histogram of samples drawn from those Gaussians (seeded, clipped to the
  bounds), so every exponent rule works unchanged.
* Every weighted layer's input has ``meta[MEAN]``, the propagated per-channel mean, for the bias correction
  (the analytical bias correction of data-free quantization, Nagel et al. 2019).
* An op the propagation does not know stops the pass with a :class:`PtqcError` naming it; a model without any
  BatchNorm is refused before that, with what to pass instead.
"""

from __future__ import annotations

__all__ = ["CalibrateFromBnPass", "clipped_normal_moments"]

import logging
import math

import numpy as np
import onnx_ir as ir
from ptqc.passes.fold_batchnorm import const
from ptqc.passes.plan_quantization import clip_bounds

from ptqc.annotations import ACT, BN, HIST, MEAN, PASSTHROUGH_OPS, WEIGHT
from ptqc.data import Preprocess
from ptqc.errors import PtqcError
from ptqc.quant import Histogram

logger = logging.getLogger(__name__)

#: extremes are taken at mean +- SIGMAS standard deviations (then cut by the bounds)
SIGMAS = 6.0
#: samples drawn per tensor for the histogram
SAMPLES = 1 << 16
#: spread of a spatial mean relative to the spread of the values it averages (neighbouring activations are
#: strongly correlated, so it is far above 1/sqrt(area))
SUM_SPREAD = 0.5
#: ImageNet pixel statistics (0-255), the prior for an image input
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))


def _pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def clipped_normal_moments(mu: np.ndarray, sd: np.ndarray, lo: float | None, hi: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of ``clip(X, lo, hi)`` for ``X ~ N(mu, sd^2)`` (per element; None = no bound)."""
    mu = np.asarray(mu, np.float64)
    sd = np.maximum(np.asarray(sd, np.float64), 1e-12)
    a = -np.inf if lo is None else float(lo)
    b = np.inf if hi is None else float(hi)
    za, zb = (a - mu) / sd, (b - mu) / sd
    ca, cb = _cdf(za), _cdf(zb)
    pa, pb = _pdf(za), _pdf(zb)
    mid = cb - ca
    # terms of the bounded parts; each vanishes for an infinite bound
    ta = a * ca if math.isfinite(a) else 0.0
    tb = b * (1.0 - cb) if math.isfinite(b) else 0.0
    ta2 = a * a * ca if math.isfinite(a) else 0.0
    tb2 = b * b * (1.0 - cb) if math.isfinite(b) else 0.0
    za_pa = za * pa if math.isfinite(a) else 0.0
    zb_pb = zb * pb if math.isfinite(b) else 0.0
    m1 = ta + tb + mu * mid + sd * (pa - pb)
    m2 = ta2 + tb2 + (mu * mu + sd * sd) * mid + 2.0 * mu * sd * (pa - pb) + sd * sd * (za_pa - zb_pb)
    return m1, np.sqrt(np.maximum(m2 - m1 * m1, 0.0))


class _Stats:
    """One tensor, per channel: its mean and standard deviation, and the Gaussian that, clipped to the hard
    bounds ``[lo, hi]``, models its values (after a Relu/Clip, the pre-activation Gaussian)."""

    __slots__ = ("gmu", "gsd", "hi", "lo", "mu", "sd")

    def __init__(self, mu, sd, lo: float = -np.inf, hi: float = np.inf, gmu=None, gsd=None):
        self.mu = np.asarray(mu, np.float64).reshape(-1)
        self.sd = np.asarray(sd, np.float64).reshape(-1)
        self.lo, self.hi = lo, hi
        self.gmu = self.mu if gmu is None else np.asarray(gmu, np.float64).reshape(-1)
        self.gsd = self.sd if gsd is None else np.asarray(gsd, np.float64).reshape(-1)


class CalibrateFromBnPass(ir.passes.InPlacePass):
    """Activation histograms and layer-input means from BatchNorm statistics, without data."""

    def __init__(self, preprocess: Preprocess):
        super().__init__()
        self.preprocess = preprocess

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        layers = [n for n in graph if WEIGHT in n.meta]
        with_bn = sum(1 for n in layers if BN in n.meta)
        if with_bn == 0:
            raise PtqcError("data-free calibration needs BatchNormalization statistics, and this model has none "
                            "(they were folded before export); pass --calib with images or a .npy of inputs")
        stats: dict[str, _Stats] = {}
        input_value = next(v for v in graph.inputs if v.name not in graph.initializers)
        stats[input_value.name] = self._input_stats(input_value)
        for node in graph:
            out = self._propagate(node, stats)
            if out is not None:
                stats[node.outputs[0].name] = out
        planned = [v for v in graph.inputs if ACT in v.meta] + [v for n in graph for v in n.outputs if ACT in v.meta]
        rng = np.random.default_rng(0)
        for v in planned:
            st = stats.get(v.name)
            if st is None:
                raise PtqcError(f"data-free calibration found no statistics for tensor {v.name}")
            v.meta[HIST] = self._histogram(st, v.meta[ACT].signed, rng)
        for node in layers:
            st = stats.get(node.inputs[0].name)
            if st is not None and st.mu.size > 1:
                node.inputs[0].meta[MEAN] = st.mu.copy()
        model.graph.meta["ptqc.calib_samples"] = 0
        pre = self.preprocess
        logger.warning("no calibration data: activation ranges derived from the BatchNorm statistics of %d of %d "
                       "layers (data-free; input statistics through mean %s, std %s)", with_bn, len(layers),
                       "/".join(f"{m:g}" for m in pre.mean), "/".join(f"{s:g}" for s in pre.std))
        return ir.passes.PassResult(model, modified=False)

    def _input_stats(self, v: ir.Value) -> _Stats:
        pre = self.preprocess
        mean, std = np.array(pre.mean), np.array(pre.std)
        channels = v.shape[1] if v.shape is not None and len(v.shape) == 4 and isinstance(v.shape[1], int) else 3
        if channels != 3:
            raise PtqcError(f"data-free calibration assumes an RGB image input; {v.name} has {channels} channels")
        mu = (np.array(IMAGENET_MEAN) - mean) / std
        sd = np.array(IMAGENET_STD) / std
        lo, hi = float(np.min((0.0 - mean) / std)), float(np.max((255.0 - mean) / std))
        return _Stats(mu, sd, lo, hi)

    def _propagate(self, node: ir.Node, stats: dict[str, _Stats]) -> _Stats | None:
        op = node.op_type
        data = [stats.get(i.name) if i is not None else None for i in node.inputs]
        if op in ("Shape", "Constant") or not node.outputs:
            return None
        x = data[0] if data else None
        if all(d is None for d in data) or (x is None and op not in ("Add", "Concat")):
            return None  # shape arithmetic or constants: no activation flows in
        if op in ("Conv", "Gemm", "MatMul") and WEIGHT in node.meta:
            bn = node.meta.get(BN)
            if bn is not None:
                return _Stats(bn.beta, np.abs(bn.gamma))
            return self._linear(node, x)
        if op in ("Relu", "Clip"):
            bounds = clip_bounds(node)
            if bounds is None:
                raise PtqcError(f"data-free calibration: {node.name} ({op}) has non-constant bounds")
            lo, hi = bounds
            new_lo = max(x.lo, lo) if lo is not None else x.lo
            new_hi = min(x.hi, hi) if hi is not None else x.hi
            # the moments of the generating Gaussian clipped to the new bounds
            mu, sd = clipped_normal_moments(x.gmu, x.gsd, None if math.isinf(new_lo) else new_lo,
                                            None if math.isinf(new_hi) else new_hi)
            return _Stats(mu, sd, new_lo, new_hi, x.gmu, x.gsd)
        if op == "Add":
            parts = [d for d in data if d is not None]
            consts = [const(i) for i, d in zip(node.inputs, data) if d is None]
            if not parts or any(c is None for c in consts):
                raise PtqcError(f"data-free calibration cannot follow {node.name} (Add)")
            mu = sum(p.mu for p in parts) + sum(np.asarray(c, np.float64).reshape(-1) for c in consts)
            sd = np.sqrt(sum(p.sd**2 for p in parts))
            return _Stats(mu, sd, sum(p.lo for p in parts), sum(p.hi for p in parts))
        if op == "Concat":
            if node.attributes.get_int("axis", 0) != 1 or any(d is None for d in data):
                raise PtqcError(f"data-free calibration follows Concat only along channels ({node.name})")
            return _Stats(np.concatenate([d.mu for d in data]), np.concatenate([d.sd for d in data]),
                          min(d.lo for d in data), max(d.hi for d in data),
                          np.concatenate([d.gmu for d in data]), np.concatenate([d.gsd for d in data]))
        if op in ("ReduceSum", "GlobalAveragePool", "AveragePool", "ReduceMean"):
            area = 1.0
            if op == "ReduceSum":
                shape = node.inputs[0].shape
                dims = [d for d in (shape[2:] if shape is not None else []) if isinstance(d, int)]
                area = float(np.prod(dims)) if dims else 1.0
            return _Stats(x.mu * area, x.sd * area * SUM_SPREAD, x.lo * area, x.hi * area)
        if op in PASSTHROUGH_OPS or op == "Pad":
            return _Stats(x.mu, x.sd, x.lo, x.hi, x.gmu, x.gsd)
        raise PtqcError(f"data-free calibration cannot propagate statistics through {node.name} ({op}); "
                        "pass --calib")

    @staticmethod
    def _linear(node: ir.Node, x: _Stats) -> _Stats:
        """Mean and spread of a weighted layer without BatchNorm, its inputs taken as independent."""
        w = const(node.inputs[1]).astype(np.float64)
        b = const(node.inputs[2]).astype(np.float64).reshape(-1) if len(node.inputs) > 2 and node.inputs[2] is not None else 0.0
        if node.op_type == "Conv":
            groups = node.attributes.get_int("group", 1)
            n_out, c_per = w.shape[0], w.shape[1]
            group_of = np.arange(n_out) // (n_out // groups)
            idx = group_of[:, None] * c_per + np.arange(c_per)[None, :]
            taps = w.reshape(n_out, c_per, -1)
            mu = (taps.sum(axis=2) * x.mu[idx]).sum(axis=1) + b
            var = ((taps**2).sum(axis=2) * (x.sd[idx] ** 2)).sum(axis=1)
        else:
            w2 = w.T if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else w  # (K, N)
            mu = x.mu @ w2 + b
            var = (x.sd**2) @ (w2**2)
        return _Stats(mu, np.sqrt(var))

    @staticmethod
    def _histogram(st: _Stats, signed: bool, rng: np.random.Generator) -> Histogram:
        c = st.gmu.size
        per = max(16, SAMPLES // c)
        draws = rng.standard_normal((c, per)) * st.gsd[:, None] + st.gmu[:, None]
        draws = np.clip(draws, st.lo, st.hi)
        h = Histogram()
        h.add(draws.astype(np.float32), bins=True, signed=True)
        h.max_value = float(max(0.0, np.max(np.minimum(st.gmu + SIGMAS * st.gsd, st.hi))))
        h.min_value = float(min(0.0, np.min(np.maximum(st.gmu - SIGMAS * st.gsd, st.lo)))) if signed else 0.0
        return h
