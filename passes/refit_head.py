"""Head refit: fit the last layer to the float model's output from the quantized features it really gets.

Every earlier pass fits a layer or a block to the float values it would see in the float model.  The last
layer (the classifier) reads features that carry the whole network's quantization error, and at low
activation widths that error is large and structured (MobileNetV2 w2a4: about 1 dB of logit SNR).  A
linear layer can undo part of it: this pass runs the simulated quantized model and the float model on the
calibration data, and fits the last layer's weights and bias by ridge regression from the quantized input
to the float model's output, shrunk towards the current weights.  The ridge strength comes from 5-fold
cross-validation over the calibration images (each image's samples stay in one fold).

Least squares from a noisy input attenuates (the MMSE map, docs/design.md), and through fifty layers the
attenuation compounds; here nothing follows but shape ops, so it does not.

The pass guarantees, for each layer with role "last" (``plan_quantization``) that is a Gemm, a MatMul or an
unpadded stride-1 1x1 Conv with one group, whose output carries no quantizer:

* it is changed only when the cross-validated squared error against the float model's output, at the best
  ridge strength, is at least ``min_gain`` below the current weights' (else it is left exactly as it was);
* then its bias and its weights are the ridge solution on all calibration images, the weights rounded to
  nearest on their per-channel power-of-two grid of the layer's width (exponents chosen again) and the bias
  legalized as ``legalize_scales`` does it (the pass runs after that one, on the features the written
  model computes, int32 biases included);
* no op is added, and every scale stays a power of two.
"""

from __future__ import annotations

__all__ = ["RefitHeadPass", "HeadStats", "ridge_refit"]

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from ptqc import progress, runtime, simulate
from ptqc.annotations import ACT, WEIGHT
from ptqc.data import Dataset
from ptqc.passes.calibrate import float_session, run_batch
from ptqc.passes.legalize_scales import legalize_bias
from ptqc.passes.pot_scales import channel_view, weight_matrix
from ptqc.quant import quantize, weight_exponents

logger = logging.getLogger(__name__)

#: cross-validation folds; ridge strengths tried, relative to the mean diagonal of the input second moment
FOLDS = 5
STRENGTHS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
#: skip a layer whose per-fold statistics would exceed this many float64 numbers (about 1.6 GB)
MAX_STAT_NUMBERS = 200_000_000


@dataclasses.dataclass
class HeadStats:
    """Per-fold sufficient statistics of ``min ||A dW - R||^2``: A the inputs with a ones column, R the float
    output minus the current layer's output on the quantized input."""

    gram: np.ndarray  # (folds, d, d): A^T A
    cross: np.ndarray  # (folds, d, n): A^T R
    resid: np.ndarray  # (folds,): ||R||^2
    samples: np.ndarray  # (folds,): rows

    @classmethod
    def empty(cls, d: int, n: int, folds: int = FOLDS) -> HeadStats:
        return cls(np.zeros((folds, d, d)), np.zeros((folds, d, n)), np.zeros(folds), np.zeros(folds, np.int64))

    def add(self, fold: int, a: np.ndarray, r: np.ndarray) -> None:
        self.gram[fold] += a.T @ a
        self.cross[fold] += a.T @ r
        self.resid[fold] += float((r * r).sum())
        self.samples[fold] += len(a)


def _solve(gram: np.ndarray, cross: np.ndarray, strengths) -> list[np.ndarray]:
    """Ridge solutions ``(G + l s I)^-1 C`` for each strength l, s the mean diagonal of G."""
    d, v = np.linalg.eigh(gram)
    proj = v.T @ cross
    scale = max(float(np.trace(gram)) / len(gram), 1e-30)
    return [v @ (proj / (d + lam * scale)[:, None]) for lam in strengths]


def _error(gram: np.ndarray, cross: np.ndarray, resid: float, dw: np.ndarray) -> float:
    """``||A dW - R||^2`` from the statistics."""
    return float(np.sum(dw * (gram @ dw)) - 2.0 * np.sum(dw * cross) + resid)


def ridge_refit(stats: HeadStats, strengths=STRENGTHS, min_gain: float = 0.01) -> tuple[np.ndarray | None, dict]:
    """The weight change ``dW`` (d x n) at the cross-validated best strength, or None when no strength lowers
    the held-out error by ``min_gain`` (relative) or a fold is empty; and what was measured."""
    info = {"base": float(stats.resid.sum())}
    if np.any(stats.samples == 0) or info["base"] <= 0.0:
        return None, info
    total_g, total_c = stats.gram.sum(0), stats.cross.sum(0)
    cv = np.zeros(len(strengths))
    for k in range(len(stats.samples)):
        for i, dw in enumerate(_solve(total_g - stats.gram[k], total_c - stats.cross[k], strengths)):
            cv[i] += _error(stats.gram[k], stats.cross[k], stats.resid[k], dw)
    best = int(np.argmin(cv))
    info.update(cv=cv / info["base"], strength=strengths[best])
    if cv[best] > (1.0 - min_gain) * info["base"]:
        return None, info
    return _solve(total_g, total_c, [strengths[best]])[0], info


def _as_matrix(w: np.ndarray, axis: int) -> np.ndarray:
    """The weight as (inputs, outputs): what a sample row of the input multiplies."""
    return weight_matrix(w, axis).T


