"""Stretch a bounded activation (ReLU6) so its clip bound is exactly the power-of-two grid's top.

A power-of-two grid rarely ends at a clip bound: for ReLU6 at 8 bits the grid is ``2^-5 * [0, 255]``, which
reaches 7.97, so the bound 6 needs an extra integer Clip at code 192, and codes 193-255 go unused.  Clip is
positively homogeneous: ``Clip(a*y, 0, 6a) = a * Clip(y, 0, 6)`` for ``a > 0``.  Where a fused Clip's
producer and all its consumers are weighted layers, the pass guarantees:

* the producer's weights and bias are multiplied by ``a = top / hi`` (``top`` = the grid's largest value)
  and every consumer's weights divided by ``a``, so the network computes the same function;
* the clip bound becomes ``top``, so the quantizer's own saturation is the clip: no integer Clip op, and the
  full code range spans [0, hi];
* the activation's exponent is fixed (``meta[ACT].exp``) and its per-channel mean rescaled.

With ``continuous=True``, tensors below 8 bits go further: any fused Relu/Clip output between weighted layers
gets the least-squares clipping threshold found on a continuous search (not only the 2^e * qmax values), and
the same rescaling puts it on the grid's top (or the threshold ``learn_clip_ranges`` learned, when it did).  This is the "absorb the non-power-of-two part of the scale
into the weights" equalization: clipping ranges become continuous while every scale stays 2^e.
"""

from __future__ import annotations

__all__ = ["AbsorbClipRangePass", "saturate_at_top", "scale_output_channels", "scale_weights"]

import logging

import numpy as np
import onnx_ir as ir

from ptqc.annotations import ACT, CLIP, HIST, MEAN, WEIGHT, group_sizes
from ptqc.passes.fold_batchnorm import const, new_initializer
from ptqc.passes.pot_scales import channel_view
from ptqc.quant import int_range

logger = logging.getLogger(__name__)


def scale_weights(graph: ir.Graph, node: ir.Node, factor: float | np.ndarray, suffix: str = "eq") -> None:
    """Multiply a weighted layer's weight initializer by ``factor`` (a scalar, or an array that broadcasts
    against the weight)."""
    w = const(node.inputs[1])
    name = node.name or node.outputs[0].name
    node.replace_input_with(1, new_initializer(graph, f"{name}_W_{suffix}", (w.astype(np.float64) * factor).astype(w.dtype)))


def scale_output_channels(graph: ir.Graph, node: ir.Node, factor: float | np.ndarray, suffix: str = "eq") -> None:
    """Multiply a weighted layer's output channels by ``factor`` (a scalar or one per channel): its weight
    rows, its planned bias and its bias initializer.  Before an activation that is positively homogeneous,
    the activation's output is scaled the same way."""
    wq = node.meta[WEIGHT]
    w = const(node.inputs[1])
    scale_weights(graph, node, factor if np.ndim(factor) == 0 else channel_view(np.asarray(factor), w.ndim, wq.axis), suffix)
    wq.bias = wq.bias * factor
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b = const(node.inputs[2])
        name = node.name or node.outputs[0].name
        scaled = (b.astype(np.float64).reshape(-1) * factor).astype(b.dtype).reshape(b.shape)
        node.replace_input_with(2, new_initializer(graph, f"{name}_B_{suffix}", scaled))


def saturate_at_top(graph: ir.Graph, v: ir.Value, top: float, e: int, factor: float | np.ndarray) -> None:
    """After ``v`` was scaled by ``factor`` (scalar or per channel): its exponent is ``e``, its fused Clip bound
    is ``top`` (the grid's top, so saturation is the clip), and its recorded rescale and channel means follow."""
    act = v.meta[ACT]
    if act.fused.op_type == "Clip" and len(act.fused.inputs) > 2 and act.fused.inputs[2] is not None:
        act.fused.replace_input_with(2, new_initializer(graph, f"{v.name}_clip_max", np.array(top, np.float32)))
    act.clip_hi = top
    act.exp = e
    act.rescale = act.rescale * factor
    if MEAN in v.meta:
        v.meta[MEAN] = v.meta[MEAN] * factor


class AbsorbClipRangePass(ir.passes.InPlacePass):
    """Scale weights around fused Clip(0, hi) so that hi lands on the top of the power-of-two grid."""

    def __init__(self, act_method: str = "auto", continuous: bool = False):
        super().__init__()
        self.act_method = act_method
        self.continuous = continuous

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        values = [v for node in graph for v in node.outputs if ACT in v.meta]
        group_size = group_sizes(graph)
        count = 0
        for v in values:
            act = v.meta[ACT]
            if act.exp is not None:
                continue  # equalize_channels already put this tensor on its grid
            continuous = self.continuous and act.bits < 8 and act.fused is not None and not act.signed
            if not continuous and (act.fused is None or act.clip_hi is None or act.clip_hi <= 0 or (act.clip_lo or 0) < 0):
                continue
            producer = act.fused.inputs[0].producer()
            if producer is None or WEIGHT not in producer.meta or group_size[act.group] != 1:
                continue
            if not v.uses() or not all(WEIGHT in u.node.meta and u.idx == 0 for u in v.uses()):
                continue
            qmax = int_range(act.bits, act.signed)[1]
            if continuous:
                # the least-squares clipping threshold, anywhere (not only at 2^e * qmax), below the bound,
                # unless learn_clip_ranges found a better one for the block around it
                bound = v.meta.get(CLIP) or v.meta[HIST].best_clip(act.bits, act.signed, upper=act.clip_hi)
                if bound <= 0:
                    continue
                e = int(np.ceil(np.log2(bound / qmax)))
            else:
                bound = act.clip_hi
                e = v.meta[HIST].best_exponent(act.bits, act.signed, method=self.act_method)
            top = qmax * 2.0**e
            if top <= bound:
                continue  # the grid already saturates below the bound: no Clip needed
            alpha = top / bound
            scale_output_channels(graph, producer, alpha)
            for consumer in {u.node for u in v.uses()}:
                scale_weights(graph, consumer, 1.0 / alpha)
            saturate_at_top(graph, v, top, e, alpha)
            producer.meta[WEIGHT].methods.append("absorb_clip_range")
            count += 1
        logger.info("absorbed the clip range of %d activations into weights", count)
        return ir.passes.PassResult(model, modified=bool(count))
