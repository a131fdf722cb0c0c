"""Sequential layer reconstruction: each layer fitted to the float output from its *quantized* input.

Round-to-nearest and float-input GPTQ treat each layer's input as exact.  In the quantized network it is
not: activation rounding and every earlier layer's error reach it.  For each weighted layer in topological
order, the pass guarantees:

* its statistics come from a simulation (``ptqc.simulate``) in which all activations are quantized and every
  earlier layer already has its final integer weights and bias: ``E[x~ x~^T]``, ``E[x~ x^T]``, ``E[x x^T]``
  with ``x~`` that input and ``x`` the float model's;
* its integer weights are GPTQ's solution (floor/ceil space, per-channel exponent from {e-1, e, e+1}) for the
  target ``W* = W C^T H~^-1`` under the metric ``H~`` (methods.md 6.2, ``target="asym"``), or under QDrop's
  expectation of that loss (6.4, ``target="qdrop"``);
* its bias then removes the remaining mean error: ``b' = b - (E[W_hat x~] - E[W x])``.

Later layers are measured after earlier ones are fixed, so no error is compensated twice.  One onnxruntime
session serves all layers (weights are graph inputs); each layer costs one run of the float and one of the
simulated model over ``samples`` images.
"""

from __future__ import annotations

__all__ = ["ReconstructLayersPass"]

import logging

import numpy as np
import onnx_ir as ir

from ptqc import progress, simulate
from ptqc.annotations import WEIGHT
from ptqc.data import Dataset
from ptqc.hessian import PairedMoment, for_layer, gptq_pot, row_loss
from ptqc.passes.bias_correction import expected_output_error
from ptqc.passes.calibrate import channel_sum
from ptqc.passes.fold_batchnorm import const
from ptqc.passes.gptq_rounding import grouped, ungrouped
from ptqc.quant import weight_exponents

logger = logging.getLogger(__name__)


class ReconstructLayersPass(ir.passes.InPlacePass):
    """GPTQ + bias correction per layer, in order, on quantized-input statistics."""

    def __init__(self, data: Dataset, batch_size: int = 16, samples: int = 128, target: str = "asym",
                 exponent_search: bool = True):
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.samples = samples
        self.target = target
        self.search = (-1, 0, 1) if exponent_search else (0,)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        layers = [n for n in graph if WEIGHT in n.meta and n.meta[WEIGHT].q is not None and for_layer(n) is not None]
        if not layers:
            return ir.passes.PassResult(model, modified=False)
        # decoded once; each layer's inputs are moved on from the previous layer's
        stream = simulate.CutInputs(model, layers, quantized=False,
                                    batches=list(self.data.head(self.samples, self.batch_size)))
        before = after = 0.0
        for node in progress.steps(layers, "reconstruct", unit="layer"):
            moment = for_layer(node, PairedMoment)
            mean_q = mean_f = 0.0
            n = 0
            stream.advance(node.inputs[0].name)
            for x_q, x_f in zip(stream.x_q, stream.x_f):
                moment.add_pair(x_q, x_f)
                mean_q = mean_q + channel_sum(x_q)
                mean_f = mean_f + channel_sum(x_f)
                n += len(x_q)
            b, a = self._solve(node, moment)
            before, after = before + b, after + a
            wq = node.meta[WEIGHT]
            w = const(node.inputs[1]).astype(np.float64)
            w_hat = wq.dequantized()
            zero = np.zeros_like(w)
            wq.bias = wq.bias - (expected_output_error(node, zero, w_hat, mean_q / n)
                                 - expected_output_error(node, zero, w, mean_f / n))
            wq.methods.append(f"reconstruct_{self.target}+bias")
            stream.fix(node)
        logger.info("reconstructed %d layers (%s target): summed layer loss %.4g -> %.4g", len(layers), self.target,
                    before, after)
        model.graph.meta["ptqc.gptq_loss"] = (before, after)
        return ir.passes.PassResult(model, modified=True)

    def _solve(self, node: ir.Node, moment: PairedMoment) -> tuple[float, float]:
        wq = node.meta[WEIGHT]
        w = const(node.inputs[1]).astype(np.float64)
        wg, g = grouped(node, w, wq.axis)
        metric, target = moment.target(wg, self.target)
        # the target's own least-squares exponents: W* differs from W (it maps rounded inputs to float outputs)
        exps = weight_exponents(target.reshape(-1, target.shape[2]), wq.bits).reshape(g, -1)
        rtn = grouped(node, wq.dequantized(), wq.axis)[0]
        codes, new_exps, z = gptq_pot(target, metric, exps, wq.bits, self.search, wq.offsets)
        before = float(row_loss(target, rtn, metric).sum())
        after = float(row_loss(target, (codes + z[:, :, None]) * np.exp2(new_exps.astype(np.float64))[:, :, None],
                               metric).sum())
        wq.set_codes(ungrouped(node, codes, w.shape, wq.axis), new_exps.reshape(-1), z.reshape(-1))
        return before, after
