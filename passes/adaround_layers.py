"""AdaRound per layer, in order, through the layer's activation and facing its quantized input (QDrop mix).

GPTQ (the default) fits each layer's linear output to float inputs.  This pass refines the low-bit layers
after it, one at a time in topological order.  For each layer it guarantees:

* its inputs come from a simulation (``ptqc.simulate``) in which all activations are quantized and every
  earlier layer already has its final integer weights and bias; the target is the float model's output;
* its integer weights are AdaRound's (``ptqc.adaround``): each code at the floor or the ceiling of ``W/s`` on
  the power-of-two grid GPTQ chose, started from GPTQ's rounding direction, learned with Adam on the error
  *after* the fused Relu/Clip and the output grid's saturation, with QDrop's random mix of quantized and
  float inputs; its float bias is learned with them;
* on the quantized calibration input, the layer's error is never above that of its starting codes and bias
  (otherwise those are kept).

8-bit layers keep GPTQ's codes.  With ``outside_blocks``, so do the layers ``reconstruct_blocks`` will learn
again (it starts from the codes it is given, and learns them against the block output): AdaRound then only
refines the low-bit layers no block reaches.  Each layer costs one run of the float and of the simulated model over
``samples`` images, plus ``iters`` Adam steps of two matmuls on ``batch`` sampled patch rows.
"""

from __future__ import annotations

__all__ = ["AdaRoundLayersPass", "output_bounds"]

import logging

import numpy as np
import onnx_ir as ir

from ptqc import progress, simulate
from ptqc.adaround import adaround
from ptqc.annotations import ACT, FUSABLE_ACTS, WEIGHT
from ptqc.data import Dataset
from ptqc.hessian import for_layer
from ptqc.passes.fold_batchnorm import const
from ptqc.passes.gptq_rounding import grouped, ungrouped
from ptqc.passes.reconstruct_blocks import reconstructed_blocks
from ptqc.quant import int_range

logger = logging.getLogger(__name__)


def output_bounds(node: ir.Node) -> tuple[float | None, float | None]:
    """The range a weighted layer's output can take once quantized: its fused Relu/Clip bounds intersected
    with the output grid's saturation (None: unbounded on that side)."""
    out = node.outputs[0]
    value = out if ACT in out.meta else None
    uses = out.uses()
    if value is None and len(uses) == 1 and uses[0].node.op_type in FUSABLE_ACTS:
        candidate = uses[0].node.outputs[0]
        if ACT in candidate.meta and candidate.meta[ACT].fused is uses[0].node:
            value = candidate
    if value is None:
        return None, None
    act = value.meta[ACT]
    lo, hi = act.clip_lo, act.clip_hi
    if act.exp is not None:
        qlo, qhi = int_range(act.bits, act.signed)
        lo = qlo * 2.0**act.exp if lo is None else max(lo, qlo * 2.0**act.exp)
        hi = qhi * 2.0**act.exp if hi is None else min(hi, qhi * 2.0**act.exp)
    return lo, hi


class AdaRoundLayersPass(ir.passes.InPlacePass):
    """Refine low-bit layers' codes and biases by AdaRound on quantized-input, post-activation error."""

    def __init__(self, data: Dataset, batch_size: int = 16, samples: int = 64, iters: int = 100,
                 rows: int = 16384, batch: int = 1024, seed: int = 0, outside_blocks: bool = False):
        super().__init__()
        self.outside_blocks = outside_blocks
        self.data = data
        self.batch_size = batch_size
        self.samples = samples
        self.iters = iters
        self.rows = rows
        self.batch = batch
        self.seed = seed

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        quantized = [n for n in graph if WEIGHT in n.meta and n.meta[WEIGHT].q is not None]
        layers = [n for n in quantized if n.meta[WEIGHT].bits < 8 and for_layer(n) is not None]
        if self.outside_blocks:
            inside = {id(n) for b, _ in reconstructed_blocks(graph) for n in b.layers}
            logger.info("AdaRound leaves %d layers to block reconstruction",
                        sum(id(n) in inside for n in layers))
            layers = [n for n in layers if id(n) not in inside]
        if not layers:
            return ir.passes.PassResult(model, modified=False)
        # decoded once; each layer's inputs are moved on from the previous layer's
        stream = simulate.CutInputs(model, quantized, quantized=True,
                                    batches=list(self.data.head(self.samples, self.batch_size)))
        rng = np.random.default_rng(self.seed)
        before = after = 0.0
        for node in progress.steps(layers, "adaround", unit="layer"):
            moment = for_layer(node)
            # a depthwise channel has d = 9 or 25 weights: 512 rows per weight settle it, and its
            # (rows, channels, taps) patches would otherwise dominate memory and time
            per_batch = -(-min(self.rows, 512 * moment.d if moment.d else self.rows) // len(stream.batches))
            xq_parts, xf_parts = [], []
            stream.advance(node.inputs[0].name)
            for x_q, x_f in zip(stream.x_q, stream.x_f):
                pq, pf = moment.columns(x_q), moment.columns(x_f)
                keep = rng.choice(pq.shape[2], size=min(per_batch, pq.shape[2]), replace=False)
                xq_parts.append(pq[:, :, keep].transpose(2, 0, 1))  # rows first, as adaround wants them
                xf_parts.append(pf[:, :, keep].transpose(2, 0, 1))
            wq = node.meta[WEIGHT]
            w = const(node.inputs[1]).astype(np.float64)
            wg, g = grouped(node, w, wq.axis)
            b0 = (const(node.inputs[2]).astype(np.float64).reshape(-1) if len(node.inputs) > 2 and node.inputs[2] is not None
                  else np.zeros(wg.shape[0] * wg.shape[1]))
            lo, hi = output_bounds(node)
            k, e, z = wq.codes()
            res = adaround(wg, e.reshape(g, -1), wq.bits, b0.reshape(g, -1), np.concatenate(xq_parts),
                           np.concatenate(xf_parts), lo, hi, init_codes=grouped(node, k, wq.axis)[0],
                           init_bias=wq.bias.reshape(g, -1), iters=self.iters,
                           batch=min(self.batch, 32 * moment.d) if moment.d else self.batch, seed=self.seed,
                           offset=z.reshape(g, -1))
            before, after = before + res.before, after + res.after
            wq.set_codes(ungrouped(node, res.codes, w.shape, wq.axis), e, wq.offset)
            wq.bias = res.bias.reshape(-1)
            wq.methods.append("adaround")
            logger.debug("%s: error on quantized input %.4g -> %.4g", node.name, res.before, res.after)
            stream.fix(node)
        logger.info("AdaRound on %d layers: summed layer error %.4g -> %.4g", len(layers), before, after)
        model.graph.meta["ptqc.adaround_loss"] = (before, after)
        return ir.passes.PassResult(model, modified=True)
