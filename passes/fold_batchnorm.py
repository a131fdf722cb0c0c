"""Fold BatchNormalization into the layer before it.

Guarantees after the pass:

* A BatchNormalization whose input comes from a Conv, ConvTranspose or Gemm with constant weights, and
  which is that layer's only consumer, is gone: ``W' = W * g/sqrt(v+eps)`` per output channel and
  ``b' = beta + (b - mean) * g/sqrt(v+eps)``.  The result is numerically the same function.
* The folded statistics stay available as ``node.meta[ptqc.annotations.BN]`` on the layer, so later passes
  (data-free ranges, loss weighting) can use them.
* A BatchNormalization with nothing to fold into becomes a depthwise 1x1 Conv: a per-channel affine that the
  quantization passes handle like any other layer.
"""

from __future__ import annotations

__all__ = ["FoldBatchNormPass"]

import logging

import numpy as np
import onnx_ir as ir

from ptqc.annotations import BN, BnStats
from ptqc.errors import PtqcError

logger = logging.getLogger(__name__)


def const(value: ir.Value | None) -> np.ndarray | None:
    """The numpy array behind an initializer or constant, else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register a fresh initializer, with a name not used by any value yet."""
    taken = set(graph.initializers)
    base, i = name, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    array = np.array(array, copy=True, order="C")  # (ascontiguousarray would turn a scalar into shape (1,))
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    return value


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold every BatchNormalization into its producer, or turn it into a depthwise 1x1 Conv."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folded = converted = 0
        for node in list(graph):
            if node.op_type != "BatchNormalization":
                continue
            if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
                raise PtqcError(f"BatchNormalization {node.name} is in training mode; export the model for inference")
            params = [const(v) for v in node.inputs[1:5]]
            if any(p is None for p in params):
                raise PtqcError(f"BatchNormalization {node.name} has non-constant parameters")
            gamma, beta, mean, var = (p.astype(np.float64) for p in params)
            eps = float(node.attributes.get_float("epsilon", 1e-5))
            scale = gamma / np.sqrt(var + eps)
            shift = beta - mean * scale
            if self._fold(graph, node, scale, shift, BnStats(gamma, beta, mean, var, eps)):
                folded += 1
            else:
                self._to_depthwise(graph, node, scale, shift)
                converted += 1
        if folded or converted:
            logger.info("folded %d BatchNormalization nodes, %d became depthwise 1x1 convs", folded, converted)
        return ir.passes.PassResult(model, modified=bool(folded or converted))

    @staticmethod
    def _fold(graph: ir.Graph, bn: ir.Node, scale: np.ndarray, shift: np.ndarray, stats: BnStats) -> bool:
        x = bn.inputs[0]
        prev = x.producer()
        if prev is None or prev.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(x.uses()) != 1:
            return False
        if x in graph.outputs:
            return False
        w = const(prev.inputs[1])
        if w is None:
            return False
        if prev.op_type == "Gemm":
            if prev.attributes.get_int("transA", 0):
                return False
            alpha = prev.attributes.get_float("alpha", 1.0)
            beta_attr = prev.attributes.get_float("beta", 1.0)
            out_axis = 0 if prev.attributes.get_int("transB", 0) else 1
        elif prev.op_type == "ConvTranspose":
            alpha = beta_attr = 1.0
            group = prev.attributes.get_int("group", 1)
            if group != 1:
                return False
            out_axis = 1
        else:
            alpha = beta_attr = 1.0
            out_axis = 0
        n_out = w.shape[out_axis]
        if scale.shape[0] != n_out:
            return False
        bias_in = prev.inputs[2] if len(prev.inputs) > 2 else None
        b = const(bias_in)
        if bias_in is not None and b is None:
            return False
        b = np.zeros(n_out) if b is None else np.broadcast_to(b.astype(np.float64) * beta_attr, (n_out,))
        bshape = [1] * w.ndim
        bshape[out_axis] = n_out
        w_new = (w.astype(np.float64) * alpha * scale.reshape(bshape)).astype(np.float32)
        b_new = (b * scale + shift).astype(np.float32)
        name = prev.name or prev.outputs[0].name
        prev.replace_input_with(1, new_initializer(graph, f"{name}_W_bnfold", w_new))
        bias_value = new_initializer(graph, f"{name}_B_bnfold", b_new)
        if len(prev.inputs) > 2:
            prev.replace_input_with(2, bias_value)
        else:
            prev.resize_inputs(3)
            prev.replace_input_with(2, bias_value)
        if prev.op_type == "Gemm":
            prev.attributes.pop("alpha", None)
            prev.attributes.pop("beta", None)
        prev.meta[BN] = stats
        out = bn.outputs[0]
        was_output = out in graph.outputs
        out.replace_all_uses_with(prev.outputs[0], replace_graph_outputs=True)
        graph.remove(bn, safe=True)
        if was_output:
            name = out.name
            out.name = None
            prev.outputs[0].name = name
        return True

    @staticmethod
    def _to_depthwise(graph: ir.Graph, bn: ir.Node, scale: np.ndarray, shift: np.ndarray) -> None:
        x = bn.inputs[0]
        if x.shape is not None and len(x.shape) != 4:
            raise PtqcError(f"BatchNormalization {bn.name} on a rank-{len(x.shape)} tensor cannot be folded")
        c = scale.shape[0]
        name = bn.name or bn.outputs[0].name
        w = new_initializer(graph, f"{name}_affine_W", scale.reshape(c, 1, 1, 1).astype(np.float32))
        b = new_initializer(graph, f"{name}_affine_B", shift.astype(np.float32))
        conv = ir.node("Conv", [x, w, b], attributes={"group": c, "kernel_shape": [1, 1]}, name=f"{name}_affine")
        graph.insert_before(bn, conv)
        out = bn.outputs[0]
        conv.outputs[0].shape = out.shape
        conv.outputs[0].type = out.type
        out.replace_all_uses_with(conv.outputs[0], replace_graph_outputs=True)
        graph.remove(bn, safe=True)
        name = out.name
        out.name = None
        conv.outputs[0].name = name
