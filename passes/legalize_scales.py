"""Make every requantization an integer shift, and every int32 bias fit.

Guarantees after the pass:

* All values of a sharing group (MaxPool, Flatten, Reshape, Pad, Concat inputs and outputs) have one
  exponent (pot_scales chose it; a pass that broke that is an error here), so those ops need no
  requantization at all.
* Every weighted op has ``bias_q``: its bias as int32 at scale ``2**(e_in + e_w[c])``, the scale of its
  accumulator, and below ``2**22`` in magnitude.  A bias that large belongs to a near-dead channel (BN folding
  left weights around 2^-28 next to an O(1) bias: MobileNetV1 had biases of 2^31 accumulator LSBs and 29-bit
  requant shifts).  Such a channel's weight exponent is raised until the bias fits (and the channel
  re-rounded): its weights' share of the output was far below one output LSB, and the accumulator keeps the
  headroom that int32 hardware and onnxruntime's float32 path (exact to 2^24) need.
* Conv/Gemm/MatMul requantization ``2**(e_in + e_w[c] - e_out)`` and Add operand alignment are shifts by
  construction, since every scale is a power of two.
"""

from __future__ import annotations

__all__ = ["LegalizeScalesPass", "legalize_bias"]

import logging

import numpy as np
import onnx_ir as ir

from ptqc.annotations import ACT, WEIGHT
from ptqc.errors import PtqcError
from ptqc.passes.fold_batchnorm import const
from ptqc.passes.pot_scales import channel_view
from ptqc.quant import quantize_offset

logger = logging.getLogger(__name__)

INT32_MAX = 2**31 - 1
#: largest |bias| in accumulator LSBs: leaves 2^24 - 2^22 for the products, within float32's exact range
BIAS_LIMIT = 2**22


class LegalizeScalesPass(ir.passes.InPlacePass):
    """Shared exponents for scale-sharing groups; int32 biases at the accumulator scale."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        values = [v for v in graph.inputs if ACT in v.meta]
        values += [v for node in graph for v in node.outputs if ACT in v.meta]
        groups: dict[int, set[int]] = {}
        for v in values:
            groups.setdefault(v.meta[ACT].group, set()).add(v.meta[ACT].exp)
        split = [g for g, exps in groups.items() if len(exps) != 1]
        if split:
            raise PtqcError(f"internal: {len(split)} scale-sharing groups have more than one exponent")
        raised = 0
        for node in graph:
            wq = node.meta.get(WEIGHT)
            if wq is None:
                continue
            act_in = node.inputs[0].meta.get(ACT)
            if act_in is None or act_in.exp is None:
                raise PtqcError(f"layer {node.name}: its input {node.inputs[0].name} has no quantizer")
            raised += legalize_bias(node, wq, act_in.exp)
        logger.info("%d channel exponents raised to keep biases below 2^22 accumulator LSBs", raised)
        return ir.passes.PassResult(model, modified=True)


def legalize_bias(node: ir.Node, wq, e_in: int) -> int:
    """Set ``wq.bias_q`` (int32 at the accumulator scale, below ``BIAS_LIMIT``), raising the exponent of a channel
    whose bias would not fit; how many channels were raised."""
    w = const(node.inputs[1]).astype(np.float64)
    b = wq.bias
    raised_rows = np.zeros(wq.exps.shape, dtype=bool)
    while True:
        bq = np.round(b * np.exp2(-(e_in + wq.exps.astype(np.float64))))
        over = np.abs(bq) >= BIAS_LIMIT
        if not over.any():
            break
        wq.exps = wq.exps + over.astype(np.int64)
        raised_rows |= over
    if raised_rows.any():
        # re-round only the channels whose grid changed; the others keep their (e.g. GPTQ) codes
        # (a coarser container step is a coarser grid step: the offsets stay)
        k, e, z = wq.codes()
        fresh = quantize_offset(w, channel_view(e, w.ndim, wq.axis), channel_view(z, w.ndim, wq.axis), wq.bits)
        wq.set_codes(np.where(channel_view(raised_rows, w.ndim, wq.axis), fresh, k), e, wq.offset)
    raised = int(raised_rows.sum())
    if raised:
        wq.methods.append(f"bias_limit({raised} channels coarser)")
    wq.bias_q = bq.astype(np.int64)
    return raised
