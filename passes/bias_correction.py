"""Compensation bias: cancel the mean output error that weight rounding causes.

With integer weights ``Q`` standing in for float weights ``W``, a layer's output shifts on average by
``(Q - W) E[x]`` per output channel.  The pass guarantees that, after it, each weighted layer's float bias
is reduced by exactly that amount, with ``E[x]`` the per-channel mean of the layer's input on the
calibration data (zero padding is ignored).  (The reconstruct_layers pass does the same, sequentially, with
the quantized model's input mean ``E[x~]``.)  It is the first-moment, zero-cost form of ARCQ's remainder
compensation (empirical bias correction, Nagel et al. 2019): one int32 bias per channel, no new ops.
"""

from __future__ import annotations

__all__ = ["BiasCorrectionPass", "expected_output_error"]

import logging

import numpy as np
import onnx_ir as ir

from ptqc.annotations import MEAN, WEIGHT
from ptqc.passes.fold_batchnorm import const

logger = logging.getLogger(__name__)


def expected_output_error(node: ir.Node, w: np.ndarray, w_hat: np.ndarray, mean_in: np.ndarray) -> np.ndarray:
    """Per-output-channel ``E[(W_hat - W) x]`` for an input with per-channel mean ``mean_in``."""
    err = w_hat - w
    if node.op_type == "Conv":
        groups = node.attributes.get_int("group", 1)
        n_out, c_per_group = err.shape[0], err.shape[1]
        taps = err.reshape(n_out, c_per_group, -1).sum(axis=2)  # (O, C/g)
        group_of = np.arange(n_out) // (n_out // groups)
        idx = group_of[:, None] * c_per_group + np.arange(c_per_group)[None, :]
        return (taps * mean_in[idx]).sum(axis=1)
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return err @ mean_in  # (N, K) @ (K,)
    return mean_in @ err  # (K,) @ (K, N)


class BiasCorrectionPass(ir.passes.InPlacePass):
    """Subtract the expected output error of weight quantization from every weighted layer's bias."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = 0
        for node in model.graph:
            wq = node.meta.get(WEIGHT)
            mean_in = node.inputs[0].meta.get(MEAN) if wq is not None else None
            if wq is None or mean_in is None or wq.q is None:
                continue
            w = const(node.inputs[1]).astype(np.float64)
            w_hat = wq.dequantized()
            wq.bias = wq.bias - expected_output_error(node, w, w_hat, mean_in)
            wq.methods.append("bias_correction")
            count += 1
        logger.info("corrected the bias of %d layers", count)
        return ir.passes.PassResult(model, modified=bool(count))