def _from_matrix(m: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Inverse of :func:`_as_matrix` for a weight of ``shape``."""
    moved = list(shape)
    moved.insert(0, moved.pop(axis))
    return np.moveaxis(m.T.reshape(moved), 0, axis)


def _rows(node: ir.Node, t: np.ndarray) -> np.ndarray:
    """A layer input or output as rows, one per sample: (N, K) for Gemm/MatMul, one per position for a 1x1 Conv."""
    if node.op_type == "Conv":
        return np.moveaxis(t, 1, -1).reshape(-1, t.shape[1])
    return t.reshape(-1, t.shape[-1])


def _bias(node: ir.Node) -> np.ndarray:
    return node.meta[WEIGHT].computed_bias(node.inputs[0].meta[ACT].exp)


def _supported(node: ir.Node) -> str | None:
    """Why this last layer cannot be refitted, or None."""
    wq = node.meta[WEIGHT]
    if wq.q is None or wq.exps is None:
        return "it is not quantized"
    if ACT in node.outputs[0].meta:
        return "its output is quantized"
    if ACT not in node.inputs[0].meta:
        return "its input is not quantized"
    if node.op_type == "Conv":
        shape = node.inputs[1].const_value.shape if node.inputs[1].const_value is not None else None
        attrs = node.attributes
        if (shape is None or any(int(k) != 1 for k in shape[2:]) or attrs.get_int("group", 1) != 1
                or any(s != 1 for s in (attrs.get_ints("strides", None) or [1]))
                or any(p != 0 for p in (attrs.get_ints("pads", None) or [0]))):
            return "only unpadded stride-1 1x1 convolutions are refitted"
    elif node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return "Gemm with transA"
    elif node.op_type != "MatMul":
        return f"{node.op_type} is not refitted"
    return None


class RefitHeadPass(ir.passes.InPlacePass):
    """Ridge-refit the last layer(s) from the quantized features to the float output, cross-validated."""

    def __init__(self, data: Dataset, batch_size: int = 16, samples: int | None = None, min_gain: float = 0.01):
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.samples = samples
        self.min_gain = min_gain

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        heads = []
        for node in model.graph:
            wq = node.meta.get(WEIGHT)
            if wq is None or wq.role != "last":
                continue
            why = _supported(node)
            if why is not None:
                logger.info("head refit: %s left as it is: %s", node.name, why)
                continue
            heads.append(node)
        if not heads:
            return ir.passes.PassResult(model, modified=False)
        current = {}
        stats: dict[str, HeadStats] = {}
        for node in heads:
            wq = node.meta[WEIGHT]
            current[node.name] = np.vstack([_as_matrix(wq.dequantized(), wq.axis), _bias(node).reshape(1, -1)])
            d, n = current[node.name].shape
            if FOLDS * d * (d + n) > MAX_STAT_NUMBERS:
                logger.info("head refit: %s left as it is: %d inputs x %d outputs is too large", node.name, d - 1, n)
                continue
            stats[node.name] = HeadStats.empty(d, n)
        heads = [n for n in heads if n.name in stats]
        if not heads:
            return ir.passes.PassResult(model, modified=False)
        q_names = [f"{n.inputs[0].name}__sim" for n in heads]
        sim = simulate.build(model, extra_outputs=q_names)
        q_session = runtime.make_session(sim.proto, what="the simulated model", arena=False)
        f_names = [n.outputs[0].name for n in heads]
        f_session = float_session(model, f_names)
        samples = len(self.data) if self.samples is None else min(self.samples, len(self.data))
        image = 0
        for batch in progress.batches(self.data.head(samples, self.batch_size), "head refit", total=samples):
            qx = runtime.run(q_session, {sim.input_name: batch}, q_names)
            fy = run_batch(f_session, sim.input_name, batch, f_names)
            folds = (image + np.arange(len(batch))) % FOLDS
            image += len(batch)
            for node, x, y in zip(heads, qx, fy):
                w = current[node.name]
                for k in np.unique(folds):
                    a = _rows(node, x[folds == k].astype(np.float64))
                    a = np.hstack([a, np.ones((len(a), 1))])
                    stats[node.name].add(int(k), a, _rows(node, y[folds == k].astype(np.float64)) - a @ w)
        changed = 0
        for node in heads:
            dw, info = ridge_refit(stats[node.name], min_gain=self.min_gain)
            if dw is None:
                logger.info("head refit: %s unchanged (cross-validated error %s of the current weights')", node.name,
                            "n/a" if "cv" not in info else f"{info['cv'].min():.3f}")
                continue
            wq = node.meta[WEIGHT]
            shape = wq.q.shape
            new = current[node.name] + dw
            w = _from_matrix(new[:-1], shape, wq.axis)
            exps = weight_exponents(weight_matrix(w, wq.axis), wq.bits)
            wq.set_codes(quantize(w, channel_view(exps, w.ndim, wq.axis), wq.bits, True), exps)
            wq.bias = new[-1].copy()
            wq.methods.append("refit_head")
            legalize_bias(node, wq, node.inputs[0].meta[ACT].exp)
            rounded = np.vstack([_as_matrix(wq.dequantized(), wq.axis), _bias(node).reshape(1, -1)])
            s = stats[node.name]
            after = _error(s.gram.sum(0), s.cross.sum(0), info["base"], rounded - current[node.name])
            logger.info("head refit: %s, ridge strength %g: cross-validated error %.3f, calibration error %.3f of "
                        "the current weights' (after rounding)", node.name, info["strength"], info["cv"].min(),
                        after / info["base"])
            changed += 1
        return ir.passes.PassResult(model, modified=bool(changed))
