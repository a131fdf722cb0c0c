"""Choose power-of-two scales: one exponent per weight output channel, one per activation tensor.

Guarantees after the pass:

* Every weighted op's ``meta[WEIGHT]`` has ``exps`` (one integer per output channel) and ``q``, the weights
  rounded to nearest on the grid ``2**exps`` within the signed ``bits`` range.  Each exponent is the one with
  the least squared weight error among the no-clip exponent and five finer ones, not the max rounded up.
  With ``weight_offsets``, an inner layer of at most ``offset_bits`` (<= 6) bits also gets each channel's grid
  offset z (``meta[WEIGHT].offset``, values ``2^e (k + z)``, stored at half the step when z is half-integer)
  from those candidates, by the same error, and ``meta[WEIGHT].offsets`` names the candidates later rounding
  passes may choose from.
* Every planned activation's ``meta[ACT].exp`` is set, one exponent per scale-sharing group (MaxPool,
  Flatten, Reshape, Pad, Concat inputs and outputs), so those ops need no requantization: by default the
  exponent with the least squared error on the group's merged calibration histogram (rounding and clipping
  error both counted) below 8 bits, and the no-clip exponent at 8 bits.  Exponents an earlier pass fixed
  are kept.
"""

from __future__ import annotations

__all__ = ["PotScalesPass", "weight_matrix"]

import logging

import numpy as np
import onnx_ir as ir

from ptqc.annotations import ACT, HIST, WEIGHT
from ptqc.passes.fold_batchnorm import const
from ptqc.quant import quantize, quantize_offset, weight_exponents, weight_grids

logger = logging.getLogger(__name__)


def weight_matrix(w: np.ndarray, axis: int) -> np.ndarray:
    """The weight as (output channels, everything else)."""
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def channel_view(exps: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Per-channel values shaped to broadcast against a weight tensor of rank ``ndim``."""
    shape = [1] * ndim
    shape[axis] = -1
    return exps.reshape(shape)


class PotScalesPass(ir.passes.InPlacePass):
    """Least-squares power-of-two exponents for weights (per channel) and activations (per tensor)."""

    def __init__(self, act_method: str = "auto", weight_offsets: tuple[float, ...] = (0.0,), offset_bits: int = 6):
        super().__init__()
        self.act_method = act_method
        self.weight_offsets = tuple(weight_offsets)
        self.offset_bits = min(offset_bits, 6)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        n_w = n_a = 0
        for node in graph:
            wq = node.meta.get(WEIGHT)
            if wq is None:
                continue
            w = const(node.inputs[1]).astype(np.float64)
            if wq.bits <= self.offset_bits and not wq.role and len(self.weight_offsets) > 1:
                # the container holds 2k + 2z for a half-integer z: inside int8 up to 6 bits.  The first and
                # last layers keep the plain 8-bit grid (the first one's pair-safe 7-bit grid needs |w| <= 64)
                wq.offsets = self.weight_offsets
                e, z = weight_grids(weight_matrix(w, wq.axis), wq.bits, self.weight_offsets)
                k = quantize_offset(w, channel_view(e, w.ndim, wq.axis), channel_view(z, w.ndim, wq.axis), wq.bits)
                wq.set_codes(k, e, z)
            else:
                wq.exps = weight_exponents(weight_matrix(w, wq.axis), wq.bits)
                wq.q = quantize(w, channel_view(wq.exps, w.ndim, wq.axis), wq.bits, True)
            n_w += 1
        values = [v for v in graph.inputs if ACT in v.meta]
        values += [v for node in graph for v in node.outputs if ACT in v.meta]
        groups: dict[int, list[ir.Value]] = {}
        for v in values:
            groups.setdefault(v.meta[ACT].group, []).append(v)
        for members in groups.values():
            fixed = [v.meta[ACT].exp for v in members if v.meta[ACT].exp is not None]
            if fixed:  # an earlier pass fixed it
                exp = fixed[0]
            else:
                merged = members[0].meta[HIST]
                for v in members[1:]:
                    merged = merged.merge(v.meta[HIST])
                act = members[0].meta[ACT]
                exp = merged.best_exponent(act.bits, act.signed, method=self.act_method)
            for v in members:
                v.meta[ACT].exp = exp
            n_a += len(members)
        logger.info("chose exponents for %d weighted layers and %d activations", n_w, n_a)
        return ir.passes.PassResult(model, modified=True)
